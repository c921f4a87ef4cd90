#!/usr/bin/env python
"""Write the sample cold-start seed file (examples/seed.jsonl and the images it references) from
the synthetic world, as an expert would write one: image path, question, answer, category.

    .venv/bin/python scripts/make_seed_sample.py [--rows 60] [--seed 777] [--out examples]

The images are small PNGs (96 px) so the sample stays a few hundred KB in the repository.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from vloop.sim.synth import World

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--out", type=Path, default=ROOT / "examples")
    args = ap.parse_args()
    images = args.out / "seed_images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in World(args.seed).samples(args.rows):
        name = f"{s.id}.png"
        s.image.resize((96, 96), Image.LANCZOS).save(images / name, optimize=True)
        lines.append(json.dumps({"image": f"seed_images/{name}", "question": s.question, "answer": s.answer,
                                 "category": s.category}, ensure_ascii=False))
    (args.out / "seed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"RESULT rows={len(lines)} out={args.out / 'seed.jsonl'}")


if __name__ == "__main__":
    main()
