"""The admin routes: everything behind ``VLOOP_ADMIN_TOKEN`` (a bearer token; without one set
they answer 503).

``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's runtime LoRA API),
``GET``/``PUT /admin/routes`` (champion, canary and their shares; registry versions are written
as the desired state every replica follows), ``POST /admin/reconcile`` (apply the registry's
serving state now) and ``POST /admin/opt-out``. The state they change is serving.models' and
serving.records'.
"""

from __future__ import annotations

import hmac
import time

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from serving.engine import EngineError
from serving.errors import ApiError
from serving.gateway import Gateway
from serving.intake import read_json, user_key
from serving.routing import Routes


def require_admin(request: Request, admin_token: str | None) -> None:
    """503 when admin routes are disabled (no token set), 401 without the right bearer token."""
    if not admin_token:
        raise ApiError(503, "admin routes are disabled: set VLOOP_ADMIN_TOKEN", "server_error")
    auth = request.headers.get("authorization", "")
    token = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), admin_token.encode()):
        raise ApiError(401, "admin route: missing or wrong bearer token", "authentication_error")


def admin_router(gw: Gateway) -> APIRouter:
    cfg, models = gw.cfg, gw.models
    router = APIRouter()

    @router.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        require_admin(request, cfg.admin_token)
        body = await read_json(request, cfg.max_request_bytes)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ApiError(400, "need 'lora_name' and 'lora_path' strings")
        t0 = time.perf_counter()
        await models.load(name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully "
                                 f"({(time.perf_counter() - t0) * 1000:.0f} ms).")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        require_admin(request, cfg.admin_token)
        body = await read_json(request, cfg.max_request_bytes)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "need a 'lora_name' string")
        await models.unload_unrouted(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @router.get("/admin/routes")
    async def get_routes(request: Request):
        require_admin(request, cfg.admin_token)
        return models.routes.routes.__dict__

    @router.put("/admin/routes")
    async def put_routes(request: Request):
        require_admin(request, cfg.admin_token)
        body = await read_json(request, cfg.max_request_bytes)
        try:
            routes = Routes(**body).validate(models.loaded_adapters())
        except TypeError as e:
            raise ApiError(400, f"unknown route field: {e}") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if "salt" in body:
            raise ApiError(400, "the salt belongs to an experiment (vloop.release.canary.start); it cannot be set here")
        routes, scope = await models.set_routes(routes)
        return {**routes.__dict__, "scope": scope}

    @router.post("/admin/reconcile")
    async def reconcile_now(request: Request):
        """Apply the registry's serving state now instead of at the next interval (a deploy
        calls this to learn at once whether this replica can load the new adapter)."""
        require_admin(request, cfg.admin_token)
        if gw.registry is None:
            raise ApiError(400, "this server has no lake, so no registry to follow")
        try:
            changed = await models.reconcile()
        except EngineError as e:
            raise ApiError(e.status if e.status < 500 else 502, f"could not apply the serving state: {e.message}") from None
        except Exception as e:
            raise ApiError(502, f"could not apply the serving state: {e}", "server_error") from None
        return {"applied_seq": models.applied_seq, "changed": changed, "routes": models.routes.routes.__dict__}

    @router.post("/admin/opt-out")
    async def opt_out(request: Request):
        require_admin(request, cfg.admin_token)
        body = await read_json(request, cfg.max_request_bytes)
        key = user_key(body, request, cfg.user_key_secret)
        if key is None:
            raise ApiError(400, "need 'user': the user id to opt out")
        await gw.opt_outs.add(key)  # the daily DAG and the dataset builder exclude these users too
        return {"user_key": key, "opted_out": True}

    return router
