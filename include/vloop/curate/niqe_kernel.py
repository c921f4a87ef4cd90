"""NIQE's per-patch features, compiled (numba): one pass over the pixels per scale.

In numpy the same steps took ~80 array operations per scale, each a pass over a small photo plus
its temporaries and call overhead: 3 ms a photo, which at 100,000 distinct photos a day was most
of the daily job. Here the local mean and deviation, the MSCN coefficients, every patch's sums and
the fits to them are a few loops over the pixels and patches, in image-sized arrays reused from
photo to photo (a work space the caller keeps).

The steps and fits are the paper's, as vloop.curate.imagequality's docstring gives them;
tests/test_imagequality.py checks the features against a plain numpy computation of the same
definitions.

Compiled on first use and cached next to this file (``cache=True``; numba falls back to a
per-user cache directory where that is read-only): a fresh process pays ~0.3 s the first time it
calls in (numba's import and LLVM's set-up; the code itself loads from the cache), a process that
finds no cache ~5 s to compile.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# The four neighbours each coefficient is multiplied by (row, column offsets): right, lower,
# lower right, lower left.
NEIGHBOURS = np.array([[0, 1], [1, 0], [1, 1], [1, -1]])

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
    """MSCN coefficients of a grey image (float64, 0..255): the image minus its local mean, over
    its local deviation plus one (Gaussian ``window``, separable, borders mirrored); and the local
    deviation. The coefficients come with one mirrored column each side and one mirrored row
    below (shape (h + 1, w + 2)), so every neighbour the products need is a plain index. Every
    array lives in ``work`` (:func:`work_size` float64s, reused from photo to photo: fresh
    arrays this size cost page faults as much as the arithmetic)."""
    h, w = grey.shape
    r = len(window) // 2
    cols_at, rows_at = _mirrored(w, r), _mirrored(h, r)
    # The local mean and mean of squares along rows, each row read once into a padded line (its
    # mirrored borders looked up once a row, not once a tap).
    row_mu = work[:h * w].reshape((h, w))
    row_sq = work[h * w:2 * h * w].reshape((h, w))
    line = np.empty(w + 2 * r)
    line_sq = np.empty(w + 2 * r)
    for i in range(h):
        for t in range(w + 2 * r):
            v = grey[i, cols_at[t]]
            line[t] = v
            line_sq[t] = v * v
        a = row_mu[i]
        b = row_sq[i]
        a[:] = 0.0
        b[:] = 0.0
        for k in range(2 * r + 1):
            wk = window[k]
            for j in range(w):
                a[j] += wk * line[j + k]
                b[j] += wk * line_sq[j + k]
    # Then along columns, a row of output at a time.
    m = work[2 * h * w:2 * h * w + (h + 1) * (w + 2)].reshape((h + 1, w + 2))
    sigma = work[2 * h * w + (h + 1) * (w + 2):work_size(h, w)].reshape((h, w))
    mu = np.empty(w)
    sq = np.empty(w)
    for i in range(h):
        mu[:] = 0.0
        sq[:] = 0.0
        for k in range(2 * r + 1):
            src = rows_at[i + k]
            wk = window[k]
            for j in range(w):
                mu[j] += wk * row_mu[src, j]
                sq[j] += wk * row_sq[src, j]
        for j in range(w):
            s = np.sqrt(abs(sq[j] - mu[j] * mu[j]))
            x = (grey[i, j] - mu[j]) / (s + 1.0)
            # In a flat region the coefficients are rounding noise (~1e-14), whose signs would
            # decide the fitted shapes there: zero is what they are.
            m[i, j + 1] = 0.0 if abs(x) < 1e-9 else x
            sigma[i, j] = s
        m[i, 0] = m[i, 2]
        m[i, w + 1] = m[i, w - 1]
    m[h] = m[h - 2]
    return m, sigma


@njit(cache=True, nogil=True, error_model="numpy")
def _shape(rho: float, rho_table: np.ndarray, shape_table: np.ndarray) -> float:
    """The shape whose moment ratio is nearest ``rho``; ``rho_table`` ascending, ``shape_table``
    the shape each ratio belongs to."""
    i = min(max(np.searchsorted(rho_table, rho), 1), len(rho_table) - 1)
    return shape_table[i - 1] if abs(rho_table[i - 1] - rho) <= abs(rho_table[i] - rho) else shape_table[i]


# error_model="numpy": 0/0 is NaN and x/0 infinite, as in numpy (a flat patch's fits are NaN and
# its row is dropped), not Python's ZeroDivisionError.
@njit(cache=True, nogil=True, error_model="numpy", fastmath=SUMS_IN_ANY_ORDER)
def scale_features(grey: np.ndarray, p: int, window: np.ndarray, rho_table: np.ndarray,
                   shape_table: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NIQE's 18 features of each non-overlapping ``p`` x ``p`` patch of the grey image ``grey``
    (float64, 0..255), patches in row-major order (the remainder at the edges left out), and each
    patch's sharpness (its mean local deviation). ``window``: the Gaussian weights;
    ``rho_table``/``shape_table``: the generalized Gaussian's moment ratios (ascending) and shapes;
    ``work``: at least :func:`work_size` float64s."""
    m, sigma = mscn(grey, window, work)
    rows, cols = grey.shape[0] // p, grey.shape[1] // p
    size = p * p
    feats = np.empty((rows * cols, 18))
    sharp = np.empty(rows * cols)
    for pr in range(rows):
        for pc in range(cols):
            q = pr * cols + pc
            top, first = pr * p, pc * p + 1  # m's columns are shifted by its border
            # The coefficients: a zero-mean generalized Gaussian (shape, variance).
            sq = 0.0
            ab = 0.0
            sg = 0.0
            for i in range(top, top + p):
                for j in range(first, first + p):
                    x = m[i, j]
                    sq += x * x
                    ab += abs(x)
                    sg += sigma[i, j - 1]
            var = sq / size
            feats[q, 0] = _shape(var / (ab / size) ** 2, rho_table, shape_table)
            feats[q, 1] = var
            sharp[q] = sg / size
            # The products with each neighbour: an asymmetric generalized Gaussian (shape, mean,
            # left and right variance), by moment matching as in BRISQUE/NIQE.
            for d in range(4):
                di, dj = NEIGHBOURS[d, 0], NEIGHBOURS[d, 1]
                total = 0.0
                left_sum = 0.0
                n_left = 0.0
                n_nonzero = 0.0
                ab = 0.0
                for i in range(top, top + p):
                    for j in range(first, first + p):
                        y = m[i, j] * m[i + di, j + dj]
                        neg = min(y, 0.0)
                        total += y * y
                        left_sum += neg * neg
                        n_left += 1.0 if y < 0.0 else 0.0
                        n_nonzero += 1.0 if y != 0.0 else 0.0
                        ab += abs(y)
                left = math.sqrt(left_sum / n_left)
                right = math.sqrt((total - left_sum) / (n_nonzero - n_left))  # zeros add to neither side
                gamma = left / right
                big_r = (ab / size) ** 2 / (total / size) * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
                alpha = _shape(1 / big_r, rho_table, shape_table)
                ratio = math.exp(math.lgamma(2 / alpha) - math.lgamma(1 / alpha))  # G(2/a) / G(1/a)
                scale = math.sqrt(math.exp(math.lgamma(1 / alpha) - math.lgamma(3 / alpha)))  # sqrt(G(1/a) / G(3/a))
                c = 2 + 4 * d
                feats[q, c] = alpha
                feats[q, c + 1] = (right - left) * scale * ratio
                feats[q, c + 2] = left * left
                feats[q, c + 3] = right * right
    return feats, sharp


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
