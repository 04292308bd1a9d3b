"""Deterministic procedural noise for synthetic slides: integer hashing and value noise.

Everything here is evaluated at absolute pixel coordinates with integer hashing and
polynomial interpolation only (no exp/sin/log), so a pixel's value does not depend on
the tile it is rendered in, the thread count or the CPU's SIMD paths.
"""

from __future__ import annotations

import numpy as np

_U32 = np.uint32
_MASK32 = 0xFFFFFFFF


def hash_u32(a: np.ndarray) -> np.ndarray:
    """Chris Wellons' lowbias32 integer hash on a uint32 array (wraps modulo 2**32)."""
    a = np.asarray(a, dtype=_U32)
    with np.errstate(over="ignore"):  # wrapping multiplication is the point
        a = a ^ (a >> _U32(16))
        a = a * _U32(0x7FEB352D)
        a = a ^ (a >> _U32(15))
        a = a * _U32(0x846CA68B)
        return a ^ (a >> _U32(16))


def to_u32(values: np.ndarray | int) -> np.ndarray:
    """Wrap (possibly negative) integers to uint32 two's complement."""
    return (np.asarray(values, dtype=np.int64) & _MASK32).astype(_U32)


def sub_seed(seed: int, stream: int) -> int:
    """A well-mixed 32-bit seed for one named random stream of a slide."""
    return int(hash_u32(to_u32(seed) ^ hash_u32(to_u32(stream * 0x9E3779B9 + 0x632BE5AB))))


def hash2(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """uint32 hash of integer lattice points (broadcasting ``ix`` against ``iy``)."""
    hy = hash_u32(to_u32(iy) ^ _U32(seed & _MASK32))
    with np.errstate(over="ignore"):
        return hash_u32(hy + hash_u32(to_u32(ix) * _U32(0x9E3779B1)))


def unit(h: np.ndarray) -> np.ndarray:
    """Map uint32 hashes to float32 in [0, 1) using their top 24 bits (exactly representable)."""
    return (h >> _U32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def rand2(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Uniform float32 in [0, 1) for each integer lattice point."""
    return unit(hash2(ix, iy, seed))


def cell_randoms(x0: int, y0: int, w: int, h: int, cs: float, seed: int, streams: int):
    """Cells of size ``cs`` covering a rectangle with one cell of margin, and uniform values.

    Returns the cell column and row indices (``gx``, ``gy``, 2-D) and ``streams`` arrays of
    per-cell values in [0, 1), each from its own sub-seed: the same cell gets the same
    values whichever tile asks.
    """
    cols = np.arange(int(np.floor(x0 / cs)) - 1, int(np.floor((x0 + w) / cs)) + 2)
    rows = np.arange(int(np.floor(y0 / cs)) - 1, int(np.floor((y0 + h) / cs)) + 2)
    gx, gy = np.meshgrid(cols, rows)
    return gx, gy, [rand2(gx, gy, sub_seed(seed, k)) for k in range(streams)]


def _quintic(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * np.float32(6) - np.float32(15)) + np.float32(10))


def _axis(start: int, count: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice cell index and quintic weight along one axis for pixels start..start+count-1."""
    u = np.arange(start, start + count, dtype=np.float64) / float(scale)
    cell = np.floor(u)
    weight = _quintic((u - cell).astype(np.float32))
    return cell.astype(np.int64), weight


def lattice_noise(x0: int, y0: int, w: int, h: int, scale: float, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1) on an axis-aligned lattice of ``scale`` pixels.

    Separable: interpolates along x on the few lattice rows first, then along y, so it
    costs a handful of operations per pixel.
    """
    cx, wx = _axis(x0, w, scale)
    cy, wy = _axis(y0, h, scale)
    lx = np.arange(cx[0], cx[-1] + 2)
    ly = np.arange(cy[0], cy[-1] + 2)
    lattice = rand2(lx[None, :], ly[:, None], seed)
    ix = cx - lx[0]
    left = lattice[:, ix]
    rows = left + (lattice[:, ix + 1] - left) * wx[None, :]
    iy = cy - ly[0]
    top = rows[iy]
    return top + (rows[iy + 1] - top) * wy[:, None]


def fbm(x0: int, y0: int, w: int, h: int, scales: tuple[float, ...], amps: tuple[float, ...], seed: int) -> np.ndarray:
    """Sum of centred lattice-noise octaves (each in [-amp/2, amp/2))."""
    out = np.zeros((h, w), np.float32)
    for k, (scale, amp) in enumerate(zip(scales, amps)):
        out += (lattice_noise(x0, y0, w, h, scale, sub_seed(seed, k)) - np.float32(0.5)) * np.float32(amp)
    return out


def noise_at(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Value noise in [0, 1) at arbitrary lattice-space coordinates (e.g. warped or rotated).

    Uses a cubic smoothstep; the lattice is built only over the bounding box of (u, v).
    """
    fu = np.floor(u)
    fv = np.floor(v)
    tu = u - fu
    tv = v - fv
    tu = tu * tu * (np.float32(3) - np.float32(2) * tu)
    tv = tv * tv * (np.float32(3) - np.float32(2) * tv)
    u0, v0 = int(fu.min()), int(fv.min())
    lw = int(fu.max()) - u0 + 2
    lh = int(fv.max()) - v0 + 2
    lattice = rand2(np.arange(u0, u0 + lw)[None, :], np.arange(v0, v0 + lh)[:, None], seed).ravel()
    # Offsets are small (the bounding box of one tile), so int32 indices are exact.
    fu -= np.float32(u0)
    fv -= np.float32(v0)
    idx = fv.astype(np.int32)
    idx *= np.int32(lw)
    idx += fu.astype(np.int32)
    a = lattice.take(idx)
    idx += 1
    top = lattice.take(idx)
    top -= a
    top *= tu
    top += a
    idx += lw - 1
    c = lattice.take(idx)
    idx += 1
    bottom = lattice.take(idx)
    bottom -= c
    bottom *= tu
    bottom += c
    bottom -= top
    bottom *= tv
    bottom += top
    return bottom


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Cubic Hermite step from 0 at ``edge0`` to 1 at ``edge1``."""
    t = np.clip((x - np.float32(edge0)) * np.float32(1.0 / (edge1 - edge0)), 0, 1).astype(np.float32)
    return t * t * (np.float32(3) - np.float32(2) * t)


def exp_neg(x: np.ndarray) -> np.ndarray:
    """exp(-x) for x >= 0 in float64 with only + and *, identical on every machine."""
    y = np.asarray(x, dtype=np.float64) / 1024.0
    t = 1.0 - y * (1.0 - y * (0.5 - y * (1.0 / 6.0 - y * (1.0 / 24.0))))
    for _ in range(10):
        t = t * t
    return t
