"""A funded development key exists only when asked for (`imgsvc serve --dev-key`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.utils import start_server, stop_server


@pytest.mark.parametrize("flag", [False, True])
def test_dev_key_only_with_the_flag(tmp_path: Path, flag: bool) -> None:
    args = ("--dev-key",) if flag else ()
    server = start_server(tmp_path, tmp_path / "weights", *args, IMGSVC_PRELOAD_MODELS="false")
    try:
        listed = server.cli("keys", "list").splitlines()[1:]  # below the header
    finally:
        stop_server(server)
    log = server.log.read_text()
    if flag:
        assert len(listed) == 1 and "\tdev\t" in listed[0]
        assert "isk_" in log and "1000 credits" in log
    else:
        assert listed == []  # an empty database stays empty: no key, nothing printed
        assert "isk_" not in log
