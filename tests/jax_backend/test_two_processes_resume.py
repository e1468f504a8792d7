"""Two JAX processes on localhost (the setup of test_two_processes.py) train
with customfit's BackupAndRestore(save_freq=3) into a directory both share;
one is killed with SIGKILL mid-epoch, the other stops with an error that
says to restart every process, and the same command on both resumes from
the last backup and ends exactly as an uninterrupted two-process run. The
script: tests/jax_backend/two_processes_backed_up.py; the TensorFlow
counterpart: tests/test_multiworker_faults.py."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.subproc import ROOT, free_ports

SCRIPT = os.path.join(os.path.dirname(__file__), "two_processes_backed_up.py")
# What process 0 prints when another process took the coordinator's port
# between `free_ports` and its start: both are started again on another port.
PORT_TAKEN = "Failed to start RPC server"
STARTS = 3
# What customfit says in a process whose peer is gone (`Cluster.lost_contact_message`).
LOST_CONTACT = "lost contact with the other processes"
# How long a survivor has to say so once its peer died. It says so within
# a second (gloo's all-reduce fails at once: the dead process's sockets
# are closed); afterwards it would wait in JAX's shutdown barrier until
# the coordinator's heartbeat timeout (100 s) and abort.
GRACE = 30
KILL_AT = (1, 4)  # the end of epoch 1's batch 4 (of 0..5)
BACKED_UP_AT = (1, 3)  # the last backup before it: after 3 batches of epoch 1


def start_two(arguments, timeout=150):
    """Runs `SCRIPT OUT COORDINATOR ID *rest` as processes 0 and 1 (`OUT` is
    `arguments[0]`), again on another port (up to `STARTS` times) when the
    coordinator's was taken. Each process's `(returncode, stdout, stderr,
    killed_here)`: `killed_here` when it was still running after its peer
    died and had said so (or `GRACE` seconds passed), and was killed, as a
    cluster manager restarting the whole job would."""
    for _ in range(STARTS):
        finished = _start_two(arguments, timeout)
        if not any(code != 0 and PORT_TAKEN in err for code, _, err, _ in finished):
            return finished
    raise AssertionError(f"the coordinator's port was taken in each of {STARTS} starts")


def _start_two(arguments, timeout):
    out, *rest = arguments
    coordinator = f"127.0.0.1:{free_ports(1)[0]}"
    procs, files, killed_here = [], [], [False, False]
    with tempfile.TemporaryDirectory(prefix="customfit-jax-resume-") as directory:
        try:
            for index in range(2):
                # Files, not pipes: the processes are polled, not read until they end.
                stdout = open(Path(directory) / f"{index}.out", "w+")
                stderr = open(Path(directory) / f"{index}.err", "w+")
                files.append((stdout, stderr))
                procs.append(subprocess.Popen(
                    [sys.executable, SCRIPT, out, coordinator, str(index), *rest],
                    cwd=ROOT, stdout=stdout, stderr=stderr, text=True))
            deadline = time.monotonic() + timeout
            peer_died = None
            while None in (codes := [proc.poll() for proc in procs]):
                failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
                if failed and any(PORT_TAKEN in _read(files[i][1]) for i in failed):
                    break  # started again on another port
                if failed and peer_died is None:
                    peer_died = time.monotonic()
                if peer_died is not None:
                    survivor = codes.index(None)
                    said = LOST_CONTACT in _read(files[survivor][1])
                    if said or time.monotonic() > peer_died + GRACE:
                        if said:
                            time.sleep(0.5)  # the rest of its traceback
                        procs[survivor].kill()
                        killed_here[survivor] = True
                        break
                if time.monotonic() > deadline:
                    running = [i for i, code in enumerate(codes) if code is None]
                    raise AssertionError(f"processes {running} still running after {timeout} s")
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        finished = [(proc.returncode, _read(stdout), _read(stderr), killed)
                    for proc, (stdout, stderr), killed in zip(procs, files, killed_here)]
        for pair in files:
            for f in pair:
                f.close()
        return finished


def _read(file):
    file.seek(0)
    return file.read()


def succeeded(finished):
    for index, (code, out, err, _) in enumerate(finished):
        assert code == 0, f"process {index} failed ({code}):\n{out[-2000:]}\n{err[-4000:]}"


def final_state(out, process):
    with np.load(out / f"process-{process}" / "final.npz") as saved:
        return {name: saved[name] for name in saved.files}


def runs(out, process):
    """This process's finished runs (one per start), in the order they ended."""
    found = sorted((out / f"process-{process}").glob("run-*.json"),
                   key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) for p in found]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_process_killed_mid_epoch_and_both_restarted_end_as_never_killed(tmp_path):
    """Bit for bit: both runs are the same program on the same two
    processes (gloo's sum of two values does not depend on their order), and
    the backup holds everything the step depends on (weights, Adam's
    state, the Dropout seed, BatchNormalization's statistics, the running
    means of the epoch's logs, NumPy's random state that Keras shuffles
    with)."""
    uninterrupted, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    succeeded(start_two([str(uninterrupted)]))

    command = [str(crashed), "--kill-at", "{}:{}".format(*KILL_AT)]
    (code0, out0, err0, survivor_killed), (code1, _, err1, _) = start_two(command)
    assert code1 == -signal.SIGKILL, err1[-3000:]
    assert (crashed / "killed").exists()
    # The survivor does not hang in the step: its collective fails as soon
    # as the peer is gone, and customfit says what happened and what to do.
    assert "Process 0 lost contact with the other processes" in err0, (code0, out0, err0[-3000:])
    assert "Restart every process with the same command" in err0
    assert "(JaxRuntimeError: " in err0  # gloo's all-reduce of the step failed
    assert survivor_killed or code0 != 0
    backup = json.loads((crashed / "backup" / "backup.json").read_text())
    assert (backup["epoch"], backup["batch"]) == BACKED_UP_AT  # mid-epoch
    assert backup["backend"] == "jax"
    # Neither process finished: no results yet.
    assert not list(crashed.glob("process-*/run-*.json"))

    succeeded(start_two(command))  # the same command on both
    for process in (0, 1):
        expected, actual = final_state(uninterrupted, process), final_state(crashed, process)
        assert expected.keys() == actual.keys()
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name],
                                          err_msg=f"process {process}: {name}")
        (reference,), (resumed,) = runs(uninterrupted, process), runs(crashed, process)
        # The restart trains the batches after the backup and nothing
        # before, each with the uninterrupted run's logs (the running means
        # of the resumed epoch continue from the backup's).
        assert resumed["batches"] == [b for b in reference["batches"]
                                      if (b[0], b[1]) >= BACKED_UP_AT]
        assert sorted(resumed["epochs"]) == ["1", "2"]
        for epoch, logs in resumed["epochs"].items():
            assert logs == reference["epochs"][epoch], f"process {process}: epoch {epoch}"
        assert reference["epochs"]["2"]["batch_rows"] == 64.0  # the global batch
    # Both processes hold one model, and the backup went once training ended.
    for name, value in final_state(crashed, 0).items():
        np.testing.assert_array_equal(final_state(crashed, 1)[name], value, err_msg=name)
    assert not (crashed / "backup").exists()
