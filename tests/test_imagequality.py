from __future__ import annotations

from collections import defaultdict

from PIL import Image

from vloop.curate.imagequality import QualityThresholds, assess
from vloop.sim.synth import World


def test_degraded_photos_are_flagged_and_clean_ones_mostly_not():
    flagged = defaultdict(list)
    for s in World(0).samples(300, degraded=0.5):
        flagged[s.degradation].append(assess(s.image).poor)
    rate = {k: sum(v) / len(v) for k, v in flagged.items()}
    assert rate[None] <= 0.10, rate
    for kind in ("blur", "low_light", "glare"):
        assert rate[kind] >= 0.9, (kind, rate)


def test_each_flag_names_its_problem():
    s = World(1).sample(0)
    from vloop.sim.synth import degrade
    import random

    assert "blurry" in assess(degrade(s.image, "blur", random.Random(0))).flags
    assert "dark" in assess(degrade(s.image, "low_light", random.Random(0))).flags
    assert "low_resolution" in assess(Image.new("RGB", (32, 32), "red")).flags
    assert "glare" in assess(Image.new("RGB", (100, 100), "white")).flags
    assert assess(s.image, QualityThresholds(min_sharpness=0, min_brightness=0)).flags == []


# -- NIQE -------------------------------------------------------------------------------------------
import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import ImageFilter  # noqa: E402

from vloop.curate.imagequality import NiqeConfig, PristineModel, fit_pristine, niqe, pristine_model  # noqa: E402
from vloop.sim.synth import textured_scene  # noqa: E402

# Seeds far from the ones the shipped model was fitted on (0..199): unseen textured images.
TEST_SEEDS = (5000, 5001, 5002)


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noisy(img, sigma, seed=0):
    a = np.asarray(img, dtype=float) + np.random.default_rng(seed).normal(0, sigma, (img.height, img.width, 1))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("seed", TEST_SEEDS)
def test_niqe_rises_with_blur_noise_and_jpeg_on_textured_images(seed):
    img = textured_scene(seed, 256)
    clean = niqe(img)
    for name, distort, levels in (("blur", lambda im, r: im.filter(ImageFilter.GaussianBlur(r)), (1, 2, 4)),
                                  ("noise", _noisy, (5, 15, 30)),
                                  ("jpeg", _jpeg, (50, 20, 5))):
        scores = [clean] + [niqe(distort(img, lv)) for lv in levels]
        assert all(a < b for a, b in zip(scores, scores[1:])), (name, scores)  # strictly worse at each step


