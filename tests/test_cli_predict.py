"""``gigaseg-predict`` end to end: a model logged in a real SQLite MLflow store, the prostate fixture, one-line errors, multiruns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, command_env

from gigaseg.cli.predict import expand_slides, find_slides
from gigaseg.errors import ConfigError

PROSTATE = FIXTURES / "prostate_he_pyramid.tiff"


def _predict(*overrides: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "gigaseg-predict"
    cmd = [str(exe) if exe.exists() else "gigaseg-predict", *overrides]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture
def store(tmp_path):
    """A real SQLite MLflow store in tmp_path holding one logged model (training metadata: level 2, threshold 0.4)."""
    import keras

    from gigaseg.model import build_unet
    from gigaseg.tracking import MlflowRun

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    keras.utils.set_random_seed(0)
    with MlflowRun(uri, "gigaseg", run_name="train", artifact_location=str(tmp_path / "artifacts")) as run:
        run.log_model(build_unet(), metadata={"gigaseg_level": 2, "gigaseg_mpp": None, "gigaseg_total_stride": 64,
                                              "gigaseg_threshold": 0.4})
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    return uri, run.run_id, env


@pytest.mark.slow
def test_predict_the_prostate_fixture_from_a_runs_uri_and_track_it(store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, model_run_id, env = store
    model_uri = f"runs:/{model_run_id}/model"
    out = tmp_path / "out"
    result = _predict(f"model_uri={model_uri}", f"slide={PROSTATE}", "tile_size=512", "min_area_um2=50",
                      f"hydra.run.dir={out}", "progress=false", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    # The model's recorded training resolution (level 2) and threshold (0.4) apply by default.
    assert (summary["level"], summary["width"], summary["height"], summary["threshold"]) == (2, 625, 625, 0.4)
    assert summary["model_run_id"] == model_run_id and summary["model_uri"] == model_uri
    assert summary["mpp"] is None and summary["tissue_area_mm2"] is None
    assert 0.0 <= summary["tissue_fraction"] <= 1.0 and summary["pieces"] >= 0 and summary["seconds"] > 0
    for name in ("mask.tiff", "outlines.geojson", "overlay.png"):
        assert (out / name).stat().st_size > 0

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["gigaseg.model_run_id"] == model_run_id
    assert run.data.tags["gigaseg.model_uri"] == model_uri
    assert run.data.params["tile_size"] == "512"
    assert run.data.metrics["tissue_fraction"] == pytest.approx(summary["tissue_fraction"])
    assert run.data.metrics["pieces"] == summary["pieces"]
    assert run.data.metrics["outline_vertices"] == summary["outline_vertices"] <= summary["outline_vertices_traced"]
    assert run.data.metrics["outline_vertices_traced"] == summary["outline_vertices_traced"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "outlines.geojson", "overlay.png", "config.yaml"} <= artifacts
    assert "mask.tiff" not in artifacts

    # The same model through the registry (models:/) resolves and loads with its training metadata.
    import mlflow

    from gigaseg.cli.predict import resolve_model
    from gigaseg.inference import load_model

    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(model_uri, "tissue")
    (tmp_path / "download").mkdir()
    loaded = load_model(resolve_model(f"models:/tissue/{version.version}", uri, tmp_path / "download"))
    assert (loaded.run_id, loaded.level, loaded.threshold, loaded.total_stride) == (model_run_id, 2, 0.4, 64)


@pytest.mark.slow
def test_a_folder_of_slides_is_one_joblib_multirun_with_a_folder_per_slide(store, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, model_run_id, env = store
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("first.tiff", "second case.tiff"):
        shutil.copy(PROSTATE, slides / name)
    (slides / "notes.txt").write_text("not a slide")
    sweep = tmp_path / "sweep"
    result = _predict(f"model_uri=runs:/{model_run_id}/model", f"slides={slides}", "level=3", "tile_size=512",
                      "log_mlflow=true", "progress=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      f"hydra.sweep.dir={sweep}", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert folders == ["0-first", "1-second_case"]
    summaries = [json.loads((sweep / f / "summary.json").read_text()) for f in folders]
    assert [Path(s["slide"]).name for s in summaries] == ["first.tiff", "second case.tiff"]
    assert summaries[0]["tissue_pixels"] == summaries[1]["tissue_pixels"]  # the same pixels, the same prediction
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("gigaseg").experiment_id],
                              filter_string="tags.`gigaseg.command` = 'predict'")
    assert sorted(r.info.run_id for r in runs) == sorted(s["mlflow_run_id"] for s in summaries)


def test_bad_input_prints_one_line_and_exits_non_zero(model, tmp_path):
    # An empty store: the slide is checked before the model is fetched, and the run id below does not exist.
    env = command_env(tmp_path / "mlflow.db")
    model.save(tmp_path / "m.keras")
    model_run_id = "0123456789abcdef0123456789abcdef"
    common = [f"hydra.run.dir={tmp_path}/out", "log_mlflow=false"]
    not_a_slide = tmp_path / "notes.tiff"
    not_a_slide.write_text("not a slide")
    cases = [
        ([f"model_uri=runs:/{model_run_id}/model", f"slide={tmp_path}/missing.svs"], "no such slide file"),
        ([f"model_uri=runs:/{model_run_id}/model", f"slide={not_a_slide}"], "not a slide"),
        ([f"model_uri=runs:/{model_run_id}/model", f"slide={PROSTATE}"], "model_uri=runs:/0123"),
        ([f"model_uri={tmp_path}/nothing.keras", f"slide={PROSTATE}"], "no such model"),
        ([f"slide={PROSTATE}"], "model_uri=... is required"),
        ([f"model_uri=runs:/{model_run_id}/model", f"slides={tmp_path}/empty*"], "no slides found"),
        ([f"model_uri={tmp_path}/m.keras", f"slide={PROSTATE}", "simplify_um=-1"], "simplify_um must be zero or positive"),
    ]
    for overrides, message in cases:
        result = _predict(*overrides, *common, env=env, cwd=tmp_path)
        assert result.returncode == 2, (overrides, result.stderr[-2000:])
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (overrides, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


def test_slides_expand_into_a_multirun_over_slide(tmp_path):
    for name in ("b.svs", "a.tiff", "with,comma 'q'.ndpi", ".hidden.svs", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in find_slides(str(tmp_path))] == ["a.tiff", "b.svs", "with,comma 'q'.ndpi"]
    assert [p.name for p in find_slides(str(tmp_path / "*.svs"))] == ["b.svs"]
    argv = expand_slides(["model_uri=m", f"slides={tmp_path}/*.svs"])
    assert argv == ["--multirun", "model_uri=m", f"slide={tmp_path}/b.svs"]
    argv = expand_slides(["-m", f"slides={tmp_path}"])
    assert argv[0] == "-m" and argv[1].startswith("slide=") and len(argv) == 2

    # Hydra's own override parser reads the quoted list back into the exact paths.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = OverridesParser.create().parse_overrides([argv[1]])[0]
    values = [getattr(v, "text", v) for v in sweep.sweep_iterator()]  # quoted ones come as QuotedString
    assert values == [str(p) for p in find_slides(str(tmp_path))]
    with pytest.raises(ConfigError, match="no slides found"):
        find_slides(str(tmp_path / "*.mrxs"))


def test_predict_config_composes_with_the_shared_paths_and_mlflow():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import gigaseg.cli.predict  # noqa: F401  (registers the slide-name resolver)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="gigaseg.conf", version_base="1.3"):
            cfg = compose("predict", overrides=["model_uri=m", "slide=/data/a b.svs", "kind=binary"],
                          return_hydra_config=True)
        assert cfg.kind == "binary" and cfg.tile_size % 512 == 0 and cfg.threshold is None
        assert list(cfg.pad_value) == [242, 242, 242]
        assert cfg.mlflow.experiment_name == "gigaseg" and cfg.paths.root == str(ROOT)
        # A multirun job's folder is named after its slide.
        subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
        assert subdir == "${hydra.job.num}-${gigaseg_stem:${slide}}"
        assert OmegaConf.create({"s": "/data/a b.svs", "d": "${gigaseg_stem:${s}}"}).d == "a_b"
    finally:
        GlobalHydra.instance().clear()
