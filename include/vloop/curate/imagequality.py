"""Image quality: blur, exposure and resolution, so poor photos are flagged and not trained on.

* blur — variance of the Laplacian of the grey image, normalised to a 128-pixel side (sharp
  edges give high variance; a blurred photo has little);
* exposure — mean brightness (too dark) and the share of blown-out pixels (glare);
* resolution — the shorter side;
* naturalness — :func:`niqe`, the Natural Image Quality Evaluator (Mittal, Soundararajan and
  Bovik, "Making a completely blind image quality analyzer", IEEE SPL 2013): how far the local
  statistics of the photo are from those of pristine images. Higher is worse; blur, noise and
  compression artefacts all raise it.

NIQE, as the paper describes it:

1. MSCN coefficients: the grey image minus its local mean, divided by its local standard deviation
   plus one (both from a 7x7 Gaussian window, sigma 7/6);
2. the image is cut into P x P patches; per patch, 18 features: a generalized Gaussian fitted to
   the MSCN coefficients (shape, variance), and an asymmetric generalized Gaussian fitted to the
   products of horizontally, vertically and diagonally neighbouring coefficients (shape, mean,
   left and right variance, for each of the 4 directions);
3. the same at half the resolution (patches of P/2), so 36 features per patch;
4. a multivariate Gaussian (mean, covariance) of the features of pristine patches — the sharpest
   ones of each pristine image (local deviation above 0.75 of the image's sharpest patch) — was
   fitted once (``scripts/fit_niqe.py``) and ships as data (``vloop/data/niqe_pristine.npz``);
5. a photo's score: the same Gaussian fitted to *all* its patches, and the distance
   ``sqrt((m1 - m2)^T ((S1 + S2) / 2)^-1 (m1 - m2))`` between the two.

The pristine model here is the project's own (fitted on procedurally generated textured images,
nothing is downloaded), so the absolute numbers differ from those of the paper's model; the
ordering — clean below degraded — is what the score is for.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class QualityThresholds:
    min_sharpness: float = 5.0
    min_brightness: float = 50.0  # mean grey level, 0..255
    max_blown_out: float = 0.2  # share of pixels at >= 250
    min_side: int = 64
    # NIQE above this adds the flag "distorted". Off by default: the pristine model is the
    # project's own, so a threshold must be set from a deployment's photos (clean textured scenes
    # score about 2, a slight blur about 20; flat computer-drawn pictures score high regardless).
    max_niqe: float | None = None


@dataclass
class ImageQuality:
    sharpness: float
    brightness: float
    blown_out: float
    width: int
    height: int
    flags: list[str]

    @property
    def poor(self) -> bool:
        return bool(self.flags)


SHARPNESS_SIDE = 128  # the blur check's Laplacian is taken at this side, so its variance does not follow the size
BLOWN_LEVEL = 250  # a grey level this high or higher is blown out


def assess(img: Image.Image, t: QualityThresholds | None = None, *, size: tuple[int, int] | None = None) -> ImageQuality:
    """The flags of ``img``; ``size`` is the picture's real size when ``img`` is a reduced decode
    of it (the resolution flag goes by the real size, the rest by the pixels at hand). The figures
    come from one compiled call (vloop.curate.image_kernels.grey_stats)."""
    grey = img if img.mode == "L" else img.convert("L")
    return assess_pixels(np.asarray(grey), t, size=size or img.size)


def assess_pixels(pixels: np.ndarray, t: QualityThresholds | None = None, *, size: tuple[int, int]) -> ImageQuality:
    """:func:`assess` of a grey image's 8-bit pixels (rows), ``size`` the picture's real size."""
    from vloop.curate.image_kernels import grey_stats

    t = t or QualityThresholds()
    sharpness, brightness, blown = grey_stats(pixels, SHARPNESS_SIDE, BLOWN_LEVEL)
    flags = []
    if sharpness < t.min_sharpness:
        flags.append("blurry")
    if brightness < t.min_brightness:
        flags.append("dark")
    if blown > t.max_blown_out:
        flags.append("glare")
    width, height = size
    if min(width, height) < t.min_side:
        flags.append("low_resolution")
    return ImageQuality(sharpness, brightness, blown, width, height, flags)


# -- NIQE -----------------------------------------------------------------------------------------

NIQE_MODEL = "data/niqe_pristine.npz"  # inside the vloop package


@dataclass(frozen=True)
class NiqeConfig:
    patch_size: int = 32  # P: small photos (a shopper's crop of 96 px) still give a few patches
    sharpness_threshold: float = 0.75  # pristine fit: keep patches this sharp relative to the sharpest
    max_side: int = 512  # larger photos are scaled down first, so cost and scale stay bounded


def _gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


_WINDOW = _gaussian_window()


# Shape parameters searched when fitting a generalized Gaussian, and the moment ratio each gives:
# rho(a) = G(1/a) G(3/a) / G(2/a)^2, which falls monotonically as a grows.
_ALPHAS = np.arange(0.2, 10.0, 0.001)
_LG = np.vectorize(math.lgamma, otypes=[float])  # once, for the table
_RHO = np.exp(_LG(1 / _ALPHAS) + _LG(3 / _ALPHAS) - 2 * _LG(2 / _ALPHAS))
# The kernel looks a ratio up in ascending order: the shape of the nearest ratio (moment matching).
_RHO_ASCENDING, _SHAPES_BY_RHO = _RHO[::-1].copy(), _ALPHAS[::-1].copy()


_WORK = threading.local()  # each thread's work space for the kernel, grown to the largest photo yet


def _work(h: int, w: int) -> np.ndarray:
    """This thread's work space for the kernels, grown to the largest photo yet."""
    from vloop.curate.image_kernels import work_size

    need = work_size(h, w)
    if getattr(_WORK, "buf", None) is None or len(_WORK.buf) < need:
        _WORK.buf = np.empty(need)
    return _WORK.buf


