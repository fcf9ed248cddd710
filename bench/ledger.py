"""Ledger capacity: charged calls per second the metering path sustains, many clients at once.

    python bench/ledger.py                        # in-process and HTTP, SQLite and PostgreSQL
    python bench/ledger.py --mode inproc --baseline HEAD --rounds 3   # old and new code in turns
    python bench/ledger.py --quick                # a few seconds, to check it works

in-process (`--mode inproc`): `Meter.hold` → `Charge.capture`, the path every charged call
takes (the hold: conditional balance UPDATE, hold row, ledger row; the capture: hold settled,
ledger row, usage row, remaining balance), from `--clients` threads, without HTTP and without
any model, on SQLite (a temporary file) and PostgreSQL (a throw-away database on the local
server). Accounts: `one` (every client spends the same balance: one hot row) and `each` (a
key and account per client).

HTTP (`--mode http`): the real server (`imgsvc serve`, a subprocess) and the cheapest charged
call there is: `POST /v1/inpaint` erasing 4 pixels of an 8x8 PNG (no model weights, ~0.2 ms of
work), from `--clients` asyncio keep-alive clients, one key each. On PostgreSQL the rate limits
are in the local Redis, as on a fleet.

Every run is reconciled: calls answered == usage rows == credits spent / price, no hold left
unsettled, `ledger_mismatches` empty, no error. Reported per run: calls/s; SQL statements per
call (what SQLAlchemy sends; in-process only); transactions per call (PostgreSQL: committed
transactions of the database as the server counts them, connection pings included; SQLite:
commits); CPU milliseconds per call of the client process (in-process) or the server process
(HTTP), and of the PostgreSQL backends serving the database.

`--baseline REF` exports `imgsvc/` at git REF to a temporary folder and measures that code in
turns with the working tree's (ABBA order over `--rounds`), each run on a fresh database, so
both meet the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Appended, not prepended: a worker of another commit's code (`--baseline`, on PYTHONPATH)
# still imports that `imgsvc`.
sys.path.append(str(REPO))

from bench.scratch import PG_ADMIN, REDIS, database  # noqa: E402

PRICE = 10  # credits per call (the erase price; in-process calls charge the same)
GRANT = 10**9
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One measured run of one code tree on one database."""

    mode: str
    database: str
    code: str
    accounts: str
    clients: int
    seconds: float = 0.0
    calls: int = 0
    errors: int = 0
    statements_per_call: float = 0.0
    transactions_per_call: float = 0.0
    client_cpu_ms_per_call: float = 0.0
    server_cpu_ms_per_call: float = 0.0
    postgres_cpu_ms_per_call: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


# --- machine accounting ----------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class PostgresWork:
    """CPU seconds of the PostgreSQL backends serving one database, and its committed
    transactions (pings included), from `start()` to `stop()`.

    The backends' pids are sampled every 0.2 s (pooled connections come and go); each one's
    CPU counts from its start, as every backend of a fresh database starts within the run.
    """

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine

        self.name = url.rsplit("/", 1)[1]
        self._admin = create_engine(PG_ADMIN, pool_size=1)
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.cpu_s = 0.0
        self.transactions = 0

    def _query(self, sql: str) -> list[Any]:
        from sqlalchemy import text

        with self._admin.connect() as conn:
            return list(conn.execute(text(sql), {"n": self.name}).scalars())

    def _pids(self) -> list[int]:
        return [int(p) for p in self._query("SELECT pid FROM pg_stat_activity WHERE datname = :n")]

    def _commits(self) -> int:
        self._query("SELECT pg_stat_clear_snapshot()")
        return int(self._query("SELECT xact_commit FROM pg_stat_database WHERE datname = :n")[0])

    def _sample(self) -> None:
        while True:
            for pid in self._pids():
                self._cpu[pid] = max(self._cpu.get(pid, 0.0), proc_cpu_s(pid))
            if self._stop.wait(0.2):
                return

    def start(self) -> PostgresWork:
        self._commits0 = self._commits()
        self._cpu0 = {pid: proc_cpu_s(pid) for pid in self._pids()}
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for pid in self._pids():
            self._cpu[pid] = max(self._cpu.get(pid, 0.0), proc_cpu_s(pid))
        self.cpu_s = sum(cpu - self._cpu0.get(pid, 0.0) for pid, cpu in self._cpu.items())
        time.sleep(1.1)  # the statistics reach pg_stat_database within a second
        self.transactions = self._commits() - self._commits0
        self._admin.dispose()


# --- databases -------------------------------------------------------------------------------


