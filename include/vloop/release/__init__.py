"""Release — the canary (``canary_rollout``): the sequential test of the canary against the
champion with always-valid intervals and its promote / hold / roll-back decision (``rollout``),
and the steps that apply it to the serving gateway and keep the history of what served when
(``canary``); a person's answer before a promotion when it is asked for (``approval``)."""
