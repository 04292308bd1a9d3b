"""The DVC pipeline (dvc.yaml) on the tiny config in a copy of the project: every stage runs,
a second ``dvc repro`` does nothing, and ``dvc exp show`` lists the validation Dice."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

STAGES = ("config", "slide", "prepare", "train", "evaluate")


def _run(*args: str, cwd: Path, env: dict) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_nothing(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("conf", "dvc.yaml", "params.yaml"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    shutil.copytree(ROOT / "src" / "gigaseg", project / "src" / "gigaseg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pipeline"]["overrides"] = "debug=smoke train.log_model=false"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # The copy's conf/ is the one composed (GIGASEG_ROOT), and MLflow writes beside it.
    env = {**os.environ, "GIGASEG_ROOT": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    dvc = (sys.executable, "-m", "dvc")
    _run("git", "init", "-q", cwd=project, env=env)
    _run(*dvc, "init", "-q", cwd=project, env=env)
    _run(*dvc, "config", "core.analytics", "false", cwd=project, env=env)

    first = _run(*dvc, "repro", cwd=project, env=env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first, stage
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    metrics = json.loads((project / "pipeline" / "metrics.json").read_text())
    trained = json.loads((project / "pipeline" / "train" / "metrics.json").read_text())
    assert metrics["step"] == 3 and 0.0 <= metrics["val_dice"] <= 1.0
    # The evaluate stage scores the trained checkpoint exactly as training's last validation did.
    assert metrics["val_dice"] == pytest.approx(trained["final_val_dice"], abs=1e-12)
    # The composed config the stages depend on comes from conf/ with the overrides.
    train_section = yaml.safe_load((project / "pipeline" / "config" / "train.yaml").read_text())["train"]
    assert train_section["steps"] == 3 and train_section["log_model"] is False
    before = _digests(project / "pipeline")

    second = _run(*dvc, "repro", cwd=project, env=env)
    assert "Running stage" not in second
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change" in second, stage
    assert _digests(project / "pipeline") == before

    # dvc exp show lists commits (and the workspace beside them): commit this scratch repository.
    _run("git", "add", "-A", cwd=project, env=env)
    _run("git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-q", "-m", "pipeline",
         cwd=project, env=env)
    shown = _run(*dvc, "exp", "show", "--no-pager", "--json", cwd=project, env=env)
    rows = {row["rev"]: row["data"] for row in json.loads(shown)}
    assert set(rows) >= {"workspace"} and len(rows) == 2  # the workspace and the commit
    for row in rows.values():
        assert row["metrics"]["pipeline/metrics.json"]["data"]["val_dice"] == metrics["val_dice"]
        assert row["params"]["params.yaml"]["data"]["pipeline"]["overrides"] == params["pipeline"]["overrides"]

    # Changing a value in conf/ re-runs only what depends on it.
    default = project / "conf" / "train" / "default.yaml"
    default.write_text(default.read_text() + "threshold: 0.6\n")
    third = _run(*dvc, "repro", cwd=project, env=env)
    assert "Running stage 'train'" in third and "Running stage 'evaluate'" in third
    assert "Running stage 'slide'" not in third and "Running stage 'prepare'" not in third
