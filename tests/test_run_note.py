"""The retrain_biweekly run note (vloop.learn.retrain.run_note), without Airflow."""

from vloop.learn.retrain import NOTE_MAX, gate_decision, run_note


def _metrics(cand, champ):
    n = len(cand)
    by = lambda ok: {"overall": {"exact_match": sum(ok) / n}, "by_category": {}}  # noqa: E731
    return {"sets": {"golden": {"candidate": by(cand), "champion": by(champ)}},
            "paired": {"golden": {"candidate_correct": cand, "champion_correct": champ}}}


def test_notes_say_skipped_rejected_promoted_queued_failed():
    assert run_note(labels={"new_labels": 12, "needed": 100}) == "skipped: only 12 new labels (needs 100)"
    worse = {**gate_decision(_metrics([1] * 50 + [0] * 50, [1] * 55 + [0] * 45)), "ref": "vqa@v1", "golden_version": 3}
    note = run_note(labels={"new_labels": 120, "needed": 100}, registered=worse)
    assert note.startswith("rejected: golden exact match 0.500 vs champion 0.550 (-0.050, 95% CI ")
    assert "McNemar p=" in note and "n=100" in note and "golden v3" in note and "below the 0.020 margin" in note
    assert note.endswith("; vqa@v1")
    better = {**gate_decision(_metrics([1] * 80 + [0] * 20, [1] * 50 + [0] * 50)), "ref": "vqa@v2"}
    assert better["passed"]
    note = run_note(registered=better, deployed={"canary": "vqa@v2", "canary_share": 0.1, "seq": 4})
    assert note.startswith("promoted to canary: vqa@v2 at 10%; golden exact match 0.800 vs champion 0.500 (+0.300")
    assert run_note(registered=better, deployed={"queued": True, "ref": "vqa@v2", "live": "vqa@v1"}).startswith(
        "approved, queued behind canary vqa@v1: vqa@v2; ")
    assert run_note(failed=["train"]).startswith("failed at train")
    assert len(run_note(registered={**worse, "reason": "x" * 5000, "p": None})) <= NOTE_MAX
