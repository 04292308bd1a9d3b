"""Render a level-0 rectangle of a synthetic slide: RGB pixels and the exact tissue mask.

Optical densities of tissue stains, pen ink, dust, the label shadow and the coverslip edge
add up (Beer-Lambert); a lookup table turns them into light, then a slight optical blur and
integer sensor noise are applied. Scanner strips are stitched with small misalignments.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gigaseg.slides.synthetic_layout import SyntheticLayout
from gigaseg.slides.synthetic_noise import cell_randoms, exp_neg, fbm, hash2, lattice_noise, smoothstep, sub_seed, to_u32
from gigaseg.slides.synthetic_tissue import tissue_stains

F32 = np.float32

#: Optical density per unit concentration (R, G, B) of haematoxylin and eosin, fitted by eye to
#: typical H&E colours (purple-blue nuclei, pink stroma).
HAEM_OD = np.array([0.60, 0.75, 0.28], F32)
EOSIN_OD = np.array([0.10, 0.86, 0.50], F32)
#: Faint tint of glass and mounting medium, so background is off-white, not 255.
GLASS_OD = np.array([0.02, 0.024, 0.012], F32)

_LUT_STEPS = 512  # lookup entries per unit optical density
_LUT_SIZE = 4 * _LUT_STEPS
_LUT_SCALE = 64  # fixed-point bits of the light values, so the blur stays exact in integers
_LN10 = 2.302585092994046
_LIGHT = np.round(255 * _LUT_SCALE * exp_neg(np.arange(_LUT_SIZE) / _LUT_STEPS * _LN10)).astype(np.uint32)


def _add_ink(layout: SyntheticLayout, od: np.ndarray, x0: int, y0: int, xs: np.ndarray, ys: np.ndarray) -> None:
    h, w = od.shape[:2]
    for n, stroke in enumerate(layout.strokes):
        hw = stroke.half_width
        pts = stroke.points
        lo = pts.min(axis=0) - hw
        hi = pts.max(axis=0) + hw
        if hi[0] < x0 or lo[0] > x0 + w or hi[1] < y0 or lo[1] > y0 + h:
            continue
        d2min = None
        for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
            if max(ax, bx) + hw < x0 or min(ax, bx) - hw > x0 + w or max(ay, by) + hw < y0 or min(ay, by) - hw > y0 + h:
                continue
            ex, ey = F32(bx - ax), F32(by - ay)
            inv = F32(1.0 / max(float(ex * ex + ey * ey), 1e-6))
            dx = xs - F32(ax)
            dy = ys - F32(ay)
            t = np.clip((dx * ex + dy * ey) * inv, 0, 1)
            px = dx - t * ex
            py = dy - t * ey
            d2 = px * px + py * py
            d2min = d2 if d2min is None else np.minimum(d2min, d2)
        if d2min is None:
            continue
        # Uneven ink laydown: soft blotches plus a faint grain, never fully opaque.
        streak = F32(1) + fbm(x0, y0, w, h, (40 * layout.scale, 6 * layout.scale), (0.6, 0.15), sub_seed(layout.seed, 200 + n))
        density = np.clip((F32(hw) - np.sqrt(d2min)) / F32(0.2 * hw), 0, 1) * F32(stroke.strength) * streak
        od += density[..., None] * np.array(stroke.od, F32)


def _add_dust(layout: SyntheticLayout, od: np.ndarray, x0: int, y0: int) -> None:
    """Grey dust specks on the coverslip (sparse, so each is stamped into its own box)."""
    h, w = od.shape[:2]
    s = layout.scale
    cs = 140.0 * s
    seed = sub_seed(layout.seed, 300)
    gx, gy, r = cell_randoms(x0, y0, w, h, cs, seed, 5)
    present = r[0] < F32(0.035)
    if not present.any():
        return
    big = r[1] < F32(0.12)
    radius = np.minimum((F32(1.3) + F32(4) * r[2]) * F32(s) * np.where(big, F32(4), F32(1)), F32(0.45 * cs))
    px = ((gx + 0.5) * cs).astype(F32) + (r[3] - F32(0.5)) * (F32(cs) - F32(2) * radius)
    py = ((gy + 0.5) * cs).astype(F32) + (r[4] - F32(0.5)) * (F32(cs) - F32(2) * radius)
    tint = np.array([1.0, 1.02, 1.08], F32)
    for cx, cy, rad, is_big in zip(px[present], py[present], radius[present], big[present]):
        c0, c1 = max(0, int(np.floor(cx - 1.5 * rad)) - x0), min(w, int(np.ceil(cx + 1.5 * rad)) - x0 + 1)
        r0, r1 = max(0, int(np.floor(cy - 1.5 * rad)) - y0), min(h, int(np.ceil(cy + 1.5 * rad)) - y0 + 1)
        if c0 >= c1 or r0 >= r1:
            continue
        # Wobble is evaluated at absolute coordinates, so a speck split across tiles matches.
        wobble = (lattice_noise(x0 + c0, y0 + r0, c1 - c0, r1 - r0, 2.5 * s, sub_seed(seed, 9)) - F32(0.5)) * F32(0.9)
        dx = np.arange(x0 + c0, x0 + c1, dtype=F32)[None, :] - cx
        dy = np.arange(y0 + r0, y0 + r1, dtype=F32)[:, None] - cy
        d = np.sqrt(dx * dx + dy * dy) / rad + wobble
        strength = F32(0.25) if is_big else F32(0.9)
        od[r0:r1, c0:c1] += (np.clip((F32(1) - d) * F32(2.5), 0, 1) * strength)[..., None] * tint


def _add_label_and_coverslip(layout: SyntheticLayout, od: np.ndarray, x0: int, y0: int, xs: np.ndarray) -> None:
    h, w = od.shape[:2]
    s = layout.scale
    from_end = (F32(layout.width - 1) - xs) if layout.label_right else xs
    shadow = F32(1) - smoothstep(0.0, layout.shadow_width, from_end)
    edge_from_end = (layout.width - layout.coverslip_x) if layout.label_right else layout.coverslip_x
    beyond = (from_end < F32(edge_from_end)).astype(F32) * F32(0.015)
    od += (F32(0.55) * shadow * shadow + beyond)[..., None] * np.array([1.0, 1.0, 0.94], F32)
    if abs(x0 + w / 2 - layout.coverslip_x) < w / 2 + 60 * s:
        edge_x = F32(layout.coverslip_x) + F32(14 * s) * (lattice_noise(x0, y0, w, h, 1500 * s, sub_seed(layout.seed, 400)) - F32(0.5))
        d = np.abs(xs - edge_x)
        line = F32(0.32) * np.clip(F32(1) - d / F32(3.5 * s), 0, 1) + F32(0.07) * np.clip(F32(1) - d / F32(16 * s), 0, 1)
        od += line[..., None]


def render_region(layout: SyntheticLayout, location: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """RGB (h x w x 3 uint8) and tissue mask (h x w uint8, 1 = tissue) of a level-0 rectangle.

    ``location`` is the level-0 (x, y) of the top-left pixel and ``size`` is (w, h), as for
    ``SlideReader.read_region``; the rectangle may extend past the slide (it is procedural).
    """
    x, y = (int(v) for v in location)
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0:
        raise ValueError(f"region size {w}x{h} must be positive")
    # One pixel of halo on every side feeds the 3x3 optical blur.
    x0, y0, ww, hh = x - 1, y - 1, w + 2, h + 2
    od = np.empty((hh, ww, 3), F32)
    mask = np.zeros((hh, ww), bool)
    sw = layout.strip_width
    n_strips = len(layout.strip_od)
    for k in range(x0 // sw, (x0 + ww - 1) // sw + 1):
        a, b = max(x0, k * sw), min(x0 + ww, (k + 1) * sw)
        dx, dy = (int(v) for v in layout.strip_shift[k % n_strips])
        cols = slice(a - x0, b - x0)
        od[:, cols] = GLASS_OD + layout.strip_od[k % n_strips]
        stains = tissue_stains(layout, a + dx, y0 + dy, b - a, hh)
        if stains is not None:
            haem, eosin, keep = stains
            od[:, cols] += haem[..., None] * HAEM_OD + eosin[..., None] * EOSIN_OD
            mask[:, cols] = keep
    xs = np.arange(x0, x0 + ww, dtype=F32)[None, :]
    ys = np.arange(y0, y0 + hh, dtype=F32)[:, None]
    _add_label_and_coverslip(layout, od, x0, y0, xs)
    _add_dust(layout, od, x0, y0)
    _add_ink(layout, od, x0, y0, xs, ys)

    od *= F32(_LUT_STEPS)
    od += F32(0.5)
    np.clip(od, F32(0), F32(_LUT_SIZE - 1), out=od)
    light = _LIGHT.take(od.astype(np.int32))
    # Exact integer 3x3 binomial blur ([1 2 1] x [1 2 1] / 16): a slightly soft focus.
    rows = light[1:-1] << np.uint32(1)
    rows += light[:-2]
    rows += light[2:]
    blurred = rows[:, 1:-1] << np.uint32(1)
    blurred += rows[:, :-2]
    blurred += rows[:, 2:]
    # Sensor noise: a triangular integer in [-3, 3] grey levels per channel from a pixel hash.
    bits = hash2(to_u32(np.arange(x, x + w))[None, :], to_u32(np.arange(y, y + h))[:, None], sub_seed(layout.seed, 500))
    three = np.uint32(3)
    for c in range(3):
        noise = (bits >> np.uint32(4 * c)) & three
        noise += (bits >> np.uint32(4 * c + 2)) & three
        blurred[..., c] += noise << np.uint32(10)
    # Remove the noise bias (3 levels) with rounding, clamp, and drop the fixed-point bits.
    total = blurred.view(np.int32)
    total += np.int32(8 * _LUT_SCALE - 3 * 16 * _LUT_SCALE)
    np.clip(total, 0, 255 << 10, out=total)
    rgb = (total >> 10).astype(np.uint8)
    return rgb, mask[1:-1, 1:-1].astype(np.uint8)