@contextmanager
def code_tree(ref: str | None) -> Iterator[Path]:
    """The repository root (ref None), a folder holding another `imgsvc/` (ref a path), or
    `imgsvc/` of git `ref` exported to a temporary folder."""
    if ref is None:
        yield REPO
        return
    if Path(ref, "imgsvc").is_dir():
        yield Path(ref).resolve()
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "imgsvc"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def tree_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


# --- reconciliation (read with the working tree's schema: the tables are the same) -----------


def reconcile(url: str, *, calls: int, spent: int, key_ids: list[int]) -> list[str]:
    """What disagrees between the calls answered and the books; empty = clean."""
    from sqlalchemy import func, select

    from imgsvc.billing import metering
    from imgsvc.billing.db import Database
    from imgsvc.billing.schema import Account, ApiKey, Hold, UsageEvent

    db = Database(url)
    problems = list(metering.ledger_mismatches(db))
    with db.read() as s:
        rows = int(
            s.scalar(
                select(func.count()).select_from(UsageEvent).where(UsageEvent.key_id.in_(key_ids))
            )
            or 0
        )
        charged = int(
            s.scalar(
                select(func.coalesce(func.sum(UsageEvent.credits), 0)).where(
                    UsageEvent.key_id.in_(key_ids)
                )
            )
            or 0
        )
        held = int(
            s.scalar(select(func.count()).select_from(Hold).where(Hold.status == "held")) or 0
        )
        accounts = select(ApiKey.account_id).where(ApiKey.id.in_(key_ids))
        balances = s.scalars(select(Account.credits).where(Account.id.in_(accounts))).all()
    db.dispose()
    spent_books = len(balances) * GRANT - sum(balances)
    if rows != calls:
        problems.append(f"{calls} calls answered but {rows} usage rows")
    if charged != spent or spent_books != spent:
        problems.append(f"charged {spent}, usage rows say {charged}, balances say {spent_books}")
    if held:
        problems.append(f"{held} hold(s) left unsettled")
    return problems


# --- in-process: Meter.hold → Charge.capture from threads ------------------------------------


def inproc_worker(url: str, clients: int, seconds: float, accounts: str) -> dict[str, Any]:
    """Runs in a subprocess whose PYTHONPATH selects the code tree; returns its figures."""
    from sqlalchemy import Engine, event

    import imgsvc
    from imgsvc.billing import keys
    from imgsvc.billing.charge import Meter
    from imgsvc.billing.db import Database
    from imgsvc.billing.metering import UsageRecord

    db = Database(url)
    db.migrate()
    n_keys = 1 if accounts == "one" else clients
    infos = [keys.create_key(db, name=f"ledger-{i}", credits=GRANT)[0] for i in range(n_keys)]
    meter = Meter(db, hold_ttl=timedelta(seconds=120))
    usage = UsageRecord("inpaint", "bench", (8, 8), (8, 8), 0, "bench")
    counts = {"statements": 0, "commits": 0}

    def count_statement(conn: Any, *_: Any) -> None:
        if conn.engine.url.database == db.engine.url.database:  # not the statistics' queries
            counts["statements"] += 1

    def count_commit(conn: Any) -> None:
        counts["commits"] += 1

    calls = [0] * clients
    errors: list[str] = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        key = infos[i % n_keys]
        start.wait()
        n = 0
        while time.monotonic() < stop_at[0]:
            rid = f"c{i}-{n}"
            n += 1
            try:
                with meter.hold(
                    key=key, credits=PRICE, request_id=rid, price_version="bench"
                ) as charge:
                    charge.capture(credits=PRICE, usage=usage)
                calls[i] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    # Every engine of the process: the code may keep more than one for the database.
    event.listen(Engine, "before_cursor_execute", count_statement)
    event.listen(Engine, "commit", count_commit)
    postgres = PostgresWork(url).start() if db.dialect == "postgresql" else None
    cpu0 = time.process_time()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    event.remove(Engine, "before_cursor_execute", count_statement)
    event.remove(Engine, "commit", count_commit)
    meter.close()
    db.dispose()  # the backends end and hand in their statistics
    if postgres is not None:
        postgres.stop()
    total = sum(calls)
    return {
        "imgsvc": str(Path(imgsvc.__file__).parent),
        "seconds": elapsed,
        "calls": total,
        "errors": errors[:5],
        "error_count": len(errors),
        "statements": counts["statements"],
        "transactions": counts["commits"] if postgres is None else postgres.transactions,
        "cpu_s": cpu,
        "postgres_cpu_s": 0.0 if postgres is None else postgres.cpu_s,
        "key_ids": [k.id for k in infos],
    }


