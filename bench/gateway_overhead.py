#!/usr/bin/env python
"""The gateway's own cost: latency it adds and the request rate it logs without loss.

An instant stub OpenAI-compatible backend (canned answer with logprobs) runs on loopback; the
gateway fronts it with ``--upstream`` and logging on (spool + shipper into a local lake). The
same chat requests go (a) straight to the stub and (b) through the gateway, one at a time, and the
difference per percentile is the added latency. Then client processes with keep-alive
connections push as hard as they can for a fixed time; every acknowledged request id must reach
the lake (zero loss).

Each is done twice: text-only requests, and requests carrying a phone photo in a data URL, since
real traffic carries one. The photos are 768x1024 JPEGs of 50-200 KB (six of them: different
detail and quality; half with an EXIF orientation tag, half with camera make, serial and GPS for
the gateway to strip), and **every request's photo is a different picture**: one entry of the
JPEG's quantisation table is changed per request, which changes every decoded pixel a little, so
nothing is cached or written once per content hash that real traffic would not allow.

    python bench/gateway_overhead.py           # 2,000 latency samples, 3 load levels x 10 s, per kind
    python bench/gateway_overhead.py --quick   # 300 samples, 2 levels x 4 s, per kind
Goals: text <= 1 ms added at p50 and >= 1,000 logged requests/s; image <= 2 ms and >= 500/s; on 2
cores, 0 lost.

    python bench/gateway_overhead.py --upstream-vllm [--quick]

replaces the stub with a real vLLM (``make vllm``) serving the tiny Qwen3-VL: the added latency
is then measured against a real model server, and the load levels are bounded by vLLM itself.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STUB = r'''
import json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ANSWER = {"id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
          "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "red"},
                       "logprobs": {"content": [{"token": "red", "logprob": -0.05, "top_logprobs": []}]}}],
          "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
BODY = json.dumps(ANSWER).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "stub", "object": "model", "parent": None}]}).encode()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):  # no Nagle: headers and body go out without a 40 ms delayed-ACK stall
        super().setup(); self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def _send(self, body):
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0))); self._send(BODY)
    def do_GET(self):
        self._send(MODELS)
    def log_message(self, *a): pass
class S(ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address): pass  # clients hanging up are not news
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''

BODY = json.dumps({"model": "vloop", "user": "bench-user", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "What colour are these shoes?"}]}).encode()


def phone_photo(seed: int = 0, fine_noise: float = 7.0, quality: int = 85, orientation: int | None = 6,
                private: bool = False) -> bytes:
    """A phone-photo-like JPEG: 768x1024, smooth colour regions plus sensor-like noise (more noise,
    more bytes: 50-200 KB), optionally an EXIF orientation tag (6: rotate on display) and camera
    make, serial number and GPS position (what the gateway must strip)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).resize((768, 1024), Image.BICUBIC)
    pixels = np.asarray(low).astype(np.float32) + rng.normal(0, fine_noise, (1024, 768, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = img.getexif()
    if orientation:
        exif[0x0112] = orientation
    if private:
        exif[0x010F], exif[0xA431] = "BenchPhone", "SN-0042-1337"
        exif[0x8825] = {1: "N", 2: (39.0, 54.0, 26.0), 3: "E", 4: (116.0, 23.0, 29.0)}
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


# (noise, quality, orientation, private): 50-200 KB, half rotated, half carrying a GPS position
PHOTO_MIX = [(1.0, 70, 6, False), (2.0, 80, None, True), (4.0, 82, 6, True),
             (6.0, 85, None, False), (7.0, 85, 6, False), (8.5, 85, None, True)]


class Bodies:
    """Chat request bodies: ``bodies(i, user)`` is the i-th. With photos, the i-th body carries
    photo ``i % len(photos)`` with two entries of its quantisation table set from ``i``: a valid
    JPEG of a slightly different picture (a different content hash) for every request, built
    by swapping four base64 characters instead of re-encoding the whole photo."""

    def __init__(self, photos: list[bytes] | None = None, extra: dict | None = None):
        self.photos = []
        for photo in photos or []:
            import base64

            dqt = photo.index(b"\xff\xdb") + 5  # the first 8-bit table's 64 entries start here
            at = next(o for o in range(dqt + 56, dqt + 62) if o % 3 == 0)  # a 3-byte base64 group
            url = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
            body = json.dumps(
                {"model": "vloop", "user": "bench-user", "max_tokens": 8, **(extra or {}), "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "@URL@"}},
                    {"type": "text", "text": "What colour are these shoes?"}]}]}).encode()
            head, tail = body.split(b"@URL@")
            cut = len("data:image/jpeg;base64,") + at // 3 * 4
            self.photos.append((head + url[:cut].encode(), url[cut + 4:].encode() + tail, photo[at:at + 3]))
        self.sizes_kb = [len(p) // 1024 for p in photos or []]

    def __call__(self, i: int, user: str, model: str = "vloop") -> bytes:
        import base64

        if not self.photos:
            body = BODY
        else:
            head, tail, group = self.photos[i % len(self.photos)]
            v = i // len(self.photos)
            patched = bytes([1 + v // 255 % 255, 1 + v % 255]) + group[2:]
            body = head + base64.b64encode(patched) + tail
        body = body.replace(b"bench-user", user.encode(), 1)
        return body if model == "vloop" else body.replace(b'"vloop"', json.dumps(model).encode(), 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, path: str) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"port {port} did not come up")


def timed_requests(port: int, n: int, model: str = "vloop", bodies: Bodies = Bodies(), first: int = 0) -> np.ndarray:
    c = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for i in range(n):
        body = bodies(first + i, f"u{i}", model)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        out.append(time.perf_counter() - t0)
        assert r.status == 200, r.status
    return np.array(out[n // 10:])  # drop warm-up


def _load_worker(port, seconds, worker, q, bodies: Bodies, first: int):
    c = http.client.HTTPConnection("127.0.0.1", port)
    ids, errors, end, i = [], 0, time.time() + seconds, 0
    while time.time() < end:
        number = first + worker * 1_000_000 + i
        body = bodies(number, f"w{worker}-{i}")
        i += 1
        try:
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status == 200:
                ids.append((json.loads(data)["id"], number))  # which body: to check the photo stored
            else:
                errors += 1
        except OSError:
            errors += 1
            c = http.client.HTTPConnection("127.0.0.1", port)
    q.put((ids, errors))


def load(port: int, clients: int, seconds: float, bodies: Bodies, first: int) -> tuple[list[tuple[str, int]], int, float]:
    q = mp.Queue()
    procs = [mp.Process(target=_load_worker, args=(port, seconds, w, q, bodies, first)) for w in range(clients)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    return [i for ids, _ in results for i in ids], sum(e for _, e in results), elapsed


def sent_photo(body: bytes) -> bytes:
    import base64

    url = json.loads(body)["messages"][0]["content"][0]["image_url"]["url"]
    return base64.b64decode(url.split(",", 1)[1])


def jpeg_picture(data: bytes) -> bytes:
    """A JPEG without its APPn and COM segments (EXIF, GPS, comments): what defines its pixels.
    Equal for two files, their decoded pixels are equal."""
    out, i = bytearray(data[:2]), 2
    while i < len(data) and data[i] == 0xFF:
        marker, size = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # start of scan: the rest is image data
            return bytes(out + data[i:])
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            out += data[i:i + 2 + size]
        i += 2 + size
    return bytes(out)


def check_images(lake, got, acked: dict[str, tuple["Bodies", int]], decode_every: int = 25) -> tuple[int, list[str]]:
    """The image behind every acknowledged photo request: present, its bytes hashing to its key, and
    the picture that was sent (the JPEG's picture segments equal; every ``decode_every``-th one also
    decoded and compared pixel by pixel). Returns (verified, problems)."""
    import hashlib
    import io

    from PIL import Image

    key_of = dict(zip(got.column("request_id").to_pylist(), got.column("image_key").to_pylist()))
    verified, problems = 0, []
    for n, (rid, (bodies, number)) in enumerate(sorted(acked.items())):
        key = key_of.get(rid)
        try:
            data = lake.get_bytes(key) if key else None
        except Exception:
            data = None
        if data is None:
            problems.append(f"{rid}: image {key} missing")
            continue
        if hashlib.sha256(data).hexdigest() not in key:
            problems.append(f"{rid}: {key} does not hash to its key")
            continue
        photo = sent_photo(bodies(number, "x"))
        if jpeg_picture(data) != jpeg_picture(photo):
            problems.append(f"{rid}: {key} is not the picture sent")
            continue
        if n % decode_every == 0 and not np.array_equal(np.asarray(Image.open(io.BytesIO(data))),
                                                        np.asarray(Image.open(io.BytesIO(photo)))):
            problems.append(f"{rid}: {key} decodes to other pixels")
            continue
        verified += 1
    return verified, problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--upstream-vllm", action="store_true", help="a real vLLM instead of the stub (make vllm)")
    args = ap.parse_args()
    n = 300 if args.quick else 2000
    levels, seconds = ((2, 4), 4) if args.quick else ((2, 4, 8), 10)

    tmp = Path(tempfile.mkdtemp(prefix="vloop-bench-"))
    stub_port, gw_port = free_port(), free_port()
    env = {**os.environ, "VLOOP_HOME": str(tmp), "VLOOP_USER_KEY_SECRET": "bench", "VLOOP_ADMIN_TOKEN": "bench"}
    procs, vllm, backend = [], None, "stub"
    if args.upstream_vllm:
        from serving.vllm import VllmServer, prepare_model_dir
        from vloop.sim.tiny import build_tiny_model

        n = 100 if args.quick else 500  # a real model answers in tens of ms, not tens of µs
        model = prepare_model_dir(build_tiny_model(tmp / "tiny"), tmp / "tiny-vllm")
        vllm = VllmServer(model, stub_port, tmp / "vllm.log").start()
        timed_requests(stub_port, 2, model="base")  # vLLM's first request warms it up (~20 s)
        backend = "vllm"
    else:
        # Popen kept (not vloop.services): the processes under measurement live only for this run, in
        # the bench's own process group so that a Ctrl-C of the bench stops them too.
        procs.append(subprocess.Popen([sys.executable, "-c", STUB, str(stub_port)]))
    # Popen kept, as for the stub above: the gateway whose added latency this bench measures.
    procs.append(subprocess.Popen([sys.executable, "-m", "serving", "--model", "stub", "--upstream",
                                   f"http://127.0.0.1:{stub_port}", "--lake", (tmp / "lake").as_uri(),
                                   "--port", str(gw_port), "--ship-interval", "0.5"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb")))
    try:
        wait_up(stub_port, "/v1/models")
        wait_up(gw_port, "/healthz")
        p = lambda a, q: float(np.percentile(a, q)) * 1000
        photos = [phone_photo(seed, *mix) for seed, mix in enumerate(PHOTO_MIX)]
        kinds = {"text": (Bodies(), 1.0), "image": (Bodies(photos), 2.0)}  # bodies, goal in ms at p50
        # What an app pays for asking for vloop.image_quality (a reduced decode): latency only.
        asked = Bodies(photos, extra={"vloop": {"image_quality": True}})
        added, direct_p50, via_p50 = {}, {}, {}
        for kind, (bodies, goal) in kinds.items():
            # The gateway's requests carry pictures it has not seen (the stub's are the same ones).
            direct = timed_requests(stub_port, n, model="base" if vllm else "vloop", bodies=bodies)
            via = timed_requests(gw_port, n, bodies=bodies, first=n)
            added[kind] = (p(via, 50) - p(direct, 50), p(via, 99) - p(direct, 99))
            direct_p50[kind], via_p50[kind] = p(direct, 50), p(via, 50)
            what = "text only" if kind == "text" else \
                f"a different 768x1024 JPEG each ({min(bodies.sizes_kb)}-{max(bodies.sizes_kb)} KB, half rotated, half with GPS)"
            print(f"latency, {what}, one request at a time ({len(direct)} each):")
            print(f"  direct to {backend:<6} p50 {p(direct, 50):.2f} ms  p99 {p(direct, 99):.2f} ms")
            print(f"  through gateway  p50 {p(via, 50):.2f} ms  p99 {p(via, 99):.2f} ms")
            print(f"  added            p50 {added[kind][0]:.2f} ms  p99 {added[kind][1]:.2f} ms "
                  f"(goal <= {goal:g} ms at p50)", flush=True)

        direct = timed_requests(stub_port, n, model="base" if vllm else "vloop", bodies=asked)
        via = timed_requests(gw_port, n, bodies=asked, first=2 * n)
        quality_added = p(via, 50) - p(direct, 50)
        print(f"latency, the same photos with vloop.image_quality asked for: added p50 {quality_added:.2f} ms, "
              f"p99 {p(via, 99) - p(direct, 99):.2f} ms (no goal: an app's choice)", flush=True)

        from vloop.store.lake import INTERACTIONS_DATASET, open_lake
        from vloop.store.schema import INTERACTION
        import datetime as dt

        lake = open_lake((tmp / "lake").as_uri())
        best = dict.fromkeys(kinds, 0.0)
        acked_all, acked_photos = [], {}
        for kind, (bodies, _) in kinds.items():
            for level, clients in enumerate(levels):
                sent, errors, elapsed = load(gw_port, clients, seconds, bodies, first=(level + 1) * 10_000_000)
                ids = [rid for rid, _ in sent]
                acked_all += ids
                if kind == "image":
                    acked_photos.update((rid, (bodies, number)) for rid, number in sent)
                rate = len(ids) / elapsed
                print(f"load, {kind}: {clients} client processes for {seconds}s: {rate:,.0f} req/s acknowledged, "
                      f"{errors} errors", flush=True)
                if errors == 0:
                    best[kind] = max(best[kind], rate)
        # Zero loss: every acknowledged id is in the lake once the shipper has caught up.
        expected = len(acked_all) + n * (len(kinds) + 1)  # the timed requests through the gateway too
        today = dt.datetime.now(dt.timezone.utc).date()
        deadline = time.time() + 120
        while time.time() < deadline:
            got = lake.read_partitions(INTERACTIONS_DATASET, today - dt.timedelta(days=1), today,
                                       columns=["request_id", "image_key"], schema=INTERACTION.arrow)
            if got.num_rows >= expected:
                break
            time.sleep(1)
        ids = set(got.column("request_id").to_pylist())
        lost = len(set(acked_all) - ids)
        print(f"lake: {got.num_rows:,} records for {expected:,} acknowledged requests; lost {lost}, "
              f"duplicates {got.num_rows - len(ids)}")
        verified, problems = check_images(lake, got, acked_photos)
        print(f"images: {verified:,} of {len(acked_photos):,} acknowledged photo requests verified (present, "
              f"hash, picture sent){'; ' + '; '.join(problems[:5]) if problems else ''}", flush=True)
        ok = lost == 0 and not problems
        print(f"RESULT added_p50_ms={added['text'][0]:.3f} added_p99_ms={added['text'][1]:.3f} "
              f"sustained_logged_rps={best['text'] if ok else 0:.0f} image_added_p50_ms={added['image'][0]:.3f} "
              f"image_added_p99_ms={added['image'][1]:.3f} image_logged_rps={best['image'] if ok else 0:.0f} "
              f"lost={lost} images_bad={len(problems)} image_quality_added_p50_ms={quality_added:.3f} image_kb={min(kinds['image'][0].sizes_kb)}-{max(kinds['image'][0].sizes_kb)} backend={backend}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        if vllm is not None:
            vllm.stop()


if __name__ == "__main__":
    main()
