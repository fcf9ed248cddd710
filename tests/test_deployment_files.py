"""docker-compose.yml read against the code it runs (there is no Docker daemon to run it)."""

from __future__ import annotations

import re
import socket

import yaml

from imgsvc.cli import build_parser
from imgsvc.config import Settings
from imgsvc.jobs.worker import default_name
from tests.utils import REPO


def compose() -> dict[str, dict[str, dict[str, object]]]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def test_every_variable_in_compose_is_a_setting() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    names = set(re.findall(r"\b(IMGSVC_[A-Z0-9_]+)\b", text))
    fields = {f"IMGSVC_{name.upper()}" for name in Settings.model_fields}
    assert names and names <= fields, names - fields


def test_api_and_worker_share_the_job_folder_and_the_fleet_services() -> None:
    services = compose()["services"]
    api, worker = services["api"], services["worker"]
    for svc in (api, worker):
        env = dict(svc["environment"])  # type: ignore[call-overload]
        assert env["IMGSVC_BROKER_URL"].startswith("amqp://")
        assert env["IMGSVC_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert f"jobs:{env['IMGSVC_JOBS_DIR']}" in svc["volumes"]  # type: ignore[operator]
    for name in ("postgres", "rabbitmq", "redis"):
        assert "healthcheck" in services[name]


def test_the_worker_command_parses_and_its_healthcheck_names_the_worker() -> None:
    worker = compose()["services"]["worker"]
    command = list(worker["command"])  # type: ignore[call-overload]
    assert command[0] == "imgsvc"
    args = build_parser().parse_args(command[1:])
    operations = args.operations.split(",")
    check = " ".join(worker["healthcheck"]["test"])  # type: ignore[index]
    expected = default_name(operations).replace(socket.gethostname(), "$$HOSTNAME")
    assert expected in check


def test_rabbitmq_waits_longer_than_the_longest_item() -> None:
    conf = (REPO / "deploy" / "rabbitmq.conf").read_text()
    timeout_ms = int(re.search(r"consumer_timeout\s*=\s*(\d+)", conf).group(1))  # type: ignore[union-attr]
    assert timeout_ms > Settings().job_item_timeout_seconds * 1000
