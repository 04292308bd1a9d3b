"""Bad inputs a careless user gives the entry points: each ends in a clear error at its root (docs/BAD_INPUTS.md).

Real slides, files, MLflow stores and TensorFlow throughout. Permission cases run in a child
process: as root, the child drops the capabilities that let root ignore file modes, so a
``chmod`` still takes effect there. Full disks are simulated with a file size limit
(``RLIMIT_FSIZE``), which makes writes fail with EFBIG.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import FIXTURES, ROOT, command_env

from gigaseg.errors import ConfigError, MaskError, RegionError, SlideError, WriteError

PROSTATE = FIXTURES / "prostate_he_pyramid.tiff"
OS_FIXTURES = FIXTURES / "openslide"


# ---------------------------------------------------------------- helpers

def _command(name: str, *args: str, env: dict, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / name
    cmd = [str(exe) if exe.exists() else name, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False, **kwargs)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command failed with exit status 2 and exactly one ``error:`` line on stderr, no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_mode_override() -> None:  # runs in the child, before exec
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture(scope="module")
def honour_modes() -> dict:
    """subprocess keyword arguments under which file modes apply (as root: without CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return {}
    try:
        subprocess.run(["true"], preexec_fn=_drop_file_mode_override, check=True)
    except (subprocess.SubprocessError, OSError):
        pytest.skip("running as root without CAP_SETPCAP: chmod cannot take effect, so permissions cannot be tested")
    return {"preexec_fn": _drop_file_mode_override}


def _python(code: str, tmp_path: Path, **kwargs) -> subprocess.CompletedProcess:
    env = command_env(tmp_path / "mlflow.db")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False, **kwargs)


@contextmanager
def read_only(*paths: Path):
    """chmod the paths read-only (folders: r-x, files: ---) and restore them afterwards."""
    saved = [(p, p.stat().st_mode) for p in paths]
    try:
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o000)
        yield
    finally:
        for p, mode in saved:
            p.chmod(mode)


@contextmanager
def file_size_limit(nbytes: int):
    """Make this process's writes past ``nbytes`` fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A small synthetic slide (512x256, JPEG tiles of 128) and a copy whose tile at level-0 (256, 128) is corrupt."""
    from gigaseg.slides.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slides")
    good = folder / "good.tiff"
    write_synthetic_slide(good, height=256, width=512, seed=5, mpp=0.5, tile_size=128, workers=1,
                          mask_path=folder / "truth.tiff", progress=False)
    bad = folder / "corrupt.tiff"
    bad.write_bytes(good.read_bytes())
    with tifffile.TiffFile(good) as tif:
        page = tif.pages[0]
        index = 1 * (512 // 128) + 2  # tile row 1, column 2
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(bad, "r+b") as f:  # the JPEG data of one tile part-way through level 0
        f.seek(offset)
        f.write(b"\0" * count)
    return good, bad


# ---------------------------------------------------------------- slides

def test_unreadable_slide_file_says_permission_not_unsupported(tmp_path, honour_modes):
    slide = tmp_path / "case.svs"
    slide.write_bytes((OS_FIXTURES / "small.svs").read_bytes())
    code = f"""
from gigaseg.slides import open_slide
from gigaseg.errors import SlideError
try:
    open_slide({str(slide)!r})
except SlideError as exc:
    print("SlideError:", exc)
"""
    with read_only(slide):
        done = _python(code, tmp_path, **honour_modes)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SlideError: cannot read slide file" in done.stdout and "Permission denied" in done.stdout
    assert "not a slide" not in done.stdout


def test_unreadable_slide_on_the_command_line_is_one_line(tmp_path, honour_modes):
    slide = tmp_path / "case.svs"
    slide.write_bytes((OS_FIXTURES / "small.svs").read_bytes())
    with read_only(slide):
        done = _command("gigaseg-predict", f"model_uri={tmp_path}/model.keras", f"slide={slide}", "log_mlflow=false",
                        f"hydra.run.dir={tmp_path}/out", env=command_env(tmp_path / "mlflow.db"), cwd=tmp_path,
                        **honour_modes)
    assert_one_error_line(done, "cannot read slide file", "case.svs", "Permission denied")


def test_text_file_named_svs_is_not_a_slide(tmp_path):
    from gigaseg.slides import open_slide

    path = tmp_path / "notes.svs"
    path.write_text("meeting notes, not a slide\n")
    with pytest.raises(SlideError, match="notes.svs is not a slide OpenSlide can read"):
        open_slide(path)


def test_corrupt_tile_part_way_names_slide_and_region_and_spares_other_regions(slides):
    from gigaseg.slides import open_slide

    good, bad = slides
    with open_slide(good) as reference, open_slide(bad) as slide:
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (256, 128)), reference.read_region((0, 0), 0, (256, 128)))
        with pytest.raises(SlideError) as info:
            slide.read_region((192, 64), 0, (256, 128))  # overlaps the corrupt tile at (256, 128)
        message = str(info.value)
        assert "corrupt.tiff" in message and "x=192, y=64" in message and "256x128" in message and "level 0" in message
        # The failed read leaves the reader usable: a later region elsewhere is read, not blamed.
        np.testing.assert_array_equal(slide.read_region((0, 128), 0, (128, 128)),
                                      reference.read_region((0, 128), 0, (128, 128)))


