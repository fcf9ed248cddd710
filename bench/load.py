"""Load with reconciliation: N clients for T seconds of mixed calls against the real server,
then the books are checked against every answer the clients got.

    python bench/load.py                          # 8 clients, 60 s, SQLite then PostgreSQL
    python bench/load.py --clients 4 --seconds 30 --databases postgresql
    python bench/load.py --quick --json out.json  # 2 clients, a few seconds (the CI smoke run)

For each database it makes a fresh one (SQLite: a temporary file; PostgreSQL: a throw-away
database on the local server, with the rate limits in the local Redis, as on a fleet), starts
`imgsvc serve` as a subprocess with the pulled weights, makes one key per client with the CLI,
and runs the clients (asyncio, one keep-alive connection each). Each client loops over a mix:

- `POST /v1/remove-background` (u2netp) on real photos resized to about 100x80 and
  `POST /v1/upscale` (realesr-animevideov3, x2) on crops of about 30x22 of them: two inputs
  of its own per client and operation, each of a size no other input has. Every answer is
  compared with the reference answer computed for that very input before the load (the same
  model, deterministic on the CPU), and an upscale also with its input (the output halved
  against the input): an answer that belongs to another request counts as mixed;
- `GET /v1/account` and `POST /v1/quote` (JSON);
- bad input: bytes that are no image, `scale=9`, no image at all, a truncated PNG, a key that
  does not exist (each must be its 4xx JSON error, uncharged).

Two more clients share one key whose credits pay for a few background removals (402s must
follow, never a negative balance), and one client sends `?dry_run=true` quotes on a key with a
tight rate limit (429s with `Retry-After`, uncharged).

Afterwards, reconciliation: charged answers (200) == usage rows, request id by request id (no
lost and no duplicate row); credits charged (X-Credits-Charged) == the usage rows' credits ==
grants − balances; no hold left held; `imgsvc billing verify` exits 0; no 5xx; no mixed
answer. Reported: calls per operation and status, p50/p99 latency per operation, the server's
RSS before, during (every tenth of the load) and after it (and its peak), and the calls whose
connection closed without an answer (status 0, with the call made before on that connection;
uncharged unless the books say otherwise). Exits 1 if anything does not reconcile.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scratch import REDIS, database  # noqa: E402
from tests.utils import Server, linked_weights, start_server, stop_server  # noqa: E402

PHOTOS = [
    REPO / "tests" / "data" / "car.jpg",
    REPO / "tests" / "data" / "cloth.jpg",
    REPO / "tests" / "data" / "anime-girl.jpg",
    REPO / "bench" / "data" / "rembg" / "car-1.jpg",
    REPO / "bench" / "data" / "realesrgan" / "0014.jpg",
    REPO / "bench" / "data" / "realesrgan" / "wolf_gray.jpg",
]
CREDITS = 1_000_000
UPSCALE = {"model": "realesr-animevideov3", "scale": "2"}
CHARGED_OPS = ("remove-background", "upscale")
# Bad calls: (name, what the answer must be).
BAD_CALLS = ("not-an-image", "scale-9", "no-image", "truncated-png", "unknown-key")
SPENDER_CALLS = 4  # background removals the shared key's credits pay for


# --- inputs and their reference answers ------------------------------------------------------


@dataclass
class Input:
    """One small image a client sends, and the answers it must get back."""

    name: str
    png: bytes
    size: tuple[int, int]
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # op → decoded answer


def small(photo: Path, index: int, width: int, height: int, whole: bool) -> bytes:
    """`photo` as a PNG of exactly width x height: the whole photo resized (its subject in
    the frame), or a crop of it whose place `index` chooses."""
    img = Image.open(photo).convert("RGB")
    if whole:
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    else:
        img.thumbnail((320, 320))
        rng = random.Random(index)
        x = rng.randrange(0, max(1, img.width - width))
        y = rng.randrange(0, max(1, img.height - height))
        img = img.crop((x, y, x + width, y + height))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def inputs_for(client: int) -> dict[str, list[Input]]:
    """Each client's own inputs: two per charged operation, no two of any client the same
    size (a mixed-up answer then has the wrong size, and in any case the wrong pixels)."""
    out: dict[str, list[Input]] = {}
    for op_index, op in enumerate(CHARGED_OPS):
        items = []
        for variant in range(2):
            n = client * 4 + op_index * 2 + variant
            size = (24 + n, 20 + n % 7) if op == "upscale" else (96 + 2 * n, 72 + n % 11)
            png = small(PHOTOS[n % len(PHOTOS)], n, *size, whole=op == "remove-background")
            items.append(Input(f"c{client}-{op}-{variant}", png, size))
        out[op] = items
    return out


def decode(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"), dtype=np.int16)


def post_charged(http: httpx.Client | httpx.AsyncClient, op: str, item: Input) -> Any:
    files = {"image": (f"{item.name}.png", item.png, "image/png")}
    return http.post(f"/v1/{op}", files=files, data=UPSCALE if op == "upscale" else {})


def mismatch(op: str, item: Input, body: bytes) -> str | None:
    """Why this answer is not the one for `item` (None: it is)."""
    try:
        got = decode(body)
    except OSError:
        return "not an image"
    ref = item.reference[op]
    if got.shape != ref.shape:
        return f"size {got.shape[1]}x{got.shape[0]}, its reference {ref.shape[1]}x{ref.shape[0]}"
    worst = int(np.abs(got - ref).max())
    if worst > 2:
        return f"pixels differ from its reference by up to {worst}"
    if op == "upscale":  # and, apart from the reference, it is an upscale of this very input
        halved = Image.open(io.BytesIO(body)).convert("RGB").resize(item.size, Image.BILINEAR)
        src = np.asarray(Image.open(io.BytesIO(item.png)).convert("RGB"), dtype=np.float64)
        mse = float(np.mean((np.asarray(halved, dtype=np.float64) - src) ** 2))
        psnr = 10 * np.log10(255**2 / max(mse, 1e-9))
        if psnr < 18:
            return f"halved, it is {psnr:.1f} dB from its input"
    return None


# --- the clients -----------------------------------------------------------------------------


@dataclass
class Call:
    op: str
    status: int
    ms: float
    request_id: str = ""
    charged: int = 0
    problem: str | None = None  # a mixed answer, or a wrong error answer


@dataclass
class Tally:
    calls: list[Call] = field(default_factory=list)

    def add(self, call: Call) -> None:
        self.calls.append(call)


def bad_request(name: str, http: httpx.AsyncClient, item: Input) -> Any:
    if name == "not-an-image":
        return http.post("/v1/remove-background", files={"image": ("x.png", b"no image here")})
    if name == "scale-9":
        files = {"image": ("x.png", item.png, "image/png")}
        return http.post("/v1/upscale", files=files, data={"scale": "9"})
    if name == "no-image":
        return http.post("/v1/upscale", data={"scale": "2"})
    if name == "truncated-png":
        files = {"image": ("x.png", item.png[: len(item.png) // 2], "image/png")}
        return http.post("/v1/remove-background", files=files)
    fake = "isk_" + "A" * 32 + "_AAAAAA"
    return http.get("/v1/account", headers={"Authorization": f"Bearer {fake}"})


def check_error(resp: httpx.Response) -> str | None:
    """A refusal must be a 4xx JSON error with code, message and request id, uncharged."""
    if not 400 <= resp.status_code < 500:
        return f"status {resp.status_code}"
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError):
        return "no JSON error body"
    if not (err.get("code") and err.get("message") and err.get("request_id")):
        return f"error body incomplete: {err}"
    if resp.headers.get("x-credits-charged", "0") != "0":
        return "a refusal was charged"
    return None


class Dropped(Exception):
    """The server closed the connection instead of answering."""

    def __init__(self, call: Call) -> None:
        super().__init__(call.problem)
        self.call = call


_LAST: dict[int, Call] = {}  # the last call answered on each client's connection pool


def dropped_last(http: httpx.AsyncClient) -> Call | None:
    return _LAST.get(id(http))


async def timed(tally: Tally, op: str, http: httpx.AsyncClient, request: Any) -> httpx.Response:
    t0 = time.perf_counter()
    try:
        resp: httpx.Response = await request
    except httpx.TransportError as exc:
        ms = (time.perf_counter() - t0) * 1000
        dropped = Call(op, 0, ms, problem=f"no answer ({type(exc).__name__})")
        tally.add(dropped)
        raise Dropped(dropped) from exc
    ms = (time.perf_counter() - t0) * 1000
    call = Call(op, resp.status_code, ms, resp.headers.get("x-request-id", ""))
    if resp.status_code == 200:
        call.charged = int(resp.headers.get("x-credits-charged", "0"))
    tally.add(call)
    _LAST[id(http)] = call
    return resp


Step = Callable[[httpx.AsyncClient], Awaitable[None]]


async def keep_calling(url: str, secret: str, stop_at: float, step: Step) -> None:
    """`step` again and again until `stop_at`, on one keep-alive connection (a new one after
    the server closed it: that call is recorded as not answered)."""
    headers = {"Authorization": f"Bearer {secret}"}
    before = "none"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as http:
        while time.monotonic() < stop_at:
            try:
                await step(http)
            except Dropped as dropped:
                dropped.call.problem = f"{dropped.call.problem} (the call before: {before})"
                continue
            last = dropped_last(http)
            before = "none" if last is None else f"{last.op} {last.status}"


async def mixed_client(
    url: str, secret: str, mine: dict[str, list[Input]], stop_at: float, tally: Tally, seed: int
) -> None:
    rng = random.Random(seed)
    weights = {"remove-background": 30, "upscale": 30, "account": 12, "quote": 12, "bad": 16}
    ops, cum = list(weights), list(weights.values())

    async def step(http: httpx.AsyncClient) -> None:
        op = rng.choices(ops, cum)[0]
        if op in CHARGED_OPS:
            item = rng.choice(mine[op])
            resp = await timed(tally, op, http, post_charged(http, op, item))
            if resp.status_code == 200:
                tally.calls[-1].problem = mismatch(op, item, resp.content)
        elif op == "account":
            resp = await timed(tally, op, http, http.get("/v1/account"))
            if resp.status_code == 200 and "credits" not in resp.json():
                tally.calls[-1].problem = "no credits in the account"
        elif op == "quote":
            item = rng.choice(mine["upscale"])
            body = {"operation": "upscale", "width": item.size[0], "height": item.size[1]}
            resp = await timed(tally, op, http, http.post("/v1/quote", json={**body, "scale": 2}))
            if resp.status_code == 200 and resp.json()["output_width"] != 2 * item.size[0]:
                tally.calls[-1].problem = f"quote for the wrong size: {resp.json()}"
        else:
            name = rng.choice(BAD_CALLS)
            item = rng.choice(mine["upscale"])
            resp = await timed(tally, f"bad:{name}", http, bad_request(name, http, item))
            tally.calls[-1].problem = check_error(resp)

    await keep_calling(url, secret, stop_at, step)


async def spender_client(url: str, secret: str, item: Input, stop_at: float, tally: Tally) -> None:
    """Background removals on a key that runs out: 200s, then 402s, never an overdraw."""

    async def step(http: httpx.AsyncClient) -> None:
        resp = await timed(tally, "spend", http, post_charged(http, "remove-background", item))
        if resp.status_code == 200:
            tally.calls[-1].problem = mismatch("remove-background", item, resp.content)
        elif resp.status_code == 402:
            tally.calls[-1].problem = check_error(resp)
            await asyncio.sleep(0.2)
        else:
            tally.calls[-1].problem = f"status {resp.status_code}"

    await keep_calling(url, secret, stop_at, step)


async def limited_client(url: str, secret: str, item: Input, stop_at: float, tally: Tally) -> None:
    """Dry-run quotes on a key with a tight rate limit: 200s, then 429s with Retry-After."""
    files = {"image": ("x.png", item.png, "image/png")}

    async def step(http: httpx.AsyncClient) -> None:
        call = http.post("/v1/remove-background", params={"dry_run": "true"}, files=files)
        resp = await timed(tally, "dry-run", http, call)
        if resp.status_code == 429:
            problem = check_error(resp)
            if problem is None and not resp.headers.get("retry-after"):
                problem = "429 without Retry-After"
            tally.calls[-1].problem = problem
            await asyncio.sleep(0.5)
        elif resp.status_code != 200 or resp.headers.get("x-credits-charged", "0") != "0":
            tally.calls[-1].problem = f"status {resp.status_code}"

    await keep_calling(url, secret, stop_at, step)


# --- one run on one database -----------------------------------------------------------------


def rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def new_key(server: Server, name: str, credits: int, rate_limit: str) -> str:
    out = server.cli(
        "keys", "create", "--name", name, "--credits", str(credits), "--rate-limit", rate_limit
    )
    return out.strip().splitlines()[-1]


def references(server: Server, secret: str, all_inputs: list[dict[str, list[Input]]]) -> list[Call]:
    """Each input's answer, one call at a time before the load (charged calls too)."""
    calls = []
    with server.client(secret) as http:
        for mine in all_inputs:
            for op, items in mine.items():
                for item in items:
                    resp = post_charged(http, op, item)
                    resp.raise_for_status()
                    item.reference[op] = decode(resp.content)
                    charged = int(resp.headers["x-credits-charged"])
                    calls.append(Call("reference", 200, 0.0, resp.headers["x-request-id"], charged))
    return calls


