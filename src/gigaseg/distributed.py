"""Exact tiled training on several replicas with ``tf.distribute``: one region's tiles spread over them.

The tiled step is a sum over tiles (docs/STREAMING.md), so a region's tiles can be split
between replicas, each computing the partial sums of its share; the strategy's collectives
add the partial sums up (pass 1's Dice sums, then pass 2's gradients) and every replica
applies the same update to its own copy of the model. The step stays exact.

- ``multiworker``: ``MultiWorkerMirroredStrategy``, one process per worker, the cluster from
  ``TF_CONFIG`` or from a list of ``host:port`` and this worker's index.
- ``mirrored``: ``MirroredStrategy`` over the local devices (all GPUs) of one process.

The strategy is used for its collectives only: the model and optimizer stay ordinary local
variables on every replica, kept identical by broadcasting the chief's state at the start and
by applying identical summed gradients. Chief = ``chief`` task, or worker 0 if there is none.
No Hydra and no MLflow in here.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gigaseg.errors import ConfigError, GigasegError

log = logging.getLogger(__name__)

KINDS = ("none", "multiworker", "mirrored")


class WorkerLostError(GigasegError):
    """A peer worker stopped answering (crashed, killed, or its host went away)."""


@dataclass(frozen=True)
class Cluster:
    """The workers of a multi-worker run and which one this process is."""

    jobs: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def is_chief(self) -> bool:
        if "chief" in self.jobs:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def tasks(self) -> list[tuple[str, int, str]]:
        """Every (job, index, address), chief first."""
        order = sorted(self.jobs, key=lambda job: job != "chief")
        return [(job, i, address) for job in order for i, address in enumerate(self.jobs[job])]

    def name(self, job: str, index: int) -> str:
        """``worker 1 (host:port)``: how messages name a task."""
        addresses = self.jobs.get(job, [])
        where = f" ({addresses[index]})" if 0 <= index < len(addresses) else ""
        return f"{job} {index}{where}"

    def tf_config(self) -> str:
        return json.dumps({"cluster": self.jobs, "task": {"type": self.task_type, "index": self.task_index}})


_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d+$")


def cluster_from(workers: Sequence[str] | None, task_index: int | None, environ=os.environ) -> Cluster:
    """The cluster from ``TF_CONFIG`` (if set) or from ``workers`` (host:port list) and ``task_index``."""
    raw = environ.get("TF_CONFIG")
    if raw:
        try:
            spec = json.loads(raw)
            jobs = {str(job): [str(a) for a in addresses] for job, addresses in spec["cluster"].items()}
            task_type, index = str(spec["task"]["type"]), int(spec["task"]["index"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(
                f"TF_CONFIG is not a valid cluster description ({exc}); expected "
                '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'
            ) from exc
        unknown = sorted(set(jobs) - {"chief", "worker"})
        if unknown:
            raise ConfigError(f"TF_CONFIG has job(s) {', '.join(unknown)}; gigaseg uses only 'chief' and 'worker'")
        where = "TF_CONFIG"
    else:
        if not workers:
            raise ConfigError(
                "distributed=multiworker needs the cluster: set TF_CONFIG on every worker, list them in "
                "distributed.workers=[host:port,...] with distributed.task_index=i, or start local workers "
                "with distributed.local_workers=N"
            )
        if task_index is None:
            raise ConfigError("distributed.task_index must say which of distributed.workers this process is (0 = chief)")
        jobs = {"worker": [str(w) for w in workers]}
        task_type, index = "worker", int(task_index)
        where = "distributed.workers"
    for job, addresses in jobs.items():
        for address in addresses:
            if not _ADDRESS.match(address):
                raise ConfigError(f"{where}: '{address}' in job '{job}' is not host:port")
    if task_type not in jobs or not 0 <= index < len(jobs[task_type]):
        raise ConfigError(f"{where}: this task ({task_type} {index}) is not in the cluster {jobs}")
    return Cluster(jobs, task_type, index)


def _same_endpoint(address: str, seen: str) -> bool:
    """Whether ``host:port`` of the cluster is the ``ip:port`` a gRPC error names."""
    host, port = address.rsplit(":", 1)
    seen_host, seen_port = seen.rsplit(":", 1)
    if port != seen_port:
        return False
    if host.strip("[]") == seen_host.strip("[]"):
        return True
    try:
        return socket.gethostbyname(host) == seen_host
    except OSError:
        return False


def lost_worker_message(error: Exception, cluster: Cluster | None) -> str:
    """Name the peer(s) a collective's error points at, by index and address."""
    text = str(error)
    names: list[str] = []
    if cluster is not None:
        for job, index in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", text):
            if (job, int(index)) != (cluster.task_type, cluster.task_index):
                name = cluster.name(job, int(index))
                if name not in names:
                    names.append(name)
        for host_port in re.findall(r"ipv[46]:([^\s,;'\"]+:\d+)", text):
            for job, index, address in cluster.tasks:
                if _same_endpoint(address, host_port) and cluster.name(job, index) not in names:
                    names.append(cluster.name(job, index))
        others = [cluster.name(job, i) for job, i, _ in cluster.tasks if (job, i) != (cluster.task_type, cluster.task_index)]
        if not names and len(others) == 1:
            names = others  # with two workers, the peer is the other one
    who = ", ".join(names) if names else "a peer worker"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The informative part of TensorFlow's message follows "aborted by:".
    reason = next((line.split("aborted by:", 1)[1].strip() for line in lines if "aborted by:" in line), "")
    reason = reason or (lines[0] if lines else type(error).__name__)
    return f"lost {who}: {reason[:300]}"


