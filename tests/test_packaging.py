"""gigaseg as an installed package: the wheel carries the configs, and the commands work outside a checkout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT


def test_every_package_is_listed_and_every_config_is_package_data():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src").rglob("__init__.py")}
    assert listed == found | {"gigaseg.conf"}
    assert setuptools["package-dir"]["gigaseg.conf"] == "conf"
    globs = setuptools["package-data"]["gigaseg.conf"]
    configs = {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and all(any(c.match(g) and len(c.parts) == len(Path(g).parts) for g in globs) for c in configs)


def test_project_root_is_env_then_checkout_then_working_folder(tmp_path, monkeypatch):
    from gigaseg.cli.common import project_root

    checkout = tmp_path / "checkout"
    (checkout / "deep" / "er").mkdir(parents=True)
    (checkout / "data.dvc").write_text("outs: []\n")
    monkeypatch.delenv("GIGASEG_ROOT", raising=False)
    monkeypatch.chdir(checkout / "deep" / "er")
    assert project_root() == checkout.resolve()
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()
    monkeypatch.setenv("GIGASEG_ROOT", str(checkout / "deep"))
    assert project_root() == (checkout / "deep").resolve()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_predicts_evaluates_and_views_from_an_empty_folder(tmp_path):
    """Build the wheel, install it with its dependencies (from pip's cache) in a new venv, and use it nowhere near the checkout."""
    wheels, venv, work = tmp_path / "wheels", tmp_path / "venv", tmp_path / "empty"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("gigaseg-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=1800)
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "gigaseg" / "conf" / "config.yaml").is_file()
    before = _snapshot(site)

    # NUMBA_CACHE_DIR too: importing gigaseg in this process (other tests) set it for our cache folder.
    env = {k: v for k, v in os.environ.items() if k not in ("GIGASEG_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                                                               "VIRTUAL_ENV", "PYTHONPATH", "NUMBA_CACHE_DIR")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, (args, done.stderr[-3000:])
        return done

    which = run("python", "-c", "import gigaseg; print(gigaseg.__file__)")
    assert which.stdout.strip().startswith(str(site))

    trained = run("gigaseg-train", "debug=smoke", "train.steps=2")
    said = trained.stdout + trained.stderr  # Hydra's log handler writes to stdout
    assert "preparing them now" in said
    assert "oneDNN" not in said
    model_uri = re.search(r"model logged as (\S+)", said).group(1)
    data = work / "data" / "smoke" / "demo"
    assert (data / "prepared" / "cohort.json").is_file() and (work / "mlflow.db").is_file()

    run("gigaseg-predict", f"model_uri={model_uri}", f"slide={data / 'slides' / 's4.tiff'}", f"output_dir={work / 'pred'}")
    assert (work / "pred" / "mask.tiff").is_file() and (work / "pred" / "outlines.geojson").is_file()
    scored = run("gigaseg-evaluate", f"prediction={work / 'pred'}", f"reference={data / 'slides' / 's4_mask.tiff'}",
                 f"output_dir={work / 'eval'}")
    assert "dice" in scored.stdout and (work / "eval" / "evaluation.json").is_file()

    # The viewer serves the prediction from the installed package's pages, scripts and OpenSeadragon.
    viewer = subprocess.Popen([str(venv / "bin" / "gigaseg-view"), f"dir={work / 'pred'}"], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = viewer.stdout.readline()
        assert "gigaseg-view: 1 slide from" in line, line + viewer.stderr.read()
        url = line.split(" at ")[1].split()[0]

        def fetch(path: str) -> bytes:
            with urllib.request.urlopen(url + path, timeout=60) as response:
                assert response.status == 200, path
                return response.read()

        assert b'href="/slide/0"' in fetch("")
        assert fetch("static/openseadragon/openseadragon.min.js").startswith(b"//! openseadragon")
        assert fetch("static/openseadragon/images/zoomin_rest.png").startswith(b"\x89PNG")
        layers = json.loads(fetch("api/slide/0.json"))["layers"]
        assert {"slide", "mask"} <= set(layers)
        assert fetch("dz/0/slide_files/0/0_0.jpeg").startswith(b"\xff\xd8")
        assert fetch("dz/0/mask_files/0/0_0.png").startswith(b"\x89PNG")
    finally:
        viewer.terminate()
        viewer.wait(timeout=60)
    assert not list(work.glob("outputs/*/*/view.log")), "the viewer writes no run folder"

    assert _snapshot(site) == before, "nothing is written into the installed package"
    assert any((tmp_path / "cache" / "gigaseg" / "numba").rglob("*.nbi")), "compiled kernels go to the user cache"


def test_configs_come_from_the_projects_conf_folder_else_from_the_package(tmp_path, monkeypatch):
    from gigaseg.cli.common import PACKAGE_CONFIGS, config_path

    monkeypatch.setenv("GIGASEG_ROOT", str(tmp_path))
    assert config_path() == PACKAGE_CONFIGS
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("defaults: [train_schema]\n")
    assert config_path() == str(tmp_path.resolve() / "conf")
