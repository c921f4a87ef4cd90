"""What this replica serves: the base model, its LoRA adapters and the routes among them.

:class:`ServingModels` (after vLLM's ``OpenAIServingModels``) owns that state for one process: the
base model's id (the local model's, or the upstream server's own, asked once), loading and
unloading adapters (a lake prefix copied to a local directory first when the model server is an
upstream vLLM, which reads adapters from its own disk), the persisted routes, and following the
registry's desired serving state (:meth:`ServingModels.reconcile`). Which arm a request gets
from those routes is serving.routing's.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from serving.engine import EngineError, LocalEngine
from serving.errors import ApiError
from serving.metrics import Metrics
from serving.routing import Routes, RouteStore, choose_arm

log = logging.getLogger(__name__)


class ServingModels:
    """The base model and the adapters of one serving process, and the routes among them.

    ``engine`` is the model server (the local engine or an upstream client); ``local`` the same
    object when it is the local engine, else None. ``model_arg`` is ``--model``'s value, which
    keeps naming the base (clients set up with the path keep working)."""

    def __init__(self, engine, *, local: LocalEngine | None, routes: RouteStore, model_arg: str | None,
                 state_dir: Path, lake, registry, metrics: Metrics):
        self.engine, self.local, self.routes = engine, local, routes
        self.model_arg, self.state_dir, self.lake, self.registry, self.metrics = (
            model_arg, state_dir, lake, registry, metrics)
        self.applied_seq = 0  # the registry serving state this replica has applied
        self.reconciled: set[str] = set()  # adapters loaded because the registry said so
        self.reconcile_lock = asyncio.Lock()  # one reconciliation at a time, states in order
        r = routes.routes
        if local is not None and (r.champion or r.canary):
            # A fresh local engine holds no adapter: routes naming one would answer 404 until the
            # adapters are back (the registry's, at the first reconciliation). Serve the base meanwhile.
            log.warning("persisted routes name adapters that are not loaded yet (%s); serving the base "
                        "until they are", r)
            routes.routes = Routes()

    # -- the base model -------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        """The base model's id as clients and records know it: the local model's, or the
        upstream's own id once it has been asked (until then what --model said)."""
        if self.local:
            return self.local.base_name
        return self.engine.base_name or self.model_arg or "upstream"

    async def base_id(self) -> str:
        """The id the model server knows the base by (asks the upstream the first time)."""
        return self.local.base_name if self.local else await self.engine.resolve_base()

    def is_base(self, model: str) -> bool:
        # --model's value still names the base, so clients set up with the path keep working.
        return model == self.base_name or (self.model_arg is not None and model == self.model_arg)

    def base_missing(self) -> None:
        """The model server did not know the base by its id: the upstream may have restarted
        under another name, so it is asked again next time."""
        if not self.local:
            self.engine.forget_base()

    async def available_models(self) -> list[dict]:
        """``GET /v1/models``'s data: the base and every loaded adapter."""
        return self.local.models() if self.local else await self.engine.models()

    # -- which model answers a request -------------------------------------------------------------
    def choose_arm(self, model: str, user_key: str | None) -> tuple[str, str | None]:
        """(arm, adapter or None for the base) for a request naming ``model``; an adapter the
        local engine does not hold is refused (404) before the request's photo is staged (the
        engine checks again on submission)."""
        arm, adapter = choose_arm(self.routes.routes, model, user_key, self.is_base)
        if self.local is not None and adapter is not None and adapter not in self.local.adapters:
            raise EngineError(404, f"model {adapter!r} does not exist; see GET /v1/models")
        return arm, adapter

    # -- adapters -------------------------------------------------------------------------------------
    async def load(self, name: str, path: str) -> None:
        if self.local:
            await asyncio.to_thread(self.local.load_adapter, name, path)
        else:
            # vLLM reads adapters from its own disk: a lake prefix is copied to a local directory
            # first, and a local directory is passed as an absolute path.
            local = Path(path)
            if local.is_dir():
                path = str(local.resolve())
            elif self.lake is not None and not path.startswith("/"):
                path = await self.sync_adapter(name, path)
            await self.engine.load_adapter(name, path)
        self.metrics.inc("vloop_adapter_loads_total", "adapter loads")

    async def unload(self, name: str) -> None:
        if self.local:
            await asyncio.to_thread(self.local.unload_adapter, name)
        else:
            await self.engine.unload_adapter(name)

    async def unload_unrouted(self, name: str) -> None:
        """Unload an adapter no route names (409 for one that is: change the routes first)."""
        r = self.routes.routes
        if name in (r.champion, r.canary):
            raise ApiError(409, f"adapter {name!r} is routed to ({'champion' if name == r.champion else 'canary'}); "
                                "change the routes first")
        await self.unload(name)
        self.reconciled.discard(name)

    async def loaded_names(self) -> set[str]:
        if self.local:
            return set(self.local.adapters)
        return {m["id"] for m in await self.engine.models() if m.get("parent")}

    def loaded_adapters(self) -> set[str] | None:
        """The adapters the local engine holds; None for an upstream (not checked here)."""
        return set(self.local.adapters) if self.local else None

    async def load_version(self, ref: str) -> None:
        """Load a registry version. The local engine reads the lake itself; an upstream server
        (vLLM) needs a directory it can read, so the files are copied under the state dir first
        (shared with vLLM's host in production)."""
        version = await asyncio.to_thread(self.registry.get, ref)
        path = version.path
        if not self.local:
            path = await self.sync_adapter(ref, path)
        await self.load(ref, path)

    async def sync_adapter(self, name: str, prefix: str) -> str:
        """Copy an adapter's files from the lake under the state dir (which production shares with
        the vLLM host) and return that directory's absolute path."""
        from vloop.store.lake import fetch_files

        keys = await asyncio.to_thread(self.lake.list, prefix.rstrip("/") + "/")
        if not keys:
            raise ApiError(400, f"lora_path {prefix!r} is neither a local directory nor an adapter in the lake")
        dest = (self.state_dir / "adapters" / name.replace("@", "_").replace("/", "_")).resolve()
        await asyncio.to_thread(shutil.rmtree, dest, True)  # no stale file from an earlier copy
        return str(await asyncio.to_thread(fetch_files, self.lake, keys, dest))

    # -- routes and the registry's desired state ------------------------------------------------------
    async def set_routes(self, routes: Routes) -> tuple[Routes, str]:
        """Apply routes an admin set (validated); (the routes applied, their scope). Routes that
        name registry versions (or the base) are written to the registry as the desired state every
        replica follows; others apply to this replica alone."""
        scope = "this replica"
        if self.registry is not None and all(n is None or "@" in n for n in (routes.champion, routes.canary)):
            # Registry versions: write the desired state every replica follows, not just ours.
            from vloop.learn.registry import RegistryConflict, RegistryError

            async with self.reconcile_lock:
                head = await asyncio.to_thread(self.registry.serving_state)
                changes = {"champion": routes.champion, "canary": routes.canary,
                           "canary_share": routes.canary_share, "holdout_share": routes.holdout_share}
                if head.experiment and any(changes[k] != getattr(head, k) for k in ("champion", "canary", "canary_share")):
                    # A hand-made change of the split ends the experiment: its figures would mix two splits.
                    changes["experiment"] = None
                try:
                    state = await asyncio.to_thread(
                        self.registry.update_serving, changes, actor="admin api", reason="PUT /admin/routes",
                        expected_seq=head.seq)
                except RegistryConflict as e:
                    raise ApiError(409, str(e)) from None
                except RegistryError as e:
                    raise ApiError(400, str(e)) from None
                self.applied_seq, scope = state.seq, "all replicas"
                routes = Routes(**{**routes.__dict__, "salt": (state.experiment or {}).get("salt") or Routes.salt})
        self.routes.set(routes)
        log.info("routes changed to %s (%s)", routes, scope)
        return routes, scope

    async def reconcile(self) -> bool:
        """Make this replica serve what the registry's newest serving state says: load its
        adapters, apply its routes, unload what it no longer names. True if anything changed.
        Serialised, and only ever forward (a newer state is never undone by an older one). A
        champion that fails to load leaves the previous routes serving; a canary that fails is left
        out (the champion's routes apply, canary share 0). Either is retried next round."""
        if self.registry is None:
            return False
        async with self.reconcile_lock:
            want = await asyncio.to_thread(self.registry.serving_state)
            if want.seq <= self.applied_seq:
                return False
            names = [n for n in (want.champion, want.canary) if n]
            loaded = await self.loaded_names()
            canary, share, failed = want.canary, want.canary_share, None
            for ref in names:
                if ref not in loaded:
                    try:
                        await self.load_version(ref)
                    except Exception as e:
                        if ref != want.canary:
                            raise  # no champion: keep the previous routes, retry next round
                        # A canary that cannot load must not hold up the champion's routes.
                        canary, share, failed = None, 0.0, e
                        continue
                    self.reconciled.add(ref)
            salt = (want.experiment or {}).get("salt") or Routes.salt
            self.routes.set(Routes(champion=want.champion, canary=canary, canary_share=share,
                                   holdout_share=want.holdout_share, salt=salt).validate(await self.loaded_names()))
            for ref in sorted(self.reconciled - set(names)):
                await self.unload(ref)
                self.reconciled.discard(ref)
            if failed is not None:
                self.metrics.inc("vloop_reconcile_failures_total", "failed reconciliations with the registry")
                log.warning("serving state #%d applied without its canary %s, which failed to load: %s",
                            want.seq, want.canary, failed)
                raise failed  # applied_seq stays behind: the canary is retried next round
            self.applied_seq = want.seq
            log.info("serving state #%d applied: %s", want.seq, self.routes.routes)
            return True

    async def reconcile_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as e:  # the lake or an adapter is unavailable: keep serving, retry
                self.metrics.inc("vloop_reconcile_failures_total", "failed reconciliations with the registry")
                log.warning("reconciling with the registry failed: %s", e)
            await asyncio.sleep(interval_s)
