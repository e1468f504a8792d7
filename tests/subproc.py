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
    """Ports nothing listens on now (bound together, so all distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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
    did. A worker still running after `timeout` seconds fails the test.

    Every worker is killed and reaped when the call returns, whatever happens.
    """
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(count)]}
    procs = []
    try:
        for index in range(count):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(
                [sys.executable, "-W", "error::UserWarning", *arguments],
                cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                               "PYTHONPATH": str(ROOT), "TF_CONFIG": json.dumps(config)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        deadline = time.monotonic() + timeout
        finished = []
        for index, proc in enumerate(procs):
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"worker {index} still running after {timeout} s")
            finished.append((proc.returncode, out, err))
        return finished
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def run_python_once(code: str, timeout: float = 300, two_cpus: bool = False) -> str:
    """`run_python(code)`, run once per test run even when several pytest-xdist
    workers ask for it: the first runs it, under a file lock, and the others
    read its output. (Outside xdist: run each time it is called.)"""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return run_python(code, timeout=timeout, two_cpus=two_cpus)
    key = hashlib.sha256(f"{two_cpus}{code}".encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / f"customfit-tests-{run_id}"
    directory.mkdir(exist_ok=True)
    output = directory / f"{key}.out"
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            output.write_text(run_python(code, timeout=timeout, two_cpus=two_cpus))
        return output.read_text()