def price_of(server: Server, secret: str, item: Input) -> int:
    """What one background removal of `item` costs (a dry run: nothing is charged)."""
    with server.client(secret) as http:
        files = {"image": ("x.png", item.png, "image/png")}
        resp = http.post("/v1/remove-background", params={"dry_run": "true"}, files=files)
        resp.raise_for_status()
        return int(resp.json()["credits"])


@dataclass
class Report:
    database: str
    clients: int
    seconds: float
    rss_before_mib: float = 0.0
    rss_during_mib: list[float] = field(default_factory=list)  # every tenth of the load
    rss_after_mib: float = 0.0
    rss_peak_mib: float = 0.0
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    server_errors: int = 0
    mixed_or_wrong: int = 0
    dropped: int = 0  # calls whose connection closed without an answer
    dropped_after: dict[str, int] = field(default_factory=dict)  # by the call before it
    charged_answers: int = 0
    usage_rows: int = 0
    credits_charged: int = 0
    credits_in_usage: int = 0
    credits_spent: int = 0
    holds_left: int = 0
    verify_exit: int = -1
    verify_output: str = ""
    problems: list[str] = field(default_factory=list)


def reconcile(url: str, report: Report, charged: list[Call], secrets_: dict[str, int]) -> None:
    from sqlalchemy import func, select

    from imgsvc.billing.db import Database
    from imgsvc.billing.schema import Account, Hold, UsageEvent

    db = Database(url)
    with db.read() as s:
        rows = s.execute(select(UsageEvent.request_id, UsageEvent.credits)).all()
        balances = s.execute(select(Account.id, Account.credits)).all()
        report.holds_left = int(
            s.scalar(select(func.count()).select_from(Hold).where(Hold.status == "held")) or 0
        )
    db.dispose()
    answered = [c.request_id for c in charged]
    in_rows = [r for r, _ in rows]
    report.charged_answers, report.usage_rows = len(answered), len(in_rows)
    report.credits_charged = sum(c.charged for c in charged)
    report.credits_in_usage = sum(int(c) for _, c in rows)
    report.credits_spent = sum(secrets_.values()) - sum(int(c) for _, c in balances)
    if len(set(in_rows)) != len(in_rows):
        report.problems.append("duplicate usage rows")
    if set(answered) != set(in_rows) or len(set(answered)) != len(answered):
        lost = sorted(set(answered) - set(in_rows))[:5]
        extra = sorted(set(in_rows) - set(answered))[:5]
        report.problems.append(
            f"answers vs usage rows: missing rows {lost}, rows unanswered {extra}"
        )
    if not report.credits_charged == report.credits_in_usage == report.credits_spent:
        report.problems.append(
            f"credits: answers {report.credits_charged}, usage rows {report.credits_in_usage}, "
            f"balances {report.credits_spent}"
        )
    if any(int(c) < 0 for _, c in balances):
        report.problems.append("a negative balance")
    if report.holds_left:
        report.problems.append(f"{report.holds_left} hold(s) left held")


