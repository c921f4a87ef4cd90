"""The image check's per-pixel work, compiled (numba): NIQE's per-patch features and its score, and
the blur and exposure figures.

In numpy the same NIQE steps took ~80 array operations per scale, each a pass over a small photo
plus its temporaries and call overhead: 3 ms a photo, which at 100,000 distinct photos a day was most
of the daily job. Here the local mean and deviation, the MSCN coefficients, every patch's sums and
the fits to them are a few loops over the pixels and patches, in image-sized arrays reused from
photo to photo (a work space the caller keeps); the score (the patches' Gaussian against the
pristine one) is one more call. The blur and exposure figures (``grey_stats``) were ~0.25 ms a photo
of Pillow and numpy calls.

The steps and fits are the paper's, as vloop.curate.imagequality's docstring gives them;
tests/test_imagequality.py checks the features against a plain numpy computation of the same
definitions, the resizes against Pillow's, and the score against numpy's.

Compiled on first use and cached next to this file (``cache=True``; numba falls back to a
per-user cache directory where that is read-only, and compiles again on a CPU other than the one
that filled the cache): a fresh process pays ~0.3-0.4 s the first time it calls in (numba's import
and set-up; the code itself loads from the cache), a process that finds no cache ~5-10 s to
compile. No SciPy: numba's linear algebra would need it (the serving image has none), so the
solve is written out.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Sums may be reordered (and a multiply-add fused), so the compiler may vectorise them. Only that:
# NaN and infinity keep their meaning, since a flat patch's fits are NaN and it is dropped by that.
SUMS_IN_ANY_ORDER = {"reassoc", "contract"}


@njit(cache=True, nogil=True)
def _mirrored(n: int, r: int) -> np.ndarray:
    """Indices -r..n-1+r reflected into 0..n-1 without repeating the edge (d c b | a b c d | c b a):
    scipy's "mirror", numpy's "reflect"."""
    idx = np.empty(n + 2 * r, dtype=np.int64)
    for t in range(n + 2 * r):
        i = t - r
        idx[t] = -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    return idx


@njit(cache=True, nogil=True)
def work_size(h: int, w: int) -> int:
    """The float64s :func:`mscn` needs for an h x w image."""
    return 3 * h * w + (h + 1) * (w + 2)


@njit(cache=True, nogil=True, fastmath=SUMS_IN_ANY_ORDER)
def mscn(grey: np.ndarray, window: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MSCN coefficients of a grey image (uint8 or float64, 0..255): the image minus its local mean, over
    its local deviation plus one (the 7-tap Gaussian ``window``, separable, borders mirrored); and
    the local deviation. The coefficients come with one mirrored column each side and one mirrored
    row below (shape (h + 1, w + 2)), so every neighbour the products need is a plain index. Every
    array lives in ``work`` (:func:`work_size` float64s, reused from photo to photo: fresh
    arrays this size cost page faults as much as the arithmetic did)."""
    h, w = grey.shape
    if len(window) != 7:
        raise ValueError("the MSCN window has 7 taps")
    # The taps written out, each output one expression of seven: the compiler keeps the sums in
    # registers and vectorises along the row (a loop over the taps stored every partial sum).
    w0, w1, w2, w3, w4, w5, w6 = window[0], window[1], window[2], window[3], window[4], window[5], window[6]
    cols_at, rows_at = _mirrored(w, 3), _mirrored(h, 3)
    # Along rows: each row read once into a padded line (its mirrored borders looked up once a
    # row, not once a tap), then the local mean and mean of squares.
    row_mu = work[:h * w].reshape((h, w))
    row_sq = work[h * w:2 * h * w].reshape((h, w))
    line = np.empty(w + 6)
    line_sq = np.empty(w + 6)
    for i in range(h):
        g = grey[i]
        for t in range(w):  # the row itself: a plain copy, which vectorises (an indexed one did not)
            v = np.float64(g[t])  # an 8-bit photo's grey levels, or float ones
            line[t + 3] = v
            line_sq[t + 3] = v * v
        for t in range(3):  # and its mirrored borders
            for at in (t, w + 3 + t):
                v = np.float64(g[cols_at[at]])
                line[at] = v
                line_sq[at] = v * v
        a = row_mu[i]
        b = row_sq[i]
        for j in range(w):
            a[j] = (w0 * line[j] + w1 * line[j + 1] + w2 * line[j + 2] + w3 * line[j + 3] + w4 * line[j + 4]
                    + w5 * line[j + 5] + w6 * line[j + 6])
            b[j] = (w0 * line_sq[j] + w1 * line_sq[j + 1] + w2 * line_sq[j + 2] + w3 * line_sq[j + 3]
                    + w4 * line_sq[j + 4] + w5 * line_sq[j + 5] + w6 * line_sq[j + 6])
    # Then along columns, a row of output at a time from the seven rows around it.
    m = work[2 * h * w:2 * h * w + (h + 1) * (w + 2)].reshape((h + 1, w + 2))
    sigma = work[2 * h * w + (h + 1) * (w + 2):work_size(h, w)].reshape((h, w))
    for i in range(h):
        m0, m1, m2, m3 = row_mu[rows_at[i]], row_mu[rows_at[i + 1]], row_mu[rows_at[i + 2]], row_mu[rows_at[i + 3]]
        m4, m5, m6 = row_mu[rows_at[i + 4]], row_mu[rows_at[i + 5]], row_mu[rows_at[i + 6]]
        s0, s1, s2, s3 = row_sq[rows_at[i]], row_sq[rows_at[i + 1]], row_sq[rows_at[i + 2]], row_sq[rows_at[i + 3]]
        s4, s5, s6 = row_sq[rows_at[i + 4]], row_sq[rows_at[i + 5]], row_sq[rows_at[i + 6]]
        out = m[i]
        dev = sigma[i]
        g = grey[i]
        for j in range(w):
            mu = w0 * m0[j] + w1 * m1[j] + w2 * m2[j] + w3 * m3[j] + w4 * m4[j] + w5 * m5[j] + w6 * m6[j]
            sq = w0 * s0[j] + w1 * s1[j] + w2 * s2[j] + w3 * s3[j] + w4 * s4[j] + w5 * s5[j] + w6 * s6[j]
            sd = np.sqrt(abs(sq - mu * mu))
            x = (g[j] - mu) / (sd + 1.0)
            # In a flat region the coefficients are rounding noise (~1e-14), whose signs would
            # decide the fitted shapes there: zero is what they are.
            out[j + 1] = 0.0 if abs(x) < 1e-9 else x
            dev[j] = sd
        out[0] = out[2]
        out[w + 1] = out[w - 1]
    m[h] = m[h - 2]
    return m, sigma


