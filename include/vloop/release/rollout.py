"""The canary decision rule: from cumulative per-arm counts to continue / promote / rollback / halt.

``decide`` is a pure function of the counts of the current stage (10% → 50% → 100%); the hourly
``canary_rollout`` DAG calls it with cumulative counts since the stage went live and acts on the
answer. It keeps no state between looks, and it does not need to: the interval below is valid at
every look at once, so looking every hour does not inflate the error rates.

Metrics. Two ratio metrics per arm: acceptance ``Σ a_u / Σ n_u`` and edit ``Σ e_u / Σ n_u`` (requests
with an accept / with an edit over requests). Acceptance should go up, edit should go down.

Variance. The unit of randomisation is the user, and the requests of one user are correlated, so
the variance is taken over users (cluster-robust). For a ratio r̂ = Σa_u / Σn_u over N users the
delta method gives (Deng, Knoblich & Lu 2018, "Applying the delta method in metric analytics")

    Var(r̂) = 1/(N·n̄²) · (s²_a − 2·r·s_an + r²·s²_n)
           = Σ_u (a_u − r·n_u)² / (R²·(N−1)/N)        with R = Σ n_u,

and the second line is what the per-user moment columns give:
``Σ(a_u − r n_u)² = accepted_sq − 2 r accepted_x_requests + r² requests_sq``. When the moment columns
are absent the rule falls back to ``p(1−p)/users``: the variance if every request of a user had the
same outcome, the worst case of intra-user correlation when users send similar numbers of requests.
It is wider than the delta method whenever the intra-user correlation is moderate (with 1 + Poisson(2)
requests per user it is about twice the variance at a correlation of 0.2); it is not a strict
bound when request counts are very uneven *and* users are almost perfectly consistent, so feed the
moment columns in production. Either way the variance is floored at the independent-requests
value ``p̃(1−p̃)/requests`` with ``p̃ = (successes + ½)/(requests + 1)``, so an arm with no successes
yet, or a single user, never gets a zero-width interval.

Always-valid inference. For Δ = r_canary − r_champion with estimated variance V = Var_canary +
Var_champion, the interval at every look is ``Δ ± radius`` with Robbins' normal-mixture boundary

    radius = sqrt( 2·V·(V+τ²)/τ² · ( log(1/α_m) + ½·log((V+τ²)/V) ) )

— the mixture SPRT of Johari, Koomen, Pekelis & Walsh (2017, "Peeking at A/B tests"), as used by
GrowthBook, which is the asymptotic confidence sequence of Waudby-Smith, Arbour, Sinha, Kennedy &
Ramdas (2023, "Time-uniform central limit theory and asymptotic confidence sequences", Thm 2.2)
written on the scale of the difference. τ (``mixture_sd``) is the effect size the boundary is
tightest for; the interval is about 3.3·sqrt(V) wide on each side when V ≈ τ²/10 (the default
τ = 0.03 suits a 3-point change with ~60,000 requests at a 10% share) and grows faster than sqrt(V)
when V ≫ τ² (few users), so early looks rarely decide. α is split over the two metrics
(Bonferroni, α_m = α/2), so the chance that an A/A experiment is ever promoted or rolled back on a
metric, however often it is looked at, is at most α. The guarantee is asymptotic (large samples,
plug-in variance); ``tests/test_rollout.py`` measures it by simulation with clustered users (10%
share, ~830 requests an hour, hourly looks from the first hour for a week): about 2% of A/A
experiments are promoted or rolled back, and a 3-point change on both metrics is promoted / rolled
back in about 97% of experiments of 60,000 requests. A canary "significantly worse" on either
metric is rolled back at the first look that shows it; promotion needs ``min_hours`` and
``min_requests`` per arm as well, so a full daily cycle is seen before the champion changes.

Checks in order: input errors raise ``ValueError``; counts no set of users can produce (more users
than requests, impossible moments) → halt; a missing arm or an arm without users → continue
(``max_hours`` passed → inconclusive rollback; else a user split that already shows a sample-ratio
mismatch → halt); guardrails (error rate up by more than ``max_error_rate_increase``, p95 latency
up by more than ``max_latency_p95_ratio``; point estimates, once the canary has
``guardrail_min_requests``) → rollback; a metric significantly worse → rollback; ``max_hours``
passed while the split is mismatched → inconclusive rollback; sample-ratio mismatch (chi-square
goodness of fit of canary vs champion users against ``expected_canary_share``; p < ``srm_p``) →
halt; enough time and traffic, a metric significantly better and none worse → promote;
``max_hours`` without a decision → rollback marked ``inconclusive`` (keep the champion, retire the
canary); else continue.

Why the guardrails, a regression and ``max_hours`` come before the SRM check: each of them ends
with the champion serving everyone, which is safe whatever the split; a mismatch most often means
some replicas failed to load the canary, exactly when it is likely broken, so it must not shield a
broken canary from them. The SRM check still comes before a promotion, because a mismatched split
invalidates the comparison. A halt is not "change nothing": :func:`vloop.release.canary.step` takes the
canary off (share 0, the champion serves everyone) and the DAG task fails as the alert.

Error rates that are *not* in the α budget: the SRM check is a fixed-level test repeated at every
look, so an A/A experiment is halted now and then (about 2–3% over a week of hourly looks in the
simulation; a halt takes the canary off and waits for a person, it promotes nothing and rejects
no version); guardrails are business limits on point estimates, not tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import pandas as pd

ARMS = ("champion", "canary")
ACTIONS = ("continue", "promote", "rollback", "halt")
REQUIRED = ("arm", "users", "requests", "accepted", "edited", "hours")
MOMENT_COLUMNS = ("requests_sq", "accepted_sq", "edited_sq", "accepted_x_requests", "edited_x_requests")
OPTIONAL = ("errors", "latency_p95_ms") + MOMENT_COLUMNS
# metric name -> (success column, whether up is good)
METRICS = {"acceptance": ("accepted", True), "edit": ("edited", False)}


@dataclass(frozen=True)
class RolloutPolicy:
    alpha: float = 0.05  # chance, over all looks, that an A/A canary is promoted or rolled back
    expected_canary_share: float = 0.10  # canary / (canary + champion) users at this stage
    min_hours: float = 24  # before promoting: a full daily cycle
    min_requests: int = 1000  # per arm, before promoting
    max_hours: float = 7 * 24  # then keep the champion and retire the canary as inconclusive
    max_error_rate_increase: float = 0.02  # guardrail: canary error rate − champion's
    max_latency_p95_ratio: float = 1.5  # guardrail: canary p95 / champion p95
    guardrail_min_requests: int = 100  # canary requests before a guardrail may trip
    srm_p: float = 0.001
    # τ of the normal mixture: the difference in rate the boundary is tightest for (3 points of
    # acceptance/edit rate is the effect a retrained adapter is expected to make).
    mixture_sd: float = 0.03

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.expected_canary_share < 1:
            raise ValueError(f"expected_canary_share must be in (0, 1), got {self.expected_canary_share}")
        if not 0 < self.srm_p < 1:
            raise ValueError(f"srm_p must be in (0, 1), got {self.srm_p}")
        if not self.mixture_sd > 0:
            raise ValueError(f"mixture_sd must be > 0, got {self.mixture_sd}")
        if self.max_hours < self.min_hours:
            raise ValueError(f"max_hours ({self.max_hours}) is below min_hours ({self.min_hours})")


@dataclass
class MetricResult:
    champion: float  # rate
    canary: float
    diff: float  # canary − champion
    lower: float  # always-valid interval of diff
    upper: float
    better: bool  # interval entirely on the good side (acceptance up, edit down)
    worse: bool  # interval entirely on the bad side
    variance: float  # V = Var(canary rate) + Var(champion rate)
    variance_method: str  # "delta" when both arms had the moment columns, else "conservative"


@dataclass
class Decision:
    action: str  # continue / promote / rollback / halt
    reason: str  # one sentence, with the figures
    metrics: dict[str, MetricResult] = field(default_factory=dict)
    srm_p: float | None = None
    guardrails: list[str] = field(default_factory=list)  # names of the guardrails that tripped
    inconclusive: bool = False  # rollback because max_hours passed without a decision
    hours: float = 0.0
    users: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON types only (non-finite floats become None), for registry events and reports."""
        return _json_safe(asdict(self))


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    number = float(value)  # also numpy scalars
    return number if math.isfinite(number) else None


