"""A cohort: slides with their labels, their split, and the regions to cut from each.

A cohort is given as a list of slides, a folder or glob of slides, or a CSV/YAML table
(``read_table``). Splits are per slide, so no slide's pixels reach both training and
validation; the single-slide form (one slide, regions named ``train`` and ``val``) is the
one exception, kept from the first generation of gigaseg.
"""

from __future__ import annotations

import csv
import glob
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gigaseg.dataset import MASK_SOURCES, RegionRequest, SyntheticRecipe, _check_region
from gigaseg.errors import ConfigError

SPLITS = ("train", "val", "test")
#: File endings of slides OpenSlide reads, for a folder of slides.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi", ".dcm")
#: The columns a cohort table may have; ``slide`` and ``split`` are required.
TABLE_COLUMNS = ("slide", "split", "name", "mask_source", "mask_path", "regions", "mpp")


@dataclass(frozen=True)
class Labels:
    """Where a slide's labels come from: a mask ``source`` and its ``path``, and what its values or classes mean.

    GeoJSON: ``classes`` are tissue (None: every class not named as background or ignore),
    ``background`` and ``ignore`` name classes, ``unannotated`` says what pixels outside every
    annotation are. Mask images: ``ignore_value`` names a value that means "not labelled".
    """

    source: str
    path: Path | None = None
    classes: tuple[str, ...] | None = None
    background: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    unannotated: str = "background"
    ignore_value: int | None = None

    def label_classes(self):
        """The GeoJSON class settings (:class:`gigaseg.data.labels.LabelClasses`); None for other sources."""
        from gigaseg.data.labels import LabelClasses

        if self.source != "geojson":
            return None
        return LabelClasses(tissue=self.classes, background=self.background, ignore=self.ignore,
                            unannotated=self.unannotated)


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its file, split, labels and region requests."""

    name: str
    path: Path
    split: str
    labels: Labels
    regions: tuple[RegionRequest, ...]
    synthetic: SyntheticRecipe | None = None

    def region_split(self, region: RegionRequest) -> str:
        """The split of a region: the slide's (in the single-slide form, the region's name says it)."""
        return self.split


@dataclass(frozen=True)
class SingleSlide(CohortSlide):
    """The first generation's form: one slide whose regions named ``val*``/``test*`` are held out."""

    def region_split(self, region: RegionRequest) -> str:
        for split in ("val", "test"):
            if region.name.startswith(split):
                return split
        return "train"


@dataclass
class Cohort:
    """The slides of a cohort, in a fixed order (their names are unique and name their folders)."""

    slides: list[CohortSlide] = field(default_factory=list)

    def validate(self) -> None:
        """Refuse what would make an unusable or leaky cohort, naming the slide."""
        if not self.slides:
            raise ConfigError("the cohort has no slide; give data.slides, data.glob, data.table or data.slide.path")
        seen: dict[str, CohortSlide] = {}
        by_file: dict[Path, CohortSlide] = {}
        for slide in self.slides:
            if slide.split not in SPLITS:
                raise ConfigError(f"slide {slide.name}: split '{slide.split}' is unknown; choose one of {', '.join(SPLITS)}")
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", slide.name) or slide.name in (".", ".."):
                raise ConfigError(f"slide name {slide.name!r} must be a plain folder name (letters, digits, _ . + -)")
            if slide.name in seen:
                raise ConfigError(f"two slides are named {slide.name} ({seen[slide.name].path} and {slide.path}); "
                                  "give them distinct names")
            seen[slide.name] = slide
            other = by_file.get(slide.path)
            if other is not None and other.split != slide.split:
                raise ConfigError(f"slide {slide.path} is in two splits ({other.split} and {slide.split}); "
                                  "splits are per slide, so that no slide's pixels are both trained and validated on")
            by_file[slide.path] = slide
            if slide.labels.source not in MASK_SOURCES:
                raise ConfigError(f"slide {slide.name}: mask source '{slide.labels.source}' is unknown; "
                                  f"choose one of {', '.join(MASK_SOURCES)}")
            if not slide.regions:
                raise ConfigError(f"slide {slide.name}: no region to prepare; give regions (e.g. kind: auto)")
            where = "data.regions" if isinstance(slide, SingleSlide) else f"slide {slide.name}: regions"
            for region in slide.regions:
                _check_region(region, where=where)
        if not any(s.region_split(r) == "train" for s in self.slides for r in s.regions):
            raise ConfigError("the cohort has no training region; put at least one slide in split train")

    def regions(self, split: str | None = None) -> list[tuple[CohortSlide, RegionRequest]]:
        """Every (slide, region request), of one split or all."""
        return [(s, r) for s in self.slides for r in s.regions if split is None or s.region_split(r) == split]


def slide_name(path: str | Path) -> str:
    """A folder name for a slide: its file name without the extension, made safe.

    Never ``.`` or ``..`` (a slide named ``...svs``) nor hidden: the folder stays inside its parent.
    """
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(str(path)).stem).lstrip(".") or "slide"


