"""``distributed.local_workers=N``: start N training workers on 127.0.0.1 and watch over them.

Each worker is the same command (same overrides) with its own ``TF_CONFIG`` and Hydra run
folder (``<run dir>/worker_<i>``; worker 0 is the chief). If a worker dies, the others are
given the heartbeat timeout to notice it and stop on their own (naming it); any still
running after that are stopped. The launcher then fails with one line saying which worker
was lost and how to resume.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gigaseg.atomic import atomic_path

log = logging.getLogger("gigaseg.workers")

#: Set in the environment of a launched worker, so it trains instead of launching again.
LAUNCHED = "GIGASEG_LOCAL_WORKER"
#: A sweep job's MLflow parent run and tags, handed from the launcher to its chief.
SWEEP_JOB = "GIGASEG_SWEEP_JOB"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Worker:
    index: int
    address: str
    process: subprocess.Popen
    folder: Path

    @property
    def name(self) -> str:
        role = ", chief" if self.index == 0 else ""
        return f"worker {self.index} ({self.address}, pid {self.process.pid}{role})"


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def launch(
    module: str,
    overrides: list[str],
    count: int,
    run_dir: Path,
    *,
    heartbeat_timeout_s: float,
    sweep_job: dict | None = None,
) -> Path:
    """Run ``python -m module`` as ``count`` local workers; return the chief's run folder.

    Raises WorkerLostError naming the first worker that failed.
    """
    from gigaseg.distributed import WorkerLostError

    ports = free_ports(count)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    cluster = {"worker": addresses}
    threads = max(1, (os.cpu_count() or 1) // count)
    workers: list[Worker] = []
    for index, address in enumerate(addresses):
        folder = run_dir / f"worker_{index}"
        env = {
            **os.environ,
            LAUNCHED: "1",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        # Share the cores instead of every worker starting one thread per core.
        env.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
        if sweep_job:
            env[SWEEP_JOB] = json.dumps(sweep_job)
        args = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={folder}"]
        if index:
            args.append("train.progress=false")  # one progress bar is enough
        workers.append(Worker(index, address, subprocess.Popen(args, env=env), folder))
    with atomic_path(run_dir / "workers.json") as tmp:
        tmp.write_text(json.dumps([{"index": w.index, "address": w.address, "pid": w.process.pid,
                                    "folder": str(w.folder)} for w in workers], indent=2))
    log.info("started %d local workers: %s", count, ", ".join(w.name for w in workers))
    try:
        failed = _supervise(workers, heartbeat_timeout_s)
    except BaseException:
        _stop(workers, grace_s=5.0)
        raise
    if failed:
        first = failed[0]
        others = "; ".join(f"{w.name} {_how(w.process.returncode)}" for w in failed[1:])
        raise WorkerLostError(
            f"{first.name} {_how(first.process.returncode)}"
            + (f"; then {others}" if others else "")
            + ". Resume the run from the chief's last checkpoint with the same command and train.resume=auto"
        )
    return workers[0].folder


def _supervise(workers: list[Worker], heartbeat_timeout_s: float) -> list[Worker]:
    """Wait for every worker; return those that failed, first failure first."""
    failed: list[Worker] = []
    deadline = None
    while True:
        running = [w for w in workers if w.process.poll() is None]
        for w in workers:
            if w.process.returncode not in (None, 0) and w not in failed:
                failed.append(w)
                log.error("%s %s", w.name, _how(w.process.returncode))
        if not running:
            return failed
        if failed and deadline is None:
            # The survivors detect the loss themselves within the heartbeat timeout plus one pass.
            deadline = time.monotonic() + 3 * heartbeat_timeout_s + 30
        if deadline is not None and time.monotonic() > deadline:
            log.error("stopping %s: still running after a worker was lost", ", ".join(w.name for w in running))
            _stop(running, grace_s=5.0)
            for w in running:
                failed.append(w)
            return failed
        time.sleep(0.2)


def _stop(workers: list[Worker], grace_s: float) -> None:
    for w in workers:
        if w.process.poll() is None:
            w.process.terminate()
    end = time.monotonic() + grace_s
    for w in workers:
        try:
            w.process.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait()
