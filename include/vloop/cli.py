"""The ``vloop`` command. Each sub-command imports what it needs when it runs, so
``vloop --help`` stays fast and lists exactly the commands that exist."""

from __future__ import annotations

import argparse
import datetime as dt
import sys


def _cmd_config(args) -> int:
    from vloop.config import load_settings

    for env, value, doc in load_settings().describe():
        print(f"{env:24} {value}\n{'':24} {doc}")
    return 0


def _cmd_lake_ls(args) -> int:
    from vloop.lake import open_lake

    lake = open_lake(args.url)
    for key in lake.list(args.prefix):
        print(key)
    return 0


def _cmd_lake_check(args) -> int:
    """Round-trip a probe object: proves the URL, the credentials and write permission."""
    import uuid

    from vloop.lake import open_lake

    lake = open_lake(args.url)
    key = f"_health/probe-{uuid.uuid4().hex}"
    payload = uuid.uuid4().bytes
    lake.put_bytes(key, payload)
    ok = lake.get_bytes(key) == payload
    lake.delete(key)
    print(f"{lake.url}: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _cmd_demo(args) -> int:
    from vloop.demo import run_demo
    from vloop.lake import open_lake

    run_demo(open_lake(args.lake), args.day, n=args.n, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vloop", description="Close the feedback loop around a deployed "
                                "vision-language model.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("config", help="print the effective VLOOP_* settings (secrets masked)")
    c.set_defaults(fn=_cmd_config)

    lake = sub.add_parser("lake", help="inspect the lake")
    lsub = lake.add_subparsers(dest="lake_command", metavar="ACTION", required=True)
    ls = lsub.add_parser("ls", help="list keys under a prefix")
    ls.add_argument("prefix", nargs="?", default="")
    ls.set_defaults(fn=_cmd_lake_ls)
    chk = lsub.add_parser("check", help="write, read back and delete a probe object")
    chk.set_defaults(fn=_cmd_lake_check)
    for q in (ls, chk):
        q.add_argument("--url", help="lake URL (default: VLOOP_LAKE_URL)")

    d = sub.add_parser("demo", help="the main job on embedded defaults (what `make demo` runs)")
    d.add_argument("--lake", help="lake URL (default: VLOOP_LAKE_URL)")
    d.add_argument("--day", type=dt.date.fromisoformat, default=dt.date.today(), help="YYYY-MM-DD")
    d.add_argument("--n", type=int, default=300, help="synthetic interactions to write")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vloop.config import ConfigError
    from vloop.images import ImageError
    from vloop.lake import LakeError

    try:
        return args.fn(args)
    except (ConfigError, LakeError, ImageError, ValueError) as e:
        print(f"vloop {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
