"""Cohorts: their forms in the config, splits per slide, region kinds, preparing every slide, and the index."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from gigaseg.cli.prepare import cohort_from_config
from gigaseg.data.cohort import SingleSlide, read_index
from gigaseg.data.region_kinds import choose_windows, resolve
from gigaseg.dataset import RegionRequest, prepare_cohort
from gigaseg.errors import ConfigError

STRIDE = 64


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three small synthetic slides with their truth masks (different seeds, so different tissue layouts)."""
    from gigaseg.slides.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slides")
    for seed, (h, w) in enumerate([(1024, 2048), (768, 1536), (1024, 1024)]):
        write_synthetic_slide(folder / f"case{seed}.tiff", height=h, width=w, seed=seed, mpp=0.5, tile_size=256,
                              mask_path=folder / f"case{seed}_mask.tiff")
    return folder


def data_config(compose, *overrides):
    plain = OmegaConf.to_container(compose(list(overrides)).data, resolve=True)
    return plain


def test_single_slide_form_splits_its_regions_by_name(compose):
    cohort = cohort_from_config(data_config(compose, "data=paper_region"))
    (slide,) = cohort.slides
    assert isinstance(slide, SingleSlide)
    assert [r.name for r in slide.regions] == ["train", "val"]
    assert [slide.region_split(r) for r in slide.regions] == ["train", "val"]


def test_glob_form_with_held_out_slides_and_per_slide_masks(compose, slides):
    data = data_config(compose, "data=slide", "data.slide.path=null", "data.regions={}", f"data.glob='{slides}/case*[0-9].tiff'",
                       "data.val_slides=[case2]", "data.mask.source=synthetic", "data.mask.path='{dir}/{stem}_mask.tiff'")
    cohort = cohort_from_config(data)
    assert [(s.name, s.split) for s in cohort.slides] == [("case0", "train"), ("case1", "train"), ("case2", "val")]
    assert cohort.slides[1].labels.path == slides / "case1_mask.tiff"
    assert [r.kind for r in cohort.slides[0].regions] == ["auto"]


def test_table_forms_csv_and_yaml(tmp_path, slides):
    from gigaseg.data.cohort import Labels, read_table

    (tmp_path / "cohort.csv").write_text(
        "slide,split,mask_source,mask_path,regions,mpp\n"
        f"{slides}/case0.tiff,train,synthetic,{slides}/case0_mask.tiff,whole,\n"
        f"{slides}/case1.tiff,val,bootstrap,,,1.0\n")
    rows = read_table(tmp_path / "cohort.csv", labels=Labels("synthetic"), regions=(RegionRequest("auto", kind="auto"),))
    assert [(s.name, s.split, s.labels.source) for s in rows] == [("case0", "train", "synthetic"), ("case1", "val", "bootstrap")]
    assert rows[0].regions[0].kind == "whole"
    assert rows[1].regions[0].kind == "auto" and rows[1].regions[0].mpp == 1.0 and rows[1].regions[0].level is None
    (tmp_path / "cohort.yaml").write_text(
        "- {slide: " + str(slides / "case0.tiff") + ", split: train, regions: [{kind: rect, x: 0, y: 0, width: 256, height: 128}]}\n")
    (row,) = read_table(tmp_path / "cohort.yaml", labels=Labels("bootstrap"), regions=())
    assert (row.regions[0].kind, row.regions[0].width, row.labels.source) == ("rect", 256, "bootstrap")


@pytest.mark.parametrize("text, words", [
    ("slide,split,stain\na.svs,train,HE\n", ["row 2", "unknown column(s) stain", "mask_source"]),
    ("slide,split\na.svs,\n", ["row 2", "needs a slide and a split"]),
])
def test_bad_tables_are_refused_naming_the_row(tmp_path, text, words):
    from gigaseg.data.cohort import Labels, read_table

    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_table(tmp_path / "t.csv", labels=Labels("bootstrap"), regions=())
    for word in words:
        assert word in str(refused.value)


