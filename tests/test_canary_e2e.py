"""The release end to end: two real serving replicas on one lake follow the registry, an app
(the official openai client) sends image questions through them, simulated users accept right
answers and edit wrong ones, and the canary_rollout DAG (dag.test()) judges the canary hour by
simulated hour: a truly better adapter is widened, then promoted to champion; a truly worse one is
rolled back; a manual rollback through the DAG's params restores the base. After every step the
registry and both replicas' routes agree.

Simulated users are the only stand-in (named so): they know the synthetic world's true answer.
Simulation mode (VLOOP_SIMULATION=1, `--simulation`) lets requests carry the simulated clock."""

from __future__ import annotations

import datetime as dt
import json

import httpx
import pytest
import requests

from tests.conftest import load_dag
from tests.test_serving import TOKEN, Server, data_url, wait_for
from vloop.release import canary
from vloop.store.lake import LocalLake
from vloop.vlm.model import normalise_answer
from vloop.learn.registry import AdapterVersion, Registry
from vloop.learn.retrain import deploy_canary
from vloop.sim.synth import World

T0 = dt.datetime(2026, 11, 2, 0, 0, tzinfo=dt.timezone.utc)
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def routes_of(srv) -> dict:
    return requests.get(srv.url + "/admin/routes", headers=ADMIN, timeout=10).json()


def converged(replicas, **want):
    def check():
        return all(all(routes_of(s).get(k) == v for k, v in want.items()) for s in replicas)
    return wait_for(check, timeout=30, what=f"both replicas to serve {want}")


def app_traffic(replicas, start: dt.datetime, hours: int, users: int, seed: int) -> dict:
    """``users`` users ask two colour questions each, spread over ``hours`` simulated hours, through
    alternating replicas; each accepts a right answer and edits a wrong one with the true answer."""
    from openai import OpenAI

    clients = [OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60) for s in replicas]
    world, tally = World(seed), {}
    for u in range(users):
        at = start + dt.timedelta(seconds=int((hours * 3600 - 120) * u / users))
        sim = {"X-Vloop-Sim-Time": at.isoformat()}
        for q in range(2):
            s = world.sample(u * 2 + q, intents=("colour",), colours=("white", "yellow"))
            r = clients[(u + q) % 2].chat.completions.create(
                model="vloop", user=f"shopper-{seed}-{u}", max_tokens=8, extra_headers=sim,
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(s.image)}},
                    {"type": "text", "text": s.question}]}])
            arm = r.model_extra["vloop"]["arm"]
            right = normalise_answer(r.choices[0].message.content) == normalise_answer(s.answer)
            fb = {"request_id": r.id, "type": "accept"} if right else \
                {"request_id": r.id, "type": "edit", "edited_text": s.answer}
            fb["feedback_token"] = r.model_extra["vloop"]["feedback_token"]  # good on either replica
            httpx.post(replicas[u % 2].url + "/v1/feedback", json=fb, headers=sim, timeout=30).raise_for_status()
            t = tally.setdefault(arm, [0, 0])
            t[0], t[1] = t[0] + 1, t[1] + right
    return tally


def shipped(lake, n_before: int, n_new: int):
    from vloop.store.lake import INTERACTIONS_DATASET
    from vloop.store.schema import INTERACTION

    def count():
        t = lake.read_partitions(INTERACTIONS_DATASET, T0.date(), T0.date() + dt.timedelta(days=1),
                                 columns=["request_id"], schema=INTERACTION.arrow)
        return t.num_rows >= n_before + n_new and t.num_rows
    return wait_for(count, timeout=60, what="the replicas to ship their records")


