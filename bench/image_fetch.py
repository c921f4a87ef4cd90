"""What the daily steps that touch every photo cost on an S3 lake: validation asking which photos
exist, and the image check reading each one.

``--photos`` distinct product photos (the simulation's renders, each stamped to be distinct, as in
bench/daily_pipeline.py) are stored in a SeaweedFS S3 server (``weed mini``) on loopback. Then, in
the same run and alternated (best of ``--repeat``), with the minio client as the lake uses it:

* existence: a HEAD per photo one after another against ``S3Lake.existing`` (HEADs on threads);
* the image check (vloop.curate.daily.image_check, NIQE on) over photos read one after another
  (``Lake.get_many`` of the base class) against ``S3Lake.get_many`` (a window of GETs ahead, on
  threads, while a photo is checked).

    python bench/image_fetch.py                 # 2,000 photos
    python bench/image_fetch.py --photos 500

Last line: ``RESULT exists_speedup=… check_speedup=… check_photos_per_s=…``. A loopback server
answers in well under a millisecond; a remote bucket's latency makes the difference larger.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from daily_pipeline import _store_photos

    from vloop.curate.daily import image_check
    from vloop.curate.imagequality import warm_up
    from vloop.store.lake import Lake, LocalLake, S3Lake
    from vloop.store.s3server import start_seaweedfs

    warm_up()
    tmp = tempfile.TemporaryDirectory()
    server = start_seaweedfs(Path(tmp.name) / "s3", access_key="bench-a", secret_key="bench-b")
    try:
        s3 = S3Lake("bench-photos", endpoint=server.endpoint, access_key="bench-a", secret_key="bench-b",
                    max_image_bytes=2**24, max_image_pixels=2**24)
        t = time.perf_counter()
        local = Path(tmp.name) / "local"
        keys = [key for _, key, _, _ in _store_photos((str(local), 0, args.photos))]
        source = LocalLake(local, max_image_bytes=2**24, max_image_pixels=2**24)
        for k in keys:
            s3.put_bytes(k, source.get_bytes(k), "image/png")
        print(f"{len(keys):,} photos stored in S3 in {time.perf_counter() - t:.0f}s (not counted)", flush=True)

        def check(get_many) -> int:
            return sum(1 for k, data in get_many(s3, keys) if image_check(s3, k, None, data=data)["niqe"] > 0)

        runs = {
            "exists, one at a time": lambda: {k for k in keys if s3.exists(k)},
            "exists, S3Lake.existing": lambda: s3.existing(keys),
            "check, one GET at a time": lambda: check(Lake.get_many),
            "check, S3Lake.get_many": lambda: check(S3Lake.get_many),
        }
        best = {}
        for i in range(args.repeat):
            for name, run in runs.items():
                t = time.perf_counter()
                out = run()
                secs = time.perf_counter() - t
                best[name] = min(best.get(name, secs), secs)
                print(f"  run {i + 1}/{args.repeat}  {name:26s} {secs:6.2f}s  ({len(out) if isinstance(out, set) else out:,})",
                      flush=True)
    finally:
        server.stop()
        tmp.cleanup()
    n = len(keys)
    for name, secs in best.items():
        print(f"{name:28s} {secs:6.2f}s  {n / secs:8,.0f} photos/s")
    exists = best["exists, one at a time"] / best["exists, S3Lake.existing"]
    checked = best["check, one GET at a time"] / best["check, S3Lake.get_many"]
    print(f"RESULT exists_speedup={exists:.2f} check_speedup={checked:.2f} "
          f"check_photos_per_s={n / best['check, S3Lake.get_many']:.0f} photos={n}")


if __name__ == "__main__":
    main()