@njit(cache=True, nogil=True, error_model="numpy")
def _shape(rho: float, rho_table: np.ndarray, shape_table: np.ndarray) -> float:
    """The shape whose moment ratio is nearest ``rho``; ``rho_table`` ascending, ``shape_table``
    the shape each ratio belongs to."""
    i = min(max(np.searchsorted(rho_table, rho), 1), len(rho_table) - 1)
    return shape_table[i - 1] if abs(rho_table[i - 1] - rho) <= abs(rho_table[i] - rho) else shape_table[i]


@njit(cache=True, nogil=True, fastmath=SUMS_IN_ANY_ORDER, inline="always")
def _add_product(y: float, total: float, left: float, n_left: float, n_nonzero: float,
                 ab: float) -> tuple[float, float, float, float, float]:
    """One neighbour product added to its sums: of squares, of the negative ones' squares, how many
    are negative and nonzero, of absolute values (inlined: the sums stay in registers)."""
    neg = min(y, 0.0)
    return (total + y * y, left + neg * neg, n_left + (1.0 if y < 0.0 else 0.0),
            n_nonzero + (1.0 if y != 0.0 else 0.0), ab + abs(y))


@njit(cache=True, nogil=True, error_model="numpy")
def _aggd(total: float, left_sum: float, n_left: float, n_nonzero: float, ab: float, size: int,
          rho_table: np.ndarray, shape_table: np.ndarray) -> tuple[float, float, float, float]:
    """An asymmetric generalized Gaussian fitted to a patch's products with one neighbour, by
    moment matching as in BRISQUE/NIQE, from their sums (of squares, of the negative ones' squares,
    of absolute values) and counts (negative, nonzero): shape, mean, left and right variance."""
    left = math.sqrt(left_sum / n_left)
    right = math.sqrt((total - left_sum) / (n_nonzero - n_left))  # zeros add to neither side
    gamma = left / right
    big_r = (ab / size) ** 2 / (total / size) * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
    alpha = _shape(1 / big_r, rho_table, shape_table)
    ratio = math.exp(math.lgamma(2 / alpha) - math.lgamma(1 / alpha))  # G(2/a) / G(1/a)
    scale = math.sqrt(math.exp(math.lgamma(1 / alpha) - math.lgamma(3 / alpha)))  # sqrt(G(1/a) / G(3/a))
    return alpha, (right - left) * scale * ratio, left * left, right * right