def mixture_radius(variance: float, mixture_sd: float, alpha: float) -> float:
    """Half-width of the normal-mixture confidence sequence for an estimate with variance V:
    ``sqrt(2·V·(V+τ²)/τ² · (log(1/α) + ½·log((V+τ²)/V)))`` (Johari et al. 2017; Waudby-Smith et al.
    2023, Thm 2.2). Two-sided; the probability that Δ ever leaves ``Δ̂ ± radius`` is ≤ α."""
    if variance <= 0:
        return 0.0
    tau2 = mixture_sd * mixture_sd
    total = variance + tau2
    return math.sqrt(2 * variance * total / tau2 * (math.log(1 / alpha) + 0.5 * math.log(total / variance)))


def rate_variance(arm: dict, success_column: str) -> tuple[float, str]:
    """Variance of one arm's rate ``Σ successes / Σ requests`` over its users, and the method used.

    Delta method over users when the moment columns are there (see the module docstring):
    ``(S_aa − 2 r S_an + r² S_nn) / (R² (N−1)/N)``; else ``p(1−p)/users``. Floored at
    ``p̃(1−p̃)/requests``, p̃ = (successes + ½)/(requests + 1)."""
    users, requests, successes = arm["users"], arm["requests"], arm[success_column]
    rate = successes / requests
    shrunk = (successes + 0.5) / (requests + 1)
    floor = shrunk * (1 - shrunk) / requests
    moments = (arm.get(f"{success_column}_sq"), arm.get(f"{success_column}_x_requests"), arm.get("requests_sq"))
    if users >= 2 and all(m is not None for m in moments):
        s_aa, s_an, s_nn = moments
        squared_residuals = s_aa - 2 * rate * s_an + rate * rate * s_nn  # Σ_u (a_u − r n_u)²
        return max(squared_residuals / (requests * requests * (users - 1) / users), floor), "delta"
    return max(shrunk * (1 - shrunk) / users, floor), "conservative"


