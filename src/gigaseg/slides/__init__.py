"""Slide readers: one small interface, an OpenSlide implementation and an in-memory one."""

from gigaseg.slides.array_reader import ArrayReader
from gigaseg.slides.base import LevelChoice, SlideReader

__all__ = ["ArrayReader", "LevelChoice", "SlideReader"]
