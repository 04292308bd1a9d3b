"""A real ``mlflow server`` on 127.0.0.1 over the store of a real sweep: its REST API finds the
parent, the children and their ``val_dice`` histories."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import command_env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, path: str, **query) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(query)}" if query else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_server_rest_api_lists_the_sweep_and_val_dice_histories(tmp_path: Path):
    db = tmp_path / "mlflow.db"
    env = command_env(db)
    common = ["debug=smoke", f"paths.data_dir={tmp_path}/data"]
    for module, extra in (("gigaseg.cli.prepare", [f"hydra.run.dir={tmp_path}/prep"]),
                          ("gigaseg.cli.train", ["-m", "train.lr=0.001,0.003", "train.steps=4", "train.val_every=2",
                                                 "train.progress=false", "train.log_model=false",
                                                 f"hydra.sweep.dir={tmp_path}/sweep"])):
        flags = [a for a in extra if a.startswith("-")]
        rest = [a for a in extra if not a.startswith("-")]
        out = subprocess.run([sys.executable, "-m", module, *flags, *common, *rest], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900, check=False)
        assert out.returncode == 0, out.stderr[-3000:]

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--default-artifact-root", str(tmp_path / "mlartifacts"),
         "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)

        experiment = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="gigaseg")["experiment"]
        runs = _post(base, "/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        parents = [i for i, t in tags.items() if "mlflow.parentRunId" not in t]
        assert len(parents) == 1 and len(runs) == 3
        children = _post(base, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"tags.`mlflow.parentRunId` = '{parents[0]}'",
        })["runs"]
        assert len(children) == 2
        lrs = set()
        for child in children:
            params = {p["key"]: p["value"] for p in child["data"]["params"]}
            lrs.add(params["train.lr"])
            history = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=child["info"]["run_id"],
                           metric_key="val_dice")["metrics"]
            assert [m["step"] for m in history] == [2, 4]
            assert all(0.0 <= m["value"] <= 1.0 for m in history)
            # Step is the optimizer step for every per-step metric, so the compare view lines up.
            loss = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=child["info"]["run_id"],
                        metric_key="loss")["metrics"]
            assert [m["step"] for m in loss] == [1, 2, 3, 4]
        assert lrs == {"0.001", "0.003"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