# error_model="numpy": 0/0 is NaN and x/0 infinite, as in numpy (a flat patch's fits are NaN and
# its row is dropped), not Python's ZeroDivisionError.
@njit(cache=True, nogil=True, error_model="numpy", fastmath=SUMS_IN_ANY_ORDER)
def scale_features(grey: np.ndarray, p: int, window: np.ndarray, rho_table: np.ndarray,
                   shape_table: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NIQE's 18 features of each non-overlapping ``p`` x ``p`` patch of the grey image ``grey``
    (uint8 or float64, 0..255), patches in row-major order (the remainder at the edges left out),
    and each patch's sharpness (its mean local deviation). ``window``: the Gaussian weights;
    ``rho_table``/``shape_table``: the generalized Gaussian's moment ratios (ascending) and shapes;
    ``work``: at least :func:`work_size` float64s. An image smaller than a patch, or than the
    mirrored borders' 4 pixels, a side is refused (the loops check no bounds)."""
    _check_size(grey, p)
    m, sigma = mscn(grey, window, work)
    sharp = _patch_sharpness(sigma, p)
    return _patch_features(m, sigma, p, rho_table, shape_table, sharp, -np.inf), sharp


@njit(cache=True, nogil=True)
def _check_size(grey: np.ndarray, p: int) -> None:
    if min(grey.shape) < max(p, 4):
        raise ValueError("the image is smaller than one patch, or than 4 pixels, a side")


@njit(cache=True, nogil=True, fastmath=SUMS_IN_ANY_ORDER)
def _patch_sharpness(sigma: np.ndarray, p: int) -> np.ndarray:
    """Each ``p`` x ``p`` patch's mean local deviation, patches in row-major order."""
    rows, cols = sigma.shape[0] // p, sigma.shape[1] // p
    sharp = np.empty(rows * cols)
    for pr in range(rows):
        for pc in range(cols):
            sg = 0.0
            for i in range(pr * p, pr * p + p):
                dev = sigma[i]
                for j in range(pc * p, pc * p + p):
                    sg += dev[j]
            sharp[pr * cols + pc] = sg / (p * p)
    return sharp


@njit(cache=True, nogil=True, error_model="numpy", fastmath=SUMS_IN_ANY_ORDER)
def _patch_features(m: np.ndarray, sigma: np.ndarray, p: int, rho_table: np.ndarray, shape_table: np.ndarray,
                    skip_sharp: np.ndarray, flat: float) -> np.ndarray:
    """The 18 features of each patch of the MSCN coefficients ``m`` (as :func:`mscn` returns them);
    a patch ``q`` with ``skip_sharp[q] <= flat`` is left NaN, not computed (the score drops flat
    patches: a plain background is most of many product photos)."""
    rows, cols = sigma.shape[0] // p, sigma.shape[1] // p
    size = p * p
    feats = np.full((rows * cols, 18), np.nan)
    for pr in range(rows):
        for pc in range(cols):
            q = pr * cols + pc
            if q < len(skip_sharp) and skip_sharp[q] <= flat:
                continue
            top, first = pr * p, pc * p + 1  # m's columns are shifted by its border
            # Every sum the fits need, in one pass over the patch: of the coefficients (squares,
            # absolute values), and per neighbour (right, lower, lower right,
            # lower left) of their products: squares, negative ones' squares, absolute values, and
            # how many are negative and nonzero.
            sq = ab = 0.0
            t0 = l0 = n0 = z0 = a0 = 0.0
            t1 = l1 = n1 = z1 = a1 = 0.0
            t2 = l2 = n2 = z2 = a2 = 0.0
            t3 = l3 = n3 = z3 = a3 = 0.0
            for i in range(top, top + p):
                row = m[i]
                below = m[i + 1]
                for j in range(first, first + p):
                    x = row[j]
                    sq += x * x
                    ab += abs(x)
                    t0, l0, n0, z0, a0 = _add_product(x * row[j + 1], t0, l0, n0, z0, a0)
                    t1, l1, n1, z1, a1 = _add_product(x * below[j], t1, l1, n1, z1, a1)
                    t2, l2, n2, z2, a2 = _add_product(x * below[j + 1], t2, l2, n2, z2, a2)
                    t3, l3, n3, z3, a3 = _add_product(x * below[j - 1], t3, l3, n3, z3, a3)
            # The coefficients: a zero-mean generalized Gaussian (shape, variance).
            var = sq / size
            feats[q, 0] = _shape(var / (ab / size) ** 2, rho_table, shape_table)
            feats[q, 1] = var
            # The products: an asymmetric generalized Gaussian per neighbour.
            feats[q, 2], feats[q, 3], feats[q, 4], feats[q, 5] = _aggd(t0, l0, n0, z0, a0, size, rho_table, shape_table)
            feats[q, 6], feats[q, 7], feats[q, 8], feats[q, 9] = _aggd(t1, l1, n1, z1, a1, size, rho_table, shape_table)
            feats[q, 10], feats[q, 11], feats[q, 12], feats[q, 13] = _aggd(t2, l2, n2, z2, a2, size, rho_table,
                                                                           shape_table)
            feats[q, 14], feats[q, 15], feats[q, 16], feats[q, 17] = _aggd(t3, l3, n3, z3, a3, size, rho_table,
                                                                           shape_table)
    return feats


# -- the half-scale image -------------------------------------------------------------------------
# NIQE's second scale is the image at half size, bicubic with antialiasing (MATLAB's imresize, which
# the paper used; Pillow's resize). Done here as Pillow does it for a float image, the same
# weights and the same order of sums, so the result is Pillow's to the bit
# (tests/test_imagequality.py), at a fraction of the cost of a round trip through a PIL image.
@njit(cache=True, nogil=True)
def _bicubic(x: float) -> float:
    """The cubic convolution kernel with a = -0.5 (Keys)."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@njit(cache=True, nogil=True)
def _resample_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output position: the first input it reads, how many, and their weights (normalised to
    sum to one). Reducing, the kernel is widened by the scale (antialiasing)."""
    scale = n_in / n_out
    widen = max(scale, 1.0)
    support = 2.0 * widen
    weights = np.zeros((n_out, int(math.ceil(support)) * 2 + 1))
    first = np.empty(n_out, dtype=np.int64)
    count = np.empty(n_out, dtype=np.int64)
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)  # int(): toward zero, as C's cast
        n = min(int(centre + support + 0.5), n_in) - lo
        total = 0.0
        for t in range(n):
            weights[o, t] = _bicubic((t + lo - centre + 0.5) * (1.0 / widen))  # as Pillow: times the reciprocal
            total += weights[o, t]
        if total != 0.0:
            for t in range(n):
                weights[o, t] /= total
        first[o], count[o] = lo, n
    return first, count, weights