def srm_p_value(canary_users: float, champion_users: float, expected_canary_share: float) -> float:
    """Chi-square goodness of fit (1 degree of freedom) of the two arms' user counts against the
    expected split: ``χ² = Σ (O−E)²/E``, ``p = P(χ²₁ > χ²) = erfc(sqrt(χ²/2))`` (exact for 1 df,
    so no scipy)."""
    total = canary_users + champion_users
    if total <= 0:
        return 1.0
    expected_canary = total * expected_canary_share
    expected_champion = total - expected_canary
    chi2 = ((canary_users - expected_canary) ** 2 / expected_canary
            + (champion_users - expected_champion) ** 2 / expected_champion)
    return math.erfc(math.sqrt(chi2 / 2))


def _read_arms(counts: pd.DataFrame) -> tuple[dict[str, dict], float]:
    """The champion and canary rows as dicts of floats (absent or NaN optional values left out),
    and the hours (max over those rows). Raises ValueError on malformed input."""
    if not isinstance(counts, pd.DataFrame):
        raise ValueError(f"counts must be a pandas DataFrame, got {type(counts).__name__}")
    missing = [c for c in REQUIRED if c not in counts.columns]
    if missing:
        raise ValueError(f"counts is missing required column(s) {missing}; it needs {list(REQUIRED)}")
    # Plain Python rows: pandas' per-column and per-row access costs far more than the arithmetic,
    # and simulations call this at every look.
    names = counts.columns.tolist()
    rows = counts.to_numpy(dtype=object).tolist()
    wanted = [(c, names.index(c)) for c in REQUIRED[1:] + OPTIONAL if c in names]
    arm_names = [row[names.index("arm")] for row in rows]
    duplicated = [name for name in ARMS if arm_names.count(name) > 1]
    if duplicated:
        raise ValueError(f"counts must have one row per arm; {duplicated} appear more than once")
    arms: dict[str, dict] = {}
    hours = 0.0
    for name, row in zip(arm_names, rows):
        if name not in ARMS:
            continue
        record = {column: row[position] for column, position in wanted}
        arm = {}
        for column, value in record.items():
            if value is None or value is pd.NA:
                value = math.nan
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"counts[{column!r}] for arm {name!r} is not a number: {value!r}") from None
            if math.isnan(number):
                if column in REQUIRED:
                    raise ValueError(f"counts[{column!r}] for arm {name!r} is missing (NaN)")
                continue  # an optional figure this arm does not have
            if number < 0 or math.isinf(number):
                raise ValueError(f"counts[{column!r}] for arm {name!r} must be finite and >= 0, "
                                 f"got {value!r}")
            arm[column] = number
        for column in ("accepted", "edited", "errors"):
            if arm.get(column, 0) > arm["requests"]:
                raise ValueError(f"arm {name!r} has {column}={arm[column]:g} > requests={arm['requests']:g}")
        hours = max(hours, arm.pop("hours"))
        arms[name] = arm
    return arms, hours


