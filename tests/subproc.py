"""Run test code in a fresh Python: for TensorFlow settings fixed at start-up."""

import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Start of a subprocess that needs two replicas: two logical CPU devices, set
# before TensorFlow initialises, and op determinism.
TWO_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()
"""


def run_python(code: str, timeout: float = 300, env: dict | None = None,
               two_cpus: bool = False) -> str:
    """Runs `code` in a new interpreter from the repository root; returns its
    stdout, or fails the test with its output. `two_cpus` starts it with
    `TWO_CPUS`."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT),
                **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c",
         (TWO_CPUS if two_cpus else "") + textwrap.dedent(code)],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (bound together, so all distinct). They
    are free only until another process takes one: `start_workers` starts
    its cluster again on other ports when a worker cannot bind its own."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# What a worker prints when another process took its port first.
PORT_TAKEN = "Could not start gRPC server"
CLUSTER_STARTS = 3


def run_workers(code: str, count: int = 2, timeout: float = 240) -> list[str]:
    """Runs `code` in `count` new interpreters forming one multi-worker cluster
    on localhost (`TF_CONFIG` set per worker); returns each worker's stdout,
    or fails the test with the output of the first worker that failed."""
    finished = start_workers(["-c", textwrap.dedent(code)], count, timeout)
    for index, (returncode, out, err) in enumerate(finished):
        if returncode != 0:
            raise AssertionError(f"worker {index} failed ({returncode}):\n{out}\n{err[-4000:]}")
    return [out for _, out, _ in finished]


def start_workers(arguments: list[str], count: int = 2,
                  timeout: float = 240) -> list[tuple[int, str, str]]:
    """Runs `python <arguments>` as `count` workers of one cluster on
    localhost; returns `(returncode, stdout, stderr)` of each, whatever they
    did. A worker still running after `timeout` seconds fails the test. If
    a worker finds its port taken (by another process, between `free_ports`
    and the worker's start), the cluster is started again on other ports.

    Every worker is killed and reaped when the call returns, whatever happens.
    """
    for _ in range(CLUSTER_STARTS):
        finished = _run_cluster(arguments, count, timeout)
        if not any(code != 0 and PORT_TAKEN in err for code, _, err in finished):
            return finished
    raise AssertionError(f"a worker's port was taken in each of {CLUSTER_STARTS} starts")


def _run_cluster(arguments: list[str], count: int,
                 timeout: float) -> list[tuple[int, str, str]]:
    """One start of `start_workers`' cluster. When a worker cannot bind its
    port, the others (which would wait for it) are killed at once."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(count)]}
    procs, outputs = [], []
    with tempfile.TemporaryDirectory(prefix="customfit-workers-") as directory:
        try:
            for index in range(count):
                config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
                # Files, not pipes: the workers are polled, not read until they end.
                out = open(Path(directory) / f"{index}.out", "w+")
                err = open(Path(directory) / f"{index}.err", "w+")
                outputs.append((out, err))
                procs.append(subprocess.Popen(
                    [sys.executable, "-W", "error::UserWarning", *arguments],
                    cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                   "PYTHONPATH": str(ROOT), "TF_CONFIG": json.dumps(config)},
                    stdout=out, stderr=err, text=True,
                ))
            deadline = time.monotonic() + timeout
            while None in (codes := [proc.poll() for proc in procs]):
                if any(code not in (None, 0) and PORT_TAKEN in _read(err)
                       for code, (_, err) in zip(codes, outputs)):
                    break
                if time.monotonic() > deadline:
                    running = [i for i, proc in enumerate(procs) if proc.poll() is None]
                    raise AssertionError(f"workers {running} still running after {timeout} s")
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        finished = [(proc.returncode, _read(out), _read(err))
                    for proc, (out, err) in zip(procs, outputs)]
        for files in outputs:
            for f in files:
                f.close()
        return finished


def _read(file) -> str:
    file.seek(0)
    return file.read()


# A directory the whole test run shares (pytest-xdist's workers included),
# made and removed by tests/conftest.py.
SHARED_DIRECTORY = "CUSTOMFIT_TESTS_SHARED_DIRECTORY"


def run_python_once(code: str, timeout: float = 300, two_cpus: bool = False) -> str:
    """`run_python(code)`, run once per test run even when several pytest-xdist
    workers ask for it: the first runs it, under a file lock, and the others
    read its output. (Outside a test run's shared directory: run each time.)"""
    shared = os.environ.get(SHARED_DIRECTORY)
    if shared is None:
        return run_python(code, timeout=timeout, two_cpus=two_cpus)
    key = hashlib.sha256(f"{two_cpus}{code}".encode()).hexdigest()[:16]
    directory = Path(shared)
    output = directory / f"{key}.out"
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            output.write_text(run_python(code, timeout=timeout, two_cpus=two_cpus))
        return output.read_text()
