"""`BackupAndRestore(save_freq=N)`: a fit killed at any batch and started
again continues with the next untrained batch, and ends exactly like a fit
that was never interrupted."""

import json
import signal
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit.callbacks import BackupAndRestore, ResumeWarning
from tests import models
from tests.subproc import ROOT
from tests.test_crash_resume import finish, output, start

SCRIPT = ROOT / "tests" / "scripts" / "resumable_mid_epoch.py"
CASES = ["arrays", "dataset", "arrays-2-replicas", "dataset-2-replicas"]
KILL_AFTER = (1, 4)  # epoch, batch (of 8): the last backup is after batch 2
BACKED_UP = 3  # batches of epoch 1 in that backup (save_freq=3)


def case_runs(directory):
    """Each process's run of one case, in start order."""
    files = sorted(directory.glob("run-*.json"), key=lambda f: f.stat().st_mtime)
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkilled_mid_epoch_resumes_at_the_next_batch_bit_for_bit(tmp_path):
    reference_out, crashed_out = tmp_path / "reference", tmp_path / "crashed"
    script = [sys.executable, str(SCRIPT)]
    command = [*script, str(crashed_out), "--pause-once-at", "{}:{}".format(*KILL_AFTER)]
    reference = start([*script, str(reference_out)], tmp_path / "reference.log")
    crashed = start(command, tmp_path / "crashed.log")
    processes = [reference, crashed]
    try:
        deadline = time.monotonic() + 240
        while not (crashed_out / "paused").exists():
            assert crashed.poll() is None, output(crashed)
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        crashed.send_signal(signal.SIGKILL)
        assert crashed.wait(timeout=30) == -signal.SIGKILL
        for case in CASES:  # every case was killed mid-epoch, backed up mid-epoch
            backup = json.loads((crashed_out / case / "backup" / "backup.json").read_text())
            assert (backup["epoch"], backup["batch"]) == (KILL_AFTER[0], BACKED_UP), case
            assert not (crashed_out / case / "final.npz").exists()

        restarted = start(command, tmp_path / "restarted.log")  # the same command
        processes.append(restarted)
        finish(restarted)
        finish(reference)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    for case in CASES:
        (expected,) = case_runs(reference_out / case)
        (resumed,) = case_runs(crashed_out / case)  # the killed process wrote none
        # The resumed epoch's callbacks start at the first batch not backed up,
        # with its real number; every batch's running means are the reference's.
        first = resumed["batches"][0][:2]
        assert first == [KILL_AFTER[0], BACKED_UP], case
        reference_batches = {(e, b): logs for e, b, logs in expected["batches"]}
        assert len(resumed["batches"]) == len(reference_batches) - 8 - BACKED_UP, case
        for epoch, batch, logs in resumed["batches"]:
            assert logs == reference_batches[epoch, batch], (case, epoch, batch)
        assert sorted(resumed["epochs"]) == ["1", "2"], case
        for epoch, logs in resumed["epochs"].items():
            assert logs == expected["epochs"][epoch], (case, epoch)
        final = np.load(crashed_out / case / "final.npz")
        reference_final = np.load(reference_out / case / "final.npz")
        assert sorted(final.files) == sorted(reference_final.files)
        for key in reference_final.files:
            np.testing.assert_array_equal(final[key], reference_final[key],
                                          err_msg=f"{case}: {key}")
        assert not (crashed_out / case / "backup").exists()
