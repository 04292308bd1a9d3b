"""The U-Net's full-resolution tail fused into one pass over the tile core: transposed convolution, ReLU, 1x1 head, sigmoid, loss terms and all their gradients.

At full resolution the network is a few channels wide, so TensorFlow spends its time moving
whole-window tensors between small ops (a 64-channel pre-activation, its ReLU, two head
products, the sigmoid, the loss terms, then the same again backwards). Here each row of
f x f blocks is computed start to finish while it sits in cache, in numba-compiled loops
over the row (which the compiler vectorises), with no full-size intermediate at all. The
arithmetic is the model's own, in float32 (with per-block partial sums added in float64), so
results agree with the TensorFlow evaluation to float32 rounding. Rows are split over threads
(the kernels release the GIL); per-row results are added in row order, so the sums do not
depend on the number of threads.

Shapes (``S = f*f`` pixels per block, ``C`` input channels, ``F`` filters, ``J = S*F``):
``value`` (rows, cols, C) float32, the transposed convolution's input cut to the core;
``image`` (rows, cols, 3*S) uint8, the core's pixels in blocks; ``labels`` (rows, cols, S)
uint8: 0 background, 1 tissue, above 1 (the ignore label) a pixel left out of every sum and
given no gradient. The tail's own parameters travel as a :class:`TailParams`, the surrogate's
constants as a :class:`Surrogate`, the gradients as a :class:`TailGradients`; numba compiles
their attribute access away.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np

# Reassociation (vectorised sums), fused multiply-adds and fast reciprocals, but NaN and inf
# keep their meaning: a diverging step must still show a NaN loss.
_FAST = {"reassoc", "contract", "arcp", "nsz", "afn"}

# Sums of one core over its labelled pixels, in this order (the engine's PassSums layout).
SUMS = ("A", "B", "C", "bce", "hard_intersection", "hard_predicted")

_F32 = np.float32
_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)


class TailParams(NamedTuple):
    """The tail's parameters, as the kernels take them (float32; build one with :meth:`as_float32`)."""

    #: (C, J): the last transposed convolution (kernel = stride = f) as a matrix product; output
    #: index ``J`` = sub-pixel * F + filter, the space-to-depth order.
    transposed_weights: np.ndarray
    #: (J,): its bias, repeated per sub-pixel.
    transposed_bias: np.ndarray
    #: (F,): the 1x1 head's weights for the transposed convolution's activations.
    head_activation_weights: np.ndarray
    #: (3,): the 1x1 head's weights for the rescaled image.
    head_image_weights: np.ndarray
    #: The 1x1 head's bias.
    head_bias: np.float32
    #: The Rescaling layer's ``scale`` and ``offset``: the image the head reads is ``pixel * scale + offset``.
    scale: np.float32
    offset: np.float32

    @classmethod
    def as_float32(cls, *fields) -> TailParams:
        """The seven fields (arrays or tensors' values, in field order) as contiguous float32 arrays and scalars."""
        arrays = [np.ascontiguousarray(a, np.float32) for a in fields[:4]]
        return cls(*arrays, *(np.float32(s) for s in fields[4:]))

    @property
    def learned(self) -> tuple:
        """The five fields that come from the model's variables (not the rescaling's constants)."""
        return self[:5]


class Surrogate(NamedTuple):
    """Pass 2's constants, float32: ``dL/dp`` of a background and of a tissue pixel, and BCE's 1/n (0: no BCE term)."""

    background: np.float32
    tissue: np.float32
    bce_scale: np.float32


class TailGradients(NamedTuple):
    """Gradients of the surrogate for the tail's input and parameters, and the core's :data:`SUMS`.

    Inside the kernels every field has a leading axis of rows (float64 partial sums, ``value``
    float32); :meth:`FusedTail.gradients` returns them added over rows, in float32 shaped like
    the inputs, the sums in float64.
    """

    value: np.ndarray
    transposed_weights: np.ndarray
    transposed_bias: np.ndarray
    head_activation_weights: np.ndarray
    head_image_weights: np.ndarray
    head_bias: np.ndarray
    sums: np.ndarray


class RowScratch(NamedTuple):
    """One block row's intermediates, each (length, cols) so that loops over the row vectorise."""

    value: np.ndarray  # (C, cols): the transposed convolution's input
    pre_activations: np.ndarray  # (J, cols): the transposed convolution's output before ReLU
    pixels: np.ndarray  # (3*S, cols): the rescaled image
    probabilities: np.ndarray  # (S, cols)
    exponent_bits: np.ndarray  # (S, cols) int32: scratch of :func:`_sigmoid`