def find_slides(pattern: str | Path) -> list[Path]:
    """The slides of a folder (by file ending; DICOM folders count as one slide each) or of a glob pattern, sorted."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
                       and not p.name.startswith(".") and p.suffix.lower() != ".dcm")
        found += sorted(p for p in path.iterdir() if p.is_dir() and any(p.glob("*.dcm")))
    else:
        found = sorted(Path(p) for p in glob.glob(str(path)) if not Path(p).name.startswith("."))
    if not found:
        raise ConfigError(f"{pattern}: no slides found; give a folder of slides or a glob such as '/data/*.svs'")
    return found


def slide_mask_path(template: str | None, slide: Path) -> Path | None:
    """A per-slide mask path: ``{stem}`` and ``{dir}`` in ``template`` become the slide's file stem and folder."""
    if template is None:
        return None
    try:
        return Path(str(template).format(stem=slide.stem, name=slide.name, dir=slide.parent))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"mask path {template!r}: only {{stem}}, {{name}} and {{dir}} may appear in braces") from exc


def _regions_from_cell(value: Any, where: str, default: tuple[RegionRequest, ...]) -> tuple[RegionRequest, ...]:
    """A table's ``regions`` cell: empty (the default), a kind name (``whole``, ``auto``), or a YAML list of regions."""
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return (RegionRequest(name=value, kind=value),)
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        out = []
        for i, item in enumerate(value):
            try:
                out.append(RegionRequest(**{"name": item.get("kind", "region") + str(i), **item}))
            except TypeError as exc:
                raise ConfigError(f"{where}: a region has an unknown option ({exc})") from exc
        return tuple(out)
    raise ConfigError(f"{where}: regions must be empty, a kind (whole, auto) or a list of regions, got {value!r}")


def read_table(path: str | Path, *, labels: Labels, regions: tuple[RegionRequest, ...]) -> list[CohortSlide]:
    """The slides of a cohort table: a CSV file, or a YAML file holding a list of rows.

    Columns: ``slide`` (path, relative to the table's folder or absolute) and ``split``
    (train, val, test) are required; ``name``, ``mask_source``, ``mask_path``, ``regions``
    and ``mpp`` are optional and default to ``labels`` and ``regions``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"cohort table {path} does not exist; give a CSV or YAML file (data.table)")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            rows = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"cohort table {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"cohort table {path}: a YAML table is a list of rows (mappings with slide, split, ...)")
    else:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    slides = []
    for number, row in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        where = f"cohort table {path}, row {number}"
        unknown = sorted(set(row) - set(TABLE_COLUMNS))
        if unknown:
            raise ConfigError(f"{where}: unknown column(s) {', '.join(map(str, unknown))}; "
                              f"the columns are {', '.join(TABLE_COLUMNS)}")
        if not row.get("slide") or not row.get("split"):
            raise ConfigError(f"{where}: every row needs a slide and a split")
        slide = Path(str(row["slide"])).expanduser()
        slide = slide if slide.is_absolute() else path.parent / slide
        mask_path = row.get("mask_path") or None
        row_labels = Labels(
            source=str(row.get("mask_source") or labels.source),
            path=(Path(str(mask_path)) if Path(str(mask_path)).is_absolute() else path.parent / str(mask_path))
            if mask_path else slide_mask_path(str(labels.path) if labels.path else None, slide),
            classes=labels.classes, background=labels.background, ignore=labels.ignore,
            unannotated=labels.unannotated, ignore_value=labels.ignore_value,
        )
        row_regions = _regions_from_cell(row.get("regions"), where, regions)
        mpp = row.get("mpp")
        if mpp not in (None, ""):
            try:
                row_regions = tuple(r if r.mpp is not None else replace(r, level=None, mpp=float(mpp)) for r in row_regions)
            except ValueError as exc:
                raise ConfigError(f"{where}: mpp must be a number of microns per pixel, got {mpp!r}") from exc
        slides.append(CohortSlide(name=str(row.get("name") or slide_name(slide)), path=slide,
                                  split=str(row["split"]).strip(), labels=row_labels, regions=row_regions))
    return slides


#: The index of a prepared cohort, beside its slides' folders: which region is where, in which split.
INDEX_NAME = "cohort.json"


def write_index(out_dir: Path, entries: list[dict]) -> Path:
    """Write the prepared cohort's index (``cohort.json``): one entry per region (slide, region, split, dir)."""
    import json

    from gigaseg.atomic import atomic_path

    path = Path(out_dir) / INDEX_NAME
    text = json.dumps({"version": 1, "regions": entries}, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path  # unchanged: leave the file (and DVC's view of it) alone
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_index(out_dir: Path) -> list[dict]:
    """The entries of a prepared cohort's index; a clear error when the cohort was not prepared."""
    import json

    path = Path(out_dir) / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["regions"]
    except FileNotFoundError:
        raise ConfigError(f"no prepared cohort at {out_dir} ({INDEX_NAME} is missing); run gigaseg-prepare") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a cohort index ({exc}); run gigaseg-prepare again") from exc
    return list(entries)