def test_a_slide_in_two_splits_and_a_cohort_without_training_are_refused(compose, slides):
    path = str(slides / "case0.tiff")
    twice = data_config(compose, "data=slide", "data.slide.path=null", "data.regions={}", "data.mask.source=bootstrap",
                        f"+data.slides=[{{path: '{path}', split: train, name: a}}, {{path: '{path}', split: val, name: b}}]")
    with pytest.raises(ConfigError, match="is in two splits \\(train and val\\)"):
        cohort_from_config(twice)
    held_out = data_config(compose, "data=slide", "data.slide.path=null", "data.regions={}", "data.mask.source=bootstrap",
                           f"+data.slides=[{{path: '{path}', split: val}}]")
    with pytest.raises(ConfigError, match="no training region"):
        cohort_from_config(held_out)
    both = data_config(compose, f"data.glob={slides}")
    with pytest.raises(ConfigError, match="one form"):
        cohort_from_config(both)


def test_a_slide_in_two_splits_is_one_line_from_the_command(tmp_path, slides):
    import subprocess

    path = str(slides / "case0.tiff")
    done = subprocess.run(
        [sys.executable, "-m", "gigaseg.cli.prepare", "data=slide", "data.slide.path=null", "data.regions={}",
         f"+data.slides=[{{path: '{path}', split: train, name: a}}, {{path: '{path}', split: val, name: b}}]",
         f"paths.data_dir={tmp_path}/data", f"hydra.run.dir={tmp_path}/out"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and path in errors[0] and "two splits" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "data").exists()


def test_choose_windows_greedy_without_overlap():
    tissue = np.zeros((40, 100), dtype=bool)
    tissue[0:10, 0:20] = True       # a full window
    tissue[20:30, 60:80] = True     # another full window
    tissue[30:40, 0:10] = True      # half a window
    chosen = choose_windows(tissue, (10, 20), 5, count=5, min_fraction=0.25)
    assert [(t, l) for t, l, _ in chosen[:2]] in ([(0, 0), (20, 60)], [(20, 60), (0, 0)])
    assert all(f >= 0.25 for *_, f in chosen)
    boxes = [(t, l) for t, l, _ in chosen]
    for i, (t, l) in enumerate(boxes):
        for t2, l2 in boxes[i + 1:]:
            assert abs(t - t2) >= 10 or abs(l - l2) >= 20


def test_auto_regions_lie_on_tissue_aligned_and_apart(slides):
    from gigaseg.slides import open_slide

    truth = None
    with open_slide(slides / "case0_mask.tiff") as mask_reader:
        truth = mask_reader.read_region((0, 0), 0, mask_reader.dimensions)[..., 0] > 0
    with open_slide(slides / "case0.tiff") as reader:
        regions = resolve(reader, (RegionRequest("auto", kind="auto", width=512, height=256, count=3, min_tissue=0.25),),
                          STRIDE)
        whole = resolve(reader, (RegionRequest("all", kind="whole", level=1),), STRIDE)
        level1 = reader.level_dimensions[1]
    assert (whole[0].width, whole[0].height, whole[0].level, whole[0].kind) == (*level1, 1, "rect")
    assert 1 <= len(regions) <= 3 and [r.name for r in regions] == [f"auto{i}" for i in range(len(regions))]
    for i, r in enumerate(regions):
        assert r.kind == "rect" and (r.width, r.height) == (512, 256)
        assert r.x % STRIDE == 0 and r.y % STRIDE == 0
        assert r.x + r.width <= 2048 and r.y + r.height <= 1024
        assert truth[r.y:r.y + r.height, r.x:r.x + r.width].mean() >= 0.2
        for other in regions[i + 1:]:
            assert r.x + r.width <= other.x or other.x + other.width <= r.x or \
                r.y + r.height <= other.y or other.y + other.height <= r.y


def test_annotation_regions_are_the_boxes_of_a_class(tmp_path, slides):
    from gigaseg.slides import open_slide

    features = [
        {"type": "Feature", "properties": {"classification": {"name": cls}},
         "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}
        for cls, (x0, y0, x1, y1) in [("Region", (100, 50, 612.5, 300)), ("Tissue", (0, 0, 50, 50)),
                                      ("Region", (1000, 500, 1200, 700))]]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with open_slide(slides / "case0.tiff") as reader:
        regions = resolve(reader, (RegionRequest("roi", kind="annotations", annotation_class="Region", level=1),),
                          STRIDE, geojson=path)
        ds = reader.level_downsamples[1]
    # Boxes of the two Region annotations (not the Tissue one), in level-1 pixels, rounded outwards.
    assert [(r.name, r.x, r.y, r.width, r.height, r.level) for r in regions] == [
        ("roi0", 100, 50, math.ceil(512.5 / ds), math.ceil(250 / ds), 1),
        ("roi1", 1000, 500, math.ceil(200 / ds), math.ceil(200 / ds), 1)]


def test_prepare_cohort_writes_each_slide_and_the_index(tmp_path, slides, compose):
    data = data_config(compose, "data=slide", "data.slide.path=null", "data.regions={}", f"data.glob='{slides}/case*[0-9].tiff'",
                       "data.val_slides=[case2]", "data.mask.source=synthetic", "data.mask.path='{dir}/{stem}_mask.tiff'",
                       "data.slide_regions=[{name: r, kind: rect, x: 64, y: 64, width: 320, height: 192}]")
    cohort = cohort_from_config(data)
    entries = prepare_cohort(cohort, tmp_path / "out", total_stride=STRIDE, progress=False)
    assert read_index(tmp_path / "out") == entries
    assert [(e["slide"], e["region"], e["split"], e["dir"]) for e in entries] == [
        ("case0", "r", "train", "case0/r"), ("case1", "r", "train", "case1/r"), ("case2", "r", "val", "case2/r")]
    from gigaseg.data import load_region

    region = load_region(tmp_path / "out" / "case1" / "r")
    assert region.image.shape == (192, 320, 3)
    with_mtime = (tmp_path / "out" / "case1" / "r" / "mask.tiff").stat().st_mtime_ns
    prepare_cohort(cohort, tmp_path / "out", total_stride=STRIDE, progress=False)  # up to date: nothing rewritten
    assert (tmp_path / "out" / "case1" / "r" / "mask.tiff").stat().st_mtime_ns == with_mtime


def test_the_demo_is_a_generated_cohort_of_six_slides(compose):
    cohort = cohort_from_config(data_config(compose))
    slides = cohort.slides
    assert [s.split for s in slides] == ["train"] * 4 + ["val"] * 2
    assert len({s.synthetic.seed for s in slides}) == 6 and len({(s.synthetic.height, s.synthetic.width) for s in slides}) > 3
    assert 350e6 <= sum(s.synthetic.height * s.synthetic.width for s in slides) <= 450e6
    assert all(s.labels.source == "synthetic" and s.labels.path.name == f"{s.name}_mask.tiff" for s in slides)


def test_a_missing_slide_or_a_region_outside_its_slide_fails_before_anything_is_written(tmp_path):
    from gigaseg.data.cohort import Cohort, CohortSlide, Labels
    from gigaseg.dataset import RegionRequest, prepare_cohort
    from gigaseg.errors import RegionError, SlideError
    from gigaseg.slides.synthetic import write_synthetic_slide

    write_synthetic_slide(tmp_path / "a.tiff", height=256, width=320, seed=1, mask_path=tmp_path / "a_mask.tiff")
    labels = Labels(source="synthetic", path=tmp_path / "a_mask.tiff")
    whole = (RegionRequest(name="r", kind="whole"),)
    good = CohortSlide(name="a", path=tmp_path / "a.tiff", split="train", labels=labels, regions=whole)
    missing = CohortSlide(name="b", path=tmp_path / "b.tiff", split="val", labels=labels, regions=whole)
    with pytest.raises(SlideError, match=r"^slide b: no such slide file: .*b.tiff$"):
        prepare_cohort(Cohort([good, missing]), tmp_path / "out", total_stride=64, progress=False)
    outside = CohortSlide(name="c", path=tmp_path / "a.tiff", split="train", labels=labels,
                          regions=(RegionRequest(name="far", x=200, y=0, width=256, height=128),))
    with pytest.raises(RegionError, match=r"^slide c: region far: a.tiff: region at level-0 \(x=200, y=0\) .* lies outside"):
        prepare_cohort(Cohort([good, outside]), tmp_path / "out", total_stride=64, progress=False)
    assert not (tmp_path / "out").exists()


def test_regions_no_longer_asked_for_are_removed(tmp_path):
    from gigaseg.data.cohort import Cohort, CohortSlide, Labels
    from gigaseg.dataset import RegionRequest, prepare_cohort
    from gigaseg.slides.synthetic import write_synthetic_slide

    write_synthetic_slide(tmp_path / "a.tiff", height=256, width=512, seed=1, mask_path=tmp_path / "a_mask.tiff")
    labels = Labels(source="synthetic", path=tmp_path / "a_mask.tiff")
    two = (RegionRequest(name="left", x=0, y=0, width=256, height=128),
           RegionRequest(name="right", x=256, y=0, width=256, height=128))

    def cohort(regions, *extra):
        return Cohort([CohortSlide(name="a", path=tmp_path / "a.tiff", split="train", labels=labels, regions=regions),
                       *extra])

    (tmp_path / "b.tiff").write_bytes((tmp_path / "a.tiff").read_bytes())
    val = CohortSlide(name="v", path=tmp_path / "b.tiff", split="val", labels=labels,
                      regions=(RegionRequest(name="whole", kind="whole"),))
    prepare_cohort(cohort(two, val), tmp_path / "out", total_stride=64, progress=False)
    (tmp_path / "out" / "notes").mkdir()
    (tmp_path / "out" / "notes" / "x").mkdir()  # not a prepared region: left alone
    assert {p.parent.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").glob("*/*/manifest.json")} == {
        "a/left", "a/right", "v/whole"}
    prepare_cohort(cohort(two[:1]), tmp_path / "out", total_stride=64, progress=False)
    assert {p.parent.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").glob("*/*/manifest.json")} == {
        "a/left"}
    assert not (tmp_path / "out" / "v").exists() and (tmp_path / "out" / "notes" / "x").is_dir()


def test_auto_regions_on_a_trained_models_tissue(tmp_path, slides, model):
    """``tissue_model``: windows chosen on the model's thresholded prediction, sampled as the Otsu view is."""
    from gigaseg.data.region_kinds import VIEW_SIZE
    from gigaseg.inference import LoadedModel, ModelTissueEstimate
    from gigaseg.slides import open_slide

    with open_slide(slides / "case0.tiff") as reader:
        image = reader.read_region((0, 0), 0, reader.dimensions)
        reference = model(image[np.newaxis])[0, ..., 0].numpy()  # 1024 x 2048: whole strides, no padding
        # The threshold at the median makes half the slide "tissue", in the model's own layout.
        threshold = float(np.median(reference))
        loaded = LoadedModel(model=model, path=tmp_path, total_stride=STRIDE, threshold=threshold)
        estimate = ModelTissueEstimate(loaded, "seed-0 model", max_side=512, tile_size=256)
        view, downsample = estimate(reader)
        assert downsample == 4.0 and view.shape == (256, 512)
        np.testing.assert_array_equal(view, reference[::4, ::4] >= np.float32(threshold))

        request = RegionRequest("m", kind="auto", width=512, height=256, count=3, min_tissue=0.25, tissue_model="m.keras")
        with pytest.raises(ConfigError, match="tissue_model=m.keras, which was not loaded"):
            resolve(reader, (request,), STRIDE)
        regions = resolve(reader, (request,), STRIDE, estimates={"m.keras": estimate})
    expected = choose_windows(view, (64, 128), STRIDE // 4, 3, 0.25)
    assert [(r.y, r.x) for r in regions] == [(top * 4, left * 4) for top, left, _ in expected]
    assert regions and all(reference[r.y:r.y + 256, r.x:r.x + 512].__ge__(threshold).mean() >= 0.2 for r in regions)
    assert VIEW_SIZE == ModelTissueEstimate(loaded, "default").max_side


def test_prepare_chooses_auto_regions_on_a_model_file_and_keeps_its_estimate(tmp_path, slides, model):
    import subprocess

    model.save(tmp_path / "m.keras")
    path = str(slides / "case0.tiff")
    command = [sys.executable, "-m", "gigaseg.cli.prepare", "data=slide", "data.slide.path=null", "data.regions={}",
               f"+data.slides=[{{path: '{path}', split: train, name: a}}]", "data.mask.source=synthetic",
               f"data.mask.path='{slides}/case0_mask.tiff'",
               f"data.slide_regions=[{{name: m, kind: auto, width: 512, height: 256, count: 2, min_tissue: 0.0, "
               f"tissue_model: '{tmp_path}/m.keras'}}]",
               f"paths.data_dir={tmp_path}/data", f"hydra.run.dir={tmp_path}/out", "mlflow.tracking_uri=sqlite:///x.db"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    prepared = tmp_path / "data" / "slide" / "prepared" / "a"
    saved = list(prepared.glob("tissue-*.npz"))
    assert len(saved) == 1 and "estimating tissue with" in first.stdout + first.stderr
    manifest = json.loads((prepared / "m0" / "manifest.json").read_text())
    assert manifest["chosen_on"] == {"tissue_model": f"{tmp_path}/m.keras"}
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    log = second.stdout + second.stderr
    assert "tissue estimate read from" in log and "estimating tissue with" not in log
    assert "region m0 is up to date" in log
