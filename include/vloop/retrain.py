"""The decisions of the biweekly retraining: whether there is enough to learn from, whether the
candidate is good enough to serve, and putting it in front of users as a canary.

The training itself runs as ``python -m training`` (its own process or container, see
:mod:`training.job`); these functions are what the ``retrain_biweekly`` DAG calls around it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from vloop import daily
from vloop.lake import Lake
from vloop.registry import Registry


@dataclass
class GateConfig:
    set_name: str = "golden"  # the set the decision is made on
    metric: str = "exact_match"
    margin: float = 0.02  # the candidate must beat the champion by at least this much overall
    category_tolerance: float = 0.05  # and lose no category by more than this


def labels_since_last_training(lake: Lake, registry: Registry) -> tuple[int, str | None]:
    """Labels (correct/wrong verdicts) pulled after the newest registered adapter was created."""
    versions = registry.versions()
    since = max((v.created_at for v in versions), default=None)
    lab = daily.read_days(lake, daily.LABELED, daily.LABELED_FILE)
    if not len(lab):
        return 0, since
    lab = lab[lab["verdict"].isin(["correct", "wrong"])]
    if since:
        lab = lab[lab["dt"] > since[:10]]
    return len(lab), since


def gate(metrics: dict, cfg: GateConfig | None = None) -> tuple[bool, str]:
    """(passed, reason) for a candidate's ``metrics.json`` (candidate and champion side by side)."""
    cfg = cfg or GateConfig()
    sets = metrics.get("sets", {})
    if cfg.set_name not in sets:
        return False, f"no {cfg.set_name} evaluation in the metrics"
    cand, champ = sets[cfg.set_name]["candidate"], sets[cfg.set_name]["champion"]
    c, h = cand["overall"][cfg.metric], champ["overall"][cfg.metric]
    if c < h + cfg.margin:
        return False, (f"{cfg.set_name} {cfg.metric} {c:.3f} does not beat the champion's {h:.3f} "
                       f"by the margin {cfg.margin:.3f}")
    worse = []
    for cat, m in champ["by_category"].items():
        cm = cand["by_category"].get(cat, {}).get(cfg.metric)
        if cm is not None and cm < m[cfg.metric] - cfg.category_tolerance:
            worse.append(f"{cat} {cm:.3f} < {m[cfg.metric]:.3f}")
    if worse:
        return False, f"regresses beyond {cfg.category_tolerance:.3f} in: " + ", ".join(worse)
    return True, f"{cfg.set_name} {cfg.metric} {c:.3f} vs champion {h:.3f} (margin {cfg.margin:.3f}); no category regressed"


def deploy_canary(serving_url: str, token: str, lora_name: str, lake_prefix: str, share: float,
                  timeout: float = 120) -> dict:
    """Load the adapter into serving (vLLM's runtime LoRA API) and route ``share`` of users to it,
    keeping the champion route as it is. Returns the new routes."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=serving_url.rstrip("/"), headers=headers, timeout=timeout) as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": lora_name, "lora_path": lake_prefix})
        if r.status_code >= 400:
            raise RuntimeError(f"serving refused to load {lora_name}: {r.status_code} {r.text[:300]}")
        routes = http.get("/admin/routes").raise_for_status().json()
        routes.update(canary=lora_name, canary_share=share)
        r = http.put("/admin/routes", json=routes)
        if r.status_code >= 400:
            raise RuntimeError(f"serving refused the routes {routes}: {r.status_code} {r.text[:300]}")
        return r.json()


def today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()
