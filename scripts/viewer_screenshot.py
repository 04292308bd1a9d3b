"""Make the viewer's screenshots shown in docs/VIEWER.md: a slide page and the cohort page, in headless Chromium.

Serves ``--dir`` (predictions, e.g. of the smoke demo, see docs/VIEWER.md) on a free loopback
port, opens each page in Debian's ``chromium`` at a fixed viewport, waits until it says it is
drawn, and saves the viewport as a palette PNG (256 colours are plenty for a page and keep
the file small). Example:

    python scripts/viewer_screenshot.py --dir predicted --out docs/images/viewer_slide.png \\
        --cohort-out docs/images/viewer_cohort.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

# The DevTools client the browser test uses (tests/devtools.py): an exact viewport, a wait until drawn.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from devtools import Chromium  # noqa: E402


def save(png: bytes, out: Path) -> None:
    """A screenshot as a palette PNG (a page needs few colours; it keeps the file small)."""
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="predictions to serve (gigaseg-view dir=)")
    parser.add_argument("--slide", type=int, default=0, help="the slide page's number (its row, from 0)")
    parser.add_argument("--query", default="style=binary&opacity=40&reference=0",
                        help="the slide page's controls, as in its address")
    parser.add_argument("--out", type=Path, default=Path("docs/images/viewer_slide.png"))
    parser.add_argument("--cohort-out", type=Path, default=None, help="also take the cohort page")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=500)
    parser.add_argument("--cohort-height", type=int, default=260)
    args = parser.parse_args(argv)

    from gigaseg.cli.common import user_errors
    from gigaseg.cli.view import open_viewer

    with user_errors(), open_viewer(args.dir, None, port=0) as server:
        with Chromium(args.width, args.height, timeout=120) as browser:
            browser.open(f"{server.url}slide/{args.slide}?{args.query}")
            browser.wait_for("document.body.dataset.drawn")  # every visible layer loaded, the outlines in
            save(browser.screenshot(), args.out)
        if args.cohort_out is not None:
            with Chromium(args.width, args.cohort_height, timeout=120) as browser:
                browser.open(f"{server.url}?sort=-dice")
                browser.wait_for("Array.from(document.querySelectorAll('img')).every(i => i.dataset.drawn)"
                                 " && document.querySelectorAll('img').length > 0")
                save(browser.screenshot(), args.cohort_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
