"""``vloop serve`` / ``python -m serving``: start the model server and feedback gateway."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", help="base model directory or hub id (default: VLOOP_BASE_MODEL)")
    p.add_argument("--lake", help="lake URL records are shipped to (default: VLOOP_LAKE_URL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--upstream", help="an OpenAI-compatible server (e.g. vLLM) to front instead of the local model")
    p.add_argument("--state-dir", help="routes, opt-outs, adapter cache (default: $VLOOP_HOME/serving)")
    p.add_argument("--ship-interval", type=float, default=1.0, help="seconds between shipper runs")
    p.add_argument("--reconcile-interval", type=float, default=5.0,
                   help="seconds between reads of the registry's desired serving state (0: never)")
    p.add_argument("--decoding-ttl", type=float, default=10.0,
                   help="seconds between reads of the lake's decoding policy (banned phrases)")
    p.add_argument("--simulation", action="store_true",
                   help="simulation mode (the demo): honour X-Vloop-Sim-Time; never in production "
                        "(also on with VLOOP_SIMULATION=1)")
    p.add_argument("--playground", action="store_true",
                   help="serve the /playground page (also on with VLOOP_PLAYGROUND=1)")
    return p


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args) -> int:
    import uvicorn

    from serving.app import ServeConfig, create_app
    from serving.auth import ApiKeys
    from vloop.store.config import load_settings
    from vloop.capture.netguard import FetchPolicy

    s = load_settings()
    model = args.model or s.base_model
    if not model and not args.upstream:
        raise ValueError("no model: pass --model DIR or set VLOOP_BASE_MODEL")
    cfg = ServeConfig(
        model=model, lake_url=args.lake or s.lake_url, upstream=args.upstream, upstream_api_key=s.upstream_api_key,
        state_dir=Path(args.state_dir) if args.state_dir else Path(s.home) / "serving",
        spool_dir=Path(s.spool_dir), admin_token=s.admin_token, user_key_secret=s.user_key_secret,
        max_image_bytes=s.max_image_bytes, max_image_pixels=s.max_image_pixels,
        fetch=FetchPolicy.from_env(s.fetch_allowlist, max_bytes=s.max_image_bytes),
        ship_interval_s=args.ship_interval, reconcile_interval_s=args.reconcile_interval,
        decoding_ttl_s=args.decoding_ttl,
        simulation=args.simulation or s.simulation,
        feedback_secret=s.feedback_secret, feedback_secret_previous=s.feedback_secret_previous,
        feedback_token_ttl_s=s.feedback_token_ttl_s, feedback_max_events=s.feedback_max_events,
        api_keys=ApiKeys.parse(s.api_keys, s.api_keys_file),
        cors_origins=tuple(o.strip().rstrip("/") for o in (s.cors_origins or "").split(",") if o.strip()),
        playground=args.playground or s.playground)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not cfg.api_keys and not is_loopback(args.host):
        logging.getLogger("serving").warning(
            "listening on %s with no API keys: anyone who reaches this port can chat and send feedback; "
            "set VLOOP_API_KEYS or VLOOP_API_KEYS_FILE", args.host)
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m serving", description=__doc__))
    return serve(p.parse_args(argv))