@njit(cache=True, nogil=True)
def _resample_lines(lines: np.ndarray, n_out: int) -> np.ndarray:
    """``lines`` (float32, one row per position along the axis resized) resampled to ``n_out``
    rows: each output row the weighted sum of its input rows, in float64 in the order of the taps,
    stored as float32. A whole line of independent sums at a time, so it vectorises without
    reordering any sum."""
    n_in, length = lines.shape
    first, count, weights = _resample_weights(n_in, n_out)
    out = np.empty((n_out, length), dtype=np.float32)
    acc = np.empty(length)
    for o in range(n_out):
        acc[:] = 0.0
        for t in range(count[o]):
            wt = weights[o, t]
            line = lines[first[o] + t]
            for i in range(length):
                acc[i] += np.float64(line[i]) * wt
        for i in range(length):
            out[o, i] = acc[i]
    return out


@njit(cache=True, nogil=True)
def half_scale(grey: np.ndarray) -> np.ndarray:
    """``grey`` at (h // 2, w // 2), as Pillow resizes a float32 ("F") image with BICUBIC: along
    rows first, then along columns, each pass stored as float32."""
    h, w = grey.shape
    columns = np.empty((w, h), dtype=np.float32)  # grey transposed: one row per column
    for i in range(h):
        for j in range(w):
            columns[j, i] = grey[i, j]
    half_width = _resample_lines(columns, w // 2)  # (w // 2, h), still transposed
    return _resample_lines(half_width.T.copy(), h // 2).astype(np.float64)


# -- the blur and exposure check ------------------------------------------------------------------
# imagequality.assess's figures from a grey photo's 8-bit pixels in one call: the photo resized to
# a fixed side as Pillow resizes an "L" image (bicubic, the weights rounded to 22-bit integers, each
# pass rounded and clipped to 8 bits), the variance of its Laplacian, the mean grey level and the
# share of blown-out pixels. Through Pillow and numpy this was ~0.25 ms a photo, mostly call overhead.
_WEIGHT_BITS = 22  # Pillow's 8-bit resampling: 32 bits less 8 for the pixel and 2 for overshoot


@njit(cache=True, nogil=True)
def _resample_lines_8bit(lines: np.ndarray, n_out: int) -> np.ndarray:
    """``lines`` (uint8, one row per position along the axis resized) resampled to ``n_out`` rows
    with integer weights, rounded half up and clipped to 0..255."""
    n_in, length = lines.shape
    if n_in == n_out:  # Pillow leaves an axis of the right size alone
        return lines.copy()
    first, count, weights = _resample_weights(n_in, n_out)
    one = 1 << _WEIGHT_BITS
    out = np.empty((n_out, length), dtype=np.uint8)
    acc = np.empty(length, dtype=np.int64)
    for o in range(n_out):
        acc[:] = one >> 1
        for t in range(count[o]):
            wt = weights[o, t] * one
            k = np.int64(wt - 0.5) if wt < 0 else np.int64(wt + 0.5)  # C's cast: toward zero
            line = lines[first[o] + t]
            for i in range(length):
                acc[i] += np.int64(line[i]) * k
        for i in range(length):
            out[o, i] = min(max(acc[i] >> _WEIGHT_BITS, 0), 255)
    return out


@njit(cache=True, nogil=True)
def resize_8bit(pixels: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """An 8-bit grey image resized to (h_out, w_out): bicubic, antialiased when reducing, along rows
    and then along columns, each pass rounded to 8 bits; Pillow's ``Image.resize`` to the bit
    (tests/test_imagequality.py) except where Pillow 13 resizes a much taller image along columns
    first. The order here stays fixed, so the blur figure does not move with Pillow's version."""
    h, w = pixels.shape
    columns = pixels.T.copy()  # one row per column
    narrowed = _resample_lines_8bit(columns, w_out)  # (w_out, h)
    return _resample_lines_8bit(narrowed.T.copy(), h_out)


@njit(cache=True, nogil=True)
def grey_stats(pixels: np.ndarray, side: int, blown_level: int) -> tuple[float, float, float]:
    """(sharpness, brightness, blown_out) of an 8-bit grey image: the variance of the 4-neighbour
    Laplacian of the image resized to ``side`` x ``side``; the mean grey level; the share of
    pixels at ``blown_level`` or above. Sums are exact (integers) until the last division."""
    h, w = pixels.shape
    total = 0
    blown = 0
    for i in range(h):
        for j in range(w):
            v = np.int64(pixels[i, j])
            total += v
            blown += 1 if v >= blown_level else 0
    small = resize_8bit(pixels, side, side)
    s1 = 0
    s2 = 0
    for i in range(1, side - 1):
        for j in range(1, side - 1):
            lap = (np.int64(small[i - 1, j]) + np.int64(small[i + 1, j]) + np.int64(small[i, j - 1])
                   + np.int64(small[i, j + 1]) - 4 * np.int64(small[i, j]))
            s1 += lap
            s2 += lap * lap
    n = (side - 2) * (side - 2)
    size = max(h * w, 1)
    return (n * s2 - s1 * s1) / (n * n), total / size, blown / size  # the variance's numerator exact


# -- the score ------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _cholesky_solve(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, bool]:
    """x with a @ x = b for a symmetric positive definite ``a`` (Cholesky); False when ``a`` is
    not positive definite."""
    n = len(b)
    low = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            s = a[i, j]
            for k in range(j):
                s -= low[i, k] * low[j, k]
            if i == j:
                if not s > 0.0:
                    return b.copy(), False
                low[i, i] = math.sqrt(s)
            else:
                low[i, j] = s / low[j, j]
    y = np.empty(n)
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= low[i, k] * y[k]
        y[i] = s / low[i, i]
    x = np.empty(n)
    for i in range(n - 1, -1, -1):
        s = y[i]
        for k in range(i + 1, n):
            s -= low[k, i] * x[k]
        x[i] = s / low[i, i]
    return x, True


@njit(cache=True, nogil=True, error_model="numpy")
def niqe_score(grey: np.ndarray, p: int, window: np.ndarray, rho_table: np.ndarray, shape_table: np.ndarray,
               work: np.ndarray, flat: float, mean: np.ndarray, cov: np.ndarray) -> tuple[float, bool]:
    """NIQE of a grey image (uint8 or float64, 0..255) against the pristine Gaussian (``mean``, ``cov``): the
    36 features of each patch (``p`` pixels, then ``p // 2`` at half scale), the patches that are
    finite and sharper than ``flat`` kept, their Gaussian, and the distance between the two. NaN
    when no patch is kept; (NaN, False) when the pooled covariance is not positive definite (the
    caller falls back to a pseudo-inverse)."""
    # Both scales' features, but not of the patches dropped below for being flat: the decision is
    # the full-scale patch's sharpness, known before its products are summed.
    _check_size(grey, p)
    m, sigma = mscn(grey, window, work)
    sharp = _patch_sharpness(sigma, p)
    f1 = _patch_features(m, sigma, p, rho_table, shape_table, sharp, flat)
    half = half_scale(grey)
    _check_size(half, p // 2)
    m, sigma = mscn(half, window, work)  # the same work space: the full scale's are done with
    f2 = _patch_features(m, sigma, p // 2, rho_table, shape_table, sharp, flat)
    n_all = min(len(f1), len(f2))
    dims = f1.shape[1] + f2.shape[1]
    feats = np.empty((n_all, dims))
    n = 0
    for q in range(n_all):
        keep = sharp[q] > flat
        for c in range(f1.shape[1]):
            keep = keep and np.isfinite(f1[q, c]) and np.isfinite(f2[q, c])
        if keep:
            feats[n, :f1.shape[1]] = f1[q]
            feats[n, f1.shape[1]:] = f2[q]
            n += 1
    if n == 0:
        return np.nan, True
    mu = np.zeros(dims)
    for q in range(n):
        mu += feats[q]
    mu /= n
    pooled = cov / 2
    if n > 1:
        centred = feats[:n] - mu
        for a in range(dims):
            for b in range(a, dims):
                s = 0.0
                for q in range(n):
                    s += centred[q, a] * centred[q, b]
                pooled[a, b] += s / (n - 1) / 2
                if b != a:
                    pooled[b, a] = pooled[a, b]
    d = mean - mu
    x, ok = _cholesky_solve(pooled, d)
    if not ok:
        return np.nan, False
    quad = 0.0
    for a in range(dims):  # not d @ x: numba's @ calls BLAS through SciPy, which the serving image lacks
        quad += d[a] * x[a]
    return math.sqrt(max(0.0, quad)), True
