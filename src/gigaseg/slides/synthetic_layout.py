"""Slide-wide layout of a synthetic slide, decided once from the seed at low resolution.

The layout holds a coarse signed-distance field of the tissue pieces, the pen-ink strokes,
the slide-label shadow and coverslip edge, and the scanner's stitching strips. Tiles are
rendered from it independently (see ``synthetic_tissue``), so it must be cheap to pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gigaseg.slides.synthetic_noise import noise_at, sub_seed

#: Pixels per coarse grid step of the tissue field.
GRID_STEP = 32
#: Extra grid points on every side, so shifted and haloed tiles stay inside the grid.
GRID_PAD = 3

#: Optical density (R, G, B) of pen inks at full strength: blue, green, black marker.
INK_COLOURS = ((1.1, 0.65, 0.12), (0.95, 0.22, 0.75), (1.25, 1.2, 1.1))


@dataclass(frozen=True)
class InkStroke:
    """A pen mark: a polyline (level-0 x, y) drawn with a soft round nib."""

    points: np.ndarray
    half_width: float
    od: tuple[float, float, float]
    strength: float


@dataclass(frozen=True)
class SyntheticLayout:
    """Everything about a synthetic slide that is decided globally from its seed."""

    height: int
    width: int
    seed: int
    mpp: float
    #: Pixels per 0.5 micron: feature sizes scale with it so nuclei stay nuclei-sized.
    scale: float
    #: Coarse signed distance to the tissue boundary (pixels, > 0 inside), grid-sampled.
    coarse: np.ndarray
    strokes: tuple[InkStroke, ...]
    #: Scanner strip width (pixels) and per-strip (dx, dy, optical-density offset).
    strip_width: int
    strip_shift: np.ndarray
    strip_od: np.ndarray
    #: Slide label at the left (False) or right (True) end, its shadow width and the coverslip edge x.
    label_right: bool
    shadow_width: float
    coverslip_x: float
    piece_count: int = field(default=0)


def _rotation(rng: np.random.Generator) -> tuple[float, float]:
    """A random unit vector (cos, sin) using only sqrt, so it is identical on every machine."""
    while True:
        c, s = rng.uniform(-1.0, 1.0, size=2)
        r2 = c * c + s * s
        if 0.01 < r2 <= 1.0:
            r = float(np.sqrt(r2))
            return float(c / r), float(s / r)


def _add_piece(coarse: np.ndarray, centre: tuple[float, float], axes: tuple[float, float],
               rot: tuple[float, float], seed: int) -> None:
    """Max-combine one warped elliptical piece into the coarse signed-distance grid."""
    gh, gw = coarse.shape
    cx, cy = centre
    a, b = axes
    reach = 1.6 * max(a, b)
    gx0 = max(0, int((cx - reach) // GRID_STEP) + GRID_PAD)
    gx1 = min(gw, int((cx + reach) // GRID_STEP) + GRID_PAD + 2)
    gy0 = max(0, int((cy - reach) // GRID_STEP) + GRID_PAD)
    gy1 = min(gh, int((cy + reach) // GRID_STEP) + GRID_PAD + 2)
    if gx0 >= gx1 or gy0 >= gy1:
        return
    xs = ((np.arange(gx0, gx1) - GRID_PAD) * GRID_STEP).astype(np.float64)[None, :]
    ys = ((np.arange(gy0, gy1) - GRID_PAD) * GRID_STEP).astype(np.float64)[:, None]
    xs, ys = np.broadcast_arrays(xs, ys)
    warp_scale = 0.7 * min(a, b) + GRID_STEP
    u = (xs / warp_scale).astype(np.float32)
    v = (ys / warp_scale).astype(np.float32)
    wx = (noise_at(u, v, sub_seed(seed, 1)) - 0.5) + 0.5 * (noise_at(2.3 * u, 2.3 * v, sub_seed(seed, 3)) - 0.5)
    wy = (noise_at(u, v, sub_seed(seed, 2)) - 0.5) + 0.5 * (noise_at(2.3 * u, 2.3 * v, sub_seed(seed, 4)) - 0.5)
    dx = xs - cx
    dy = ys - cy
    c, s = rot
    p = (dx * c + dy * s) / a + 0.9 * wx
    q = (-dx * s + dy * c) / b + 0.9 * wy
    dist = (1.0 - np.sqrt(p * p + q * q)) * min(a, b)
    np.maximum(coarse[gy0:gy1, gx0:gx1], dist.astype(np.float32), out=coarse[gy0:gy1, gx0:gx1])


def _arc(rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    """Points on a wobbly circular arc, parametrised rationally (no trigonometry)."""
    t0 = rng.uniform(-3.0, -0.8)
    t1 = rng.uniform(0.8, 3.0)
    t = np.linspace(t0, t1, 160)
    den = 1.0 + t * t
    c, s = _rotation(rng)
    ux, uy = (1.0 - t * t) / den, 2.0 * t / den
    wobble = 1.0 + 0.06 * np.cumsum(rng.uniform(-1, 1, t.size)) / np.sqrt(t.size)
    px = cx + radius * wobble * (ux * c - uy * s)
    py = cy + radius * wobble * (ux * s + uy * c)
    return np.stack([px, py], axis=1)


def _curve(rng: np.random.Generator, start: tuple[float, float], end: tuple[float, float]) -> np.ndarray:
    """A quadratic Bezier stroke from ``start`` to ``end`` with a random bulge."""
    (x0, y0), (x2, y2) = start, end
    bulge = rng.uniform(-0.3, 0.3)
    x1 = (x0 + x2) / 2 - bulge * (y2 - y0)
    y1 = (y0 + y2) / 2 + bulge * (x2 - x0)
    t = np.linspace(0.0, 1.0, 60)[:, None]
    pts = (1 - t) ** 2 * np.array([x0, y0]) + 2 * (1 - t) * t * np.array([x1, y1]) + t * t * np.array([x2, y2])
    return pts


def make_layout(height: int, width: int, seed: int = 0, mpp: float = 0.5) -> SyntheticLayout:
    """Decide the tissue pieces, ink, label shadow and scanner strips of a slide from ``seed``."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED])
    scale = 0.5 / mpp
    gh = height // GRID_STEP + 2 * GRID_PAD + 2
    gw = width // GRID_STEP + 2 * GRID_PAD + 2
    # Far from every piece the distance is clamped: it only needs to stay below the
    # amplitude of the fine boundary noise, and a small value keeps the spline local.
    floor = -(160.0 * scale + 2 * GRID_STEP)
    coarse = np.full((gh, gw), floor, np.float32)

    label_right = bool(rng.integers(2))
    shadow_width = 0.012 * width
    edge_offset = rng.uniform(0.025, 0.035) * width
    coverslip_x = width - edge_offset if label_right else edge_offset
    x_lo, x_hi = (0.02 * width, coverslip_x - 0.015 * width) if label_right else (coverslip_x + 0.015 * width, 0.98 * width)
    y_lo, y_hi = 0.03 * height, 0.97 * height
    short = float(min(height, x_hi - x_lo))

    target = rng.uniform(0.28, 0.45)
    centres: list[tuple[float, float, float]] = []
    pieces = 0
    for attempt in range(400):
        big = attempt < 3 or rng.random() < 0.25
        # Small fragments span 1/128..1/8 of the short side; powers of two keep this exact.
        size = short * (rng.uniform(0.12, 0.32) if big else rng.uniform(1.0, 2.0) / float(2 ** int(rng.integers(4, 8))))
        aspect = rng.uniform(2.5, 6.0) if rng.random() < 0.2 else rng.uniform(1.0, 1.8)
        a, b = size * np.sqrt(aspect), size / np.sqrt(aspect)
        reach = min(a, 0.45 * (x_hi - x_lo))
        cx = rng.uniform(x_lo + reach, max(x_lo + reach + 1, x_hi - reach))
        cy = rng.uniform(y_lo + min(b, 0.4 * height), max(y_lo + 1, y_hi - min(b, 0.4 * height)))
        _add_piece(coarse, (cx, cy), (a, b), _rotation(rng), sub_seed(seed, 1000 + attempt))
        centres.append((cx, cy, max(a, b)))
        pieces += 1
        inner = coarse[GRID_PAD : GRID_PAD + height // GRID_STEP + 1, GRID_PAD : GRID_PAD + width // GRID_STEP + 1]
        if attempt % 4 == 3 and float((inner > 0).mean()) >= target:
            break

    strokes = []
    for _ in range(int(rng.integers(1, 4))):
        half_width = rng.uniform(25, 70) * scale
        od = INK_COLOURS[int(rng.integers(len(INK_COLOURS)))]
        if rng.random() < 0.6 and centres:
            cx, cy, r = centres[int(rng.integers(len(centres)))]
            pts = _arc(rng, cx, cy, min(1.3 * r + 3 * half_width, 0.6 * height))
        else:
            x0 = rng.uniform(x_lo, x_hi)
            y0 = rng.uniform(0.05, 0.95) * height
            length = rng.uniform(0.05, 0.2) * min(height, width) + 4 * half_width
            c, s = _rotation(rng)
            pts = _curve(rng, (x0, y0), (x0 + c * length, y0 + s * length))
        strokes.append(InkStroke(pts, float(half_width), od, float(rng.uniform(0.3, 0.65))))

    strip_width = int(round(2000 * scale))
    n_strips = width // strip_width + 2
    strip_shift = rng.integers(-3, 4, size=(n_strips, 2)).astype(np.int64)
    strip_od = rng.uniform(-0.006, 0.012, size=n_strips).astype(np.float32)
    return SyntheticLayout(
        height=int(height), width=int(width), seed=int(seed), mpp=float(mpp), scale=float(scale),
        coarse=coarse, strokes=tuple(strokes), strip_width=strip_width, strip_shift=strip_shift,
        strip_od=strip_od, label_right=label_right, shadow_width=float(shadow_width),
        coverslip_x=float(coverslip_x), piece_count=pieces,
    )
