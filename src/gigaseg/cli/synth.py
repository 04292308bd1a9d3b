"""``gigaseg-synth``: write a synthetic H&E slide (and its exact tissue mask) from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Sequence

from gigaseg.errors import GigasegError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gigaseg-synth",
        description="Write a synthetic H&E whole slide image as a pyramidal JPEG TIFF that OpenSlide opens.",
    )
    parser.add_argument("output", help="slide file to write (e.g. slide.tiff)")
    parser.add_argument("--height", type=int, required=True, help="level-0 height in pixels")
    parser.add_argument("--width", type=int, required=True, help="level-0 width in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes (default 0)")
    parser.add_argument("--mpp", type=float, default=0.5, help="microns per pixel at level 0 (default 0.5)")
    parser.add_argument("--mask", default=None, help="also write the exact tissue mask to this TIFF")
    parser.add_argument("--tile-size", type=int, default=512, help="TIFF tile size, a multiple of 16 (default 512)")
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: up to 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so the writer removes its partial files.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, write the slide, print what was written as JSON."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    from gigaseg.slides.synthetic import write_synthetic_slide

    try:
        info = write_synthetic_slide(
            args.output, height=args.height, width=args.width, seed=args.seed, mpp=args.mpp,
            tile_size=args.tile_size, mask_path=args.mask, progress=not args.quiet, workers=args.workers,
        )
    except GigasegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
