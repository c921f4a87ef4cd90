"""The main job on embedded defaults: what `make demo` runs.

Today it exercises the foundation end to end on the configured lake (a local directory by
default): it writes one synthetic day of interactions (hourly partitions), feedback events and
content-addressed product images, reads the day back with a column subset, and checks that what
came back is what went in. Later stages of the loop (serving, the daily and biweekly DAGs) plug
in here as they land. Nothing is faked: every figure printed is read back from the lake.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import random
import time
import uuid
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

from vloop.lake import Lake, partition_prefix
from vloop.schema import ARMS, FEEDBACK, INTERACTION

INTERACTIONS = "raw/interactions"
FEEDBACK_DATASET = "raw/feedback"

_PRODUCTS = {  # category -> (question, answer template)
    "shoes": ("What colour are these shoes?", "These shoes are {colour}."),
    "bags": ("What colour is this bag?", "The bag is {colour}."),
    "hats": ("这顶帽子是什么颜色?", "这顶帽子是{colour}。"),
}
_COLOURS = {"red": (200, 30, 30), "blue": (30, 60, 200), "green": (30, 160, 60), "black": (20, 20, 20)}
_FEEDBACK_MIX = [("accept", 0.5), ("edit", 0.15), ("regenerate", 0.1), ("skip", 0.1),
                 ("dwell", 0.1), ("rating", 0.05)]


def _product_image(category: str, colour: str, rng: random.Random) -> bytes:
    img = Image.new("RGB", (64, 64), tuple(rng.randint(200, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    x, y = rng.randint(2, 20), rng.randint(2, 20)
    rgb = _COLOURS[colour]
    if category == "shoes":
        d.polygon([(x, y + 30), (x + 38, y + 30), (x + 38, y + 20), (x + 12, y + 8), (x, y + 10)], fill=rgb)
    elif category == "bags":
        d.rectangle([x, y + 10, x + 34, y + 38], fill=rgb)
        d.arc([x + 8, y, x + 26, y + 20], 180, 360, fill=rgb, width=3)
    else:
        d.ellipse([x, y + 10, x + 36, y + 30], fill=rgb)
        d.rectangle([x + 8, y, x + 28, y + 20], fill=rgb)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def synthetic_day(lake: Lake, day: dt.date, n: int = 300, seed: int = 0) -> dict:
    """Write ``n`` interactions with feedback for ``day`` into ``lake``; returns what was written."""
    rng = random.Random(seed * 1_000_003 + day.toordinal())
    np_rng = np.random.default_rng(rng.getrandbits(32))
    rows = []
    events = []
    for i in range(n):
        category = rng.choice(list(_PRODUCTS))
        colour = rng.choice(list(_COLOURS))
        stored = lake.put_image(_product_image(category, colour, rng))
        ts = dt.datetime.combine(day, dt.time(rng.randrange(24), rng.randrange(60), rng.randrange(60)),
                                 dt.timezone.utc)
        question, template = _PRODUCTS[category]
        right = rng.random() < 0.7
        answer = template.format(colour=colour if right else rng.choice(list(_COLOURS)))
        logprobs = (-np_rng.exponential(0.05 if right else 0.6, size=6)).round(4).tolist()
        request_id = str(uuid.UUID(int=rng.getrandbits(128)))
        rows.append({
            "request_id": request_id, "ts": ts,
            "user_key": hashlib.sha256(f"user{rng.randrange(50)}".encode()).hexdigest()[:32],
            "session_id": f"s{rng.randrange(120)}", "category": category,
            "image_sha256": stored.sha256, "image_key": stored.key,
            "image_w": stored.width, "image_h": stored.height,
            "question": question, "answer": answer, "token_logprobs": logprobs,
            "confidence": float(np.exp(np.mean(logprobs))), "latency_ms": rng.uniform(80, 400),
            "base_model": "tiny-qwen3-vl", "adapter": None,
            "arm": rng.choices(ARMS, weights=[85, 10, 5])[0], "status": "ok", "redactions": 0,
        })
        kind = rng.choices([k for k, _ in _FEEDBACK_MIX], weights=[w for _, w in _FEEDBACK_MIX])[0]
        events.append({
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))), "request_id": request_id,
            "ts": ts + dt.timedelta(seconds=rng.randint(2, 90)), "type": kind,
            "edited_text": template.format(colour=colour) if kind == "edit" else None,
            "dwell_ms": rng.randint(500, 20000) if kind == "dwell" else None,
            "rating": rng.randint(1, 5) if kind == "rating" else None,
        })
    # Hourly partitions as the gateway's shipper lays them out; re-running the day replaces it.
    hour_keys = lake.write_hourly(INTERACTIONS, INTERACTION.to_table(rows), day)
    lake.write_partition(FEEDBACK_DATASET, FEEDBACK.to_table(events), day)
    return {"interactions": n, "feedback": len(events), "hours": len(hour_keys),
            "request_ids": sorted(r["request_id"] for r in rows)}


def run_demo(lake: Lake, day: dt.date, n: int = 300, seed: int = 0, out=print) -> dict:
    """Write a synthetic day, read it back and check it. Returns the figures it printed."""
    out(f"lake: {lake.url}")
    t0 = time.perf_counter()
    written = synthetic_day(lake, day, n=n, seed=seed)
    out(f"wrote {written['interactions']} interactions in {written['hours']} hourly partitions "
        f"and {written['feedback']} feedback events for {day} in {time.perf_counter() - t0:.2f}s")
    return verify_day(lake, day, written["request_ids"], out=out)


def verify_day(lake: Lake, day: dt.date, expected_ids: list[str], out=print) -> dict:
    """Read ``day`` back from the lake and check it holds exactly ``expected_ids`` and their images."""
    t0 = time.perf_counter()
    inter = lake.read_partitions(INTERACTIONS, day, day,
                                 columns=["request_id", "arm", "category", "confidence", "image_key"],
                                 schema=INTERACTION.arrow)
    fb = lake.read_partitions(FEEDBACK_DATASET, day, day, schema=FEEDBACK.arrow)
    t_read = time.perf_counter() - t0
    got_ids = sorted(inter.column("request_id").to_pylist())
    if got_ids != sorted(expected_ids):
        raise RuntimeError(f"read back {len(got_ids)} interactions for {day}, expected {len(expected_ids)}")
    images = set(inter.column("image_key").to_pylist())
    missing = [k for k in images if not lake.exists(k)]
    if missing:
        raise RuntimeError(f"{len(missing)} image objects are missing, e.g. {missing[0]}")
    arms = Counter(inter.column("arm").to_pylist())
    types = Counter(fb.column("type").to_pylist())
    conf = np.asarray(inter.column("confidence").to_pylist(), dtype=float)
    out(f"read back {inter.num_rows} interactions ({len(inter.column_names)} of "
        f"{len(INTERACTION.names)} columns) and {fb.num_rows} feedback events in {t_read:.2f}s; "
        f"all request ids match")
    out("arms: " + ", ".join(f"{a}={arms.get(a, 0)}" for a in ARMS))
    out("feedback: " + ", ".join(f"{t}={c}" for t, c in types.most_common()))
    out(f"distinct images: {len(images)} (content-addressed, all present); "
        f"confidence mean {conf.mean():.3f}, below 0.6: {(conf < 0.6).mean():.1%}")
    files = lake.list(partition_prefix(INTERACTIONS, day))
    out(f"partition files for {day}: {len(files)}")
    return {"interactions": inter.num_rows, "feedback": fb.num_rows, "images": len(images),
            "arms": dict(arms), "feedback_types": dict(types), "files": len(files)}
