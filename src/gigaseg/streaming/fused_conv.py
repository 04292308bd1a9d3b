"""The U-Net's first convolution (full-resolution RGB in, stride = block side, ReLU) in numba loops, reading the window's blocks directly; forward only.

TensorFlow spends about 28 ms of a 1152x1152 window on it (casting the uint8 window to float,
rescaling, a stride-1 convolution over blocks with a third of its taps zero). Here each
block row the output row reads is rescaled into planes, one per (sub-pixel row, sub-pixel
column, colour), with a margin of zero blocks (the convolution's 'same' padding); every
output row is then the sum of ``k*k*3`` shifted plane rows times a weight, in loops over the
row that the compiler vectorises. Only the real ``k x k`` taps are computed. The planes of
the few block rows in use are kept in a ring, so they stay in the cache: 12 ms for a
1664x1664 window, where planes of the whole window (33 MB, written, then read back) took 36.

Only forward passes use it (prediction, pass 1 of a two-pass step). A version that also
computed the filter gradient for pass 2 was withdrawn: at 2048x2048 its steps' deepest-layer
gradients were up to 1.1e-4 from the float64 plain step, against 6e-7 with TensorFlow's
convolution, over the exactness tests' 1e-4. The cause is float32 rounding flipping a ReLU
near zero in a 32x32 layer, not an error in it: TensorFlow's own convolution lands at 8.2e-4
there when the first bias is scaled by 1 - 5e-7 (``benchmarks/README.md``, current training
figures).
"""

from __future__ import annotations

import numba
import numpy as np

from gigaseg.streaming.fused import _FAST, RowSplitter, _scratch

_F32 = np.float32
_ZERO = np.float32(0.0)


@numba.njit(fastmath=_FAST, nogil=True, cache=True, error_model="numpy")
def _forward(blocks, w, b, f, before, margin, scale, offset, lo, hi, out):  # pragma: no cover - compiled
    """ReLU(convolution + b) of the rescaled ``blocks``, output rows ``lo:hi``, into ``out`` (rows, cols, filters)."""
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
        self.before = max(self.kernel_size - self.factor, 0) // 2
        reach = (-(-self.before // self.factor), (self.kernel_size - 1 - self.before) // self.factor)
        self.margin = max(reach)
        self._rows = rows or RowSplitter()

    def forward(self, blocks: np.ndarray, kernel: np.ndarray, bias: np.ndarray, scale, offset) -> np.ndarray:
        """(rows, cols, filters) float32 activations of the rescaled blocks."""
        kernel, bias = np.ascontiguousarray(kernel, np.float32), np.ascontiguousarray(bias, np.float32)
        out = np.empty((blocks.shape[0], blocks.shape[1], kernel.shape[3]), np.float32)
        args = (self.factor, self.before, self.margin, np.float32(scale), np.float32(offset))
        self._rows(out.shape[0], lambda lo, hi: _forward(blocks, kernel, bias, *args, lo, hi, out))
        return out