def _inconsistency(name: str, arm: dict) -> str | None:
    """Why an arm's counts cannot be right (so nothing computed from them can be trusted), or None."""
    if arm["requests"] < arm["users"]:
        return f"{name} has more users ({arm['users']:g}) than requests ({arm['requests']:g})"
    if arm["users"] == 0 and arm["requests"] > 0:
        return f"{name} has {arm['requests']:g} requests but no users"
    # Per user 0 <= a_u <= n_u and n_u >= 1, so S_aa <= S_an <= S_nn, S_nn >= R and S_nn >= R²/N.
    if "requests_sq" in arm:
        n_sq = arm["requests_sq"]
        if n_sq < arm["requests"] or n_sq * arm["users"] < arm["requests"] ** 2 * (1 - 1e-9):
            return (f"{name} has requests_sq={n_sq:g}, impossible for {arm['requests']:g} requests "
                    f"of {arm['users']:g} users")
        for column in ("accepted", "edited"):
            sq, cross = arm.get(f"{column}_sq"), arm.get(f"{column}_x_requests")
            if sq is None or cross is None:
                continue
            if not arm[column] <= sq <= cross * (1 + 1e-9) <= n_sq * (1 + 1e-9):
                return f"{name} has per-user moments of {column} that no set of users can produce"
    return None


def _figures(metrics: dict[str, MetricResult], users: dict, hours: float, alpha_m: float) -> str:
    parts = [
        f"{name} {m.canary:.3f} canary vs {m.champion:.3f} champion "
        f"(diff {m.diff:+.3f}, {1 - alpha_m:.1%} always-valid interval [{m.lower:+.3f}, {m.upper:+.3f}])"
        for name, m in metrics.items()
    ]
    return (f"{'; '.join(parts)}; {users['canary']:,.0f} canary / {users['champion']:,.0f} champion users "
            f"after {hours:.1f} h")