def _configure_coordination(cluster: Cluster, heartbeat_timeout_s: float, startup_timeout_s: float) -> None:
    """Coordination service with our heartbeat and registration timeouts (before the strategy exists).

    ``MultiWorkerMirroredStrategy`` configures the service itself with TensorFlow's defaults
    unless one is configured already; this is the only place gigaseg touches that API.
    """
    from tensorflow.python.eager import context

    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2

    leader = "chief" if "chief" in cluster.jobs else "worker"
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=f"/job:{leader}/replica:0/task:0",
        heartbeat_timeout_in_ms=int(heartbeat_timeout_s * 1000),
        cluster_register_timeout_in_ms=int(startup_timeout_s * 1000),
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(addresses))
            for job, addresses in cluster.jobs.items()
        ],
    )


@dataclass
class DistributedConfig:
    """The ``distributed`` config group."""

    #: none | multiworker | mirrored
    kind: str = "none"
    #: The cluster when TF_CONFIG is not set: every worker's host:port, and which one this is (0 = chief).
    workers: list[str] | None = None
    task_index: int | None = None
    #: >0: start that many workers on 127.0.0.1 from this one command (a single-machine check).
    local_workers: int = 0
    #: A worker silent this long is declared lost; the others stop with an error naming it
    #: (after at most the current pass over their tiles).
    heartbeat_timeout_s: float = 10.0
    #: How long workers wait for the whole cluster to come up.
    startup_timeout_s: float = 300.0

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"distributed.kind '{self.kind}' is unknown; choose one of {', '.join(KINDS)}")
        if self.local_workers < 0:
            raise ConfigError(f"distributed.local_workers must be 0 or more, got {self.local_workers}")
        if self.local_workers and self.kind != "multiworker":
            raise ConfigError("distributed.local_workers needs distributed=multiworker")
        if not self.heartbeat_timeout_s > 0:
            raise ConfigError(f"distributed.heartbeat_timeout_s must be positive, got {self.heartbeat_timeout_s}")
        if not self.startup_timeout_s > 0:
            raise ConfigError(f"distributed.startup_timeout_s must be positive, got {self.startup_timeout_s}")


