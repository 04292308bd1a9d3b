"""The viewer's pages in headless Chromium (Debian's ``chromium``): what the pages' DOM says was drawn, and the screenshot's pixels.

Chromium is driven over the DevTools protocol (``tests/devtools.py``): each page is opened at
an exact viewport, the test waits until the page says its layers are fully loaded, then reads
the DOM and captures the viewport. As root Chromium needs ``--no-sandbox``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from devtools import Chromium, find_chromium
from PIL import Image
from test_view import cohort  # noqa: F401  (the module's fixture: two real predictions, one evaluated)

from gigaseg.cli.view import open_viewer

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (.ci/run installs it)")]

#: What the slide page says once its visible layers are fully loaded and its outlines drawn.
DRAWN = "document.body.dataset.drawn"


@pytest.fixture(scope="module")
def served(cohort):  # noqa: F811
    server = open_viewer(str(cohort / "cohort"), None, port=0)
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    with Chromium(1200, 800) as chromium:
        yield chromium


def pixels(browser: Chromium) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(browser.screenshot())).convert("RGB")).astype(int)


def near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> np.ndarray:
    return (np.abs(image - rgb) <= tolerance).all(axis=-1)


def test_the_cohort_page_draws_every_thumbnail_and_overlay(served, browser):
    browser.open(served.url + "?sort=-dice")
    drawn = browser.wait_for("(() => { const i = Array.from(document.querySelectorAll('img'));"
                             " return i.every(x => x.dataset.drawn) && i.map(x => [x.className, x.dataset.drawn]); })()")
    assert sorted(kind for kind, _ in drawn) == ["overlay", "overlay", "thumb", "thumb"]
    assert all(int(w) > 100 and int(h) > 50 for _, size in drawn for w, h in [size.split("x")])
    # Sorted by Dice, highest first: the evaluated slide is the first row, the other (no Dice) last.
    assert browser.evaluate("Array.from(document.querySelectorAll('tbody tr')).map(r => r.dataset.id)") == ["0", "1"]
    assert browser.evaluate("document.getElementById('shown').textContent") == "2 of 2 shown"
    image = pixels(browser)
    # Two thumbnails and two overlays of stained tissue, thousands of dark pixels each (the text: about 2000).
    assert (image.sum(axis=-1) < 600).sum() > 15000
    # Each image where the page put it: not blank, and the overlay is the thumbnail with outlines drawn on it.
    boxes = browser.evaluate("Array.from(document.querySelectorAll('tr[data-id=\"0\"] img')).map(i => {"
                             " const b = i.getBoundingClientRect(); return [b.left, b.top, b.width, b.height]; })")
    crops = [image[round(y):round(y + h), round(x):round(x + w)] for x, y, w, h in boxes]
    assert len(crops) == 2 and all(crop.size and crop.std() > 10 for crop in crops)
    thumbnail, overlay = crops
    assert thumbnail.shape == overlay.shape and np.abs(thumbnail - overlay).mean() > 2

    browser.open(served.url + "?filter=dice%3E0")
    assert browser.wait_for("document.getElementById('shown').textContent") == "1 of 2 shown"
    assert browser.evaluate("Array.from(document.querySelectorAll('tbody tr')).filter(r => !r.hidden).length") == 1


def test_the_slide_page_draws_the_slide_the_mask_the_outlines_and_the_reference(served, browser, cohort):  # noqa: F811
    browser.open(served.url + "slide/0")
    assert browser.wait_for(DRAWN) == "slide mask reference"
    data = browser.evaluate("Object.assign({}, document.body.dataset)")
    assert data["layers"] == "slide mask mask_binary reference"
    assert int(data["slideTiles"]) > 0 and int(data["maskTiles"]) > 0 and int(data["referenceTiles"]) > 0
    assert int(data["outlineRings"]) > 0
    assert data["scalebar"].endswith(("µm", "mm"))
    # The outlines are drawn as SVG paths over the layers, inside the viewer.
    assert browser.evaluate("document.querySelectorAll('#outlines path.exterior').length") == 1
    # In level-0 pixels, the extent of the GeoJSON's rings.
    box = browser.evaluate("(() => { const b = document.querySelector('#outlines g').getBBox();"
                           " return [b.x, b.y, b.x + b.width, b.y + b.height]; })()")
    geojson = json.loads((cohort / "cohort" / "0-probability" / "outlines.geojson").read_text())
    points = np.array([p for f in geojson["features"] for ring in f["geometry"]["coordinates"] for p in ring])
    assert np.allclose(box, [*points.min(axis=0), *points.max(axis=0)], atol=0.5)

    # The binary mask at full opacity, no reference: the predicted tissue in green, the outlines in yellow.
    browser.open(served.url + "slide/0?style=binary&opacity=100&reference=0")
    assert browser.wait_for(DRAWN) == "slide mask_binary"
    viewer = pixels(browser)[120:]  # below the header and the controls
    green, yellow = near(viewer, (0, 200, 0)).sum(), near(viewer, (255, 212, 0), 40).sum()
    assert green > 5000, green
    assert yellow > 300, yellow
    # The outlines lie on the mask's edges: most yellow pixels have mask within five pixels, far more
    # than they would were the outlines drawn 30 pixels off.
    ys, xs = np.nonzero(near(viewer, (255, 212, 0), 40))
    mask = near(viewer, (0, 200, 0), 40)

    def on_mask(dy: int, dx: int) -> float:
        return float(np.mean([mask[max(0, y + dy - 5):y + dy + 6, max(0, x + dx - 5):x + dx + 6].any()
                              for y, x in zip(ys, xs)]))

    assert on_mask(0, 0) > 0.85 and on_mask(0, 0) > on_mask(30, 30) + 0.2, (on_mask(0, 0), on_mask(30, 30))

    # With the mask, the outlines and the reference off, only the slide: no green, no yellow, not blank.
    browser.open(served.url + "slide/0?mask=0&outlines=0&reference=0")
    assert browser.wait_for(DRAWN) == "slide"
    bare = pixels(browser)[120:]
    assert near(bare, (0, 200, 0)).sum() < green / 20 and near(bare, (255, 212, 0), 40).sum() < yellow / 10
    assert bare.std() > 10
    # The reference alone over the slide, in blue.
    browser.open(served.url + "slide/0?mask=0&outlines=0&opacity=100")
    assert browser.wait_for(DRAWN) == "slide reference"
    assert near(pixels(browser)[120:], (40, 120, 255)).sum() > 5000