def decide(counts: pd.DataFrame, policy: RolloutPolicy | None = None) -> Decision:
    """The decision at one look from the current stage's cumulative per-arm counts.

    ``counts``: one row per arm (``arm`` champion / canary; other rows ignored) with ``users``,
    ``requests``, ``accepted``, ``edited``, ``hours``; optionally ``errors``, ``latency_p95_ms`` and
    the per-user moments ``requests_sq``, ``accepted_sq``, ``edited_sq``, ``accepted_x_requests``,
    ``edited_x_requests`` (Σ over the arm's users of n², a², e², a·n, e·n)."""
    policy = policy or RolloutPolicy()
    arms, hours = _read_arms(counts)
    alpha_m = policy.alpha / len(METRICS)
    users = {name: int(arms[name]["users"]) if name in arms else 0 for name in ARMS}
    requests = {name: int(arms[name]["requests"]) if name in arms else 0 for name in ARMS}
    base = dict(hours=hours, users=users, requests=requests)
    srm = srm_p_value(users["canary"], users["champion"], policy.expected_canary_share)
    observed_share = users["canary"] / max(users["canary"] + users["champion"], 1)
    srm_text = (f"canary has {observed_share:.2%} of {users['canary'] + users['champion']:,} users, "
                f"expected {policy.expected_canary_share * 100:g}% (SRM p={srm:.2g})")

    # 1. Counts that cannot be right: nothing computed from them can be trusted.
    for name, arm in arms.items():
        problem = _inconsistency(name, arm)
        if problem:
            return Decision("halt", f"halt: unusable counts, {problem}", srm_p=srm, **base)

    # 2. Nothing to compare yet. A canary that gets no users while the champion gets many is an
    # assignment failure, not "too early", so the SRM check still applies.
    empty = [name for name in ARMS if users[name] == 0]
    if empty:
        what = " and ".join(f"{name} {'has no users' if name in arms else 'row is missing'}" for name in empty)
        if hours >= policy.max_hours:  # out of time wins: the canary comes off either way
            return Decision("rollback", f"inconclusive after {hours:.0f} hours: {what}", srm_p=srm,
                            inconclusive=True, **base)
        if srm < policy.srm_p:
            return Decision("halt", f"halt: sample-ratio mismatch, {what}: {srm_text}", srm_p=srm, **base)
        return Decision("continue", f"continue: {what} after {hours:.1f} h, nothing to compare yet",
                        srm_p=srm, **base)

    champion, canary = arms["champion"], arms["canary"]
    metrics: dict[str, MetricResult] = {}
    for name, (column, up_is_good) in METRICS.items():
        var_champion, method_champion = rate_variance(champion, column)
        var_canary, method_canary = rate_variance(canary, column)
        rate_champion = champion[column] / champion["requests"]
        rate_canary = canary[column] / canary["requests"]
        diff = rate_canary - rate_champion
        variance = var_champion + var_canary
        radius = mixture_radius(variance, policy.mixture_sd, alpha_m)
        lower, upper = diff - radius, diff + radius
        metrics[name] = MetricResult(
            champion=rate_champion, canary=rate_canary, diff=diff, lower=lower, upper=upper,
            better=lower > 0 if up_is_good else upper < 0, worse=upper < 0 if up_is_good else lower > 0,
            variance=variance,
            variance_method="delta" if method_champion == method_canary == "delta" else "conservative")
    figures = _figures(metrics, users, hours, alpha_m)
    base.update(metrics=metrics, srm_p=srm)

    # 3. Guardrails: limits on the point estimates, once the canary has some traffic. Judged before
    # the SRM check: rolling back is safe whatever the split, and a mismatch (replicas that could
    # not load the canary) is when a canary is most likely broken.
    tripped, trip_text = [], []
    if canary["requests"] >= policy.guardrail_min_requests:
        if "errors" in champion and "errors" in canary:
            error_champion = champion["errors"] / champion["requests"]
            error_canary = canary["errors"] / canary["requests"]
            increase = error_canary - error_champion
            if increase > policy.max_error_rate_increase:
                tripped.append("error_rate")
                trip_text.append(f"error rate {error_canary:.3f} canary vs {error_champion:.3f} champion "
                                 f"(+{increase:.3f} > +{policy.max_error_rate_increase:.3f})")
        if champion.get("latency_p95_ms", 0) > 0 and "latency_p95_ms" in canary:
            ratio = canary["latency_p95_ms"] / champion["latency_p95_ms"]
            if ratio > policy.max_latency_p95_ratio:
                tripped.append("latency_p95")
                trip_text.append(f"p95 latency {canary['latency_p95_ms']:.0f} ms canary vs "
                                 f"{champion['latency_p95_ms']:.0f} ms champion "
                                 f"(x{ratio:.2f} > x{policy.max_latency_p95_ratio:g})")
    if tripped:
        return Decision("rollback", f"rollback: guardrail tripped, {'; '.join(trip_text)}; {figures}",
                        guardrails=tripped, **base)

    # 4. Significantly worse on either metric: roll back at once (before the SRM check, as above).
    worse = [name for name, m in metrics.items() if m.worse]
    if worse:
        return Decision("rollback", f"rollback: canary significantly worse on {' and '.join(worse)}: "
                        f"{figures}", **base)

    # 5. An assignment that is not the configured split invalidates the comparison: no promotion
    # on it. Out of time still retires the canary as inconclusive; otherwise halt (the canary is
    # taken off by vloop.release.canary.step and a person is alerted).
    if srm < policy.srm_p:
        if hours >= policy.max_hours:
            return Decision("rollback", f"inconclusive after {hours:.0f} hours with a sample-ratio mismatch, "
                            f"{srm_text}; {figures}", inconclusive=True, **base)
        return Decision("halt", f"halt: sample-ratio mismatch, {srm_text}; {figures}", **base)

    # 6. Promote: enough time and traffic, better on one metric, worse on none.
    better = [name for name, m in metrics.items() if m.better]
    enough = hours >= policy.min_hours and min(requests.values()) >= policy.min_requests
    if better and enough:
        return Decision("promote", f"promote: canary significantly better on {' and '.join(better)}: "
                        f"{figures}", **base)

    # 7. Out of time: keep the champion, retire the canary.
    if better:
        status = (f"better on {' and '.join(better)} but waiting for {policy.min_hours:g} h and "
                  f"{policy.min_requests:,} requests per arm")
    else:
        status = "no significant difference yet"
    if hours >= policy.max_hours:
        return Decision("rollback", f"inconclusive after {hours:.0f} hours: {status}; {figures}",
                        inconclusive=True, **base)
    return Decision("continue", f"continue: {status}; {figures}", **base)
