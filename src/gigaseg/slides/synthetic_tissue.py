"""Procedural H&E tissue: stain concentrations and the exact tissue mask of a pixel rectangle.

Tissue is pink stroma with wavy collagen fibres, purple nuclei (round and spindle-shaped),
glands with lumens and a purple epithelial lining, adipose honeycomb, tears, and pieces
whose edges fade to a faint stain. Lumens and tears are background; adipose is tissue.
Every value is a pure function of absolute pixel coordinates (see ``synthetic_noise``).
"""

from __future__ import annotations

import math

import numpy as np

from gigaseg.slides.synthetic_layout import GRID_PAD, GRID_STEP, SyntheticLayout
from gigaseg.slides.synthetic_noise import cell_randoms, fbm, lattice_noise, noise_at, rand2, smoothstep, sub_seed

F32 = np.float32

#: Unit fibre directions (cos, sin), 22.5 degrees apart, from integer vectors (sqrt only).
_DIRS = tuple((x / math.sqrt(x * x + y * y), y / math.sqrt(x * x + y * y))
              for x, y in ((1, 0), (5, 2), (1, 1), (2, 5), (0, 1), (-2, 5), (-1, 1), (-5, 2)))


def _bspline(t: np.ndarray) -> tuple[np.ndarray, ...]:
    """Uniform cubic B-spline weights: smooth and never overshooting (all weights >= 0)."""
    s = F32(1) - t
    t2 = t * t
    t3 = t2 * t
    sixth = F32(1.0 / 6.0)
    return (
        s * s * s * sixth,
        (F32(3) * t3 - F32(6) * t2 + F32(4)) * sixth,
        (F32(-3) * t3 + F32(3) * t2 + F32(3) * t + F32(1)) * sixth,
        t3 * sixth,
    )