def latency(calls: list[Call]) -> dict[str, Any]:
    ms = sorted(c.ms for c in calls)
    statuses: dict[str, int] = {}
    for c in calls:
        statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
    return {
        "calls": len(calls),
        "statuses": statuses,
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], 1),
    }


def run(kind: str, clients: int, seconds: float) -> Report:
    report = Report(kind, clients, seconds)
    all_inputs = [inputs_for(i) for i in range(clients + 1)]  # the last: spenders, limited
    shared = all_inputs[-1]["remove-background"][0]
    grants: dict[str, int] = {}
    with (
        tempfile.TemporaryDirectory() as tmp_name,
        database(kind, Path(tmp_name), "imgsvc_load") as url,
    ):
        tmp = Path(tmp_name)
        env = {
            "IMGSVC_DATABASE_URL": url,
            "IMGSVC_JOBS_DIR": str(tmp / "jobs"),
            "IMGSVC_DEFAULT_RATE_LIMIT": "100000/minute",
        }
        if kind == "postgresql":
            env["IMGSVC_REDIS_URL"] = REDIS
        server = start_server(tmp, linked_weights(tmp / "weights", REPO / "weights", None), **env)
        try:

            def key(name: str, credits: int, limit: str = "100000/minute") -> str:
                secret = new_key(server, name, credits, limit)
                grants[secret] = credits
                return secret

            ref_calls = references(server, key("references", CREDITS), all_inputs)
            mine = [key(f"client-{i}", CREDITS) for i in range(clients)]
            spender = key("spender", price_of(server, mine[0], shared) * SPENDER_CALLS)
            # Its own limit: Redis keeps a key's counters under the limit too, so an earlier
            # run's counters (same key id, same window) cannot be met.
            limited = key("limited", CREDITS, f"{random.randint(20, 40)}/minute")
            report.rss_before_mib = rss_kib(server.proc.pid)["VmRSS"] / 1024
            tally = Tally()
            stop_at = time.monotonic() + seconds

            async def watch_memory() -> None:
                while time.monotonic() < stop_at:
                    await asyncio.sleep(seconds / 10)
                    report.rss_during_mib.append(rss_kib(server.proc.pid)["VmRSS"] / 1024)

            async def everyone() -> None:
                await asyncio.gather(
                    watch_memory(),
                    *(
                        mixed_client(server.url, mine[i], all_inputs[i], stop_at, tally, seed=i)
                        for i in range(clients)
                    ),
                    spender_client(server.url, spender, shared, stop_at, tally),
                    spender_client(server.url, spender, shared, stop_at, tally),
                    limited_client(server.url, limited, shared, stop_at, tally),
                )

            asyncio.run(everyone())
            mem = rss_kib(server.proc.pid)
            report.rss_after_mib, report.rss_peak_mib = mem["VmRSS"] / 1024, mem["VmHWM"] / 1024
            verify = subprocess.run(
                [sys.executable, "-m", "imgsvc", "billing", "verify"],
                env=server.env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            report.verify_exit, report.verify_output = verify.returncode, verify.stdout.strip()
        finally:
            stop_server(server)
        by_op: dict[str, list[Call]] = {}
        for c in tally.calls:
            by_op.setdefault(c.op, []).append(c)
        report.operations = {op: latency(calls) for op, calls in sorted(by_op.items())}
        report.server_errors = sum(c.status >= 500 for c in tally.calls)
        dropped = [c for c in tally.calls if c.status == 0]
        report.dropped = len(dropped)
        for c in dropped:
            before = str(c.problem).rpartition("the call before: ")[2].rstrip(")")
            report.dropped_after[before] = report.dropped_after.get(before, 0) + 1
        wrong = [c for c in tally.calls if c.problem and c.status != 0]
        report.mixed_or_wrong = len(wrong)
        report.problems += [f"{c.op} {c.status}: {c.problem}" for c in wrong[:10]]
        if report.server_errors:
            report.problems.append(f"{report.server_errors} answers were 5xx")
        if report.verify_exit != 0:
            report.problems.append(f"imgsvc billing verify: {report.verify_output}")
        spent = sum(c.charged for c in tally.calls if c.op == "spend" and c.status == 200)
        if spent > grants[spender]:
            report.problems.append(f"the spender's key paid {spent} of its {grants[spender]}")
        charged = [c for c in tally.calls if c.status == 200 and c.op in (*CHARGED_OPS, "spend")]
        reconcile(url, report, ref_calls + charged, grants)
    return report


def print_report(report: Report) -> None:
    print(f"\n## {report.database}: {report.clients} clients, {report.seconds:.0f} s")
    print("| operation | calls | statuses | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for op, r in report.operations.items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        print(f"| {op} | {r['calls']} | {statuses} | {r['p50_ms']} | {r['p99_ms']} |")
    print(
        f"charged answers {report.charged_answers} (references included), usage rows "
        f"{report.usage_rows}; credits: answers {report.credits_charged}, usage rows "
        f"{report.credits_in_usage}, grants − balances {report.credits_spent}; holds left "
        f"{report.holds_left}; 5xx {report.server_errors}; mixed or wrong answers "
        f"{report.mixed_or_wrong}; billing verify: {report.verify_output!r} (exit "
        f"{report.verify_exit})"
    )
    if report.dropped:
        print(
            f"connections closed without an answer: {report.dropped} (by the call before on "
            f"that connection: {report.dropped_after})"
        )
    during = ", ".join(f"{m:.0f}" for m in report.rss_during_mib)
    print(
        f"server RSS: {report.rss_before_mib:.0f} MiB before the load, {during} during, "
        f"{report.rss_after_mib:.0f} MiB after (peak {report.rss_peak_mib:.0f} MiB)"
    )
    print("reconciliation: " + ("ok" if not report.problems else "; ".join(report.problems)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8, help="mixed-load clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="load per database")
    parser.add_argument(
        "--databases", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"]
    )
    parser.add_argument("--quick", action="store_true", help="2 clients, 6 s: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the reports here")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.seconds = 2, 6.0
    print(
        f"load: {args.clients} mixed clients + 2 on a small balance + 1 rate-limited, "
        f"{args.seconds:.0f} s per database, {os.cpu_count()} CPUs"
    )
    reports = []
    for kind in args.databases:
        report = run(kind, args.clients, args.seconds)
        print_report(report)
        reports.append(report)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
