"""Training on several workers: ``tf.distribute.MultiWorkerMirroredStrategy`` from ``TF_CONFIG``.

    python -m model.train --distributed-workers 2 ...   # two worker processes on loopback

A worker is a ``python -m model.train`` process with ``TF_CONFIG`` in its environment: Kubeflow's
training operator sets it in every pod of a ``TFJob`` (``manifests/training/``), and
``--distributed-workers N`` sets it for N processes it starts on 127.0.0.1. Every worker reads the
data, fits the same seeded scaler and writes the same example shards; each then trains on the shards
its ``tf.distribute.InputContext`` assigns it (``model/input_pipeline.py``), and the gradients of every
step are summed over the workers. The chief (worker 0, or the ``chief`` task when there is one) fits
the segments, measures quality and writes the model version; the others stop after training.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

TF_CONFIG = "TF_CONFIG"


@dataclass(frozen=True)
class Role:
    """This process's place in a training cluster."""

    workers: int  # tasks that train (chief included)
    index: int  # this task's place among them, 0 for the chief
    task: str  # "worker" or "chief", as TF_CONFIG names it

    @property
    def is_chief(self) -> bool:
        return self.index == 0


class ClusterConfigError(ValueError):
    """TF_CONFIG that cannot describe a training cluster."""


def role_from_environment(environ=os.environ) -> Role | None:
    """The role ``TF_CONFIG`` gives this process, or None when it is absent (training on one process).

    A ``chief`` task is worker 0 and the ``worker`` tasks follow it (TensorFlow's own convention);
    without a chief, ``worker`` 0 is the chief. Parameter servers and evaluators are not used here.
    """
    text = environ.get(TF_CONFIG, "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        task_type, task_index = task["type"], int(task["index"])
        chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterConfigError(f"{TF_CONFIG} is not a cluster and task description ({exc}): expected "
                                 '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}'
                                 ) from None
    unused = sorted(set(cluster) - {"chief", "worker"})
    if unused:
        raise ClusterConfigError(f"{TF_CONFIG} names {', '.join(unused)} tasks; training here uses only chief and "
                                 "worker tasks (MultiWorkerMirroredStrategy): remove them from the TFJob")
    if chiefs > 1:
        raise ClusterConfigError(f"{TF_CONFIG} has {chiefs} chief tasks; at most one")
    if task_type not in ("chief", "worker") or not 0 <= task_index < (chiefs if task_type == "chief" else workers):
        raise ClusterConfigError(f"{TF_CONFIG}'s task {task_type} {task_index} is not in its cluster")
    return Role(workers=chiefs + workers, index=task_index + (chiefs if task_type == "worker" else 0), task=task_type)


def cluster_strategy():
    """The strategy that trains across the cluster of ``TF_CONFIG``. Call it before any other TensorFlow op:
    it sets up the process's collective runtime."""
    import tensorflow as tf

    return tf.distribute.MultiWorkerMirroredStrategy()


def finish(strategy) -> None:
    """Wait until every worker is here: the chief calls it after writing the version, the others after
    training, so no worker's runtime goes away while the chief still runs (which would fail the chief)."""
    import tensorflow as tf

    @tf.function
    def everyone():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)

    everyone()


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def loopback_configs(n: int) -> list[str]:
    """``TF_CONFIG`` for each of ``n`` workers on 127.0.0.1 (worker 0 is the chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(n)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(n)]


def run_local_workers(n: int, argv: list[str], *, poll_seconds: float = 0.2) -> int:
    """Run ``python -m model.train argv`` as ``n`` workers on loopback; the chief's output is the run's.

    Returns the first failing worker's exit code (the others are stopped then), else 0.
    """
    processes, logs = [], []
    try:
        for index, config in enumerate(loopback_configs(n)):
            env = {**os.environ, TF_CONFIG: config}
            quiet = [] if index == 0 or "--quiet" in argv else ["--quiet"]
            # The other workers' output is kept aside and shown only if one fails: it is the chief's run.
            log = None if index == 0 else tempfile.TemporaryFile(mode="w+")
            logs.append(log)
            processes.append(subprocess.Popen([sys.executable, "-m", "model.train", *argv, *quiet], env=env,
                                              stdout=log, stderr=log))
        while True:
            codes = [p.poll() for p in processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                index, code = failed[0]
                if logs[index] is not None:
                    logs[index].seek(0)
                    sys.stderr.write(logs[index].read()[-4000:])
                print(f"error: worker {index} of {n} exited with {code}; stopping the others", file=sys.stderr)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_seconds)
    finally:
        for log in logs:
            if log is not None:
                log.close()
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