def coarse_field(layout: SyntheticLayout, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """The coarse signed distance to tissue, cubic-interpolated to pixels (separable)."""
    def axis(start: int, count: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        u = np.arange(start, start + count, dtype=np.float64) / GRID_STEP + GRID_PAD
        cell = np.floor(u)
        return cell.astype(np.int64), _bspline((u - cell).astype(F32))

    cx, wx = axis(x0, w)
    cy, wy = axis(y0, h)
    gh, gw = layout.coarse.shape
    r0, r1 = int(cy[0]) - 1, int(cy[-1]) + 3
    rows_idx = np.clip(np.arange(r0, r1), 0, gh - 1)
    sub = layout.coarse[rows_idx]
    rows = np.zeros((r1 - r0, w), F32)
    for k in range(4):
        rows += sub[:, np.clip(cx - 1 + k, 0, gw - 1)] * wx[k][None, :]
    out = np.zeros((h, w), F32)
    for k in range(4):
        out += rows[cy - 1 + k - r0] * wy[k][:, None]
    return out


def _candidates(x0: int, y0: int, w: int, h: int, cs: float):
    """Cell lattice origin/size and the 2x2 candidate cells of every pixel row and column.

    A blob centred in a cell of size ``cs`` with radius <= cs/2 can only reach pixels in
    its own cell and the nearer half of its neighbours, so four candidates suffice.
    """
    def axis(start: int, count: int):
        u = np.arange(start, start + count, dtype=np.float64) / cs
        cell = np.floor(u)
        other = cell + np.where(u - cell < 0.5, -1, 1)
        return cell.astype(np.int64), other.astype(np.int64)

    ca, cb = axis(x0, w)
    ra, rb = axis(y0, h)
    c0, r0 = int(min(ca.min(), cb.min())), int(min(ra.min(), rb.min()))
    cols = np.arange(c0, int(max(ca.max(), cb.max())) + 1)
    rows = np.arange(r0, int(max(ra.max(), rb.max())) + 1)
    pairs = [(ry - r0, cx - c0) for ry in (ra, rb) for cx in (ca, cb)]
    return cols, rows, pairs


def _nuclei(layout: SyntheticLayout, x0: int, y0: int, w: int, h: int, xs: np.ndarray, ys: np.ndarray,
            spindle: bool, lumens: np.ndarray) -> np.ndarray:
    """Nuclear haematoxylin (0..~1) of one population: round epithelial/lymphocyte or spindle."""
    s = layout.scale
    cs = (32.0 if spindle else 22.0) * s
    seed = sub_seed(layout.seed, 40 if spindle else 41)
    cols, rows, pairs = _candidates(x0, y0, w, h, cs)
    gx, gy = np.meshgrid(cols, rows)
    r = [rand2(gx, gy, sub_seed(seed, k)) for k in range(6)]
    px = ((gx + 0.5) * cs).astype(F32) + (r[0] - F32(0.5)) * F32(0.5 * cs)
    py = ((gy + 0.5) * cs).astype(F32) + (r[1] - F32(0.5)) * F32(0.5 * cs)
    gland = smoothstep(0.5, 0.62, noise_at(px / F32(900 * s), py / F32(900 * s), sub_seed(layout.seed, 11)))
    lymph = smoothstep(0.72, 0.8, noise_at(px / F32(500 * s), py / F32(500 * s), sub_seed(layout.seed, 12)))
    fat = smoothstep(0.6, 0.68, noise_at(px / F32(1400 * s), py / F32(1400 * s), sub_seed(layout.seed, 10)))
    if spindle:
        density = F32(0.55) * (F32(1) - gland) * (F32(1) - lymph)
        a = (F32(8) + F32(6) * r[3]) * F32(s)
        b = (F32(2.4) + F32(1.2) * r[4]) * F32(s)
        k = np.floor(noise_at(px / F32(4000 * s), py / F32(4000 * s), sub_seed(layout.seed, 20)) * 10 + 0.5).astype(np.int64) % 8
        dirs = np.array(_DIRS, F32)
        c, sn = dirs[k, 0], dirs[k, 1]
    else:
        density = F32(0.1) + F32(0.45) * gland + F32(0.8) * lymph
        if len(lumens):
            # Gland epithelium: a crowded row of nuclei just outside each lumen.
            wall = _lumen_distance(lumens, px, py)
            density = np.where(wall < F32(5 * s), F32(0), density + F32(0.85) * ((wall < F32(30 * s))))
        a = (F32(4.4) + F32(3.2) * r[3] * (F32(1) - F32(0.7) * lymph) - F32(0.8) * lymph) * F32(s)
        b = a * (F32(0.7) + F32(0.3) * r[4])
        norm = np.sqrt((r[5] - F32(0.5)) ** 2 + (r[4] - F32(0.5)) ** 2) + F32(1e-3)
        c, sn = (r[5] - F32(0.5)) / norm, (r[4] - F32(0.5)) / norm
    a = np.minimum(a, F32(0.5 * cs))
    present = (r[2] < density * (F32(1) - fat)).astype(F32)
    dark = present * (F32(0.55) + F32(0.45) * rand2(gx, gy, sub_seed(seed, 9)) + F32(0.25) * lymph)
    # Pre-scaled axes: the ellipse is p^2 + q^2 < 1 with p = (dx*c + dy*s)/a, q = (dy*c - dx*s)/b.
    params = np.stack([px, py, c / a, sn / a, c / b, sn / b, dark], axis=-1).astype(F32)
    out = np.zeros((h, w), F32)
    for ry, cx in pairs:
        if not dark[np.ix_(np.unique(ry), np.unique(cx))].any():
            continue
        g = params[ry][:, cx]
        dx = xs - g[..., 0]
        dy = ys - g[..., 1]
        p = dx * g[..., 2]
        p += dy * g[..., 3]
        q = dy * g[..., 4]
        q -= dx * g[..., 5]
        p *= p
        q *= q
        p += q
        # 3 * (1 - d2), clipped to [0, 1]: a disc with a soft rim.
        p *= F32(-3)
        p += F32(3)
        np.clip(p, F32(0), F32(1), out=p)
        p *= g[..., 6]
        np.maximum(out, p, out=out)
    return out


def _fibres(layout: SyntheticLayout, x0: int, y0: int, w: int, h: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Wavy collagen fibre texture in [0, 1], oriented by a slowly varying direction field."""
    s = layout.scale
    seed = layout.seed
    # Orientation in units of 22.5 degrees, wrapping at 8 (fibres have no head or tail).
    turns = lattice_noise(x0, y0, w, h, 4000 * s, sub_seed(seed, 20)) * F32(10)
    orient = turns % F32(8)
    wx = xs + fbm(x0, y0, w, h, (110 * s,), (45 * s,), sub_seed(seed, 21))
    wy = ys + fbm(x0, y0, w, h, (110 * s,), (45 * s,), sub_seed(seed, 22))
    out = np.zeros((h, w), F32)
    # The field is smooth, so a tile only sees the directions next to its unwrapped range.
    for k in {k % 8 for k in range(int(np.floor(turns.min())), int(np.floor(turns.max())) + 2)}:
        d = np.abs(orient - F32(k))
        weight = np.clip(F32(1) - np.minimum(d, F32(8) - d), 0, 1)
        if not weight.any():
            continue
        c, sn = F32(_DIRS[k][0]), F32(_DIRS[k][1])
        u = (wx * c + wy * sn) * F32(1 / (34 * s))
        v = (wy * c - wx * sn) * F32(1 / (3.2 * s))
        out += weight * noise_at(u, v, sub_seed(seed, 30 + k))
    grain = lattice_noise(x0, y0, w, h, 2.0 * s, sub_seed(seed, 23))
    return out * F32(0.8) + grain * F32(0.2)


def _fat_membranes(layout: SyntheticLayout, x0: int, y0: int, w: int, h: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Adipocyte membranes: thin lines where the two nearest Worley cell points are equidistant."""
    s = layout.scale
    cs = 110.0 * s
    seed = sub_seed(layout.seed, 60)
    cx = np.floor(np.arange(x0, x0 + w, dtype=np.float64) / cs).astype(np.int64)
    cy = np.floor(np.arange(y0, y0 + h, dtype=np.float64) / cs).astype(np.int64)
    cols = np.arange(cx.min() - 1, cx.max() + 2)
    rows = np.arange(cy.min() - 1, cy.max() + 2)
    gx, gy = np.meshgrid(cols, rows)
    # Warping the pixel grid bends the straight Voronoi edges into curved cell walls.
    xs = xs + fbm(x0, y0, w, h, (60 * s,), (22 * s,), sub_seed(seed, 5))
    ys = ys + fbm(x0, y0, w, h, (60 * s,), (22 * s,), sub_seed(seed, 6))
    px = ((gx + F32(0.5)) * cs).astype(F32) + (rand2(gx, gy, seed) - F32(0.5)) * F32(0.8 * cs)
    py = ((gy + F32(0.5)) * cs).astype(F32) + (rand2(gx, gy, seed + 1) - F32(0.5)) * F32(0.8 * cs)
    d1 = np.full((h, w), F32(1e12))
    d2 = np.full((h, w), F32(1e12))
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            ix = np.ix_(cy + oy - rows[0], cx + ox - cols[0])
            dx = xs - px[ix]
            dy = ys - py[ix]
            d = dx * dx + dy * dy
            np.minimum(d2, np.maximum(d1, d), out=d2)
            np.minimum(d1, d, out=d1)
    gap = np.sqrt(d2) - np.sqrt(d1)
    return np.clip(F32(1.5) - gap / F32(1.6 * s), 0, 1)


def _lumen_blobs(layout: SyntheticLayout, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Gland lumens near a rectangle as rows of (centre x, centre y, semi-axis a, semi-axis b)."""
    s = layout.scale
    cs = 360.0 * s
    seed = sub_seed(layout.seed, 70)
    gx, gy, r = cell_randoms(x0, y0, w, h, cs, seed, 5)
    b = (F32(18) + F32(55) * r[2] * r[2]) * F32(s)
    a = np.minimum(b * (F32(1) + F32(1.6) * r[3]), F32(0.4 * cs))
    px = ((gx + 0.5) * cs).astype(F32) + (r[0] - F32(0.5)) * (F32(cs) - F32(2) * a)
    py = ((gy + 0.5) * cs).astype(F32) + (r[1] - F32(0.5)) * (F32(cs) - F32(2) * a)
    gland = noise_at(px / F32(900 * s), py / F32(900 * s), sub_seed(layout.seed, 11))
    present = r[4] < smoothstep(0.5, 0.62, gland) * F32(0.9)
    return np.stack([px[present], py[present], a[present], b[present]], axis=1)


def _lumen_distance(blobs: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Approximate distance (pixels) from points to the nearest lumen wall, negative inside."""
    out = np.full(np.broadcast(px, py).shape, F32(1e6))
    for cx, cy, a, b in blobs:
        dx = (px - cx) / a
        dy = (py - cy) / b
        np.minimum(out, (np.sqrt(dx * dx + dy * dy) - F32(1)) * b, out=out)
    return out


def _lumens(layout: SyntheticLayout, x0: int, y0: int, w: int, h: int, blobs: np.ndarray, reach: float) -> np.ndarray:
    """Distance outside the nearest lumen per pixel (negative inside, 1e6 beyond ``reach``)."""
    s = layout.scale
    seed = sub_seed(layout.seed, 70)
    outside = np.full((h, w), F32(1e6))
    wobble = None
    for cx, cy, a, b in blobs:
        c0 = max(0, int(np.floor(cx - 1.3 * a - reach)) - x0)
        c1 = min(w, int(np.ceil(cx + 1.3 * a + reach)) - x0 + 1)
        r0 = max(0, int(np.floor(cy - 1.3 * a - reach)) - y0)
        r1 = min(h, int(np.ceil(cy + 1.3 * a + reach)) - y0 + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        if wobble is None:
            # Smooth infoldings of the gland wall, not ragged holes.
            wobble = (lattice_noise(x0, y0, w, h, 45 * s, sub_seed(seed, 9)) - F32(0.5)) * F32(0.45)
            wobble += (lattice_noise(x0, y0, w, h, 16 * s, sub_seed(seed, 8)) - F32(0.5)) * F32(0.12)
        dx = (np.arange(x0 + c0, x0 + c1, dtype=F32)[None, :] - cx) / a
        dy = (np.arange(y0 + r0, y0 + r1, dtype=F32)[:, None] - cy) / b
        dist = (np.sqrt(dx * dx + dy * dy) + wobble[r0:r1, c0:c1] - F32(1)) * b
        np.minimum(outside[r0:r1, c0:c1], dist, out=outside[r0:r1, c0:c1])
    return outside


def tissue_stains(layout: SyntheticLayout, x0: int, y0: int, w: int, h: int):
    """Haematoxylin and eosin concentrations and the tissue mask of a rectangle, or None if empty."""
    s = layout.scale
    seed = layout.seed
    gy0 = max(0, int(np.floor(y0 / GRID_STEP)) + GRID_PAD - 2)
    gx0 = max(0, int(np.floor(x0 / GRID_STEP)) + GRID_PAD - 2)
    window = layout.coarse[gy0 : int(np.floor((y0 + h) / GRID_STEP)) + GRID_PAD + 4,
                           gx0 : int(np.floor((x0 + w) / GRID_STEP)) + GRID_PAD + 4]
    # The spline never exceeds its control values and the boundary noise is bounded.
    if window.size == 0 or float(window.max()) + 67.0 * s <= 0:
        return None
    dist = coarse_field(layout, x0, y0, w, h)
    dist += fbm(x0, y0, w, h, (150 * s, 45 * s, 13 * s, 4.5 * s), (90 * s, 30 * s, 9 * s, 3 * s), sub_seed(seed, 1))
    inside = dist > 0
    if not inside.any():
        return None
    xs = np.arange(x0, x0 + w, dtype=F32)[None, :]
    ys = np.arange(y0, y0 + h, dtype=F32)[:, None]

    def field(scale: float, stream: int) -> np.ndarray:
        return lattice_noise(x0, y0, w, h, scale * s, sub_seed(seed, stream))

    fat = smoothstep(0.6, 0.68, field(1400, 10))
    gland = smoothstep(0.5, 0.62, field(900, 11))
    stain_h = F32(0.8) + F32(0.45) * field(2500, 13)
    stain_e = F32(0.7) + F32(0.6) * field(3000, 14)
    edge = (F32(25) + F32(140) * field(700, 15)) * F32(s)
    fade = F32(0.16) + F32(0.84) * smoothstep(0.0, 1.0, dist / edge)

    fib = _fibres(layout, x0, y0, w, h, xs, ys)
    eosin = F32(0.06) + F32(0.4) * smoothstep(0.2, 0.8, fib) * (F32(1) - F32(0.5) * gland)
    eosin += F32(0.12) * gland
    haem = F32(0.07) + F32(0.08) * gland
    blobs = _lumen_blobs(layout, x0, y0, w, h) if gland.max() > 0 else np.zeros((0, 4), F32)
    nuclei = np.maximum(_nuclei(layout, x0, y0, w, h, xs, ys, False, blobs),
                        _nuclei(layout, x0, y0, w, h, xs, ys, True, blobs))
    chromatin = F32(0.65) + F32(0.7) * lattice_noise(x0, y0, w, h, 2.2 * s, sub_seed(seed, 16))
    haem += F32(0.95) * nuclei * chromatin
    eosin *= F32(1) - F32(0.6) * nuclei

    keep = inside
    if len(blobs):
        outside = _lumens(layout, x0, y0, w, h, blobs, 40 * s)
        lining = smoothstep(0.0, 1.0, F32(1) - outside / F32(40 * s)) * (outside >= 0)
        haem += lining * F32(0.12)
        eosin += lining * F32(0.06)
        keep = keep & (outside >= 0)
    if fat.max() > 0:
        membrane = _fat_membranes(layout, x0, y0, w, h, xs, ys)
        membrane = np.maximum(membrane, (dist < F32(3 * s)).astype(F32))
        eosin = eosin * (F32(1) - fat) + fat * (F32(0.004) + F32(0.55) * membrane)
        haem = haem * (F32(1) - fat) + fat * (F32(0.002) + F32(0.08) * membrane)
    tear_gate = smoothstep(0.6, 0.7, field(900, 18)) * (F32(1) - fat)
    # Tears follow a level line of jagged noise; their width varies along the crack.
    ridge = np.abs(field(300, 19) + F32(0.3) * field(55, 24) + F32(0.1) * field(12, 25) - F32(0.7))
    keep = keep & ~(ridge < F32(0.02) * tear_gate)

    scale_h = np.where(keep, stain_h * fade, F32(0))
    scale_e = np.where(keep, stain_e * fade, F32(0))
    return haem * scale_h, eosin * scale_e, keep