def test_corrupt_tile_while_preparing_leaves_no_region(slides, tmp_path):
    from gigaseg.data import RegionSpec, SyntheticMask, prepare_region
    from gigaseg.slides import open_slide

    good, bad = slides
    out = tmp_path / "data" / "train"
    with open_slide(bad) as slide:
        with pytest.raises(SlideError, match=r"corrupt.tiff: cannot read the region at level-0 \(0, 0\).*tile at level-0"):
            prepare_region(slide, RegionSpec(0, 0, 512, 256), SyntheticMask(good.with_name("truth.tiff")), out,
                           total_stride=64, tile_size=128)
    assert list((tmp_path / "data").iterdir()) == []


def test_corrupt_tile_while_predicting_writes_no_mask(model, slides, tmp_path):
    from gigaseg.inference import PredictOptions, predict_slide

    _, bad = slides
    (tmp_path / "mask.tiff").write_bytes(b"the previous mask")
    with pytest.raises(SlideError, match="corrupt.tiff: cannot read the region"):
        predict_slide(model, bad, tmp_path, PredictOptions(tile_size=512, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tiff"]
    assert (tmp_path / "mask.tiff").read_bytes() == b"the previous mask"


def test_an_os_error_no_code_named_is_still_one_line(capsys):
    from gigaseg.cli.common import user_errors

    with pytest.raises(SystemExit) as info:
        with user_errors():
            raise PermissionError(errno.EACCES, "Permission denied", "/data/run/.hydra")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: /data/run/.hydra: Permission denied\n"


# ---------------------------------------------------------------- regions and their configuration

@pytest.mark.parametrize("key, value, option", [
    ("width", 0, "data.regions.train.width must be a positive integer, got 0"),
    ("height", -64, "data.regions.train.height must be a positive integer, got -64"),
    ("x", -1, "data.regions.train.x must be an integer of at least 0, got -1"),
    ("width", "abc", "data.regions.train.width must be a positive integer, got 'abc'"),
])
def test_bad_region_numbers_name_the_option(tmp_path, key, value, option):
    from gigaseg.dataset import DatasetSpec, RegionRequest

    region = {"name": "train", "x": 0, "y": 0, "width": 128, "height": 64, key: value}
    spec = DatasetSpec(out_dir=tmp_path, slide_path=PROSTATE, regions=[RegionRequest(**region)], mask_source="bootstrap")
    with pytest.raises(ConfigError, match=re.escape(option)):
        spec.validate()


def test_region_names_and_synthetic_sizes_are_checked(tmp_path):
    from gigaseg.dataset import DatasetSpec, RegionRequest, SyntheticRecipe

    escaping = DatasetSpec(out_dir=tmp_path / "data", slide_path=PROSTATE, mask_source="bootstrap",
                           regions=[RegionRequest(name="../../elsewhere", x=0, y=0, width=64, height=64)])
    with pytest.raises(ConfigError, match="plain folder name"):
        escaping.validate()
    synthetic = DatasetSpec(out_dir=tmp_path, slide_path=tmp_path / "s.tiff", mask_path=tmp_path / "m.tiff",
                            synthetic=SyntheticRecipe(height=0, width=1024),
                            regions=[RegionRequest(name="train", x=0, y=0, width=64, height=64)])
    with pytest.raises(ConfigError, match="data.slide.synthetic.height must be a positive integer, got 0"):
        synthetic.validate()
    assert list(tmp_path.iterdir()) == []


def test_region_outside_the_slide_on_the_command_line(tmp_path):
    # The default regions of data=slide are 4096 wide; the prostate fixture is 2500x2500.
    done = _command("gigaseg-prepare", "data=slide", f"data.slide.path={PROSTATE}", f"paths.data_dir={tmp_path}/data",
                    f"hydra.run.dir={tmp_path}/out", env=command_env(tmp_path / "mlflow.db"), cwd=tmp_path)
    assert_one_error_line(done, "data.regions.train:", "prostate_he_pyramid.tiff", "lies outside the level (2500x2500)")
    assert not (tmp_path / "data" / "slide").exists() or list((tmp_path / "data" / "slide").iterdir()) == []


@pytest.mark.parametrize("command, overrides, fragments", [
    ("gigaseg-prepare", ["model=nosuch"], ["Could not find 'model/nosuch'", "gigaunet, gigaunet_wide"]),
    ("gigaseg-train", ["model=nosuch"], ["Could not find 'model/nosuch'", "gigaunet, gigaunet_wide"]),
    ("gigaseg-train", ["distributed=nosuch"], ["Could not find 'distributed/nosuch'", "mirrored, multiworker, none"]),
    ("gigaseg-prepare", ["data=paper_region", "data.regions.train.width=0"], ["data.regions.train.width must be a positive integer"]),
    ("gigaseg-prepare", ["data.slide_regions.0.count=0"], ["slide s0: regions.auto.count must be a positive integer"]),
    ("gigaseg-evaluate", ["nosuch=1"], ["nosuch is not an option", "reference_type"]),
    ("gigaseg-predict", ["model_uri=m.keras", "slide=s.svs", "tile_size=[1"], ["no viable alternative"]),
])
def test_config_errors_are_one_line_naming_the_option(tmp_path, command, overrides, fragments):
    done = _command(command, *overrides, f"paths.data_dir={tmp_path}/data", f"hydra.run.dir={tmp_path}/out",
                    env=command_env(tmp_path / "mlflow.db"), cwd=tmp_path)
    assert_one_error_line(done, *fragments)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("script, args, fragments", [
    ("synth_and_read.py", ["--height", "0", "--width", "10"], ["synthetic slide size 10x0", "at least 1x1"]),
    ("loss_curve.py", ["--region", "/nonexistent/region"], ["no prepared region at /nonexistent/region"]),
])
def test_benchmark_scripts_end_bad_input_in_one_line(tmp_path, script, args, fragments):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False, env={**command_env(tmp_path / "mlflow.db"), "TMPDIR": str(tmp_path)})
    assert_one_error_line(done, *fragments)


def test_model_strides_are_checked_before_preparing(compose, tmp_path):
    from gigaseg.cli.prepare import run

    cfg = compose(["model.strides=[4,0,4]", f"paths.data_dir={tmp_path}/data"])
    with pytest.raises(ConfigError, match=r"model.strides must be a list of positive integers, got \[4, 0, 4\]"):
        run(cfg)
    assert not (tmp_path / "data").exists()


def test_a_tile_smaller_than_the_halo_is_refused_naming_one_that_works(model):
    from gigaseg.inference import PredictOptions
    from gigaseg.model import build_unet
    from gigaseg.streaming import model_geometry, plan_tile_size

    wide = build_unet(kernels=(15, 15, 15))  # halo 128 at total stride 64
    assert model_geometry(wide).halo == 128
    with pytest.raises(ConfigError, match="tile_size 64x64 is smaller than the model's halo 128.*tile_size=128"):
        plan_tile_size(wide, (512, 512), budget_bytes=8 * 2**30, tile_size=64)
    assert plan_tile_size(wide, (64, 64), budget_bytes=8 * 2**30, tile_size=64).tiles == 1  # the tile is the region
    assert plan_tile_size(model, (512, 512), budget_bytes=8 * 2**30, tile_size=64).halo == 64
    with pytest.raises(ConfigError, match="tile_size 512 is smaller than the model's halo 640.*tile_size=1024"):
        PredictOptions(tile_size=512).validate(64, halo=640)


@pytest.mark.parametrize("options, option", [
    (dict(tile_size=0), "tile_size 0"), (dict(tile_size=-512), "tile_size -512"), (dict(readers=0), "readers"), (dict(workers=0), "workers"),
    (dict(thumbnail_size=0), "thumbnail_size"), (dict(compression_level=12), "compression_level"),
    (dict(min_area_um2=-1.0), "min_area_um2"), (dict(threshold=1.5), "threshold"),
])
def test_bad_predict_options_name_the_option(options, option):
    from gigaseg.inference import PredictOptions

    with pytest.raises(ConfigError, match=re.escape(option)):
        PredictOptions(**options).validate(64)


# ---------------------------------------------------------------- GeoJSON annotations

def _geojson(tmp_path: Path, *rings: list, name: str = "a.geojson") -> Path:
    features = [{"type": "Feature", "properties": {"classification": {"name": "Tissue"}},
                 "geometry": {"type": "Polygon", "coordinates": [ring]}} for ring in rings]
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_self_intersecting_polygon_is_repaired_by_the_even_odd_rule():
    from gigaseg.data.geojson import parse_annotations, rasterise

    # A bow tie: its ring crosses itself at (8, 8). Even-odd keeps the two triangles (what shapely.make_valid
    # makes of it), not the top and bottom ones between them.
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [16, 16], [16, 0], [0, 16], [0, 0]]]}
    mask = rasterise(parse_annotations(bowtie), (0, 0), 1.0, (16, 16))
    yy, xx = np.mgrid[0:16, 0:16] + 0.5
    left = (xx < yy) & (xx < 16 - yy)  # triangle (0,0)-(8,8)-(0,16)
    right = (xx > yy) & (xx > 16 - yy)  # triangle (16,0)-(8,8)-(16,16)
    off_edges = (xx != yy) & (xx + yy != 16)  # pixel centres on a diagonal follow the top-left rule
    np.testing.assert_array_equal(mask[off_edges], (left | right)[off_edges].astype(np.uint8))
    assert mask[4, 8] == 0 and mask[11, 8] == 0 and mask[8, 2] == 1 and mask[8, 13] == 1
    # A ring that goes round a square, then round its top-left quarter again: that quarter is not tissue.
    twice = {"type": "Polygon", "coordinates": [[[0, 0], [8, 0], [8, 8], [0, 8], [0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]]}
    assert rasterise(parse_annotations(twice), (0, 0), 1.0, (8, 8)).sum() == 64 - 16


def test_annotations_far_outside_the_slide_are_refused_slight_overhangs_are_clipped(tmp_path):
    from gigaseg.data import GeoJSONMask, RegionSpec, fit_region
    from gigaseg.slides import ArrayReader

    reader = ArrayReader(np.zeros((200, 400, 3), np.uint8), name="case.svs")
    region = fit_region(reader, RegionSpec(0, 0, 400, 200), total_stride=1)
    # Level-1 coordinates of a slide twice as large: the polygon reaches x 780 on a 400-wide slide.
    doubled = GeoJSONMask(_geojson(tmp_path, [[300, 20], [780, 20], [780, 300], [300, 300]]))
    with pytest.raises(MaskError, match=r"spans x 300\.\.780, y 20\.\.300, far outside case.svs \(400x200 level-0 px\)"
                                        r".*another space"):
        doubled.attach(reader, region, tmp_path)
    edge = GeoJSONMask(_geojson(tmp_path, [[350, 150], [405, 150], [405, 205], [350, 205]], name="edge.geojson"))
    edge.attach(reader, region, tmp_path)  # 5 px beyond the edge: drawn up to it, clipped
    assert edge.read((0, 0), 0, (400, 200)).sum() == 50 * 50


def test_geojson_reference_outside_the_predicted_slide_is_refused(tmp_path):
    from gigaseg.evaluation_inputs import evaluate_files

    prediction = tmp_path / "prediction.png"
    from PIL import Image

    Image.fromarray(np.zeros((100, 120), np.uint8)).save(prediction)
    reference = _geojson(tmp_path, [[5000, 5000], [6000, 5000], [6000, 6000]])
    with pytest.raises(MaskError, match="entirely outside the predicted slide"):
        evaluate_files(prediction, reference)


def test_not_json_geojson_on_the_command_line_is_one_line(tmp_path):
    from PIL import Image

    prediction = tmp_path / "prediction.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(prediction)
    reference = tmp_path / "annotations.geojson"
    reference.write_text('{"type": "FeatureCollection", "features": [')
    done = _command("gigaseg-evaluate", f"prediction={prediction}", f"reference={reference}", "log_mlflow=false",
                    f"hydra.run.dir={tmp_path}/out", env=command_env(tmp_path / "mlflow.db"), cwd=tmp_path)
    assert_one_error_line(done, "annotations.geojson is not valid JSON")
    assert not (tmp_path / "out" / "evaluation.json").exists()


# ---------------------------------------------------------------- no tissue, only tissue

@pytest.mark.parametrize("fill", [0, 1])
def test_a_region_of_one_class_has_a_defined_dice_and_finite_losses(fill):
    import tensorflow as tf

    from gigaseg.evaluation import count, evaluate_masks
    from gigaseg.losses import LOSSES, region_loss

    truth = np.full((128, 128), fill, np.uint8)
    same = evaluate_masks(truth.astype(float), truth)
    assert same.scores() == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    opposite = count(1.0 - truth, truth).scores()
    assert opposite == {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}
    y = tf.constant(truth, tf.float32)
    for loss in LOSSES:
        for p in (0.0, 1.0, 0.5):
            assert np.isfinite(float(region_loss(loss, tf.fill(y.shape, p), y))), (loss, p)


@pytest.mark.slow
def test_tiled_training_steps_on_one_class_regions_have_finite_losses_and_gradients(model):
    from gigaseg.losses import LOSSES
    from gigaseg.streaming import TiledEngine

    for loss in LOSSES:
        engine = TiledEngine(model, loss=loss, tile_size=64)
        for fill, colour in ((0, 230), (1, 150)):  # only glass, only tissue
            result = engine.step(np.full((128, 128, 3), colour, np.uint8), np.full((128, 128), fill, np.uint8))
            assert np.isfinite(result.loss) and all(np.isfinite(g).all() for g in result.gradients), (loss, fill)


# ---------------------------------------------------------------- read-only folders and full disks

def _assert_write_error_in_read_only(folder: Path, target: Path, setup: str, call: str, tmp_path: Path, honour_modes):
    """Run ``setup`` then ``call`` (which writes ``target`` into ``folder``) in a child with ``folder`` read-only:
    it must raise WriteError naming ``target`` and leave ``folder`` empty."""
    code = f"""{setup}
from gigaseg.errors import WriteError
try:
    {call}
except WriteError as exc:
    print("WriteError:", exc)
"""
    with read_only(folder):
        done = _python(code, tmp_path, **honour_modes)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"WriteError: cannot write {target}: Permission denied" in done.stdout
    assert list(folder.iterdir()) == []


def test_mask_tiff_into_a_read_only_folder_names_it_and_writes_nothing(tmp_path, honour_modes):
    out = tmp_path / "results"
    out.mkdir()
    setup = "import numpy as np\nfrom gigaseg.inference import write_mask_tiff"
    call = (f"write_mask_tiff({str(out / 'mask.tiff')!r}, [(0, 0, np.zeros((300, 520), np.uint8))], "
            "width=520, height=300, tile_size=256)")
    _assert_write_error_in_read_only(out, out / "mask.tiff", setup, call, tmp_path, honour_modes)


def test_synth_into_a_read_only_folder_is_one_line(tmp_path, honour_modes):
    out = tmp_path / "slides"
    out.mkdir()
    with read_only(out):
        done = _command("gigaseg-synth", str(out / "slide.tiff"), "--height", "64", "--width", "64", "--quiet",
                        env=command_env(tmp_path / "mlflow.db"), cwd=tmp_path, **honour_modes)
    assert_one_error_line(done, f"cannot write {out / 'slide.tiff'}: Permission denied")
    assert list(out.iterdir()) == []


def test_predict_on_a_full_disk_keeps_the_old_mask_and_leaves_no_partial_file(model, slides, tmp_path):
    from gigaseg.inference import PredictOptions, predict_slide

    good, _ = slides
    (tmp_path / "mask.tiff").write_bytes(b"the previous mask")
    with file_size_limit(16_000):  # a level-0 mask of 512x256 does not fit
        with pytest.raises(WriteError, match=r"cannot write .*mask.tiff: File too large") as info:
            predict_slide(model, good, tmp_path, PredictOptions(tile_size=512, compression_level=0, progress=False))
    assert isinstance(info.value, OSError) and info.value.errno == errno.EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tiff"]
    assert (tmp_path / "mask.tiff").read_bytes() == b"the previous mask"


def test_checkpoint_on_a_full_disk_keeps_the_last_good_one(model, tmp_path):
    import keras

    from gigaseg.checkpoint import load_checkpoint, save_checkpoint

    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    path = save_checkpoint(tmp_path / "last.npz", model, optimizer, 1, [{"step": 1}])
    with file_size_limit(16_000):  # the checkpoint is about 55 kB
        with pytest.raises(WriteError, match="cannot write .*last.npz: File too large"):
            save_checkpoint(path, model, optimizer, 2, [{"step": 1}, {"step": 2}])
    assert [p.name for p in tmp_path.iterdir()] == ["last.npz"]
    assert load_checkpoint(path).step == 1


def test_preparing_onto_a_full_disk_leaves_no_region(tmp_path):
    from gigaseg.data import BootstrapMask, RegionSpec, prepare_region
    from gigaseg.slides import open_slide

    with open_slide(PROSTATE) as slide, file_size_limit(100_000):
        with pytest.raises(WriteError, match="cannot write .*train: File too large"):
            prepare_region(slide, RegionSpec(0, 0, 512, 512), BootstrapMask(), tmp_path / "train", total_stride=64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_checkpoint_into_a_read_only_folder_names_it(tmp_path, honour_modes):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    setup = """import keras
from gigaseg.checkpoint import save_checkpoint
from gigaseg.model import build_unet
model = build_unet()
optimizer = keras.optimizers.Adam()
optimizer.build(model.trainable_variables)"""
    call = f"save_checkpoint({str(folder / 'last.npz')!r}, model, optimizer, 1, [])"
    _assert_write_error_in_read_only(folder, folder / "last.npz", setup, call, tmp_path, honour_modes)


@pytest.mark.slow
def test_predict_command_on_a_full_disk_is_one_line(model, slides, tmp_path):
    good, _ = slides
    model.save(tmp_path / "model.keras")
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = _command("gigaseg-predict", f"model_uri={tmp_path}/model.keras", f"slide={good}", "log_mlflow=false",
                    "tile_size=512", "compression_level=0", "progress=false", f"output_dir={out}",
                    f"hydra.run.dir={tmp_path}/run", env=command_env(tmp_path / "mlflow.db"), cwd=tmp_path,
                    preexec_fn=limit)
    assert_one_error_line(done, f"cannot write {out}/", "File too large")
    assert all(not p.name.startswith(".") for p in out.iterdir())  # no temporary file left behind
    if (out / "mask.tiff").exists():  # what was written before the disk was full is whole
        assert tifffile.imread(out / "mask.tiff").shape == (256, 512)


@pytest.mark.slow
def test_predict_command_on_a_corrupt_slide_is_one_line(model, slides, tmp_path):
    _, bad = slides
    model.save(tmp_path / "model.keras")
    done = _command("gigaseg-predict", f"model_uri={tmp_path}/model.keras", f"slide={bad}", "log_mlflow=false",
                    "tile_size=512", "progress=false", f"hydra.run.dir={tmp_path}/out",
                    env=command_env(tmp_path / "mlflow.db"), cwd=tmp_path)
    assert_one_error_line(done, "corrupt.tiff: cannot read the region at level-0")
    assert not (tmp_path / "out" / "mask.tiff").exists()


# ---------------------------------------------------------------- MLflow stores that cannot be used

def test_unreachable_store_stops_predict_before_it_starts(tmp_path):
    env = {**command_env(tmp_path / "mlflow.db"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    done = _command("gigaseg-predict", f"model_uri={tmp_path}/model.keras", f"slide={PROSTATE}",
                    f"hydra.run.dir={tmp_path}/out", env=env, cwd=tmp_path)
    assert_one_error_line(done, "MLflow store http://127.0.0.1:9 cannot be reached")
    # Checked before the model: the missing model file was never looked at.
    assert "no such model" not in done.stderr and not (tmp_path / "out" / "mask.tiff").exists()


def test_store_in_a_missing_folder_stops_evaluate_before_it_scores(tmp_path):
    from PIL import Image

    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
    env = {**command_env(tmp_path / "mlflow.db"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/nowhere/mlflow.db"}
    done = _command("gigaseg-evaluate", f"prediction={mask}", f"reference={mask}", f"hydra.run.dir={tmp_path}/out",
                    env=env, cwd=tmp_path)
    assert_one_error_line(done, f"folder {tmp_path}/nowhere does not exist")
    assert not (tmp_path / "out" / "evaluation.json").exists()


def test_store_in_a_read_only_folder_is_refused(tmp_path, honour_modes):
    folder = tmp_path / "store"
    folder.mkdir()
    code = f"""
from gigaseg.tracking import TrackingError, check_tracking_store
try:
    check_tracking_store("sqlite:///{folder}/mlflow.db")
except TrackingError as exc:
    print("TrackingError:", exc)
"""
    with read_only(folder):
        done = _python(code, tmp_path, **honour_modes)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TrackingError: MLflow store" in done.stdout and "is not writable" in done.stdout
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_unreachable_store_stops_train_before_the_first_step(tmp_path):
    from gigaseg.data import RegionSpec, prepare_region
    from gigaseg.data.bootstrap import BootstrapMask
    from gigaseg.slides import open_slide

    data = tmp_path / "data"
    with open_slide(PROSTATE) as slide:
        prepare_region(slide, RegionSpec(0, 0, 256, 128, level=2), BootstrapMask(), data / "train", total_stride=64)
    env = {**command_env(tmp_path / "mlflow.db"), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    done = _command("gigaseg-train", f"data.dir={data}", "train.steps=1", f"hydra.run.dir={tmp_path}/out",
                    env=env, cwd=tmp_path)
    assert_one_error_line(done, "MLflow store http://127.0.0.1:9 cannot be reached")
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------- NaN or Inf in the loss

def test_diverging_loss_stops_training_naming_the_step_and_keeping_the_last_good_checkpoint(tmp_path):
    from gigaseg.checkpoint import load_checkpoint
    from gigaseg.training import TrainConfig, TrainRegion, TrainingDivergedError, train

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (128, 256, 3), dtype=np.uint8)
    mask = (image[..., 0] > 128).astype(np.uint8)
    # An absurd learning rate: the first update sends the weights so far that step 2's loss is NaN.
    config = TrainConfig(steps=5, lr=1e30, optimizer="sgd", checkpoint_every=1, progress=False)
    with pytest.raises(TrainingDivergedError) as info:
        train({}, [TrainRegion("train", image, mask)], [], config, checkpoint_dir=tmp_path)
    message = str(info.value)
    assert "the loss became nan at step 2" in message and str(tmp_path / "last.npz") in message
    assert "train.lr" in message
    checkpoint = load_checkpoint(tmp_path / "last.npz")
    assert checkpoint.step == 1 and all(np.isfinite(w).all() for w in checkpoint.weights)
    assert [p.name for p in tmp_path.iterdir()] == ["last.npz"]


# ---------------------------------------------------------------- safety: no stored code runs, nothing escapes

def test_a_keras_file_with_a_lambda_layer_is_refused_without_running_it(tmp_path):
    import keras
    from keras import layers

    from gigaseg.inference import ModelError, load_model

    marker = tmp_path / "lambda ran"
    # What a malicious lambda could do when the model is rebuilt on loading: here, leave a file.
    leaves_a_marker = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t[..., :1] * 0.0)[1]")
    inputs = keras.Input((None, None, 3))
    keras.Model(inputs, layers.Lambda(leaves_a_marker)(inputs)).save(tmp_path / "lambda.keras")
    marker.unlink()  # building the model ran it once, here
    with pytest.raises(ModelError, match="cannot load the Keras model .*lambda.keras"):
        load_model(tmp_path / "lambda.keras")
    assert not marker.exists()


def test_pickled_arrays_are_never_loaded(tmp_path):
    from gigaseg.checkpoint import CheckpointError, load_checkpoint
    from gigaseg.data import load_region

    np.savez(tmp_path / "last.npz", step=np.array(3), history=np.array([{"step": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="holds pickled Python objects, which gigaseg never loads"):
        load_checkpoint(tmp_path / "last.npz")
    from gigaseg.data.maskfile import TILE, write_mask
    from gigaseg.data.manifest import FORMAT_VERSION

    region = tmp_path / "train"
    region.mkdir()
    (region / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                      "files": {"image": {"name": "image.npy"}}}))
    write_mask(region / "mask.tiff", iter([np.zeros((TILE, TILE), np.uint8)]), (1, 1))
    np.save(region / "image.npy", np.array([[[{"pickled": True}] * 3]], dtype=object), allow_pickle=True)
    with pytest.raises(RegionError, match="image.npy is not a readable .npy array"):
        load_region(region)


def test_slide_names_never_make_output_folders_outside_the_output_dir(tmp_path):
    from gigaseg.data.cohort import slide_name as _stem

    out = tmp_path / "out"
    for slide in ("...svs", "..svs", "../../etc/x.svs", ".hidden.svs", "/data/a b/c;d.ndpi", "....tiff"):
        stem = _stem(slide)
        assert stem not in ("", ".", "..") and not stem.startswith(".") and "/" not in stem, (slide, stem)
        target = (out / stem).resolve()
        assert target.parent == out.resolve(), (slide, stem)


def test_a_summary_cannot_point_evaluate_outside_its_folder(tmp_path):
    from gigaseg.cli.evaluate import prediction_file

    folder = tmp_path / "predicted"
    folder.mkdir()
    (tmp_path / "secret.tiff").write_bytes(b"x")
    (folder / "summary.json").write_text(json.dumps({"files": {"mask": "../secret.tiff"}}))
    with pytest.raises(MaskError, match="not a file in that folder"):
        prediction_file(folder)


def test_mlflow_servers_in_docs_and_code_bind_to_the_local_machine():
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").rglob("*.md")),
             *sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")), ROOT / "MLproject"]
    # A command line that starts the UI or a server with options (shell or argument list).
    starts = re.compile(r"mlflow\s+(ui|server)\s+--|\"mlflow\",\s*\"(ui|server)\"")
    anywhere = "0.0.0" + ".0"  # not spelled out, so this file does not match itself
    found = 0
    for path in texts:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            assert anywhere not in line, f"{path}:{i + 1}: {line}"
            if starts.search(line) and "re.compile" not in line:
                found += 1
                near = " ".join(lines[i : i + 2])  # the host may follow on the next line
                assert "--host 127.0.0.1" in near or '"--host", "127.0.0.1"' in near, f"{path}:{i + 1}: {line}"
    assert found >= 3  # the README's two commands and tests/test_mlflow_server.py's server at least


# ---------------------------------------------------------------- a writer killed with SIGKILL

def _kill_when(process: subprocess.Popen, ready: str) -> None:
    line = process.stdout.readline()
    assert line.strip() == ready, line + process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def _leftovers(folder: Path, target: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != target)


@pytest.mark.parametrize("old", [b"the old file", None])
def test_writer_killed_mid_way_through_atomic_path_leaves_old_file_or_none(tmp_path, old):
    target = tmp_path / "big.bin"
    if old is not None:
        target.write_bytes(old)
    code = f"""
import os, time
from gigaseg.atomic import atomic_path
with atomic_path({str(target)!r}) as tmp, open(tmp, "wb") as f:
    f.write(b"n" * (16 << 20))
    f.flush()
    os.fsync(f.fileno())
    print("half", flush=True)
    time.sleep(120)
    f.write(b"n" * (16 << 20))
"""
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=command_env(tmp_path / "mlflow.db"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(process, "half")
    if old is None:
        assert not target.exists()
    else:
        assert target.read_bytes() == old
    # The half-written temporary stays (nothing runs after SIGKILL), hidden and never under the final name.
    left = _leftovers(tmp_path, target.name)
    assert len(left) == 1 and left[0].startswith(".big.bin.") and (tmp_path / left[0]).stat().st_size == 16 << 20


def test_mask_tiff_writer_killed_mid_way_leaves_the_old_mask(tmp_path):
    from gigaseg.inference import write_mask_tiff

    target = tmp_path / "mask.tiff"
    old = np.full((100, 200), 255, np.uint8)
    write_mask_tiff(target, [(0, 0, old)], width=200, height=100, kind="binary", tile_size=256)
    before = target.read_bytes()
    code = f"""
import time
import numpy as np
from gigaseg.inference import write_mask_tiff

def blocks():
    rng = np.random.default_rng(0)
    for top in range(0, 2048, 256):
        yield top, 0, rng.integers(0, 256, (256, 2048), dtype=np.uint8)
        if top == 768:  # half the bands are in the temporary file
            print("half", flush=True)
            time.sleep(120)

write_mask_tiff({str(target)!r}, blocks(), width=2048, height=2048, tile_size=256, compression_level=0)
"""
    process = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=command_env(tmp_path / "mlflow.db"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    _kill_when(process, "half")
    assert time.monotonic() - start < 60
    assert target.read_bytes() == before
    np.testing.assert_array_equal(tifffile.imread(target), old)
    left = _leftovers(tmp_path, target.name)
    assert left and all(name.startswith(".mask.tiff.") for name in left)
    partial = [tmp_path / name for name in left if name.endswith(".tiff")]
    assert partial and partial[0].stat().st_size > 1 << 20  # it was killed part-way through, not before writing
