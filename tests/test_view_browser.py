"""The viewer's pages in headless Chromium (Debian's ``chromium``): what the pages' DOM says was drawn, and the screenshot's pixels.

Chromium runs with a virtual time budget, so it waits for the tiles and the outlines before
it dumps the DOM or takes the screenshot. As root it needs ``--no-sandbox``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_view import cohort  # noqa: F401  (the module's fixture: two real predictions, one evaluated)

from gigaseg.cli.view import open_viewer

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZE = (1200, 800)


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    flags = ["--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--mute-audio",
             f"--window-size={SIZE[0]},{SIZE[1]}", "--virtual-time-budget=20000"]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout, check=False)


def dom(url: str, *wanted: str) -> str:
    """The page's DOM once it shows every ``wanted`` text (Chromium's virtual time can run out first on a busy machine)."""
    for _ in range(3):
        done = chromium("--dump-dom", url)
        assert done.returncode == 0 and "<body" in done.stdout, done.stderr[-2000:]
        if all(text in done.stdout for text in wanted):
            break
    return done.stdout


def screenshot(url: str, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / f"{name}.png"
    done = chromium(f"--screenshot={path}", url)
    assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")).astype(int)


def near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> np.ndarray:
    return (np.abs(image - rgb) <= tolerance).all(axis=-1)


@pytest.fixture(scope="module")
def served(cohort):  # noqa: F811
    server = open_viewer(str(cohort / "cohort"), None, port=0)
    yield server
    server.close()


def body_data(page: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", page).group(1)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))


def test_the_cohort_page_draws_every_thumbnail_and_overlay(served, tmp_path):
    page = dom(served.url + "?sort=-dice", "data-drawn=")
    drawn = re.findall(r'<img class="(thumb|overlay)"[^>]*data-drawn="(\d+)x(\d+)"', page)
    assert sorted(kind for kind, _, _ in drawn) == ["overlay", "overlay", "thumb", "thumb"], page[:3000]
    assert all(int(w) > 100 and int(h) > 50 for _, w, h in drawn)
    # Sorted by Dice, highest first: the evaluated slide is the first row.
    assert page.index('<tr data-id="0"') < page.index('<tr data-id="1"')
    assert "2 of 2 shown" in page
    assert "1 of 2 shown" in dom(served.url + "?filter=dice%3E0")

    pixels = screenshot(served.url, tmp_path, "cohort")
    # Two thumbnails and two overlays of stained tissue, each some 7000 dark pixels in all (the text: about 2000).
    assert (pixels.sum(axis=-1) < 600).sum() > 15000


def test_the_slide_page_draws_the_slide_the_mask_the_outlines_and_the_reference(served, tmp_path):
    data = body_data(dom(served.url + "slide/0", "data-slide-tiles", "data-mask-tiles", "data-reference-tiles",
                         "data-outlines-drawn"))
    assert data["layers"] == "slide mask mask_binary reference"
    assert int(data["slide-tiles"]) > 0 and int(data["mask-tiles"]) > 0 and int(data["reference-tiles"]) > 0
    assert int(data["outline-rings"]) > 0 and data["outlines-drawn"] == "true"
    assert data["scalebar"].endswith(("µm", "mm"))

    # The binary mask at full opacity, no reference: the predicted tissue in green, the outlines in yellow.
    pixels = screenshot(served.url + "slide/0?style=binary&opacity=100&reference=0", tmp_path, "mask")
    viewer = pixels[120:, :]  # below the header and the controls
    green, yellow = near(viewer, (0, 200, 0)).sum(), near(viewer, (255, 212, 0), 40).sum()
    assert green > 2000, green
    assert yellow > 300, yellow
    # With the mask, the outlines and the reference off, only the slide is drawn: no green, no yellow, not blank.
    bare = screenshot(served.url + "slide/0?mask=0&outlines=0&reference=0", tmp_path, "bare")[120:, :]
    assert near(bare, (0, 200, 0)).sum() < green / 20 and near(bare, (255, 212, 0), 40).sum() < yellow / 10
    assert bare.std() > 10
    # The reference alone, in blue.
    blue = screenshot(served.url + "slide/0?mask=0&outlines=0&opacity=100", tmp_path, "reference")[120:, :]
    assert near(blue, (40, 120, 255)).sum() > 2000
