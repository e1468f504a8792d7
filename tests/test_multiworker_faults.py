"""Two worker processes on localhost: one is killed with SIGKILL (or ended by
SIGTERM) mid-epoch, the other stops with an error that says to restart the
cluster, and the same command on both resumes exactly from the last complete
backup; the loop controls work across workers."""

import json
import signal

import h5py
import numpy as np
import pytest

from tests.subproc import ROOT, run_workers, start_workers

BACKED_UP = str(ROOT / "tests" / "scripts" / "two_workers_backed_up.py")


def final_state(out, worker):
    with np.load(out / f"worker-{worker}" / "final.npz") as saved:
        return {name: saved[name] for name in saved.files}


def runs(out, worker):
    """This worker's runs (one per process), in the order they started."""
    found = sorted((out / f"worker-{worker}").glob("run-*.json"),
                   key=lambda p: p.stat().st_mtime)
    return [json.loads(p.read_text()) for p in found]


def weights_in(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_worker_and_restarted_cluster_resume_exactly(tmp_path):
    """Equal to an uninterrupted two-worker run bit for bit: on CPU, with op
    determinism, the two workers' all-reduce adds in a fixed order, so two
    uninterrupted two-worker runs are equal too.

    The worker is preempted as a cloud VM is: SIGTERM at the end of batch 5
    of epoch 1, SIGKILL one batch later. MultiWorkerMirroredStrategy has
    TensorFlow catch SIGTERM in C++ (for
    `tf.distribute.experimental.PreemptionCheckpointHandler`), and
    BackupAndRestore leaves it so: a worker that stopped alone to back up
    would leave the others waiting in the step's collectives. The worker
    trains on, the backup after batch 6 included, until the SIGKILL, and
    the cluster resumes from that last complete backup, which every worker
    took part in."""
    uninterrupted, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    assert all(code == 0 for code, _, _ in start_workers([BACKED_UP, str(uninterrupted)]))
    backed_up_at = (1, 6)

    command = [BACKED_UP, str(crashed), "--kill-at", "1:5", "--signal", "TERM"]
    (code0, _, err0), (code1, _, _) = start_workers(command, timeout=150)
    assert code1 == -signal.SIGKILL
    # The survivor stops (no hang), saying what happened and what to do.
    assert code0 == 1
    assert "Worker 0 lost contact with the rest of the cluster" in err0
    assert "Restart every worker with the same command" in err0
    backup = json.loads((crashed / "backup" / "backup.json").read_text())
    assert (backup["epoch"], backup["batch"]) == backed_up_at
    # Only the chief's files: the other worker saves into private directories.
    assert sorted(p.name for p in crashed.iterdir()) == [
        "backup", "best.weights.h5", "best.weights.h5.best.json", "killed",
        "worker-0", "worker-1"]

    assert all(code == 0 for code, _, _ in start_workers(command))  # the same command
    for worker in (0, 1):
        expected, actual = final_state(uninterrupted, worker), final_state(crashed, worker)
        assert expected.keys() == actual.keys()
        for name in expected:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
        reference = runs(uninterrupted, worker)[0]
        resumed = runs(crashed, worker)[-1]
        assert sorted(resumed["epochs"]) == ["1", "2"]
        assert all(resumed["epochs"][e] == reference["epochs"][e] for e in resumed["epochs"])
        assert resumed["batches"] == [b for b in reference["batches"]
                                      if (b[0], b[1]) >= backed_up_at]
    best, expected_best = (weights_in(d / "best.weights.h5") for d in (crashed, uninterrupted))
    assert best.keys() == expected_best.keys()
    for name in best:
        np.testing.assert_array_equal(best[name], expected_best[name], err_msg=name)


@pytest.fixture(scope="module")
def loop_controls():
    script = (ROOT / "tests" / "scripts" / "two_workers_loop_controls.py").read_text()
    return [json.loads(out.split("RESULTS", 1)[1]) for out in run_workers(script)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_nan_on_one_workers_share_skips_on_both(loop_controls):
    for results in loop_controls:
        skipping, reference = results["skipping"], results["reference"]
        assert skipping["skipped"] == 1 and skipping["history"]["skipped_steps"] == [1]
        # As if that batch were absent, on both workers (weights and Adam's state).
        assert skipping["weights"] == reference["weights"]
        assert skipping["optimizer"] == reference["optimizer"]
    assert loop_controls[0]["skipping"] == loop_controls[1]["skipping"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_batch_reaches_callbacks_across_workers(loop_controls):
    for results in loop_controls:
        one, four = results["per_batch"]["1"], results["per_batch"]["4"]
        assert [b[:2] for b in four["batches"]] == [[e, b] for e in (0, 1) for b in range(6)]
        assert four == one  # every batch's logs, History, weights, optimizer


@pytest.mark.slow
@pytest.mark.multiprocess
def test_validation_every_n_batches_across_workers(loop_controls):
    for results in loop_controls:
        without, every = results["validation"]["None"], results["validation"]["3"]
        assert [b[1] for b in every["batches"] if "val_loss" in b[2]] == [2, 5]
        assert every["history"] == without["history"]  # training logs untouched
        assert every["weights"] == without["weights"]
    assert loop_controls[0]["validation"] == loop_controls[1]["validation"]