def run_inproc(
    tree: Path, label: str, kind: str, clients: int, seconds: float, accounts: str
) -> Run:
    run = Run("inproc", kind, label, accounts, clients)
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp), "imgsvc_bench") as url:
        out = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "_inproc",
                url,
                str(clients),
                str(seconds),
                accounts,
            ],
            env=tree_env(tree),
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"in-process run failed:\n{out.stderr[-3000:]}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        if not figures["imgsvc"].startswith(str(tree)):
            raise RuntimeError(f"ran {figures['imgsvc']}, not the code of {tree}")
        calls = int(figures["calls"])
        run.seconds, run.calls, run.errors = figures["seconds"], calls, figures["error_count"]
        run.problems = [*figures["errors"]]
        per = max(calls, 1)
        run.statements_per_call = figures["statements"] / per
        run.transactions_per_call = figures["transactions"] / per
        run.client_cpu_ms_per_call = figures["cpu_s"] * 1000 / per
        run.postgres_cpu_ms_per_call = figures["postgres_cpu_s"] * 1000 / per
        run.problems += reconcile(url, calls=calls, spent=calls * PRICE, key_ids=figures["key_ids"])
    return run


# --- HTTP: the real server and the cheapest charged call -------------------------------------


def _png(
    mode: str, color: int | tuple[int, int, int], box: tuple[int, int, int, int] | None
) -> bytes:
    from PIL import Image

    img = Image.new(mode, (8, 8), color)
    if box is not None:
        img.paste(255, box)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


async def _http_clients(url: str, secrets_: list[str], seconds: float) -> tuple[int, int, int]:
    """(calls answered 200, credits charged by them, other answers). Each client has its own
    keep-alive connection (its own httpx pool: one pool shared by many tasks costs the client
    far more CPU per request than the server spends)."""
    import httpx

    image = _png("RGB", (120, 90, 60), None)
    mask = _png("L", 0, (3, 3, 5, 5))
    files = {"image": ("i.png", image, "image/png"), "mask": ("m.png", mask, "image/png")}
    ok = charged = other = 0
    stop_at = time.monotonic() + seconds

    async def client(secret: str) -> None:
        nonlocal ok, charged, other
        headers = {"Authorization": f"Bearer {secret}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
            while time.monotonic() < stop_at:
                r = await http.post("/v1/inpaint", files=files)
                if r.status_code == 200:
                    ok += 1
                    charged += int(r.headers["x-credits-charged"])
                else:
                    other += 1

    await asyncio.gather(*(client(s) for s in secrets_))
    return ok, charged, other


def run_http(tree: Path, label: str, kind: str, clients: int, seconds: float) -> Run:
    import httpx

    sys.path.insert(0, str(REPO))
    from imgsvc.billing import keys
    from imgsvc.billing.db import Database
    from tests.utils import start_server, stop_server

    run = Run("http", kind, label, "each", clients)
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp), "imgsvc_bench") as url:
        env = {
            "PYTHONPATH": str(tree),
            "IMGSVC_DATABASE_URL": url,
            "IMGSVC_PRELOAD_MODELS": "false",
            "IMGSVC_CONCURRENCY_INPAINT": str(clients),
            "IMGSVC_INPAINT_QUEUE_DEPTH": str(clients),
            "IMGSVC_DEFAULT_RATE_LIMIT": "100000000/minute",
            "IMGSVC_JOBS_DIR": str(Path(tmp) / "jobs"),
        }
        if kind == "postgresql":
            env["IMGSVC_REDIS_URL"] = REDIS
        (Path(tmp) / "weights").mkdir()
        server = start_server(Path(tmp), Path(tmp) / "weights", **env)
        try:
            db = Database(url)
            made = [keys.create_key(db, name=f"http-{i}", credits=GRANT) for i in range(clients)]
            db.dispose()
            secrets_ = [secret for _, secret in made]
            asyncio.run(_http_clients(server.url, secrets_[:2], 1.0))  # warm-up
            warm = _usage_count(url)
            pid = server.proc.pid
            postgres: PostgresWork | None = None
            postgres = PostgresWork(url).start() if kind == "postgresql" else None
            srv0, cli0 = proc_cpu_s(pid), time.process_time()
            t0 = time.monotonic()
            ok, charged, other = asyncio.run(_http_clients(server.url, secrets_, seconds))
            run.seconds = time.monotonic() - t0
            run.client_cpu_ms_per_call = (time.process_time() - cli0) * 1000 / max(ok, 1)
            run.server_cpu_ms_per_call = (proc_cpu_s(pid) - srv0) * 1000 / max(ok, 1)
            run.calls, run.errors = ok, other
            if other:
                run.problems.append(f"{other} answers were not 200")
            with httpx.Client(base_url=server.url) as c:
                assert c.get("/healthz").status_code == 200
        finally:
            stop_server(server)  # its backends end and hand in their statistics
        if postgres is not None:
            postgres.stop()
            run.postgres_cpu_ms_per_call = postgres.cpu_s * 1000 / max(ok, 1)
            run.transactions_per_call = postgres.transactions / max(ok, 1)
        run.problems += reconcile(
            url,
            calls=ok + warm,
            spent=charged + warm * PRICE,
            key_ids=[info.id for info, _ in made],
        )
    return run


