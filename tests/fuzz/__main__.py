"""`python -m tests.fuzz <target> [--seconds N] [--engine atheris|random] [--corpus DIR]
[--artifacts DIR]`: fuzz one target for N seconds; exit 0 when nothing crashed.

With atheris (coverage-guided libFuzzer), `--corpus` keeps the inputs that found new code for
the next run; without it, a mutation loop over the seeds runs instead (`--engine random`).
A crash's input is written to `--artifacts` (default: `.fuzz/`) and its traceback
printed; replay it with `python -m tests.fuzz <target> --replay FILE`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

TARGET_NAMES = ("decode", "mask", "zip", "mask_boxes", "_canary")
INSTRUMENTED = ["imgsvc", "PIL", "zipfile"]


def _canary(data: bytes) -> None:
    """Crashes on purpose on inputs starting with CRASH: proves crashes are caught."""
    if data.startswith(b"CRASH"):
        raise RuntimeError("canary input")


def _load(name: str) -> tuple[Callable[[bytes], None], list[bytes]]:
    from tests.fuzz import seeds, targets

    if name == "_canary":
        return _canary, [b"CRASH", b"fine"]
    return targets.TARGETS[name], seeds.SEEDS[name]()


def _run_atheris(name: str, seconds: int, corpus: Path, artifacts: Path) -> int:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        target, seed_inputs = _load(name)
        from tests.fuzz.targets import one_input
    for data in seed_inputs:
        (corpus / f"seed-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)

    def test_one_input(data: bytes) -> None:
        one_input(target, data)

    args = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        "-timeout=30",
        "-rss_limit_mb=3072",
        "-max_len=65536",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    ]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()  # exits the process: 0 when the time is up, non-zero on a crash
    return 0


def _run_random(name: str, seconds: int, artifacts: Path, seed: int) -> int:
    from tests.fuzz.mutate import mutate
    from tests.fuzz.targets import one_input

    target, seed_inputs = _load(name)
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    runs = 0
    pool = list(seed_inputs)
    while time.monotonic() < deadline:
        data = pool[runs] if runs < len(pool) else mutate(rng, rng.choice(pool), seed_inputs)
        runs += 1
        try:
            one_input(target, data)
        except Exception:  # noqa: BLE001 - any exception one_input lets through is a crash
            path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            traceback.print_exc()
            print(f"crash after {runs} inputs; input written to {path}", file=sys.stderr)
            return 1
    print(f"{name}: {runs} inputs, no crash", file=sys.stderr)
    return 0


def _replay(name: str, path: Path) -> int:
    from tests.fuzz.targets import one_input

    target, _ = _load(name)
    one_input(target, path.read_bytes())  # a crash raises, with its traceback
    print(f"{path}: no crash", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("target", choices=TARGET_NAMES)
    parser.add_argument("--seconds", type=int, default=60)
    default_engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    parser.add_argument("--engine", choices=("atheris", "random"), default=default_engine)
    parser.add_argument("--corpus", type=Path, help="atheris: the corpus folder to grow")
    parser.add_argument("--artifacts", type=Path, default=Path(".fuzz"))
    parser.add_argument("--seed", type=int, default=0, help="random engine: the RNG seed")
    parser.add_argument("--replay", type=Path, help="run one saved input and stop")
    args = parser.parse_args(argv)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    if args.replay is not None:
        return _replay(args.target, args.replay)
    if args.engine == "random":
        return _run_random(args.target, args.seconds, args.artifacts, args.seed)
    if args.corpus is not None:
        args.corpus.mkdir(parents=True, exist_ok=True)
        return _run_atheris(args.target, args.seconds, args.corpus, args.artifacts)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{args.target}-") as corpus:
        return _run_atheris(args.target, args.seconds, Path(corpus), args.artifacts)


if __name__ == "__main__":
    sys.exit(main())
