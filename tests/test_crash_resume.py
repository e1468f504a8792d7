"""A training process killed with SIGKILL mid-epoch and started again with the
same command ends exactly like one that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from tests.subproc import ROOT

SCRIPT = ROOT / "tests" / "scripts" / "resumable_training.py"
KILL_AT = (2, 3)  # epoch (0-based), batch: mid-epoch, after the best epoch (1)


def start(command, log_path):
    """Starts `command` with its output in `log_path`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    process.log_path = log_path
    return process


def output(process):
    return process.log_path.read_text()[-3000:]


def finish(process, timeout=240):
    code = process.wait(timeout=timeout)
    assert code == 0, f"training process failed ({code}):\n{output(process)}"


def kill_and_restart(script, tmp_path, kill_at, check_killed, kill_signal=signal.SIGKILL,
                     reference_out=None):
    """Runs `script` twice side by side: into `tmp_path/reference` (unless
    `reference_out` holds such a run already), and into `tmp_path/<signal>`
    with `--pause-once-at epoch:batch`. Sends the second `kill_signal` once
    it pauses there and checks how it ended (killed by SIGKILL; stopped by
    SIGTERM with a `customfit.Preempted`, exit status 1), calls
    `check_killed(crashed_out)`, starts the same command again and waits for
    both runs to end. Returns `(reference_out, crashed_out)`."""
    name = signal.Signals(kill_signal).name.lower()
    crashed_out = tmp_path / name
    command = [sys.executable, str(script), str(crashed_out),
               "--pause-once-at", "{}:{}".format(*kill_at)]
    processes = []
    if reference_out is None:
        reference_out = tmp_path / "reference"
        processes.append(start([sys.executable, str(script), str(reference_out)],
                               tmp_path / "reference.log"))
    crashed = start(command, tmp_path / f"{name}.log")
    processes.append(crashed)
    try:
        deadline = time.monotonic() + 240
        while not (crashed_out / "paused").exists():
            assert crashed.poll() is None, output(crashed)
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        crashed.send_signal(kill_signal)
        if kill_signal == signal.SIGTERM:
            assert crashed.wait(timeout=60) == 1, output(crashed)
            assert "customfit.Preempted: fit stopped on SIGTERM" in output(crashed)
        else:
            assert crashed.wait(timeout=30) == -kill_signal
        check_killed(crashed_out)
        restarted = start(command, tmp_path / f"{name}-restarted.log")  # the same command
        processes.append(restarted)
        for process in processes[::-1]:
            if process is not crashed:
                finish(process)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return reference_out, crashed_out


def h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def runs(out):
    """Each process's trained epochs with their logs, and trained batches,
    in start order."""
    files = sorted(out.glob("run-*.json"), key=os.path.getmtime)
    found = [json.loads(f.read_text()) for f in files]
    return [({int(k): v for k, v in run["epochs"].items()}, [tuple(b) for b in run["batches"]])
            for run in found]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkilled_or_sigtermed_training_restarted_with_the_same_command_ends_identical(
        tmp_path):
    """SIGKILL loses the batches since the last backup (save_freq="epoch":
    the epoch's start); SIGTERM lets the batch under way finish and backs up
    after it, and the restart trains from the next batch. Either way the
    restarted run ends as the uninterrupted one, bit for bit."""
    def check_killed(crashed_out):
        assert not (crashed_out / "final.npz").exists()
        backup = json.loads((crashed_out / "backup" / "backup.json").read_text())
        assert (backup["epoch"], backup["batch"]) == (KILL_AT[0], 0)  # at the epoch's start

    def check_terminated(crashed_out):
        assert not (crashed_out / "final.npz").exists()
        backup = json.loads((crashed_out / "backup" / "backup.json").read_text())
        assert (backup["epoch"], backup["batch"]) == (KILL_AT[0], KILL_AT[1] + 1)

    reference_out, killed_out = kill_and_restart(SCRIPT, tmp_path, KILL_AT, check_killed)
    _, terminated_out = kill_and_restart(SCRIPT, tmp_path, KILL_AT, check_terminated,
                                         signal.SIGTERM, reference_out)
    ((reference_run, reference_batches),) = runs(reference_out)
    (_, stopped_batches), (terminated_run, terminated_batches) = runs(terminated_out)
    # No batch ran after the SIGTERM's backup; the restart begins with the next.
    assert stopped_batches[-1] == KILL_AT
    assert terminated_batches == [b for b in reference_batches if b > KILL_AT]
    ((killed_run, killed_batches),) = runs(killed_out)  # the killed process wrote none
    assert killed_batches == [b for b in reference_batches if b >= (KILL_AT[0], 0)]
    for crashed_out, resumed_run in ((killed_out, killed_run), (terminated_out, terminated_run)):
        check_resumed(reference_out, reference_run, crashed_out, resumed_run)


def check_resumed(reference_out, reference_run, crashed_out, resumed_run):
    assert sorted(resumed_run) == [2, 3, 4]
    for epoch, logs in resumed_run.items():
        assert logs == reference_run[epoch], epoch

    final, expected = np.load(crashed_out / "final.npz"), np.load(reference_out / "final.npz")
    assert sorted(final.files) == sorted(expected.files)
    for key in expected.files:
        np.testing.assert_array_equal(final[key], expected[key], err_msg=key)

    # The best epoch came before the kill; a later one beats the epoch the
    # restart began with but not the best: a checkpoint that forgot its best
    # value on restart would have overwritten it.
    val_loss = {e: logs["val_loss"] for e, logs in reference_run.items()}
    best_epoch = min(val_loss, key=val_loss.get)
    assert best_epoch < KILL_AT[0]
    assert any(val_loss[e] < val_loss[KILL_AT[0]] for e in resumed_run if e > KILL_AT[0])
    best, expected_best = (h5_arrays(out / "best.weights.h5")
                           for out in (crashed_out, reference_out))
    assert sorted(best) == sorted(expected_best)
    for key in expected_best:
        np.testing.assert_array_equal(best[key], expected_best[key], err_msg=key)
    assert not (crashed_out / "backup").exists()  # removed after the finished run
