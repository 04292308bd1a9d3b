"""Slide readers: one small interface, an OpenSlide implementation and an in-memory one."""

from __future__ import annotations

import os

from gigaseg.slides.array_reader import ArrayReader
from gigaseg.slides.base import LevelChoice, SlideReader
from gigaseg.slides.openslide_reader import OpenSlideReader

__all__ = ["ArrayReader", "LevelChoice", "OpenSlideReader", "SlideReader", "open_slide"]


def open_slide(path: str | os.PathLike) -> SlideReader:
    """Open a whole slide image file; every format OpenSlide reads is supported.

    Raises ``SlideError`` when the file is missing, not a slide, or cannot be opened.
    """
    return OpenSlideReader(path)
