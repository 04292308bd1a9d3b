"""Every command refuses a value of the wrong type and an unknown key in every config group: one line, status 2.

The commands run in this process (their console entry points, as installed), so the table
stays fast; ``test_bad_inputs`` runs a few of them as real subprocesses.
"""

from __future__ import annotations

import sys

import pytest

from gigaseg.cli import evaluate, predict, prepare, train

COMMANDS = {"gigaseg-prepare": prepare, "gigaseg-train": train, "gigaseg-predict": predict, "gigaseg-evaluate": evaluate}

#: (command, override, words the error must hold): for each group a wrong type, then an unknown key.
CASES = [
    *[(command, override, words) for command in ("gigaseg-prepare", "gigaseg-train") for override, words in [
        ("model.filters=[4,x,4]", ["model.filters[1]=x", "expected an integer"]),
        ("+model.depth=3", ["model.depth is not an option of model", "filters"]),
        ("data.max_region=big", ["data.max_region", "expected a list"]),
        ("+data.cohort=x", ["data.cohort is not an option of data", "regions"]),
        ("data=paper_region data.slide.synthetic.seed=one", ["data.slide.synthetic.seed=one", "expected an integer"]),
        ("+data.slide.vendor=x", ["data.slide.vendor is not an option of data.slide", "synthetic"]),
        ("data.mask.classes=Tissue", ["data.mask.classes", "expected a list"]),
        ("+data.mask.colour=1", ["data.mask.colour is not an option of data.mask", "source"]),
        ("data=paper_region data.regions.train.width=wide", ["data.regions.train.width=wide", "expected an integer"]),
        ("data.slide_regions.0.count=many", ["data.slide_regions[0].count=many", "expected an integer"]),
        ("data=paper_region +data.regions.train.angle=90", ["data.regions.train.angle is not an option of data.regions.train", "mpp"]),
        ("train.steps=abc", ["train.steps=abc", "expected an integer"]),
        ("train.lr=fast", ["train.lr=fast", "expected a number"]),
        ("train.progress=maybe", ["train.progress=maybe", "expected true or false"]),
        ("+train.batch_size=2", ["train.batch_size is not an option of train", "steps"]),
        ("distributed.local_workers=two", ["distributed.local_workers=two", "expected an integer"]),
        ("+distributed.backend=nccl", ["distributed.backend is not an option of distributed", "kind"]),
        ("mlflow.log_system_metrics=sometimes", ["mlflow.log_system_metrics=sometimes", "expected true or false"]),
        ("+mlflow.server=x", ["mlflow.server is not an option of mlflow", "tracking_uri"]),
        ("paths.data_dir=[a]", ["paths.data_dir", "expected a string"]),
        ("+paths.cache=x", ["paths.cache is not an option of paths", "data_dir"]),
        ("verbose=loud", ["verbose=loud", "expected true or false"]),
        ("+colour=blue", ["colour is not an option", "train"]),
    ]],
    ("gigaseg-predict", "tile_size=big", ["tile_size=big", "expected an integer"]),
    ("gigaseg-predict", "threshold=half", ["threshold=half", "expected a number"]),
    ("gigaseg-predict", "pad_value=white", ["pad_value", "expected a list"]),
    ("gigaseg-predict", "+tiles=3", ["tiles is not an option", "tile_size"]),
    ("gigaseg-predict", "mlflow.experiment_name=[a]", ["mlflow.experiment_name", "expected a string"]),
    ("gigaseg-predict", "+mlflow.tags=x", ["mlflow.tags is not an option of mlflow", "run_name"]),
    ("gigaseg-predict", "paths.root=[a]", ["paths.root", "expected a string"]),
    ("gigaseg-evaluate", "max_piece_pixels=many", ["max_piece_pixels=many", "expected an integer"]),
    ("gigaseg-evaluate", "classes=Tissue", ["classes", "expected a list"]),
    ("gigaseg-evaluate", "+weights=x", ["weights is not an option", "reference_type"]),
    ("gigaseg-evaluate", "mlflow.log_system_metrics=2x", ["mlflow.log_system_metrics=2x", "expected true or false"]),
    ("gigaseg-evaluate", "+paths.cache=x", ["paths.cache is not an option of paths", "root"]),
]


@pytest.mark.parametrize("command, override, words", CASES, ids=[f"{c}:{o}" for c, o, _ in CASES])
def test_wrong_type_or_unknown_key_is_one_line(tmp_path, monkeypatch, capsys, command, override, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIGASEG_ROOT", str(tmp_path))
    # Hydra would reconfigure logging in this process, closing the handler TensorFlow's absl
    # logging attached to pytest's captured stderr; the errors are printed, not logged.
    monkeypatch.setattr(sys, "argv", [command, *override.split(), f"hydra.run.dir={tmp_path}/out",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stopped:
        COMMANDS[command].main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    # A key added with + passes Hydra's composition, which then writes its run folder ("out");
    # the check against the schema comes before any data, store or model is touched.
    assert {p.name for p in tmp_path.iterdir()} <= {"out"}
    if "+" not in override:
        assert not (tmp_path / "out").exists(), "a config that does not compose writes nothing"
