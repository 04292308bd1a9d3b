"""``gigaseg-prepare``: generate or open the slide and cut the dataset's regions into ``data/``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from gigaseg.cli.common import CONFIG_PATH, run_hydra, start, to_plain, user_errors
from gigaseg.cli.schema import TrainAppSchema
from gigaseg.errors import ConfigError

log = logging.getLogger("gigaseg.prepare")


def _region(name: str | None, fields: dict[str, Any], index: int = 0):
    from gigaseg.dataset import RegionRequest

    fields = {k: v for k, v in fields.items() if k != "name"}
    return RegionRequest(name=name or f"{fields.get('kind', 'rect')}{index or ''}", **fields)


def _labels(mask: dict[str, Any], slide_path: Path | None = None):
    from gigaseg.data.cohort import Labels, slide_mask_path

    path = mask.get("path")
    path = slide_mask_path(path, slide_path) if slide_path is not None else (None if path is None else Path(path))
    classes = mask.get("classes")
    return Labels(source=mask.get("source", "synthetic"), path=path, classes=None if classes is None else tuple(classes),
                  background=tuple(mask.get("background_classes") or ()), ignore=tuple(mask.get("ignore_classes") or ()),
                  unannotated=mask.get("unannotated", "background"), ignore_value=mask.get("ignore_value"))


def cohort_from_config(data: dict[str, Any]):
    """A :class:`gigaseg.data.cohort.Cohort` from the ``data`` config node (its forms are in DataSchema)."""
    from gigaseg.data.cohort import Cohort, CohortSlide, SingleSlide, find_slides, read_table, slide_name
    from gigaseg.dataset import SyntheticRecipe

    def recipe(node):
        return SyntheticRecipe(**node) if node else None

    default_regions = tuple(_region(r.get("name"), r, i) for i, r in enumerate(data.get("slide_regions") or []))
    labels = data.get("mask") or {}
    forms = [name for name in ("slides", "glob", "table") if data.get(name)]
    single = (data.get("slide") or {}).get("path") not in (None, "", "???")
    if single:
        forms.append("slide.path")
    if len(forms) != 1:
        raise ConfigError(f"give the cohort in one form: data.slides, data.glob, data.table or data.slide.path "
                          f"(got {', '.join('data.' + f for f in forms) or 'none'})")
    slides = []
    if single:
        slide = data["slide"]
        regions = tuple(_region(name, region) for name, region in (data.get("regions") or {}).items())
        slides.append(SingleSlide(name=slide_name(slide["path"]), path=Path(slide["path"]), split="train",
                                  labels=_labels(labels), regions=regions, synthetic=recipe(slide.get("synthetic"))))
    for entry in data.get("slides") or []:
        path = Path(entry["path"])
        regions = entry.get("regions")
        slides.append(CohortSlide(
            name=entry.get("name") or slide_name(path), path=path, split=entry.get("split", "train"),
            labels=_labels(entry.get("mask") or labels, None if entry.get("mask") else path),
            regions=default_regions if regions is None else tuple(_region(r.get("name"), r, i) for i, r in enumerate(regions)),
            synthetic=recipe(entry.get("synthetic")),
        ))
    if data.get("glob"):
        held_out = {**{n: "val" for n in data.get("val_slides") or []}, **{n: "test" for n in data.get("test_slides") or []}}
        found = find_slides(data["glob"])
        names = {slide_name(p) for p in found}
        unknown = sorted(set(held_out) - names)
        if unknown:
            raise ConfigError(f"data.val_slides/test_slides name {', '.join(unknown)}, which data.glob={data['glob']} "
                              f"does not find (it finds {', '.join(sorted(names))})")
        for path in found:
            slides.append(CohortSlide(name=slide_name(path), path=path, split=held_out.get(slide_name(path), "train"),
                                      labels=_labels(labels, path), regions=default_regions))
    if data.get("table"):
        slides.extend(read_table(data["table"], labels=_labels(labels), regions=default_regions))
    cohort = Cohort(slides)
    cohort.validate()
    return cohort


def total_stride(model: dict[str, Any]) -> int:
    """The product of the model's strides, without importing TensorFlow for it."""
    strides = model["strides"]
    if not isinstance(strides, list) or not strides or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0
                                                            for s in strides):
        raise ConfigError(f"model.strides must be a list of positive integers, got {strides!r}")
    return math.prod(strides)


def tissue_estimates(cohort, tracking_uri: str) -> dict[str, Any]:
    """The tissue estimate of every ``tissue_model`` URI the cohort's ``auto`` regions name, loaded once each."""
    uris = sorted({r.tissue_model for s in cohort.slides for r in s.regions if r.kind == "auto" and r.tissue_model})
    if not uris:
        return {}
    import tempfile

    from gigaseg.cli.common import resolve_model
    from gigaseg.inference import ModelTissueEstimate, load_model

    estimates = {}
    for uri in uris:
        with tempfile.TemporaryDirectory(prefix="gigaseg-model-") as tmp:
            loaded = load_model(resolve_model(uri, tracking_uri, Path(tmp)))
        estimates[uri] = ModelTissueEstimate(loaded, uri)
    return estimates


def run(cfg: DictConfig) -> list[dict]:
    """Prepare the cohort as the composed config says; returns its index entries."""
    from gigaseg.dataset import prepare_cohort

    plain = to_plain(cfg)
    data = plain["data"]
    cohort = cohort_from_config(data)
    return prepare_cohort(
        cohort, Path(data["prepared_dir"]), total_stride=total_stride(plain["model"]), fit=data.get("fit", "pad"),
        pad_value=tuple(data.get("pad_value")), max_region=None if data.get("max_region") is None else tuple(data["max_region"]),
        decoded_cache=bool(data.get("decoded_cache", False)),
        tissue_estimates=tissue_estimates(cohort, plain["mlflow"]["tracking_uri"]), progress=True,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    start(cfg, TrainAppSchema)
    with user_errors():
        entries = run(cfg)
        splits = {split: sum(1 for e in entries if e["split"] == split) for split in ("train", "val", "test")}
        log.info("prepared %d region(s) of %d slide(s): %s", len(entries), len({e["slide"] for e in entries}),
                 ", ".join(f"{n} {split}" for split, n in splits.items() if n))


def main() -> None:
    """Console entry point: Hydra composes the config; a config it cannot compose is one line ``error: ...``."""
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