# -- the compiled kernel against NIQE's definitions, in plain numpy ---------------------------------
def _reference_scale_features(grey, p):
    """One scale's 18 features and sharpness per patch, straight from the definitions (the
    imagequality module docstring) with numpy and scipy: what vloop.curate.image_kernels computes."""
    from scipy.ndimage import correlate1d
    from scipy.special import gammaln

    from vloop.curate.imagequality import _ALPHAS, _RHO, _WINDOW

    def smooth(a):
        return correlate1d(correlate1d(a, _WINDOW, axis=1, mode="mirror"), _WINDOW, axis=0, mode="mirror")

    def shape(rho):  # the shape of the nearest tabulated moment ratio
        rev = _RHO[::-1]
        i = np.clip(np.searchsorted(rev, rho), 1, len(rev) - 1)
        return _ALPHAS[::-1][np.where(np.abs(rev[i - 1] - rho) <= np.abs(rev[i] - rho), i - 1, i)]

    def patches(a):
        h, w = (a.shape[0] // p) * p, (a.shape[1] // p) * p
        return a[:h, :w].reshape(h // p, p, w // p, p).swapaxes(1, 2).reshape(-1, p * p)

    mu = smooth(grey)
    sigma = np.sqrt(np.abs(smooth(grey * grey) - mu * mu))
    m = (grey - mu) / (sigma + 1)
    m[np.abs(m) < 1e-9] = 0.0
    x = patches(m)
    var = (x * x).mean(axis=1)
    feats = [None, var]
    pad = np.pad(m, 1, mode="reflect")
    with np.errstate(divide="ignore", invalid="ignore"):
        feats[0] = shape(var / np.abs(x).mean(axis=1) ** 2)
        for nb in (pad[1:-1, 2:], pad[2:, 1:-1], pad[2:, 2:], pad[2:, :-2]):  # right, lower, lower right, lower left
            y = patches(m * nb)
            left = np.sqrt((y * y * (y < 0)).sum(axis=1) / (y < 0).sum(axis=1))
            right = np.sqrt((y * y * (y > 0)).sum(axis=1) / (y > 0).sum(axis=1))
            gamma = left / right
            r = np.abs(y).mean(axis=1) ** 2 / (y * y).mean(axis=1)
            alpha = shape(1 / (r * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2))
            mean = (right - left) * np.sqrt(np.exp(gammaln(1 / alpha) - gammaln(3 / alpha))) \
                * np.exp(gammaln(2 / alpha) - gammaln(1 / alpha))
            feats += [alpha, mean, left ** 2, right ** 2]
    return np.stack(feats, axis=1), patches(sigma).mean(axis=1)


def test_compiled_features_match_the_definitions():
    from vloop.curate.imagequality import _scale_features
    from vloop.sim.synth import World

    photos = [s.image for s in World(3).samples(12, degraded=0.3)] + [textured_scene(s, 200) for s in TEST_SEEDS]
    photos += [Image.new("RGB", (96, 64), (120, 130, 140))]  # flat: NaN fits, as numpy gives them
    assert len(photos) == 16
    for img in photos:
        grey = np.asarray(img.convert("L"), dtype=np.float64)
        for p in (32, 16):
            got, sharp = _scale_features(grey, p)
            want, want_sharp = _reference_scale_features(grey, p)
            assert got.shape == want.shape == (len(sharp), 18)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
            # The local deviation is sqrt(E[x^2] - E[x]^2): a difference of numbers ~6e4 whose last
            # bits depend on the order of the sums: ~1e-7 of a deviation near 1, ~1e-6 grey levels
            # of a flat patch (far below FLAT, which decides whether a patch counts).
            np.testing.assert_allclose(sharp, want_sharp, rtol=1e-6, atol=1e-5)


def test_half_scale_is_pillows_bicubic_resize_to_the_bit():
    from vloop.curate.image_kernels import half_scale

    rng = np.random.default_rng(0)
    for h, w in [(64, 64), (65, 97), (150, 150), (224, 161), (96, 301), (512, 383)]:
        for grey in (rng.integers(0, 256, (h, w)).astype(np.float64), rng.random((h, w)) * 255):
            want = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize((w // 2, h // 2), Image.BICUBIC),
                              dtype=np.float64)
            np.testing.assert_array_equal(half_scale(grey), want)


def test_resize_8bit_is_pillows_resize_to_the_bit():
    """The blur check's reduction is Pillow's bicubic "L" resize, rows then columns. (Pillow 13
    resizes along columns first where the height shrinks much more than the width; the kernel keeps
    one order, so photos that are no taller than wide are where the two must agree.)"""
    from vloop.curate.image_kernels import resize_8bit

    rng = np.random.default_rng(1)
    for h, w in [(1, 1), (5, 9), (64, 64), (100, 300), (128, 200), (224, 224), (301, 517), (768, 1024)]:
        for pixels in (rng.integers(0, 256, (h, w), dtype=np.uint8),
                       (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8),
                       (rng.random((h, w)) > 0.5).astype(np.uint8) * 255):  # overshoot: clipped
            for size in [(128, 128), (w // 2 or 1, h // 2 or 1), (w + 7, h + 3)]:
                want = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
                np.testing.assert_array_equal(resize_8bit(pixels, size[1], size[0]), want, err_msg=f"{(h, w)} -> {size}")


def test_blur_and_exposure_figures_match_their_definition():
    """grey_stats (assess's figures, compiled) against numpy on Pillow's 128-px image: the Laplacian's
    variance (the kernel sums exactly in integers, numpy in float32), the mean grey level and the
    share of blown-out pixels (exactly)."""
    from vloop.curate.imagequality import BLOWN_LEVEL, SHARPNESS_SIDE

    from vloop.curate.image_kernels import grey_stats

    rng = np.random.default_rng(2)
    photos = [s.image for s in World(3).samples(20, degraded=0.5)]
    photos += [Image.fromarray(rng.integers(0, 256, (150, 210), dtype=np.uint8)), Image.new("L", (90, 90), 255),
               textured_scene(TEST_SEEDS[0], 256)]
    for img in photos:
        grey = img.convert("L")
        pixels = np.asarray(grey)
        small = np.asarray(grey.resize((SHARPNESS_SIDE, SHARPNESS_SIDE), Image.BICUBIC), dtype=np.float64)
        lap = small[:-2, 1:-1] + small[2:, 1:-1] + small[1:-1, :-2] + small[1:-1, 2:] - 4 * small[1:-1, 1:-1]
        sharpness, brightness, blown = grey_stats(pixels, SHARPNESS_SIDE, BLOWN_LEVEL)
        assert sharpness == pytest.approx(lap.var(), rel=1e-12, abs=1e-12)
        assert brightness == pixels.mean()
        assert blown == np.count_nonzero(pixels >= BLOWN_LEVEL) / pixels.size


def test_compiled_score_matches_numpy_and_falls_back_to_a_pseudo_inverse():
    """niqe (one compiled call: both scales, the patches kept, their Gaussian, a Cholesky solve)
    against the same steps in numpy from niqe_features; and a model whose pooled covariance is not
    positive definite still gets a score, through the pseudo-inverse."""
    from vloop.curate.imagequality import FLAT, niqe_features

    model = pristine_model()

    def by_numpy(img, m):
        feats, sharp = niqe_features(img, m.config)
        feats = feats[np.isfinite(feats).all(axis=1) & (sharp > FLAT)]
        d = m.mean - feats.mean(axis=0)
        return float(np.sqrt(max(0.0, d @ np.linalg.pinv((m.cov + np.cov(feats, rowvar=False)) / 2) @ d)))

    scene = textured_scene(TEST_SEEDS[2], 256)
    for img in (scene, scene.filter(ImageFilter.GaussianBlur(2)), World(4).sample(0).image):
        assert niqe(img) == pytest.approx(by_numpy(img, model), rel=1e-9)
    # A "covariance" with a negative direction (its largest one, reversed): no Cholesky factor.
    from vloop.curate.image_kernels import niqe_score
    from vloop.curate.imagequality import _RHO_ASCENDING, _SHAPES_BY_RHO, _WINDOW, _grey, _work

    w, v = np.linalg.eigh(model.cov)
    degenerate = PristineModel(model.mean, model.cov - 3 * w[-1] * np.outer(v[:, -1], v[:, -1]), model.config, 0, "")
    grey = _grey(scene, model.config)
    _, solved = niqe_score(grey, 32, _WINDOW, _RHO_ASCENDING, _SHAPES_BY_RHO, _work(*grey.shape), FLAT,
                           degenerate.mean, degenerate.cov)
    assert not solved  # so niqe took the pseudo-inverse
    assert 0 < niqe(scene, degenerate) != niqe(scene)
    assert niqe(scene, degenerate) == pytest.approx(by_numpy(scene, degenerate), rel=1e-9)


def test_the_kernels_compile_without_scipy(tmp_path):
    """The serving image has numba but no SciPy, and numba's linear algebra needs SciPy: the image
    check compiles from scratch (an empty cache) in a process where SciPy cannot be imported."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['scipy'] = None\n"  # any import of scipy now fails
            "from PIL import Image\n"
            "from vloop.curate.imagequality import assess, niqe, warm_up\n"
            "warm_up()\n"
            "from vloop.sim.synth import textured_scene\n"
            "img = textured_scene(5000, 128)\n"
            "print(assess(img).sharpness > 0, niqe(img) > 0, 'scipy' in sys.modules and sys.modules['scipy'] is not None)\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}  # nothing cached: everything compiles
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "True", "False"]


def test_niqe_is_deterministic_and_size_robust():
    img = textured_scene(TEST_SEEDS[0], 256)
    assert niqe(img) == niqe(img.copy())
    # A large photo is scaled to NiqeConfig.max_side first: it scores like a clean image still.
    big = textured_scene(TEST_SEEDS[1], 640)
    assert niqe(big) < niqe(big.filter(ImageFilter.GaussianBlur(3)))


def test_niqe_bad_input_and_flat_images():
    with pytest.raises(ValueError, match="at least 64 pixels"):
        niqe(Image.new("RGB", (40, 200), "red"))
    with pytest.raises(TypeError, match="PIL image"):
        niqe(np.zeros((100, 100)))
    assert np.isnan(niqe(Image.new("RGB", (128, 128), (120, 130, 140))))  # no texture: no statistics


def test_shipped_pristine_model_and_refit(tmp_path):
    """The model ships with the package (fitted by scripts/fit_niqe.py), and the script re-fits it."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    shipped = pristine_model()
    assert shipped.mean.shape == (36,) and shipped.cov.shape == (36, 36) and shipped.n_patches > 1000
    assert np.all(np.linalg.eigvalsh(shipped.cov) > -1e-9)  # a covariance: symmetric, not negative
    assert "textured_scene" in shipped.source
    out = tmp_path / "model.npz"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "fit_niqe.py"), "--images", "30", "--seed", "100",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("RESULT images=30 patches=")
    refit = PristineModel.load(out)
    img = textured_scene(TEST_SEEDS[2], 256)
    assert niqe(img, refit) < niqe(img.filter(ImageFilter.GaussianBlur(2)), refit)
    with pytest.raises(ValueError, match="too few"):
        fit_pristine([textured_scene(1, 64)], NiqeConfig())


def test_summary_for_the_serving_response_is_json_ready():
    import json

    from vloop.curate.imagequality import summary

    clean = summary(textured_scene(TEST_SEEDS[0], 256))
    assert clean["flags"] == [] and clean["advice"] is None and clean["niqe"] > 0
    blurred = textured_scene(TEST_SEEDS[0], 256).filter(ImageFilter.GaussianBlur(4))
    s = summary(blurred, QualityThresholds(max_niqe=10))
    assert s["poor"] and "distorted" in s["flags"] and "frontal photo" in s["advice"]
    tiny = summary(Image.new("RGB", (32, 32), "red"))
    assert tiny["niqe"] is None and "low_resolution" in tiny["flags"]
    json.dumps(tiny, allow_nan=False)  # no NaN reaches a client


# -- NIQE on every photo of the daily check: a reduced decode -----------------------------------------
def _file(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _distorted_set(size):
    """Per seed: a clean scene then blur, noise and JPEG at three strengths each (as file bytes;
    JPEG ones decoded at a reduced scale by niqe_reduced)."""
    out = []
    for seed in TEST_SEEDS:
        img = textured_scene(seed, size)
        out.append([_file(img)] + [_file(img.filter(ImageFilter.GaussianBlur(r * size / 256))) for r in (1, 2, 4)]
                   + [_file(_noisy(img, s)) for s in (5, 15, 30)] + [_file(img, "JPEG", quality=q) for q in (50, 20, 5)])
    return out


def test_reduced_niqe_ranks_photos_as_the_full_resolution_score():
    from scipy.stats import spearmanr

    from vloop.curate.imagequality import NIQE_SIDE, niqe_reduced

    files = [f for size in (256, 512) for per_seed in _distorted_set(size) for f in per_seed]
    full = [niqe(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]
    reduced = [niqe_reduced(f) for f in files]
    rho = spearmanr(full, reduced)[0]
    assert rho >= 0.9, rho
    # A photo no larger than NIQE_SIDE is scored as it is; a decoded image gives what its bytes give.
    small = textured_scene(TEST_SEEDS[0], NIQE_SIDE)
    assert niqe_reduced(_file(small)) == pytest.approx(niqe(small)) == pytest.approx(niqe_reduced(small))


@pytest.mark.parametrize("size", (256, 512))
def test_reduced_niqe_rises_with_blur_noise_and_jpeg(size):
    from vloop.curate.imagequality import niqe_reduced

    for files in _distorted_set(size):
        clean, rest = niqe_reduced(files[0]), files[1:]
        for name, level_files in (("blur", rest[0:3]), ("noise", rest[3:6]), ("jpeg", rest[6:9])):
            scores = [clean] + [niqe_reduced(f) for f in level_files]
            assert all(a < b for a, b in zip(scores, scores[1:])), (size, name, scores)


def test_default_niqe_threshold_comes_from_pristine_scenes():
    """DEFAULT_MAX_NIQE is the 0.99 quantile of held-out pristine scenes' reduced-decode NIQE
    (seeds 1000-1199), rounded up to a tenth; recomputed here on the first 50 of them."""
    from vloop.curate.imagequality import DEFAULT_MAX_NIQE, QualityThresholds, flags_with_niqe, is_poor, niqe_reduced

    scores = [niqe_reduced(textured_scene(1000 + i, 256)) for i in range(50)]
    assert np.quantile(scores, 0.99) <= DEFAULT_MAX_NIQE < 1.25 * max(scores)
    blurred = niqe_reduced(textured_scene(1000, 256).filter(ImageFilter.GaussianBlur(1)))
    assert blurred > DEFAULT_MAX_NIQE
    flags = flags_with_niqe([], blurred, QualityThresholds(), default=DEFAULT_MAX_NIQE)
    assert flags == ["distorted"] and not is_poor(flags, QualityThresholds())  # shown, not poor by default
    assert is_poor(flags_with_niqe([], blurred, QualityThresholds(max_niqe=5.0)), QualityThresholds(max_niqe=5.0))
