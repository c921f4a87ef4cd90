"""Feedback that cannot be forged, and API keys per app (issue 22).

Two gateway processes on the tiny model share one lake and one feedback-token key, as two
replicas would: the first without API keys, the second with them.
"""

from __future__ import annotations

import pytest
import requests

from serving.auth import ApiKeys, FeedbackTokens, TokenError, derive_secret, user_digest
from tests.test_serving import SECRET, Server, chat_body, lake_table, minted
from vloop.store.lake import open_lake
from vloop.privacy import user_key
from vloop.store.schema import FEEDBACK, INTERACTION
from vloop.sim.synth import World

SHOP_KEY, OTHER_KEY = "shop-key-0123456789abcdef", "other-key-0123456789abcdef"


def test_tokens_rotate_and_bind(tmp_path):
    old, new = FeedbackTokens(b"k-old"), FeedbackTokens(b"k-new", previous=[b"k-old"])
    t = old.issue("chatcmpl-1", "ukey")
    assert new.verify(t, "chatcmpl-1", "ukey").user == user_digest("ukey")  # the old key still counts
    assert len(t) < 100 and "ukey" not in t
    with pytest.raises(TokenError, match="signature"):
        FeedbackTokens(b"k-new").verify(t, "chatcmpl-1")  # once the old key is dropped, it does not
    with pytest.raises(TokenError, match="another request"):
        old.verify(t, "chatcmpl-2")
    with pytest.raises(TokenError, match="another user"):
        old.verify(t, "chatcmpl-1", "someone-else")
    with pytest.raises(TokenError, match="expired"):
        old.verify(t, "chatcmpl-1", now=2**40)
    with pytest.raises(TokenError, match="malformed"):
        old.verify("v1.x.y", "chatcmpl-1")
    assert derive_secret("a") != derive_secret("b") and derive_secret("a") != b"a"


