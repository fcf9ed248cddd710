"""Schema fuzzing: schemathesis drives every operation of the real server's `/openapi.json` over
HTTP with a funded key, with no key and with the admin token, and every check must pass: no
5xx, only documented statuses, content types, bodies and headers, invalid data refused,
valid data accepted, missing authentication refused.

Bounded for CI: `IMGSVC_SCHEMA_FUZZ_EXAMPLES` examples per operation and mode (default 20; run
more by hand, e.g. 200). Image fields get arbitrary bytes, which the service refuses fast
(415/422), so the file stays short on two cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import CheckFunction, load_all_checks
from schemathesis.specs.openapi import checks as openapi_checks

from tests.utils import Server, linked_weights, start_server, stop_server

ADMIN_TOKEN = "fuzz-admin-token-" + "y" * 16
EXAMPLES = int(os.environ.get("IMGSVC_SCHEMA_FUZZ_EXAMPLES", "20"))
IMAGE_OPERATIONS = (
    "/v1/remove-background",
    "/v1/upscale",
    "/v1/inpaint",
    "/v1/jobs",
    "/v1.0/removebg",
)
# Findings not fixed yet, each pinned by a strict xfail test in tests/test_fuzz_regressions.py:
# the named checks skip that operation until the fix lands (then delete the line).
OPEN_FINDINGS: dict[str, tuple[str, ...]] = {}
# Where valid data is refused by a rule no JSON Schema can state (the check is skipped there):
# image, mask and zip fields are any bytes to the schema, and a call is refused when they are
# not an image (415/422) or decode to one over a limit (413); a quote's width x height over
# IMGSVC_MAX_INPUT_PIXELS is a 413 although each side is within its bounds.
ACCEPTANCE_UNSTATABLE = (*IMAGE_OPERATIONS, "/v1/quote")
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, repo_weights: Path) -> Iterator[Server]:
    """The real service: pulled weights loaded on first use, an admin token, no rate limit."""
    tmp = tmp_path_factory.mktemp("schema-fuzz")
    weights = linked_weights(tmp / "weights", repo_weights, None)
    env = {
        "IMGSVC_PRELOAD_MODELS": "false",
        "IMGSVC_ADMIN_TOKEN": ADMIN_TOKEN,
        "IMGSVC_DEFAULT_RATE_LIMIT": "1000000/minute",
    }
    srv = start_server(tmp, weights, **env)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def funded_key(fuzz_server: Server) -> str:
    """A key with every scope (sub-keys too) and credits for any call fuzzing can make."""
    out = fuzz_server.cli(
        "keys", "create", "--name", "fuzz", "--credits", "1000000000", "--reseller"
    )
    return out.splitlines()[-1]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis's fixture-loaded schemas read `node._nodeid`, which pytest 9 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _excluded(case: Case, *, credential_sent: bool = False) -> list[CheckFunction]:
    names = set(OPEN_FINDINGS.get(case.operation.label, ()))
    if credential_sent:
        # The token goes on every call, so a negative case that drops `Authorization` (and so
        # expects a refusal) still carries it: rejection of negative data is checked in the
        # other modes, where a missing or wrong credential is refused.
        names.add("negative_data_rejection")
    if case.operation.path in ACCEPTANCE_UNSTATABLE:
        names.add("positive_data_acceptance")
    return [getattr(openapi_checks, name) for name in sorted(names)]


def _call(case: Case, headers: dict[str, str], *, credential_sent: bool = False) -> None:
    load_all_checks()
    excluded = _excluded(case, credential_sent=credential_sent)
    case.call_and_validate(headers=headers, excluded_checks=excluded, timeout=120)


@schema.parametrize()
@FUZZ_SETTINGS
def test_with_a_funded_key(case: Case, funded_key: str) -> None:
    _call(case, {"Authorization": f"Bearer {funded_key}"})


@schema.parametrize()
@FUZZ_SETTINGS
def test_without_a_key(case: Case) -> None:
    _call(case, {})


# Last: fuzzed admin calls revoke and rotate keys, the funded key among them.
@schema.parametrize()
@FUZZ_SETTINGS
def test_with_the_admin_token(case: Case) -> None:
    _call(case, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, credential_sent=True)
