"""Make a dataset from its description: generate the synthetic slide if asked, then prepare
each named region (``train``, ``val``) with its mask into ``<dir>/<name>/``.

Plain arguments only; ``gigaseg-prepare`` turns the ``data`` config group into them.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gigaseg.atomic import atomic_path
from gigaseg.errors import ConfigError, RegionError
from gigaseg.options import DEFAULT_PAD_VALUE

log = logging.getLogger(__name__)

MASK_SOURCES = ("synthetic", "geojson", "image", "bootstrap")
FIT_MODES = ("pad", "crop", "none")


def _check_int(option: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise ConfigError(f"{option} must be {what}, got {value!r}")


def _check_region(region: "RegionRequest", where: str = "data.regions") -> None:
    """Refuse a region whose name could leave the dataset folder, or whose numbers make no rectangle."""
    name = str(region.name)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: region name {name!r} must be a plain folder name (no '/', not '.' or '..')")
    where = f"{where}.{name}"
    if region.kind not in REGION_KINDS:
        raise ConfigError(f"{where}.kind '{region.kind}' is unknown; choose one of {', '.join(REGION_KINDS)}")
    if region.kind == "rect":
        _check_int(f"{where}.x", region.x, minimum=0)
        _check_int(f"{where}.y", region.y, minimum=0)
        _check_int(f"{where}.width", region.width, minimum=1)
        _check_int(f"{where}.height", region.height, minimum=1)
    elif region.kind == "auto":
        for key in ("width", "height"):
            if getattr(region, key) is not None:
                _check_int(f"{where}.{key}", getattr(region, key), minimum=1)
        _check_int(f"{where}.count", region.count, minimum=1)
        if not 0.0 <= float(region.min_tissue) <= 1.0:
            raise ConfigError(f"{where}.min_tissue must be a fraction in [0, 1], got {region.min_tissue!r}")
        if region.tissue_model is not None and not str(region.tissue_model).strip():
            raise ConfigError(f"{where}.tissue_model must be a model URI (runs:/..., models:/..., a path) or null")
    elif region.kind == "annotations" and not region.annotation_class:
        raise ConfigError(f"{where}.annotation_class names the QuPath class whose annotations' boxes are the regions "
                          "(e.g. Region); give it")
    if region.level is not None:
        _check_int(f"{where}.level", region.level, minimum=0)
    if region.mpp is not None and (isinstance(region.mpp, bool) or not isinstance(region.mpp, numbers.Real)
                                   or not (math.isfinite(region.mpp) and region.mpp > 0)):
        raise ConfigError(f"{where}.mpp must be a positive number of microns per pixel or null, got {region.mpp!r}")


@dataclass(frozen=True)
class SyntheticRecipe:
    """How to generate a synthetic slide (see ``gigaseg.slides.synthetic``)."""

    height: int
    width: int
    seed: int = 0
    mpp: float = 0.5
    tile_size: int = 512


#: How a region is given: a rectangle; the whole level; chosen on tissue; the boxes of annotations.
REGION_KINDS = ("rect", "whole", "auto", "annotations")
#: The study's region (height, width): the default size of ``auto`` regions.
STUDY_REGION = (16000, 64000)


@dataclass(frozen=True)
class RegionRequest:
    """One named region of a slide, at a ``level`` or a target ``mpp``, and its own mask file for ``image`` masks.

    ``kind`` says how the rectangle is found:

    - ``rect``: ``x``, ``y`` (level-0 pixels) and ``width``, ``height`` (pixels at the region's resolution);
    - ``whole``: the whole level (padded to the total stride like any region);
    - ``auto``: up to ``count`` regions of ``width`` x ``height`` (default the study's 64000 x 16000,
      per axis at most the level), aligned to the total stride, chosen greedily by tissue
      fraction on a low-resolution tissue estimate (Otsu on saturation, or the tissue a trained
      model predicts when ``tissue_model`` names one by URI), without overlap, none under ``min_tissue``;
    - ``annotations``: the bounding box of every QuPath annotation of class ``annotation_class``
      in the slide's GeoJSON (``data.mask.path``, or ``annotations_path``).
    """

    name: str
    x: int = 0
    y: int = 0
    width: int | None = None
    height: int | None = None
    level: int | None = 0
    mpp: float | None = None
    mask_path: str | None = None
    kind: str = "rect"
    count: int = 1
    min_tissue: float = 0.25
    annotation_class: str | None = None
    annotations_path: str | None = None
    #: ``auto`` only: a trained model's URI (``runs:/``, ``models:/``, a path) whose predicted
    #: tissue the windows are chosen on instead of the Otsu estimate.
    tissue_model: str | None = None

    def spec(self):
        """The rectangle as :class:`gigaseg.data.RegionSpec` (by ``mpp`` when it gives one, else by ``level``)."""
        from gigaseg.data import RegionSpec

        return RegionSpec(x=self.x, y=self.y, width=self.width, height=self.height,
                          level=self.level if self.mpp is None else None, mpp=self.mpp)

    def rectangle(self) -> dict[str, Any]:
        """The fields that say which pixels a ``rect`` region holds (what a prepared region's manifest records)."""
        return {"name": self.name, "x": self.x, "y": self.y, "width": self.width, "height": self.height,
                "level": self.level, "mpp": self.mpp, "mask_path": self.mask_path}


@dataclass
class DatasetSpec:
    """A slide, where its labels come from, and the regions to cut from it."""

    out_dir: Path
    slide_path: Path
    regions: list[RegionRequest]
    mask_source: str = "synthetic"
    mask_path: Path | None = None
    classes: list[str] | None = None
    #: Which QuPath classes are tissue, background or ignore (GeoJSON labels); None: ``classes`` are tissue.
    labels: Any = None
    #: A value of ``image`` masks that means "not labelled" (prepared as 255).
    ignore_value: int | None = None
    synthetic: SyntheticRecipe | None = None
    fit: str = "pad"
    pad_value: tuple[int, int, int] = (242, 242, 242)
    max_region: tuple[int, int] | None = None
    #: Also write each region's decoded pixels (image.npy) instead of reading windows from the slide.
    decoded_cache: bool = False
    #: The tissue estimates of ``auto`` regions' ``tissue_model`` URIs: callables of a
    #: SlideReader giving (tissue view, its downsample); see gigaseg.data.region_kinds.
    tissue_estimates: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: The dataset folder: paths under it are written relative in the manifests (default: out_dir's parent).
    root: Path | None = None

    def validate(self) -> None:
        if self.mask_source not in MASK_SOURCES:
            raise ConfigError(
                f"data.mask.source '{self.mask_source}' is unknown; choose one of {', '.join(MASK_SOURCES)}"
            )
        if self.mask_source in ("synthetic", "geojson") and self.mask_path is None:
            raise ConfigError(f"data.mask.path is required for mask source '{self.mask_source}'")
        if self.mask_source == "synthetic" and self.synthetic is None and not Path(self.mask_path).is_file():
            raise ConfigError(f"data.mask.source=synthetic needs a synthetic slide recipe (data.slide.synthetic) "
                              f"or the generator's truth mask; {self.mask_path} does not exist")
        if self.labels is not None:
            self.labels.validate(where="data.mask")
        if self.fit not in FIT_MODES:
            raise ConfigError(f"data.fit '{self.fit}' is unknown; choose one of {', '.join(FIT_MODES)}")
        if self.synthetic is not None:
            for key in ("height", "width", "tile_size"):
                _check_int(f"data.slide.synthetic.{key}", getattr(self.synthetic, key), minimum=1)
        if self.max_region is not None and any(int(v) <= 0 for v in self.max_region):
            raise ConfigError(f"data.max_region must be two positive sizes (height, width), got {self.max_region}")
        if not self.regions:
            raise ConfigError("data.regions lists no region; give at least a 'train' region")
        for region in self.regions:
            _check_region(region)
            if region.mask_path is None and self.mask_source == "image":
                raise ConfigError(f"data.regions.{region.name}.mask_path is required for mask source 'image'")


def capped(region: RegionRequest, max_region: tuple[int, int] | None) -> RegionRequest:
    """The centre of the region, at most ``max_region`` (height, width) large.

    The centre rather than the origin, since region corners often hold only background.
    Offsets are kept to multiples of 64 level pixels, so level-0 origins stay aligned.
    """
    if max_region is None:
        return region
    height, width = min(region.height, int(max_region[0])), min(region.width, int(max_region[1]))
    if region.level not in (0, None) or region.mpp is not None:
        return RegionRequest(**{**asdict(region), "height": height, "width": width})
    dy = (region.height - height) // 2 // 64 * 64
    dx = (region.width - width) // 2 // 64 * 64
    return RegionRequest(
        **{**asdict(region), "x": region.x + dx, "y": region.y + dy, "height": height, "width": width}
    )


def shrunk_synthetic(
    recipe: SyntheticRecipe, regions: list[RegionRequest], max_region: tuple[int, int]
) -> tuple[SyntheticRecipe, list[RegionRequest]]:
    """Scale a synthetic slide and its level-0 regions down so the regions fit ``max_region``.

    Shrunk debug runs use this: a smaller slide from the same recipe is much faster to
    generate than a large one, and its regions keep their place relative to the tissue.
    """
    if any(r.level not in (0, None) or r.mpp is not None for r in regions):
        return recipe, [capped(r, max_region) for r in regions]
    scale = min(
        1.0, *(min(int(max_region[0]) / r.height, int(max_region[1]) / r.width) for r in regions)
    )

    def down(v: int) -> int:
        return int(v * scale) // 64 * 64

    scaled = [
        RegionRequest(**{**asdict(r), "x": down(r.x), "y": down(r.y),
                         "height": max(64, down(r.height)), "width": max(64, down(r.width))})
        for r in regions
    ]
    height = max(down(recipe.height), max(r.y + r.height for r in scaled))
    width = max(down(recipe.width), max(r.x + r.width for r in scaled))
    return SyntheticRecipe(**{**asdict(recipe), "height": height, "width": width}), scaled


def shrunk_slide(recipe: SyntheticRecipe, max_region: tuple[int, int]) -> SyntheticRecipe:
    """The same synthetic recipe at most four times ``max_region`` (height, width) large, for shrunk
    runs whose regions are found on the slide (``whole``, ``auto``) rather than given."""
    height = min(recipe.height, max(64, 4 * int(max_region[0]) // 64 * 64))
    width = min(recipe.width, max(64, 4 * int(max_region[1]) // 64 * 64))
    return SyntheticRecipe(**{**asdict(recipe), "height": height, "width": width})


def ensure_synthetic_slide(spec: DatasetSpec, recipe: SyntheticRecipe | None, *, progress: bool) -> dict | None:
    """Generate the dataset's synthetic slide and truth mask unless the same recipe exists."""
    from gigaseg.slides.synthetic import write_synthetic_slide

    if recipe is None:
        return None
    recipe_file = spec.slide_path.with_name(spec.slide_path.name + ".recipe.json")
    wanted = json.dumps(asdict(recipe), sort_keys=True)
    mask_path = spec.mask_path if spec.mask_source == "synthetic" else None
    have = spec.slide_path.exists() and (mask_path is None or Path(mask_path).exists())
    if have and recipe_file.exists() and recipe_file.read_text() == wanted:
        log.info("synthetic slide %s is up to date", spec.slide_path)
        return asdict(recipe)
    spec.slide_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating synthetic slide %s (%dx%d, seed %d)", spec.slide_path, recipe.width, recipe.height, recipe.seed)
    write_synthetic_slide(
        spec.slide_path,
        height=recipe.height,
        width=recipe.width,
        seed=recipe.seed,
        mpp=recipe.mpp,
        tile_size=recipe.tile_size,
        mask_path=mask_path,
        progress=progress,
    )
    with atomic_path(recipe_file) as tmp:
        tmp.write_text(wanted)
    return asdict(recipe)


def mask_source_for(spec: DatasetSpec, region: RegionRequest):
    """The mask source object of a region."""
    from gigaseg.data import masks

    if spec.mask_source == "synthetic":
        return masks.SyntheticMask(spec.mask_path)
    if spec.mask_source == "geojson":
        from gigaseg.data.geojson import GeoJSONMask

        if spec.labels is not None:
            return GeoJSONMask(spec.mask_path, labels=spec.labels)
        return GeoJSONMask(spec.mask_path, classes=spec.classes)
    if spec.mask_source == "image":
        return masks.MaskImage(region.mask_path, ignore_value=spec.ignore_value)
    from gigaseg.data.bootstrap import BootstrapMask

    return BootstrapMask()


def prepare_dataset(spec: DatasetSpec, *, total_stride: int, progress: bool = True) -> dict[str, dict]:
    """Prepare every region of ``spec``; regions already prepared from the same request are kept."""
    from gigaseg.data import prepare_region
    from gigaseg.data.manifest import FORMAT_VERSION, file_sha256, read_manifest
    from gigaseg.slides import open_slide

    spec.validate()
    recipe, regions = spec.synthetic, list(spec.regions)
    rectangles = all(r.kind == "rect" for r in regions)
    if spec.max_region is not None and rectangles:
        if recipe is not None:
            recipe, regions = shrunk_synthetic(recipe, regions, spec.max_region)
        else:
            regions = [capped(r, spec.max_region) for r in regions]
    elif spec.max_region is not None:
        if recipe is not None:
            recipe = shrunk_slide(recipe, spec.max_region)
        # Regions found on the slide look for windows no larger than the cap, so that the
        # tissue-richest ones are chosen, not the whole shrunk slide.
        regions = [replace(r, height=min(r.height or STUDY_REGION[0], int(spec.max_region[0])),
                           width=min(r.width or STUDY_REGION[1], int(spec.max_region[1])))
                   if r.kind == "auto" else r for r in regions]
    recipe = ensure_synthetic_slide(spec, recipe, progress=progress)
    manifests: dict[str, dict] = {}
    digest: list[str] = []

    def slide_digest() -> str:  # hashed once per slide, for the up-to-date check and every manifest
        if not digest:
            digest.append(file_sha256(spec.slide_path))
        return digest[0]

    with open_slide(spec.slide_path) as reader:
        if not rectangles:
            from gigaseg.data.region_kinds import resolve

            geojson = spec.mask_path if spec.mask_source == "geojson" else None
            estimates = {uri: saved_estimate(estimate, spec.out_dir, slide_digest)
                         for uri, estimate in spec.tissue_estimates.items()}
            regions = [capped(r, spec.max_region)
                       for r in resolve(reader, tuple(regions), total_stride, geojson, estimates)]
        for region in regions:
            out = spec.out_dir / region.name
            request = {
                "region": region.rectangle(),
                "mask_source": spec.mask_source,
                "mask_path": None if spec.mask_path is None else str(spec.mask_path),
                "classes": spec.classes,
                "labels": None if spec.labels is None else spec.labels.describe(),
                "ignore_value": spec.ignore_value,
                "fit": spec.fit,
                "pad_value": list(spec.pad_value),
                "total_stride": total_stride,
                "synthetic": recipe,
                "decoded_cache": spec.decoded_cache,
            }
            manifest_path = out / "manifest.json"
            if manifest_path.exists():
                old = read_manifest(manifest_path)
                from gigaseg.data.manifest import relative_paths

                wanted = relative_paths({"request": json.loads(json.dumps(request))}, out, spec.root)["request"]
                if (old.get("request") == wanted and old.get("format_version") == FORMAT_VERSION
                        and (old.get("slide") or {}).get("sha256") == slide_digest()):
                    log.info("region %s is up to date in %s", region.name, out)
                    manifests[region.name] = old
                    continue
            extra = {"request": request, **spec.extra}
            if recipe is not None:
                extra["seed"] = recipe["seed"]
            if region.tissue_model:
                extra["chosen_on"] = {"tissue_model": region.tissue_model}
            try:
                manifests[region.name] = prepare_region(
                    reader,
                    region.spec(),
                    mask_source_for(spec, region),
                    out,
                    total_stride=total_stride,
                    fit=spec.fit,
                    pad_value=tuple(spec.pad_value),
                    extra_manifest=extra,
                    progress=progress,
                    slide_path=spec.slide_path,
                    dataset_dir=spec.root,
                    decoded_cache=spec.decoded_cache,
                    slide_sha256=slide_digest(),
                )
            except RegionError as exc:  # say which configured region, not only which rectangle
                raise RegionError(f"data.regions.{region.name}: {exc}") from exc
            log.info("prepared region %s in %s", region.name, out)
    return manifests


def saved_estimate(estimate, folder: Path, slide_digest):
    """``estimate`` (a tissue estimate of ``auto`` regions) kept in ``folder`` beside the slide's regions.

    A model's estimate predicts the whole slide; it is saved as ``tissue-<key>.npz``, the key
    digesting the estimate's ``identity`` and the slide's digest, and read back while
    neither changes, so preparing again only reads it. Estimates without an identity are not
    saved. Other ``tissue-*.npz`` files of the folder are removed when a new one is written.
    """
    identity = getattr(estimate, "identity", None)
    if identity is None:
        return estimate

    def run(reader):
        import hashlib

        import numpy as np

        key = hashlib.sha256(f"{identity}|{slide_digest()}".encode()).hexdigest()[:16]
        path = folder / f"tissue-{key}.npz"
        if path.is_file():
            with np.load(path) as saved:
                log.info("%s: tissue estimate read from %s", reader.name, path)
                return saved["tissue"], float(saved["downsample"])
        view, downsample = estimate(reader)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, tissue=view, downsample=np.float64(downsample))
        for old in folder.glob("tissue-*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
        return view, downsample

    return run


def prepare_cohort(
    cohort,
    out_dir: Path,
    *,
    total_stride: int,
    fit: str = "pad",
    pad_value: tuple[int, int, int] = DEFAULT_PAD_VALUE,
    max_region: tuple[int, int] | None = None,
    decoded_cache: bool = False,
    tissue_estimates: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Prepare every region of every slide of a :class:`gigaseg.data.cohort.Cohort` and write its index.

    A slide's regions go to ``out_dir/<slide name>/<region name>/``; regions already prepared
    from the same request are kept. ``tissue_estimates`` maps the ``tissue_model`` URIs of
    ``auto`` regions to their estimates (see :class:`DatasetSpec`).
    Returns the index entries (also written to ``out_dir/cohort.json``).
    """
    from tqdm.auto import tqdm

    from gigaseg.data.cohort import write_index
    from gigaseg.errors import GigasegError

    cohort.validate()
    check_slides(cohort, total_stride=total_stride, fit=fit, max_region=max_region)
    entries: list[dict] = []
    for slide in tqdm(cohort.slides, desc="slides", unit="slide", disable=not progress or len(cohort.slides) < 2):
        folder = out_dir / slide.name
        spec = slide_spec(slide, folder, fit=fit, pad_value=pad_value, max_region=max_region,
                          decoded_cache=decoded_cache)
        spec.tissue_estimates = dict(tissue_estimates or {})
        spec.root = out_dir.parent  # the dataset folder, which holds the demo's slides too
        try:
            manifests = prepare_dataset(spec, total_stride=total_stride, progress=progress)
        except GigasegError as exc:
            if str(exc).startswith(("slide ", f"{slide.path}")) or len(cohort.slides) == 1:
                raise
            raise type(exc)(f"slide {slide.name}: {exc}") from exc
        for name, manifest in manifests.items():
            entries.append({
                "slide": slide.name, "region": name, "split": slide.region_split(RegionRequest(name=name)),
                "dir": f"{slide.name}/{name}",
                # Relative, so that the index of a cohort inside the project is the same in any checkout.
                "slide_path": os.path.relpath(slide.path, out_dir),
            })
    write_index(out_dir, entries)
    remove_stale_regions(out_dir, {entry["dir"] for entry in entries})
    return entries


def remove_stale_regions(out_dir: Path, kept: set[str]) -> list[str]:
    """Remove prepared region folders (``<slide>/<region>`` holding a manifest) that the index no longer lists.

    After a change of regions (another ``count``, a slide left out) the folder then holds
    exactly the cohort that ``cohort.json`` describes, so its digest (DVC's) is the same as a
    fresh preparation's. Folders without a manifest are not gigaseg's and are left alone.
    """
    import shutil

    removed = []
    for manifest in sorted(Path(out_dir).glob("*/*/manifest.json")):
        region = manifest.parent
        name = f"{region.parent.name}/{region.name}"
        if name not in kept:
            shutil.rmtree(region)
            removed.append(name)
            log.info("removed %s: no longer a region of the cohort", region)
            if not any(region.parent.iterdir()):
                region.parent.rmdir()
    return removed


def check_slides(cohort, *, total_stride: int, fit: str = "pad", max_region: tuple[int, int] | None = None) -> None:
    """Open every slide of the cohort and place its rectangles before anything is written.

    A missing or unreadable slide, or a rectangle outside its slide, fails in one line naming
    the slide, instead of after the slides before it were prepared. Synthetic slides not made
    yet are generated later and are not checked here.
    """
    from gigaseg.data import fit_region
    from gigaseg.data.cohort import SingleSlide
    from gigaseg.errors import GigasegError
    from gigaseg.slides import open_slide

    for slide in cohort.slides:
        where = "data.regions." if isinstance(slide, SingleSlide) else "region "
        if slide.synthetic is not None and not Path(slide.path).exists():
            continue
        try:
            with open_slide(slide.path) as reader:
                for region in slide.regions:
                    if region.kind != "rect" or (max_region is not None and slide.synthetic is not None):
                        continue  # found on the slide, or on a synthetic slide shrunk by max_region
                    region = capped(region, max_region)
                    try:
                        fit_region(reader, region.spec(), total_stride=total_stride, fit=fit)
                    except GigasegError as exc:
                        raise type(exc)(f"{where}{region.name}: {exc}") from exc
        except GigasegError as exc:
            if len(cohort.slides) == 1:
                raise
            raise type(exc)(f"slide {slide.name}: {exc}") from exc


def slide_spec(slide, folder: Path, *, fit: str = "pad", pad_value: tuple[int, int, int] = DEFAULT_PAD_VALUE,
               max_region: tuple[int, int] | None = None, decoded_cache: bool = False) -> DatasetSpec:
    """The DatasetSpec of one cohort slide, prepared into ``folder``."""
    labels = slide.labels
    return DatasetSpec(
        out_dir=folder, slide_path=slide.path, regions=list(slide.regions), mask_source=labels.source,
        mask_path=labels.path, classes=None if labels.classes is None else list(labels.classes),
        labels=labels.label_classes(), ignore_value=labels.ignore_value,
        synthetic=slide.synthetic, fit=fit, pad_value=pad_value, max_region=max_region,
        decoded_cache=decoded_cache,
    )


def ensure_synthetic_slides(cohort, *, max_region: tuple[int, int] | None = None, progress: bool = True) -> list[dict]:
    """Generate every synthetic slide of a cohort (shrunk as ``max_region`` asks), nothing else; their recipes."""
    made = []
    for slide in cohort.slides:
        if slide.synthetic is None:
            continue
        spec = slide_spec(slide, slide.path.parent, max_region=max_region)
        recipe = spec.synthetic
        if max_region is not None and all(r.kind == "rect" for r in spec.regions):
            recipe, _ = shrunk_synthetic(recipe, list(spec.regions), max_region)
        elif max_region is not None:
            recipe = shrunk_slide(recipe, max_region)
        made.append(ensure_synthetic_slide(spec, recipe, progress=progress))
    return made