def test_api_keys_parse_plain_and_hashed(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# id app\nsha256:{ApiKeys.digest(OTHER_KEY)} other\n")
    keys = ApiKeys.parse(f"{SHOP_KEY}:shop", f)
    assert keys.app_for(SHOP_KEY) == "shop" and keys.app_for(OTHER_KEY) == "other"
    assert keys.app_for("nope") is None and keys.app_for(None) is None
    assert OTHER_KEY not in f.read_text()
    with pytest.raises(ValueError, match="shorter than 16"):
        ApiKeys.parse("short:shop")
    assert not ApiKeys.parse(None, None)


def test_feedback_needs_a_valid_token_and_keys_when_configured(tiny_model_dir, tmp_path):
    lake_url = (tmp_path / "lake").as_uri()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shared = {"VLOOP_FEEDBACK_MAX_EVENTS": "5"}
    a = Server(tiny_model_dir, lake_url, tmp_path / "a",
               {**shared, "VLOOP_CORS_ORIGINS": "https://shop.example"}).start()
    b = Server(tiny_model_dir, lake_url, tmp_path / "b",
               {**shared, "VLOOP_API_KEYS": f"{SHOP_KEY}:shop,{OTHER_KEY}:other"}).start()
    s = World(3).sample(0, intents=("colour",))
    try:
        alice = a.post("/v1/chat/completions", chat_body(s, user="alice")).json()
        bob = a.post("/v1/chat/completions", chat_body(s, user="bob")).json()
        rid, tok = alice["id"], alice["vloop"]["feedback_token"]

        def fb(srv, token, request_id=rid, **kw):
            return srv.post("/v1/feedback", {"request_id": request_id, "type": "accept",
                                             **({"feedback_token": token} if token is not None else {}), **kw})

        forged = tok[:-4] + ("AAAA" if not tok.endswith("AAAA") else "BBBB")
        refused = {
            "missing": fb(a, None), "garbage": fb(a, "not-a-token"), "forged": fb(a, forged),
            "expired": fb(a, minted(rid, "alice", ttl_s=-60)),
            "other_request": fb(a, bob["vloop"]["feedback_token"]),  # bob's token on alice's answer
            "other_user": fb(a, tok, user="bob"),  # alice's token, the event claiming to be bob's
            "other_secret": fb(a, FeedbackTokens(b"someone else's key").issue(rid, user_key("alice", SECRET))),
        }
        codes = {k: (r.status_code, r.json()["error"]["message"]) for k, r in refused.items()}
        assert {k: c for k, (c, _) in codes.items()} == {
            "missing": 401, "garbage": 401, "forged": 401, "expired": 401, "other_request": 403,
            "other_user": 403, "other_secret": 401}, codes
        assert "feedback token" in codes["missing"][1] and "expired" in codes["expired"][1]
        metrics = requests.get(a.url + "/metrics").text
        for reason, n in (("forged", 2), ("expired", 1), ("other_request", 1), ("other_user", 1), ("missing", 1)):
            assert f'vloop_feedback_refused_total{{reason="{reason}"}} {n}.0' in metrics, reason

        # The header works as well as the body, and the same token is good on the other replica
        # (which wants an app key: the token alone does not stand in for it).
        assert a.post("/v1/feedback", {"request_id": rid, "type": "dwell", "dwell_ms": 1500},
                      headers={"X-Vloop-Feedback-Token": tok}).status_code == 202
        assert fb(b, tok).status_code == 401
        assert fb(b, tok, api_key="not-a-known-key-000").status_code == 401
        on_b = b.post("/v1/feedback", {"request_id": rid, "type": "rating", "rating": 4, "feedback_token": tok},
                      token=SHOP_KEY)
        assert on_b.status_code == 202, on_b.text
        assert fb(b, tok, api_key=SHOP_KEY, event_id="beacon-1").status_code == 202  # sendBeacon: key in the body

        # One answer takes a bounded number of events (5 here); a retry (same event_id) counts once.
        bid, btok = bob["id"], bob["vloop"]["feedback_token"]
        first = fb(a, btok, bid, event_id="ev-1")
        again = fb(a, btok, bid, event_id="ev-1")
        assert (first.status_code, again.status_code) == (202, 202)
        assert again.json() == {**first.json(), "status": "duplicate"}
        flood = [fb(a, btok, bid, event_id=f"ev-{i}").status_code for i in range(2, 10)]
        assert flood == [202] * 4 + [429] * 4
        assert fb(a, btok, bid, event_id="ev-1").status_code == 202  # a retry past the bound is still fine

        # API keys: chat needs one when keys are configured; the app is logged with the record.
        assert b.post("/v1/chat/completions", chat_body(s)).status_code == 401
        assert b.post("/v1/chat/completions", chat_body(s), token="unknown-key-0123456789").status_code == 401
        shop = b.post("/v1/chat/completions", chat_body(s, user="carol"), token=SHOP_KEY)
        assert shop.status_code == 200, shop.text
        assert b.post("/v1/chat/completions", chat_body(s, user="dan"), token=OTHER_KEY).status_code == 200

        # CORS only for the configured origin; the script is served.
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        ok = requests.options(a.url + "/v1/feedback", headers={"Origin": "https://shop.example", **pre})
        bad = requests.options(a.url + "/v1/feedback", headers={"Origin": "https://evil.example", **pre})
        assert ok.headers.get("access-control-allow-origin") == "https://shop.example"
        assert "access-control-allow-origin" not in bad.headers
        assert "access-control-allow-origin" not in requests.options(
            b.url + "/v1/feedback", headers={"Origin": "https://shop.example", **pre}).headers
        js = requests.get(a.url + "/sdk/vloop-feedback.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "export" in js.text
        assert requests.get(a.url + "/playground").status_code == 404  # off unless enabled
    finally:
        a.stop()
        b.stop()
    lake = open_lake(lake_url)
    inter = {x["request_id"]: x for x in lake_table(lake, "raw/interactions", INTERACTION.arrow).to_pylist()}
    assert inter[rid]["app"] is None and inter[shop.json()["id"]]["app"] == "shop"
    assert {x["app"] for x in inter.values()} == {None, "shop", "other"}
    events = lake_table(lake, "raw/feedback", FEEDBACK.arrow).to_pylist()
    # Alice's answer: the dwell (header), the rating and the beacon on the other replica; nothing refused.
    assert sorted(e["type"] for e in events if e["request_id"] == rid) == ["accept", "dwell", "rating"]
    assert [e["type"] for e in events if e["request_id"] == bob["id"]] == ["accept"] * 5  # the bound
    assert len({e["event_id"] for e in events}) == len(events)


def test_daily_report_per_app_metrics(tmp_path):
    """The report's per-app table reads old curated files (no `app` column) as no app."""
    import datetime as dt

    import pandas as pd
    import pyarrow as pa

    from vloop.curate.daily import CURATED, app_metrics, slice_key
    from vloop.store.lake import LocalLake

    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    day = dt.date(2026, 11, 3)
    lake.write_parquet(slice_key(CURATED, day, 0, "interactions.parquet"), pa.table({"request_id": ["a", "b"]}))
    assert app_metrics(lake, day, pd.DataFrame(columns=["request_id", "weak_label", "reason"])).empty
    lake.write_parquet(slice_key(CURATED, day, 1, "interactions.parquet"),
                       pa.table({"request_id": ["c", "d", "e"], "app": ["shop", "shop", "other"]}))
    mined = pd.DataFrame({"request_id": ["a", "c", "d", "e"], "weak_label": ["positive", "negative", "positive", "unknown"],
                          "reason": ["accepted", "edited", "accepted", "no reaction"]})
    got = app_metrics(lake, day, mined).set_index("app")
    assert got.loc["shop"].tolist() == [2, 0.5, 0.5, 0.5]
    assert got.loc["(no key)", "requests"] == 2 and got.loc["other", "negative"] == 0


def test_a_retry_that_reached_two_replicas_counts_once(tmp_path):
    """Serving's event-id dedupe is per replica: the daily ingest drops a copy that differs only in
    its arrival time (the earliest stays); distinct events with their own ids all stay."""
    import datetime as dt

    from vloop.curate.ingest import ingest_day
    from vloop.store.lake import LocalLake

    lake = LocalLake(tmp_path / "lake", max_image_bytes=2**20, max_image_pixels=2**20)
    t0 = dt.datetime(2026, 11, 3, 12, tzinfo=dt.timezone.utc)
    lake.write_partition("raw/interactions", INTERACTION.to_table([{
        "request_id": "r1", "ts": t0, "user_key": "k", "question": "colour?", "answer": "red",
        "base_model": "tiny", "arm": "champion", "status": "ok"}]), t0.date())
    ev = lambda eid, s, **kw: {"event_id": eid, "request_id": "r1", "ts": t0 + dt.timedelta(seconds=s),  # noqa: E731
                               "type": "edit", "edited_text": "blue", **kw}
    lake.write_partition("raw/feedback", FEEDBACK.to_table([ev("e1", 9), ev("e1", 5), ev("e2", 7),
                                                            ev("e3", 8, edited_text="green"), ev("e3", 8)]), t0.date())
    batch = ingest_day(lake, t0.date(), t0 + dt.timedelta(hours=1))
    got = sorted((e.event_id, e.ts.second, e.edited_text) for e in batch.feedback.itertuples())
    # e3's two rows differ in content: not a retry, both kept (the quality gate flags the id).
    assert got == [("e1", 5, "blue"), ("e2", 7, "blue"), ("e3", 8, "blue"), ("e3", 8, "green")]
    assert batch.duplicates_dropped == 1
