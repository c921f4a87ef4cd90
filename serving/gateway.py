"""The state one serving process shares among its routes: :class:`Gateway`.

It builds and holds the model server (the local engine, or a client of an upstream vLLM), what it
serves (serving.models), the spool and its shipper to the lake, the feedback tokens, the
opt-outs and the feedback memory (serving.records), the lake's decoding policy and the metrics.
The routes (serving.chat, serving.feedback, serving.admin) and the app's lifecycle (serving.app)
reach everything through it.
"""

from __future__ import annotations

import asyncio
import logging

from serving.auth import FeedbackTokens, derive_secret
from serving.config import ServeConfig
from serving.engine import LocalEngine, UpstreamEngine
from serving.metrics import Metrics
from serving.models import ServingModels
from serving.records import FeedbackEvents, OptOuts
from serving.routing import RouteStore
from vloop.capture.spool import Shipper, Spool
from vloop.vlm.decoding import DecodingPolicy, PolicyCache

log = logging.getLogger(__name__)


class Gateway:
    """Owns the engine, models and routes, opt-outs, spool and shipper of one serving process."""

    def __init__(self, cfg: ServeConfig):
        from vloop.store.lake import open_lake

        if not cfg.user_key_secret:
            raise ValueError("VLOOP_USER_KEY_SECRET must be set: user ids are stored only as HMACs")
        self.cfg = cfg
        self.metrics = Metrics()
        secret = cfg.feedback_secret.encode() if cfg.feedback_secret else derive_secret(cfg.user_key_secret)
        previous = [cfg.feedback_secret_previous.encode()] if cfg.feedback_secret_previous else []
        self.tokens = FeedbackTokens(secret, previous, ttl_s=cfg.feedback_token_ttl_s)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        routes = RouteStore(cfg.state_dir / "routes.json")
        self.lake = open_lake(cfg.lake_url) if cfg.lake_url else None
        self.opt_outs = OptOuts(cfg.state_dir / "opt_out.json", self.lake)
        self.registry = None
        if self.lake is not None:
            from vloop.learn.registry import Registry

            self.registry = Registry(self.lake)
        # The lake's banned phrases (none without a lake; the request's bad_words still apply).
        self.decoding = PolicyCache(self.lake, ttl_s=cfg.decoding_ttl_s) if self.lake is not None else None
        if cfg.upstream:
            self.engine = UpstreamEngine(cfg.upstream, api_key=cfg.upstream_api_key)
            self.local = None
        else:
            self.engine = self.local = LocalEngine(cfg.model, adapter_cache=cfg.state_dir / "adapters",
                                                   lake=self.lake, max_batch=cfg.max_batch)
        self.models = ServingModels(self.engine, local=self.local, routes=routes, model_arg=cfg.model,
                                    state_dir=cfg.state_dir, lake=self.lake, registry=self.registry,
                                    metrics=self.metrics)
        self.spool = Spool(cfg.spool_dir)
        self.feedback = FeedbackEvents(self.spool, self.metrics, cfg.feedback_max_events)
        self.shipper = None
        if self.lake is not None:
            self.shipper = Shipper(self.spool, self.lake, interval_s=cfg.ship_interval_s,
                                   on_failure=lambda e: self.metrics.inc("vloop_ship_failures_total",
                                                                         "failed attempts to ship the spool"),
                                   on_shipped=lambda s, n: self.metrics.inc(
                                       "vloop_records_shipped_total", "records moved to the lake", n, stream=s)).start()
        self.metrics.gauge("vloop_spool_segments", "spool segments not yet shipped", self.spool.depth)
        self.metrics.gauge("vloop_adapters_loaded", "LoRA adapters loaded",
                           lambda: len(self.local.adapters) if self.local else 0)

    def close(self) -> None:
        if self.shipper:
            self.shipper.stop(drain=True)
        else:
            self.spool.close()
        self.engine.close()

    async def decoding_policy(self) -> DecodingPolicy:
        """The decoding policy in force. Reading the lake (once per TTL) runs in a thread, so a
        slow lake never stalls the event loop; in between it is a memory read."""
        if self.decoding is None:
            return DecodingPolicy()
        if self.decoding.stale:
            return await asyncio.to_thread(self.decoding.get)
        return self.decoding.get()