class Replicas:
    """The replicas of a run: the strategy, this process's devices, and sums across all of them.

    ``memory_share`` is the fraction of this host's memory budget one worker may plan for
    (1 / workers started on this host).
    """

    def __init__(self, strategy, *, cluster: Cluster | None = None, memory_share: float = 1.0):
        self.strategy = strategy
        self.cluster = cluster
        self.devices: list[str] = list(strategy.extended.worker_devices)
        self.num_replicas = int(strategy.num_replicas_in_sync)
        index = 0 if cluster is None else [(j, i) for j, i, _ in cluster.tasks].index((cluster.task_type, cluster.task_index))
        self.first_replica = index * len(self.devices)
        self.is_chief = cluster is None or cluster.is_chief
        self.memory_share = memory_share

    def describe(self) -> str:
        where = "" if self.cluster is None else f" as {self.cluster.name(self.cluster.task_type, self.cluster.task_index)}"
        return f"{self.num_replicas} replicas ({len(self.devices)} here{where}: {', '.join(self.devices)})"

    def all_reduce(self, partials: Sequence[np.ndarray], what: str) -> np.ndarray:
        """Sum of the float64 vectors of every replica (``partials``: one per local device)."""
        import tensorflow as tf

        values = [tf.constant(np.asarray(p, np.float64)) for p in partials]
        try:
            per_replica = self.strategy.experimental_distribute_values_from_function(
                lambda ctx: values[ctx.replica_id_in_sync_group - self.first_replica]
            )
            total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            return total.numpy()
        except (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError, tf.errors.InternalError) as exc:
            message = lost_worker_message(exc, self.cluster)
        # Not chained: the traceback would keep the thread pool of the failed eager all-reduce
        # alive until interpreter exit, whose clean-up then prints a spurious traceback.
        gc.collect()
        raise WorkerLostError(
            f"{message} (during the {what}); the run stopped. Resume it from the chief's last checkpoint "
            "with train.resume=<run id> or train.resume=auto"
        )

    def broadcast(self, arrays: Sequence[np.ndarray], what: str) -> list[np.ndarray]:
        """The chief's ``arrays`` on every replica (the others contribute zeros to a sum)."""
        shapes = [np.shape(a) for a in arrays]
        flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]) if arrays else np.zeros(0)
        partials = [flat if self.is_chief and j == 0 else np.zeros_like(flat) for j in range(len(self.devices))]
        total = self.all_reduce(partials, what)
        out, at = [], 0
        for shape, original in zip(shapes, arrays):
            size = int(np.prod(shape))
            out.append(total[at:at + size].reshape(shape).astype(np.asarray(original).dtype))
            at += size
        return out

    def sync_state(self, model, optimizer, step: int) -> int:
        """Give every replica the chief's weights, optimizer state and step; returns the step."""
        variables = list(model.trainable_variables) + list(optimizer.variables)
        values = self.broadcast([np.asarray(v.numpy()) for v in variables] + [np.array(step, np.float64)], "start-up broadcast")
        for variable, value in zip(variables, values):
            variable.assign(value)
        return int(values[-1])


def make_replicas(config: DistributedConfig, *, memory_share: float = 1.0) -> Replicas | None:
    """The strategy for ``config`` (None for ``none``). Create it before any other TensorFlow work."""
    config.validate()
    if config.kind == "none":
        return None
    import tensorflow as tf

    if config.kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [tf.config.list_logical_devices("CPU")[0].name]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        replicas = Replicas(strategy, memory_share=memory_share)
        log.info("distributed=mirrored: %s", replicas.describe())
        return replicas
    cluster = cluster_from(config.workers, config.task_index)
    os.environ["TF_CONFIG"] = cluster.tf_config()
    start = time.perf_counter()
    # TensorFlow waits for missing workers without a limit, inside C++ calls that hold the
    # interpreter (no Python thread or signal handler runs): a watchdog process ends this one.
    watchdog = _start_watchdog(config.startup_timeout_s, cluster)
    try:
        _configure_coordination(cluster, config.heartbeat_timeout_s, config.startup_timeout_s)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        # The first collective waits for every worker to join.
        replicas = Replicas(strategy, cluster=cluster, memory_share=memory_share)
        replicas.all_reduce([np.zeros(1)] * len(replicas.devices), "start-up")
    except tf.errors.OpError as exc:
        raise WorkerLostError(
            f"the cluster did not come up within distributed.startup_timeout_s={config.startup_timeout_s:g}: "
            f"{lost_worker_message(exc, cluster)}"
        ) from exc
    finally:
        watchdog.kill()
        watchdog.wait()
    log.info("distributed=multiworker: %s, joined in %.1f s", replicas.describe(), time.perf_counter() - start)
    return replicas


_WATCHDOG = """
import os, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(timeout)
try:
    os.kill(pid, 0)
except ProcessLookupError:
    sys.exit(0)
print(message, file=sys.stderr, flush=True)
os.kill(pid, signal.SIGKILL)
"""


def _start_watchdog(timeout_s: float, cluster: Cluster):
    """A process that kills this one with a one-line error unless it is itself killed within ``timeout_s``."""
    import subprocess

    others = ", ".join(cluster.name(job, i) for job, i, _ in cluster.tasks if (job, i) != (cluster.task_type, cluster.task_index))
    message = (f"error: the cluster did not come up within distributed.startup_timeout_s={timeout_s:g}: not every one "
               f"of {others} joined {cluster.name(cluster.task_type, cluster.task_index)}; start them all with the "
               "same cluster, check that their ports are reachable, or raise the timeout")
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout_s), message])
