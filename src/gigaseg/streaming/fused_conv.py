"""The U-Net's first convolution (full-resolution RGB in, stride = block side, ReLU) in numba loops, reading the window's blocks directly; forward only.

TensorFlow's version casts the uint8 window to float, rescales it, and runs a stride-1
convolution over blocks with a third of its taps zero. Here each block row the output row
reads is rescaled into planes, one per (sub-pixel row, sub-pixel column, colour), with a
margin of zero blocks (the convolution's 'same' padding); every output row is then the sum of
``k*k*3`` shifted plane rows times a weight, in loops over the row that the compiler
vectorises. Only the real ``k x k`` taps are computed. The planes of the few block rows in
use are kept in a ring, so they stay in the cache, where planes of the whole window would be
written out and read back (benchmarks/README.md, "Kernel notes").

Only forward passes use it (prediction, pass 1 of a two-pass step). A version that also
computed the filter gradient for pass 2 was withdrawn: on large windows its steps' deepest
gradients fell outside the exactness tests' bound, from float32 rounding flipping a ReLU near
zero in a low-resolution layer rather than an error in it; TensorFlow's own convolution does
the same when the first bias is nudged (benchmarks/README.md, "Why the first convolution's
filter gradient is not fused").
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from gigaseg.streaming.fused import _FAST, RowSplitter, _scratch

_F32 = np.float32
_ZERO = np.float32(0.0)


class ConvParams(NamedTuple):
    """The first convolution's parameters and the rescaling before it, float32."""

    kernel: np.ndarray  # (k, k, 3, filters)
    bias: np.ndarray  # (filters,)
    scale: np.float32  # the Rescaling layer's: the convolution reads ``pixel * scale + offset``
    offset: np.float32


class BlockPadding(NamedTuple):
    """Where the convolution's taps fall in block layout."""

    factor: int  # the block side = the convolution's stride
    before: int  # pixels of 'same' zero padding before the first row and column
    margin: int  # zero blocks kept on each side of a plane row, enough for the farthest tap


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _forward(blocks, params, padding, lo, hi, out):  # pragma: no cover - compiled
    """ReLU(convolution + bias) of the rescaled ``blocks``, output rows ``lo:hi``, into ``out`` (rows, cols, filters)."""
    # Short names for the arithmetic: the kernel (w), its bias (b), the block side (f).
    w, b, scale, offset = params.kernel, params.bias, params.scale, params.offset
    f, before, margin = padding.factor, padding.before, padding.margin
    rows, cols, channels = blocks.shape
    k = w.shape[0]
    filters = w.shape[3]
    first, last = (-before) // f, (k - 1 - before) // f  # the block rows an output row reads, relative to it
    span = last - first + 1
    # The planes of the last ``span`` block rows: ring[slot, (ry*f + rx)*3 + c, J + margin] =
    # rescaled pixel (f*I + ry, f*J + rx, c) of block row I held in slot I % span; margins zero.
    ring = np.zeros((span, channels, cols + 2 * margin), np.float32)
    held = np.full(span, -(1 << 40), np.int64)
    acc = _scratch(filters, cols, np.float32)
    for i in range(lo, hi):
        for block_row in range(i + first, i + last + 1):
            slot = block_row % span
            if held[slot] == block_row:
                continue
            held[slot] = block_row
            planes = ring[slot]
            if 0 <= block_row < rows:
                # Each block's bytes in order, scattered over the planes (the writes stay in the L1 cache).
                source = blocks[block_row]
                for c in range(cols):
                    for q in range(channels):
                        planes[q, c + margin] = _F32(source[c, q]) * scale + offset
            else:  # above or below the window: the convolution's 'same' zero padding
                for q in range(channels):
                    for c in range(cols):
                        planes[q, c + margin] = _ZERO
        for o in range(filters):
            for j in range(cols):
                acc[o, j] = b[o]
        for ky in range(k):
            block_row, ry = divmod(f * i + ky - before, f)
            planes = ring[block_row % span]
            for kx in range(k):
                shift, rx = divmod(kx - before, f)
                for c in range(3):
                    # A view that starts at the shifted column: plain non-negative indices below.
                    row = planes[(ry * f + rx) * 3 + c, shift + margin :]
                    for o in range(filters):
                        weight = w[ky, kx, c, o]
                        for j in range(cols):
                            acc[o, j] += weight * row[j]
        for j in range(cols):
            for o in range(filters):
                out[i, j, o] = max(acc[o, j], _ZERO)


class FusedFirstConv:
    """A k x k 'same' convolution with stride ``factor`` and ReLU on RGB blocks ``(rows, cols, factor*factor*3)`` uint8."""

    def __init__(self, factor: int, kernel_size: int, rows: RowSplitter | None = None):
        self.factor = int(factor)
        self.kernel_size = int(kernel_size)
        # TensorFlow's 'same' padding when the size is a multiple of the stride.
        before = max(self.kernel_size - self.factor, 0) // 2
        reach = (-(-before // self.factor), (self.kernel_size - 1 - before) // self.factor)
        self.padding = BlockPadding(self.factor, before, max(reach))
        self._rows = rows or RowSplitter()

    def forward(self, blocks: np.ndarray, kernel: np.ndarray, bias: np.ndarray, scale, offset) -> np.ndarray:
        """(rows, cols, filters) float32 activations of the rescaled blocks."""
        params = ConvParams(np.ascontiguousarray(kernel, np.float32), np.ascontiguousarray(bias, np.float32),
                            np.float32(scale), np.float32(offset))
        out = np.empty((blocks.shape[0], blocks.shape[1], params.kernel.shape[3]), np.float32)
        self._rows(out.shape[0], lambda lo, hi: _forward(blocks, params, self.padding, lo, hi, out))
        return out