# exp(r) for |r| <= ln(2)/2: Taylor terms 1 / k!, k = 0..7 (error below 1e-8); ln 2 in two parts (Cody and Waite).
_EXP = tuple(np.float32(1.0 / math.factorial(k)) for k in range(8))
_LOG2E = np.float32(1.0 / math.log(2.0))
_LN2_HI = np.float32(0.693359375)  # exact in float32 with trailing zeros: n * _LN2_HI is exact
_LN2_LO = np.float32(math.log(2.0) - 0.693359375)


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _sigmoid(z, bits):  # pragma: no cover - compiled
    """``z = 1 / (1 + exp(-z))`` in place, float32, in loops the compiler vectorises (``math.exp`` it does not).

    ``exp(-z) = 2**n * exp(r)`` with ``n`` an integer (put straight into the float's exponent
    bits) and ``|r| <= ln(2)/2`` (a polynomial): about float32 rounding, like TensorFlow's.
    """
    c0, c1, c2, c3, c4, c5, c6, c7 = _EXP
    for q in range(z.shape[0]):
        t = min(max(-z[q], np.float32(-87.0)), np.float32(88.0))
        # np.floor keeps float32, so the loop vectorises; math.floor's integer made it scalar
        # float64 (benchmarks/README.md, "Kernel notes").
        n = np.floor(t * _LOG2E + _HALF)
        bits[q] = (np.int32(n) + np.int32(127)) << np.int32(23)
        r = (t - n * _LN2_HI) - n * _LN2_LO
        z[q] = c0 + r * (c1 + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
    power = bits.view(np.float32)
    for q in range(z.shape[0]):
        z[q] = _ONE / (_ONE + z[q] * power[q])


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _forward_row(value, image, i, params, row):  # pragma: no cover - compiled
    """Probabilities of block row ``i`` into ``row.probabilities`` (S, cols), keeping the row's other intermediates in ``row``.

    Backward passes reuse ``row``'s input, pre-activations and rescaled pixels rather than
    recomputing them.
    """
    # Short names for the arithmetic: the transposed convolution (wt, bt), the head (wa, wi), and the row's buffers.
    wt, bt = params.transposed_weights, params.transposed_bias
    wa, wi = params.head_activation_weights, params.head_image_weights
    scale, offset, bh = params.scale, params.offset, params.head_bias
    v, pre, x, p = row.value, row.pre_activations, row.pixels, row.probabilities
    cols = value.shape[1]
    channels, width = wt.shape
    filters = wa.shape[0]
    sub = width // filters
    for c in range(cols):
        for k in range(channels):
            v[k, c] = value[i, c, k]
        for q in range(3 * sub):
            x[q, c] = _F32(image[i, c, q]) * scale + offset
    for j in range(width):
        b = bt[j]
        for c in range(cols):
            pre[j, c] = b
        for k in range(channels):
            w = wt[k, j]
            for c in range(cols):
                pre[j, c] += w * v[k, c]
    for s in range(sub):
        for c in range(cols):
            p[s, c] = bh
        for o in range(filters):
            w = wa[o]
            for c in range(cols):
                p[s, c] += w * max(pre[s * filters + o, c], _ZERO)
        for ch in range(3):
            w = wi[ch]
            for c in range(cols):
                p[s, c] += w * x[s * 3 + ch, c]
    _sigmoid(p.ravel(), row.exponent_bits.ravel())


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _row_sums(p, labels, i, clip, with_bce, sums):  # pragma: no cover - compiled
    """Add row ``i``'s A, B, C, BCE (if ``with_bce``), hard intersection and hard predicted to ``sums`` (float64, per block in float32).

    Pixels labelled above 1 (ignored) add nothing. Their terms are selected away, not
    multiplied by 0, so labelled pixels add exactly what they added before ignore existed.
    """
    sub, cols = p.shape
    for c in range(cols):
        a = b = y_sum = bce = inter = predicted = _ZERO
        for s in range(sub):
            q = p[s, c]
            label = labels[i, c, s]
            labelled = label <= 1
            y = _F32(label) if labelled else _ZERO
            a += q * y
            b += q if labelled else _ZERO
            y_sum += y
            if with_bce:
                qc = min(max(q, clip), _ONE - clip)
                term = y * math.log(qc) + (_ONE - y) * math.log(_ONE - qc)
                bce -= term if labelled else _ZERO
            hard = _ONE if (q >= _HALF) & labelled else _ZERO
            inter += hard * y
            predicted += hard
        sums[0] += a
        sums[1] += b
        sums[2] += y_sum
        sums[3] += bce
        sums[4] += inter
        sums[5] += predicted


@numba.njit(nogil=True, cache=True)
def _scratch(rows, cols, dtype):  # pragma: no cover - compiled
    """An uninitialised (rows, cols) array of a 4-byte ``dtype`` starting on a 64-byte boundary.

    The compiler's vectorised reductions over a row depend on where the row starts: buffers
    placed by each thread's allocator made a pool thread's gradients differ from the calling
    thread's in the last bit. Aligned buffers make them the same whatever thread runs a row.
    """
    raw = np.empty(rows * cols + 16, dtype)
    start = (-(raw.ctypes.data // 4)) % 16
    return raw[start:start + rows * cols].reshape((rows, cols))


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _row_scratch(value, params):  # pragma: no cover - compiled
    """A :class:`RowScratch` for rows of ``value`` under ``params``, in aligned buffers."""
    cols = value.shape[1]
    channels, width = params.transposed_weights.shape
    sub = width // params.head_activation_weights.shape[0]
    return RowScratch(_scratch(channels, cols, np.float32), _scratch(width, cols, np.float32),
                      _scratch(3 * sub, cols, np.float32), _scratch(sub, cols, np.float32), _scratch(sub, cols, np.int32))


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _probabilities(value, image, lo, hi, params, out):  # pragma: no cover - compiled
    """Probabilities of rows ``lo:hi`` into ``out`` (rows, cols, S)."""
    cols, sub = value.shape[1], params.transposed_weights.shape[1] // params.head_activation_weights.shape[0]
    row = _row_scratch(value, params)
    p = row.probabilities
    for i in range(lo, hi):
        _forward_row(value, image, i, params, row)
        for c in range(cols):
            for s in range(sub):
                out[i, c, s] = p[s, c]


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _sums(value, image, labels, lo, hi, params, clip, with_bce, out):  # pragma: no cover - compiled
    """The :data:`SUMS` of rows ``lo:hi``, one row of ``out`` (rows, 6) each."""
    row = _row_scratch(value, params)
    for i in range(lo, hi):
        _forward_row(value, image, i, params, row)
        _row_sums(row.probabilities, labels, i, clip, with_bce, out[i])


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _gradients(value, image, labels, lo, hi, params, clip, with_bce, surrogate, out):  # pragma: no cover - compiled
    """Gradients of ``sum(weight(y) * p) + bce_scale * sum(bce(p, y))`` over the labelled pixels of rows ``lo:hi``, per row, into ``out``.

    ``weight(y)`` is ``surrogate.tissue`` or ``surrogate.background``; ``out`` is a
    :class:`TailGradients` of per-row arrays. The row's :data:`SUMS` come along, since the
    forward row is at hand.
    """
    # Short names for the arithmetic (see _forward_row).
    wt, wa = params.transposed_weights, params.head_activation_weights
    weight_background, weight_tissue, bce_scale = surrogate.background, surrogate.tissue, surrogate.bce_scale
    cols = value.shape[1]
    channels, width = wt.shape
    filters = wa.shape[0]
    sub = width // filters
    row = _row_scratch(value, params)
    v, pre, x, p = row.value, row.pre_activations, row.pixels, row.probabilities
    gz = _scratch(sub, cols, np.float32)  # dL/dz of the sigmoid's input
    gpre = _scratch(1, cols, np.float32)[0]  # dL/d(pre-activation) of one output column j
    gv = _scratch(channels, cols, np.float32)  # dL/d(value), (C, cols)
    g_value, g_wt, g_bt = out.value, out.transposed_weights, out.transposed_bias
    g_wa, g_wi, g_bh = out.head_activation_weights, out.head_image_weights, out.head_bias
    for i in range(lo, hi):
        _forward_row(value, image, i, params, row)
        _row_sums(p, labels, i, clip, with_bce, out.sums[i])
        # dL/dz of the sigmoid's input, as TensorFlow's gradients of the same expressions give it.
        for s in range(sub):
            for c in range(cols):
                q = p[s, c]
                label = labels[i, c, s]
                y = _F32(label)
                g = weight_tissue if y > _ZERO else weight_background
                if bce_scale != _ZERO and q >= clip and q <= _ONE - clip:
                    g += bce_scale * ((_ONE - y) / (_ONE - q) - y / q)
                # An ignored pixel's g above is finite nonsense (y = 255), selected away here.
                gz[s, c] = g * q * (_ONE - q) if label <= 1 else _ZERO
        acc_bh = _ZERO
        for s in range(sub):
            for c in range(cols):
                acc_bh += gz[s, c]
        g_bh[i] = acc_bh
        gv[:, :] = _ZERO
        for s in range(sub):
            for ch in range(3):
                acc = _ZERO
                for c in range(cols):
                    acc += gz[s, c] * x[s * 3 + ch, c]
                g_wi[i, ch] += acc
            for o in range(filters):
                j = s * filters + o
                w = wa[o]
                acc = _ZERO
                acc_b = _ZERO
                for c in range(cols):
                    a = pre[j, c]
                    acc += gz[s, c] * max(a, _ZERO)
                    gpre[c] = gz[s, c] * w if a > _ZERO else _ZERO
                    acc_b += gpre[c]
                g_wa[i, o] += acc
                g_bt[i, j] = acc_b
                for k in range(channels):
                    w_kj = wt[k, j]
                    acc = _ZERO
                    for c in range(cols):
                        acc += v[k, c] * gpre[c]
                        gv[k, c] += w_kj * gpre[c]
                    g_wt[i, k, j] = acc
        for c in range(cols):
            for k in range(channels):
                g_value[i, c, k] = gv[k, c]


class RowSplitter:
    """Calls a kernel on contiguous shares of a range of rows in ``threads`` threads (default: the CPU count)."""

    def __init__(self, threads: int | None = None):
        self.threads = max(1, int(threads or os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gigaseg-fused") if self.threads > 1 else None

    def __call__(self, rows: int, kernel) -> None:
        """``kernel(lo, hi)`` for shares ``lo:hi`` of ``range(rows)``, in parallel (the kernels release the GIL)."""
        if self._pool is None or rows < 2 * self.threads:
            kernel(0, rows)
            return
        bounds = np.linspace(0, rows, self.threads + 1).astype(int)
        for future in [self._pool.submit(kernel, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]:
            future.result()


class FusedTail:
    """Runs the tail's kernels on a tile core, its rows split by ``rows``.

    ``params`` is a :class:`TailParams`, or its seven fields in order in any sequence
    (``tf.numpy_function`` hands them over as separate arrays); they are converted to float32.
    """

    def __init__(self, rows: RowSplitter | None = None, clip: float = 1e-7):
        self._rows = rows or RowSplitter()
        self.clip = np.float32(clip)

    def probabilities(self, value, image, params) -> np.ndarray:
        """(rows, cols, S) float32 probabilities of the core."""
        params = TailParams.as_float32(*params)
        rows, cols = value.shape[:2]
        out = np.empty((rows, cols, params.transposed_weights.shape[1] // params.head_activation_weights.shape[0]), np.float32)
        self._rows(rows, lambda lo, hi: _probabilities(value, image, lo, hi, params, out))
        return out

    def sums(self, value, image, labels, params, with_bce) -> np.ndarray:
        """The six float64 sums of :data:`SUMS` over the core (BCE left 0 unless ``with_bce``)."""
        params = TailParams.as_float32(*params)
        per_row = np.zeros((value.shape[0], len(SUMS)), np.float64)
        flag = bool(with_bce)
        self._rows(value.shape[0], lambda lo, hi: _sums(value, image, labels, lo, hi, params, self.clip, flag, per_row))
        return per_row.sum(0)

    def gradients(self, value, image, labels, params, surrogate) -> TailGradients:
        """Gradients of the core's surrogate ``sum(weight(y) * p) + bce_scale * sum(bce)`` over labelled pixels, and its six sums.

        ``surrogate`` is a :class:`Surrogate` or its three numbers in order. Returns the
        gradients in float32, shaped like ``value`` and ``params``' learned fields, and the
        :data:`SUMS` in float64 (BCE only if ``bce_scale`` is not 0).
        """
        params = TailParams.as_float32(*params)
        background, tissue, bce_scale = surrogate
        rows, cols, channels = value.shape
        per_row = TailGradients(
            value=np.empty((rows, cols, channels), np.float32),
            transposed_weights=np.zeros((rows, *params.transposed_weights.shape), np.float64),
            transposed_bias=np.zeros((rows, params.transposed_bias.shape[0]), np.float64),
            head_activation_weights=np.zeros((rows, params.head_activation_weights.shape[0]), np.float64),
            head_image_weights=np.zeros((rows, 3), np.float64),
            head_bias=np.zeros(rows, np.float64),
            sums=np.zeros((rows, len(SUMS)), np.float64),
        )
        constants = Surrogate(np.float32(background), np.float32(tissue), np.float32(bce_scale))
        with_bce = bce_scale != 0
        self._rows(
            rows,
            lambda lo, hi: _gradients(value, image, labels, lo, hi, params, self.clip, with_bce, constants, per_row),
        )
        return TailGradients(
            per_row.value,
            *(g.sum(0).astype(np.float32) for g in per_row[1:5]),
            np.float32(per_row.head_bias.sum()),
            per_row.sums.sum(0),
        )