def test_canary_rollout_through_real_gateways(airflow_db, base_model_dir, adapters, tmp_path, monkeypatch):
    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    reg = Registry(lake)
    refs = {}
    for name in ("colours", "count"):
        for f in adapters[name].iterdir():
            if f.is_file():
                lake.put_bytes(f"adapters/{name}/v1/{f.name}", f.read_bytes())
        refs[name] = reg.register(AdapterVersion(name=name, version="v1", path=f"adapters/{name}/v1/",
                                                 base_model=str(base_model_dir)), actor="test").ref
    replicas = []
    for i in range(2):
        home = tmp_path / f"replica-{i}"
        home.mkdir()
        srv = Server(base_model_dir, lake.root.as_uri(), home, env_extra={"VLOOP_SIMULATION": "1"})
        srv.args += ["--reconcile-interval", "0.5", "--simulation"]
        replicas.append(srv)
    try:
        for srv in replicas:
            srv.start()
        monkeypatch.setenv("AIRFLOW_CONN_VLOOP_LAKE", json.dumps({"conn_type": "generic",
                                                                  "extra": {"lake_url": lake.root.as_uri()}}))
        monkeypatch.setenv("VLOOP_SIMULATION", "1")
        dag = load_dag("canary_rollout")
        # The effects here are large (tens of points) and the samples small (~60 canary requests a
        # stage): the mixture is tuned to such effects (τ 0.15, as in the demo). With the default
        # τ 0.03 a canary right half the time would be widened at the first look only ~40% of the
        # time at these sample sizes; with 0.15, >99% (simulated with vloop.release.rollout.decide).
        params = {"min_hours": 1, "min_requests": 20, "max_hours": 48, "mixture_sd": 0.15}

        def look(now: dt.datetime, **extra):
            dr = dag.test(run_conf={**params, "now": now.isoformat(), **extra})
            return {ti.task_id: ti.state for ti in dr.get_task_instances()}["look"]

        assert look(T0) == "skipped"  # no canary live: nothing to judge

        # The colours adapter knows white and yellow; the base does not. Canary at 30%.
        cfg = canary.ReleaseConfig(stages=(0.3, 0.6, 1.0))
        st = canary.start(reg, refs["colours"], actor="test", reason="passed the gate", cfg=cfg, now=T0)
        converged(replicas, canary=refs["colours"], canary_share=0.3, salt=st.experiment["salt"])
        tally = app_traffic(replicas, T0, 2, 100, seed=1)
        # The base never answers white or yellow right; the canary often does.
        assert tally["canary"][0] > 20 and tally["canary"][1] / tally["canary"][0] > 0.3, tally
        assert tally["champion"][1] / tally["champion"][0] < 0.1, tally
        shipped(lake, 0, 200)
        assert look(T0 + dt.timedelta(hours=2)) == "success"
        state = reg.serving_state()
        assert state.canary == refs["colours"] and state.canary_share == 0.6, (state, canary.looks(lake).to_dict("records"))
        converged(replicas, canary=refs["colours"], canary_share=0.6)

        app_traffic(replicas, T0 + dt.timedelta(hours=2), 2, 60, seed=2)
        shipped(lake, 200, 120)
        assert look(T0 + dt.timedelta(hours=4)) == "success"
        state = reg.serving_state()
        assert state.champion == refs["colours"] and state.canary is None, state
        assert reg.state().statuses[refs["colours"]] == "champion"
        converged(replicas, champion=refs["colours"], canary=None, canary_share=0.0)

        # A worse adapter (taught only to count) as the next canary: rolled back within hours.
        canary.start(reg, refs["count"], actor="test", reason="gate", cfg=cfg, now=T0 + dt.timedelta(hours=5))
        converged(replicas, canary=refs["count"], canary_share=0.3)
        app_traffic(replicas, T0 + dt.timedelta(hours=5), 2, 100, seed=3)
        shipped(lake, 320, 200)
        assert look(T0 + dt.timedelta(hours=7)) == "success"
        state = reg.serving_state()
        assert state.canary is None and state.champion == refs["colours"], state
        assert reg.state().statuses[refs["count"]] == "rejected"
        converged(replicas, champion=refs["colours"], canary=None)
        models = [m["id"] for m in requests.get(replicas[0].url + "/v1/models").json()["data"]]
        assert refs["count"] not in models  # retired adapters are unloaded

        # Manual rollback through the DAG's params: back to the bare base, on both replicas.
        assert look(T0 + dt.timedelta(hours=8), rollback=True) == "failed"  # a rollback needs a reason
        assert reg.serving_state().champion == refs["colours"]
        assert look(T0 + dt.timedelta(hours=8), rollback=True, to="base", reason="app team asked") == "success"
        assert reg.serving_state().champion is None
        converged(replicas, champion=None, canary=None)

        # A version serving cannot load: the deploy fails at once, the canary is taken off
        # (rejected) and the champion's routes never stop.
        lake.put_bytes("adapters/broken/v1/adapter_config.json", b"{not json")
        lake.put_bytes("adapters/broken/v1/adapter_model.safetensors", b"x")
        bad = reg.register(AdapterVersion(name="broken", version="v1", path="adapters/broken/v1/",
                                          base_model=str(base_model_dir)), actor="test").ref
        with pytest.raises(RuntimeError, match="could not load"):
            deploy_canary(lake, bad, actor="test", reason="gate", serving_url=replicas[0].url, token=TOKEN, cfg=cfg)
        assert reg.serving_state().canary is None and reg.state().statuses[bad] == "rejected"
        converged(replicas, champion=None, canary=None)
    finally:
        for srv in replicas:
            srv.stop()
