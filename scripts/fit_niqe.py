#!/usr/bin/env python
"""Re-fit NIQE's pristine model (vloop/data/niqe_pristine.npz) on the project's own clean images.

No photo collection can be downloaded here, so the pristine images are procedurally generated
textured scenes (:func:`vloop.sim.synth.textured_scene`: dead leaves shaded with 1/f noise, which
share the statistics NIQE measures with natural photos). The sharpest patches of each image
(NIQE's patch selection) are pooled and a multivariate Gaussian is fitted to their features.

    .venv/bin/python scripts/fit_niqe.py [--images 200] [--size 256] [--seed 0] [--out PATH]

Takes about 10 s. The last line is ``RESULT images=N patches=M out=PATH``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vloop.curate.imagequality import NIQE_MODEL, NiqeConfig, fit_pristine
from vloop.sim.synth import textured_scene

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "include" / "vloop" / NIQE_MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed + i")
    ap.add_argument("--patch-size", type=int, default=NiqeConfig.patch_size)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = NiqeConfig(patch_size=args.patch_size)
    images = (textured_scene(args.seed + i, args.size) for i in range(args.images))
    model = fit_pristine(images, cfg, source=f"scripts/fit_niqe.py: {args.images} textured_scene images of "
                                             f"{args.size} px, seeds {args.seed}..{args.seed + args.images - 1}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    print(f"fitted on {model.n_patches} patches in {time.perf_counter() - t0:.1f} s; written to {args.out}")
    print(f"RESULT images={args.images} patches={model.n_patches} out={args.out}")


if __name__ == "__main__":
    main()
