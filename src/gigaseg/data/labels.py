"""Label values of prepared masks, and the settings that map annotation classes to them.

A prepared mask holds 0 (background), 1 (tissue) or 255 (ignore: counted in no loss and
no metric), so sparse annotations need not claim that everything unannotated is background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from gigaseg.errors import ConfigError

BACKGROUND = 0
TISSUE = 1
IGNORE = 255

#: What pixels outside every annotation become.
UNANNOTATED_CHOICES = ("background", "ignore")

#: Roles in order of precedence where annotations overlap: later roles paint over earlier ones.
ROLES = ("tissue", "background", "ignore")

ROLE_VALUES = {"tissue": TISSUE, "background": BACKGROUND, "ignore": IGNORE}


def _names(value: Any, option: str) -> tuple[str, ...]:
    # A bare string would otherwise be read as a tuple of one-letter classes.
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{option} must be a list of QuPath class names, got {value!r}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{option} must hold non-empty class names (strings), got {name!r}")
    return tuple(value)


@dataclass(frozen=True)
class LabelClasses:
    """Which QuPath annotation classes are tissue, background or ignore in a prepared mask.

    ``tissue=None`` counts every class not named as background or ignore as tissue,
    annotations without a classification included; with a list, only those classes are
    tissue and annotations of other classes are not used. Where annotations overlap,
    ignore wins over background, and background over tissue (a lumen drawn as background
    inside a tissue outline stays background). ``unannotated`` is what pixels outside every
    annotation become: ``background``, or ``ignore`` for sparse annotations that do not
    outline all of the tissue. The defaults give the plain tissue mask: every annotation is
    tissue, the rest background.
    """

    tissue: tuple[str, ...] | None = None
    background: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    unannotated: str = "background"

    def __post_init__(self) -> None:
        # Configs give lists; tuples keep the settings hashable and comparable.
        for key in ROLES:
            value = getattr(self, key)
            if isinstance(value, list):
                object.__setattr__(self, key, tuple(value))

    def validate(self, where: str = "labels") -> None:
        """Raise ConfigError naming the option (``{where}.tissue`` ...) when the settings are inconsistent."""
        named: dict[str, str] = {}
        for key in ROLES:
            value = getattr(self, key)
            if key == "tissue" and value is None:
                continue
            for name in _names(value, f"{where}.{key}"):
                if name in named and named[name] != key:
                    raise ConfigError(
                        f"{where}.{named[name]} and {where}.{key} both name class {name!r}; "
                        "a class can be only one of tissue, background or ignore"
                    )
                named[name] = key
        if self.tissue is not None and not self.tissue:
            raise ConfigError(
                f"{where}.tissue is an empty list, so no annotation would be tissue; name the tissue "
                "classes, or leave it unset (null) to count every class not named as background or ignore"
            )
        if self.unannotated not in UNANNOTATED_CHOICES:
            raise ConfigError(
                f"{where}.unannotated {self.unannotated!r} is unknown; choose one of {', '.join(UNANNOTATED_CHOICES)}"
            )

    def role(self, classification: str | None) -> str | None:
        """``tissue``, ``background`` or ``ignore`` for an annotation's class, or None when it is not used."""
        if classification is not None:
            if classification in self.ignore:
                return "ignore"
            if classification in self.background:
                return "background"
        if self.tissue is None or classification in self.tissue:
            return "tissue"
        return None

    def named(self) -> dict[str, str]:
        """Every class named in the settings, with its role."""
        return {name: key for key in ROLES for name in (getattr(self, key) or ())}

    @property
    def unannotated_value(self) -> int:
        return IGNORE if self.unannotated == "ignore" else BACKGROUND

    def describe(self) -> dict:
        """JSON-ready settings for the manifest."""
        return {
            "tissue": None if self.tissue is None else list(self.tissue),
            "background": list(self.background),
            "ignore": list(self.ignore),
            "unannotated": self.unannotated,
        }


class LabelCounts(NamedTuple):
    """Pixels of each label value in a mask."""

    background: int
    tissue: int
    ignore: int

    @property
    def labelled(self) -> int:
        """Pixels that count in the loss and the metrics: background or tissue."""
        return self.background + self.tissue


def count_labels(mask: np.ndarray) -> LabelCounts:
    """Count the background, tissue and ignore pixels of a uint8 mask in one pass."""
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).reshape(-1), minlength=256)
    return LabelCounts(int(counts[BACKGROUND]), int(counts[TISSUE]), int(counts[IGNORE]))