def _scale_features(grey: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch: the 18 features at this scale, and its sharpness (mean local deviation); compiled
    (vloop.curate.image_kernels)."""
    from vloop.curate.image_kernels import scale_features

    return scale_features(np.ascontiguousarray(grey, dtype=np.float64), p, _WINDOW, _RHO_ASCENDING, _SHAPES_BY_RHO,
                          _work(*grey.shape))


def _grey(image: Image.Image, cfg: NiqeConfig) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise TypeError(f"niqe needs a PIL image, got {type(image).__name__}")
    img = image if image.mode == "L" else image.convert("L")
    if max(img.size) > cfg.max_side:
        f = cfg.max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BICUBIC)
    if min(img.size) < 2 * cfg.patch_size:
        raise ValueError(f"image is {img.width}x{img.height}: NIQE needs at least {2 * cfg.patch_size} pixels "
                         f"a side (two {cfg.patch_size}-pixel patches)")
    return np.asarray(img)  # 8-bit grey levels: the kernels read them as they are, no float copy


def niqe_features(image: Image.Image, cfg: NiqeConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 36 NIQE features of each patch of ``image`` (rows), and each patch's sharpness."""
    cfg = cfg or NiqeConfig()
    grey = _grey(image, cfg)
    p = cfg.patch_size
    f1, sharp = _scale_features(grey, p)
    # Half resolution: bicubic with antialiasing (Pillow's resize of the float image, to the bit),
    # patches of P/2 cover the same regions.
    from vloop.curate.image_kernels import half_scale

    f2, _ = _scale_features(half_scale(grey), p // 2)
    n = min(len(f1), len(f2))
    return np.hstack([f1[:n], f2[:n]]), sharp[:n]


@dataclass(frozen=True)
class PristineModel:
    mean: np.ndarray  # (36,)
    cov: np.ndarray  # (36, 36)
    config: NiqeConfig
    n_patches: int
    source: str  # how it was made

    def save(self, path) -> None:
        np.savez_compressed(path, mean=self.mean, cov=self.cov, patch_size=self.config.patch_size,
                            sharpness_threshold=self.config.sharpness_threshold, max_side=self.config.max_side,
                            n_patches=self.n_patches, source=np.array(self.source))

    @classmethod
    def load(cls, path) -> "PristineModel":
        with np.load(path) as z:
            cfg = NiqeConfig(int(z["patch_size"]), float(z["sharpness_threshold"]), int(z["max_side"]))
            return cls(z["mean"], z["cov"], cfg, int(z["n_patches"]), str(z["source"]))


def fit_pristine(images, cfg: NiqeConfig | None = None, source: str = "") -> PristineModel:
    """The multivariate Gaussian of the sharpest patches of pristine ``images`` (PIL images)."""
    cfg = cfg or NiqeConfig()
    chosen = []
    for img in images:
        feats, sharp = niqe_features(img, cfg)
        keep = (sharp > cfg.sharpness_threshold * sharp.max()) & np.isfinite(feats).all(axis=1)
        chosen.append(feats[keep])
    x = np.vstack(chosen) if chosen else np.empty((0, 36))
    if len(x) < 2 * x.shape[1]:
        raise ValueError(f"only {len(x)} pristine patches: too few to fit a {x.shape[1]}-dimensional Gaussian")
    return PristineModel(x.mean(axis=0), np.cov(x, rowvar=False), cfg, len(x), source)


@functools.lru_cache(maxsize=1)
def pristine_model() -> PristineModel:
    """The pristine model shipped with vloop (re-fit with ``scripts/fit_niqe.py``)."""
    from importlib.resources import files

    with files("vloop").joinpath(NIQE_MODEL).open("rb") as f:
        return PristineModel.load(f)


# A patch whose mean local deviation is under this (grey levels) is flat: its coefficients are
# rounding noise (1e-6 .. 1e-5 off zero), whose fitted shapes say nothing about the photo.
FLAT = 1e-3


def niqe(image: Image.Image, model: PristineModel | None = None) -> float:
    """NIQE of a PIL image: the distance of its patch statistics from pristine ones; higher is
    worse. Flat patches (no texture: a plain background) carry no statistics and are left out; an
    image with nothing but flat patches has no score (NaN). Raises ``ValueError`` for an image
    smaller than two patches a side and ``TypeError`` for anything but a PIL image."""
    model = model or pristine_model()
    return _niqe_of(_grey(image, model.config), model, image)


def _niqe_of(grey: np.ndarray, model: PristineModel, image: Image.Image | None = None) -> float:
    """:func:`niqe` of the 8-bit grey pixels ``grey``, already reduced to the model's size
    (``image``: the picture they come from, when at hand)."""
    from vloop.curate.image_kernels import niqe_score

    score, solved = niqe_score(grey, model.config.patch_size, _WINDOW, _RHO_ASCENDING, _SHAPES_BY_RHO,
                               _work(*grey.shape), FLAT, model.mean, model.cov)
    if solved:  # the pristine covariance is positive definite, so the pooled one is: a Cholesky solve
        return float(score)
    image = image if image is not None else Image.fromarray(grey)
    feats, sharp = niqe_features(image, model.config)  # a model fitted on too few patches: pinv
    feats = feats[np.isfinite(feats).all(axis=1) & (sharp > FLAT)]
    mu = feats.mean(axis=0)
    d = model.mean - mu
    pooled = (model.cov + (np.cov(feats, rowvar=False) if len(feats) > 1 else 0)) / 2
    return float(math.sqrt(max(0.0, d @ np.linalg.pinv(pooled) @ d)))


# The daily check's NIQE runs on the photo reduced to this longer side (a JPEG decoded at a reduced
# scale straight from its DCT coefficients, other formats resized): a phone photo costs what a
# 256-px one does. Against the score at full resolution (up to NiqeConfig.max_side): Spearman 0.94
# on textured scenes of 256 and 512 px with blur, noise and JPEG at three strengths each, and the
# same score for photos at most this size (tests/test_imagequality.py).
NIQE_SIDE = 256

# "distorted" by default above this: the 0.99 quantile of the reduced-decode NIQE of 200 pristine
# textured scenes (vloop.sim.synth.textured_scene, 256 px, seeds 1000-1199, never used in the fit),
# rounded up to a tenth (tests/test_imagequality.py recomputes it). Clean scenes score 1.4-1.9, a
# slight blur ~20. Flat computer-drawn pictures (the simulation's product photos) score 25-250
# regardless: the flag is shown (annotators, report) but makes a photo "poor" only when a
# deployment sets QualityThresholds.max_niqe from its own photos.
DEFAULT_MAX_NIQE = 1.9


def niqe_reduced(source: bytes | Image.Image | np.ndarray, side: int = NIQE_SIDE,
                 model: PristineModel | None = None) -> float:
    """NIQE of an image at :data:`NIQE_SIDE`: from a file's bytes, a reduced decode turned as
    shown (its orientation tag applied); from a decoded image (one already open: a PNG has no
    cheaper decode) or its 8-bit grey pixels (rows), that image reduced. NaN when it has no score
    (smaller than two patches a side, or nothing but flat patches)."""
    if isinstance(source, np.ndarray):
        if source.ndim != 2 or source.dtype != np.uint8:
            raise TypeError(f"niqe_reduced takes 8-bit grey pixels (2-D uint8), got {source.dtype} {source.shape}")
        model = model or pristine_model()
        cfg = model.config
        if max(source.shape) <= min(side, cfg.max_side) and min(source.shape) >= 2 * cfg.patch_size:
            try:  # small enough already: the pixels as they are
                return _niqe_of(source, model)
            except ValueError:  # as below: no score (e.g. the pseudo-inverse's fallback failing)
                return float("nan")
        source = Image.fromarray(source)  # reduced (or too small: NaN) as an image is
    if isinstance(source, Image.Image):
        grey = source if source.mode == "L" else source.convert("L")
    else:
        import io

        from PIL import ImageOps

        with Image.open(io.BytesIO(source)) as img:
            w, h = img.size
            if max(w, h) > side:
                f = side / max(w, h)
                img.draft("L", (max(1, round(w * f)), max(1, round(h * f))))  # JPEG: DCT-scaled; others: no-op
            grey = ImageOps.exif_transpose(img).convert("L")
    if max(grey.size) > side:
        f = side / max(grey.size)
        grey = grey.resize((max(1, round(grey.width * f)), max(1, round(grey.height * f))), Image.BICUBIC)
    try:
        return niqe(grey, model)
    except ValueError:  # under two patches a side: already flagged low_resolution
        return float("nan")


def warm_up() -> None:
    """Load the compiled checks (vloop.curate.image_kernels) now, so the first photo does not wait
    for them: ~0.3 s from numba's cache, ~5 s where there is none yet to compile."""
    assess(Image.new("L", (8, 8)))
    niqe(Image.new("L", (64, 64)))


def quick_summary(data: bytes, t: QualityThresholds | None = None) -> dict:
    """:func:`summary` for the serving hot path, from an image file's bytes: the flags come from a
    reduced grey decode (a JPEG is decoded at a quarter of its size straight from its DCT
    coefficients, ~1.3 ms for a phone photo instead of ~20 ms for the full check), and NIQE, which
    needs every pixel, is computed only when a threshold makes it decide a flag (``max_niqe``).
    The daily check (vloop.curate.daily) records the full figures for every image."""
    import io

    t = t or QualityThresholds()
    with Image.open(io.BytesIO(data)) as img:
        size = img.size
        if t.max_niqe is not None:
            from PIL import ImageOps

            return summary(ImageOps.exif_transpose(img).convert("RGB"), t)
        img.draft("L", (size[0] // 4, size[1] // 4))  # a no-op for formats other than JPEG
        return _summary(assess(img.convert("L"), t, size=size), None, t)


def summary(img: Image.Image, t: QualityThresholds | None = None) -> dict:
    """The image check as JSON for an API response (``vloop.image_quality``): ``flags``,
    ``poor``, ``niqe`` (None when it cannot be computed) and ``advice`` for the app to show when
    the photo is poor (ask for a clearer, frontal photo)."""
    t = t or QualityThresholds()
    q = assess(img, t)
    try:
        score = niqe(img)
    except ValueError:  # smaller than two NIQE patches a side: already flagged low_resolution
        score = float("nan")
    return _summary(q, score, t)


def flags_with_niqe(flags: list[str], score: float | None, t: QualityThresholds | None,
                    default: float | None = None) -> list[str]:
    """``flags`` plus "distorted" when NIQE was computed and is over ``t.max_niqe`` (or, that
    unset, over ``default``: the daily check passes :data:`DEFAULT_MAX_NIQE`)."""
    limit = t.max_niqe if t is not None and t.max_niqe is not None else default
    over = limit is not None and score is not None and score == score and score > limit
    return [*flags, "distorted"] if over else list(flags)


def is_poor(flags: list[str], t: QualityThresholds | None) -> bool:
    """Whether ``flags`` make a photo poor (kept from annotators and training): any flag, but
    "distorted" only under a threshold the deployment set (``t.max_niqe``), not the default one."""
    set_here = t is not None and t.max_niqe is not None
    return any(f != "distorted" or set_here for f in flags)


def _summary(q: ImageQuality, score: float | None, t: QualityThresholds) -> dict:
    """The response form of a check; ``score`` None: NIQE was not computed (the key is left out)."""
    flags = flags_with_niqe(q.flags, score, t)
    advice = None
    if flags:
        advice = ("The photo is " + ", ".join(f.replace("_", " ") for f in flags)
                  + ": a clearer, well-lit, frontal photo of the product will get a better answer.")
    out = {"flags": flags, "poor": bool(flags), "advice": advice}
    if score is not None:
        out["niqe"] = None if score != score else round(score, 3)
    return out