def _usage_count(url: str) -> int:
    from sqlalchemy import func, select

    from imgsvc.billing.db import Database
    from imgsvc.billing.schema import UsageEvent

    db = Database(url)
    with db.read() as s:
        n = int(s.scalar(select(func.count()).select_from(UsageEvent)) or 0)
    db.dispose()
    return n


# --- orchestration ---------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    contenders: list[tuple[str, str | None]] = [("working tree", None)]
    if args.baseline:
        contenders.insert(0, (f"baseline {args.baseline}", args.baseline))
    with code_tree(args.baseline) as base_tree:
        trees = {label: (REPO if ref is None else base_tree) for label, ref in contenders}
        for kind in args.databases:
            for mode in args.modes:
                setups = args.accounts if mode == "inproc" else ["each"]
                for accounts in setups:
                    for r in range(args.rounds):
                        order = contenders if r % 2 == 0 else list(reversed(contenders))
                        for label, _ in order:
                            tree = trees[label]
                            if mode == "inproc":
                                run = run_inproc(
                                    tree, label, kind, args.clients, args.seconds, accounts
                                )
                            else:
                                run = run_http(tree, label, kind, args.clients, args.seconds)
                            runs.append(run)
                            print(_line(run), flush=True)
    return runs


def _line(run: Run) -> str:
    pg = f" | {run.postgres_cpu_ms_per_call:.2f}" if run.database == "postgresql" else " | -"
    cpu = run.server_cpu_ms_per_call if run.mode == "http" else run.client_cpu_ms_per_call
    ok = "ok" if not run.problems and not run.errors else "; ".join(run.problems[:3]) or "errors"
    return (
        f"| {run.mode} | {run.database} | {run.code} | {run.accounts} | {run.clients} | "
        f"{run.calls} | {run.rate:.0f} | {run.statements_per_call:.1f} | "
        f"{run.transactions_per_call:.1f} | {cpu:.2f}{pg} | {ok} |"
    )


HEADER = (
    "| mode | database | code | accounts | clients | calls | calls/s | statements/call | "
    "transactions/call | process CPU ms/call | PostgreSQL CPU ms/call | reconciliation |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def summary(runs: list[Run]) -> list[str]:
    groups: dict[tuple[str, str, str, str], list[float]] = {}
    for run in runs:
        groups.setdefault((run.mode, run.database, run.accounts, run.code), []).append(run.rate)
    return [
        f"{mode} {db} accounts={acc} {code}: median {statistics.median(rates):.0f} calls/s "
        f"({', '.join(f'{r:.0f}' for r in rates)})"
        for (mode, db, acc, code), rates in groups.items()
    ]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_inproc":
        url, clients, seconds, accounts = sys.argv[2:6]
        print(json.dumps(inproc_worker(url, int(clients), float(seconds), accounts)))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs per contender and setup")
    parser.add_argument(
        "--modes", nargs="+", choices=["inproc", "http"], default=["inproc", "http"]
    )
    parser.add_argument(
        "--databases", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"]
    )
    parser.add_argument(
        "--accounts",
        nargs="+",
        choices=["one", "each"],
        default=["one", "each"],
        help="in-process: one account for all clients, or one per client",
    )
    parser.add_argument(
        "--baseline",
        help="git ref (or a folder holding imgsvc/) whose code runs in turns with this one",
    )
    parser.add_argument("--quick", action="store_true", help="2 s runs, 8 clients")
    parser.add_argument("--json", type=Path, help="also write the runs here as JSON")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.clients = 2.0, 8
    print(
        f"ledger capacity: {args.clients} clients, {args.seconds:.0f} s per run, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(HEADER)
    runs = measure(args)
    print()
    for line in summary(runs):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "rate": r.rate} for r in runs], indent=2))
    bad = [r for r in runs if r.problems or r.errors]
    if bad:
        print(f"{len(bad)} run(s) did not reconcile", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
