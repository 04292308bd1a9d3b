"""Every config group option composes, and the composed config feeds the entry points."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import ROOT


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "train", "experiment", "debug"])
def test_every_group_option_composes(compose, group):
    options = _options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        cfg = compose([f"{group}={option}"])
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        assert plain["model"]["strides"]
        assert plain["train"]["steps"] > 0
        assert str(plain["paths"]["root"]) == str(ROOT)


def test_defaults_are_the_demo(compose):
    cfg = compose()
    assert cfg.model.name == "gigaunet"
    assert cfg.data.name == "demo"
    assert cfg.train.loss == "dice_bce"
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps) == (0.01, 3, 150)
    assert (cfg.train.accumulate, cfg.train.val_every) == (2, 15)
    assert list(cfg.model.input_range) == [-6.0, 1.0]
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")
    assert cfg.data.dir == str(ROOT / "data" / "demo")


def test_tracking_uri_defaults_to_project_sqlite(compose, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert compose().mlflow.tracking_uri == f"sqlite:///{ROOT}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
    assert compose().mlflow.tracking_uri == "sqlite:////tmp/elsewhere.db"
    # Artifacts follow the store, so a run against another database writes nothing here.
    assert compose().mlflow.artifact_location == "/tmp/mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert compose().mlflow.artifact_location is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose().mlflow.artifact_location == f"{ROOT}/mlartifacts"


def test_paper_experiment_is_a_cohort_of_the_studys_regions(compose):
    cfg = compose(["experiment=paper"])
    slides = cfg.data.slides
    assert [s.split for s in slides] == ["train"] * 3 + ["val"]
    assert all((s.synthetic.height, s.synthetic.width) == (16000, 64000) for s in slides)
    assert len({s.synthetic.seed for s in slides}) == 4
    assert [(r.kind, r.level) for r in cfg.data.slide_regions] == [("whole", 0)]
    assert cfg.model.name == "gigaunet"
    assert (cfg.train.accumulate, cfg.train.steps) == (1, 30)
    region = compose(["data=paper_region"]).data.regions.train
    assert (region.height, region.width, region.level) == (16000, 64000, 0)


def test_smoke_shrinks_regions_and_steps(compose):
    cfg = compose(["debug=smoke"])
    assert list(cfg.data.max_region) == [256, 1024]
    assert cfg.train.steps <= 5
    assert "smoke" in cfg.data.dir


def test_train_config_validation_names_the_option(compose):
    from gigaseg.cli.train import train_config
    from gigaseg.errors import ConfigError

    plain = OmegaConf.to_container(compose(["train.steps=0"]).train, resolve=True)
    with pytest.raises(ConfigError, match="train.steps"):
        train_config(plain)
    plain = OmegaConf.to_container(compose(["train.loss=hinge"]).train, resolve=True)
    with pytest.raises(ConfigError, match="train.loss"):
        train_config(plain)
    plain = OmegaConf.to_container(compose(["+train.bogus=1"]).train, resolve=True)
    with pytest.raises(ConfigError, match="train.bogus"):
        train_config(plain)
