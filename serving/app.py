"""The serving HTTP API: vLLM's OpenAI-compatible subset plus the feedback gateway.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models`` (serving.chat), ``POST /v1/feedback``
(serving.feedback), ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``,
``GET/PUT /admin/routes``, ``POST /admin/reconcile``, ``POST /admin/opt-out`` (admin,
serving.admin), ``GET /healthz``, ``GET /metrics``, ``GET /sdk/vloop-feedback.js`` and, when
asked for, ``GET /playground`` (here).

A chat request picks its model with ``model``: the routed alias (``vloop``, or the base model's
id) lets the gateway choose the arm by the user's sticky bucket; an adapter's name asks for it
directly (serving.routing). The caller's user id comes from the OpenAI ``user`` field (or
``X-User-Id``); it is stored only as an HMAC. Every answered request is spooled as an
interaction record (PII redacted) before the response goes out, unless the user opted out
(serving.records). ``stream: true`` answers with server-sent events (serving.streaming), logged
once when the stream ends.

Banned phrases: the lake's decoding policy (vloop.vlm.decoding, re-read every ``--decoding-ttl``
seconds) together with the request's own vLLM-style ``bad_words`` are never said: the local
backend enforces them on every tokenisation (the policy's exceptions, e.g. 不可能, stay allowed);
the upstream gets the merged list as ``bad_words``. An image request that asks for it
(``"vloop": {"image_quality": true}`` in the body; the ``openai`` client's ``extra_body``) gets
``vloop.image_quality`` (vloop.curate.imagequality.quick_summary: flags and advice for the app), computed
in a thread while the model answers; it is opt-in because it decodes the photo, the one thing the
hot path otherwise never does (see vloop.store.images: metadata is stripped without a decode).

With ``--upstream`` the model server is an OpenAI-compatible one (vLLM in production): the
gateway asks it for its base model's id, sends it the validated sampling settings and the logged
image as a data URL (it never sees a user's URL), and copies registry adapters from the lake to a
local directory before asking it to load them (serving.models).

This module is the assembly: :func:`create_app` builds the process's :class:`~serving.gateway.Gateway`,
mounts the routers, the CORS middleware and the error handlers, and runs the startup and
shutdown work (the first reconciliation with the registry, the background loops).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse

from serving.admin import admin_router
from serving.auth import FEEDBACK_TOKEN_HEADER
from serving.chat import chat_router
from serving.config import ServeConfig
from serving.engine import EngineError
from serving.errors import ApiError, install_error_handlers
from serving.feedback import feedback_router
from serving.gateway import Gateway
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = ["ApiError", "Gateway", "ServeConfig", "create_app"]  # ServeConfig and create_app: serving.cli's

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


def create_app(cfg: ServeConfig) -> FastAPI:
    gw = Gateway(cfg)
    app = FastAPI(title="vloop serving", version="0.1.0")
    app.state.gateway = gw
    if cfg.cors_origins:
        # Only the configured origins: a page elsewhere cannot read answers with a user's cookies
        # or keys (there are none to ride on, but the allow-list keeps it that way).
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-User-Id", FEEDBACK_TOKEN_HEADER],
                           expose_headers=["X-Request-Id", FEEDBACK_TOKEN_HEADER], max_age=600)

    @app.on_event("startup")
    async def _startup():
        # The image check (vloop.image_quality) is compiled code: loaded before the first photo.
        from vloop.curate.imagequality import warm_up

        await asyncio.to_thread(warm_up)
        if gw.local is None:
            try:  # learn the upstream's base model id now; requests ask again while it is down
                await gw.models.base_id()
            except EngineError as e:
                log.warning("could not ask the upstream for its base model yet: %s", e.message)
        if gw.decoding is not None:  # banned phrases apply from the first request on
            await gw.decoding_policy()
        if gw.lake is not None:  # opt-outs and erasures apply from the first request on
            try:
                await asyncio.to_thread(gw.opt_outs.sync)
            except Exception as e:
                log.warning("could not read the lake's opt-outs yet: %s", e)
            # Every few seconds after, at the pace the registry is followed.
            app.state.opt_out_sync = asyncio.create_task(
                gw.opt_outs.sync_forever(cfg.reconcile_interval_s if cfg.reconcile_interval_s > 0 else 5.0))
        if gw.registry is not None and cfg.reconcile_interval_s > 0:
            try:  # serve what the registry says from the first request on (health waits for it)
                await gw.models.reconcile()
            except Exception as e:
                log.warning("first reconciliation with the registry failed (retrying in the background): %s", e)
            app.state.reconciler = asyncio.create_task(gw.models.reconcile_forever(cfg.reconcile_interval_s))

    @app.on_event("shutdown")
    async def _shutdown():
        for name in ("reconciler", "opt_out_sync"):
            task = getattr(app.state, name, None)
            if task is not None:
                task.cancel()
        if gw.local is None:
            await gw.engine.aclose()
        gw.close()

    install_error_handlers(app, gw.metrics)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "base_model": gw.models.base_name, "spool_segments": gw.spool.depth(),
                "routes": gw.models.routes.routes.__dict__,
                "decoding_policy": (await gw.decoding_policy()).version}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(gw.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/sdk/vloop-feedback.js")
    async def feedback_sdk():
        return FileResponse(STATIC / "vloop-feedback.js", media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=300"})

    if cfg.playground:  # off unless asked: it is a page anyone who reaches the gateway can use
        @app.get("/playground")
        async def playground():
            return HTMLResponse((STATIC / "playground.html").read_text(encoding="utf-8"))

    app.include_router(chat_router(gw))
    app.include_router(admin_router(gw))
    app.include_router(feedback_router(gw))
    return app
