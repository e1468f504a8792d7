"""Training runs backed up every few batches, for a kill at any batch.

    python tests/scripts/resumable_mid_epoch.py OUT [--pause-once-at EPOCH:BATCH]

Runs three cases, each a fresh model with Dropout, a `log`ged column and
momentum SGD, backed up by `BackupAndRestore(save_freq=3)`: NumPy arrays with
`shuffle=True` and a `tf.data` pipeline with `shuffle(...,
reshuffle_each_iteration=True)` on one device, and the pipeline on two
replicas (`MirroredStrategy` on two logical CPUs: distributed iterators and
per-replica metrics). Run it again with the same command
after a kill and every case resumes from its backup. Per case, it writes in
OUT/<case>: `final.npz` (variables and optimizer variables at the end) and
`run-<pid>.json` (this process's epoch logs and per-batch logs).

With --pause-once-at, the first process to get there stops every case at
that batch: at the end of that batch of the first case, the second case is
started inside it, and so on; the last one writes OUT/paused and sleeps, so
a test can kill the process with every case interrupted mid-epoch.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tests.subproc import TWO_CPUS  # noqa: E402

exec(TWO_CPUS)  # two logical CPUs, op determinism

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from customfit.callbacks import BackupAndRestore  # noqa: E402
from tests.scripts.resumable_training import AtBatch, Record, build  # noqa: E402

CASES = ["arrays", "dataset", "dataset-2-replicas"]
EPOCHS = 3
SAVE_FREQ = 3


def run_case(case, out, pause_at, then):
    """Trains one case; `then` runs at `pause_at` (the crashed run only)."""
    keras.utils.set_random_seed(5)
    directory = os.path.join(out, case)
    os.makedirs(directory, exist_ok=True)
    data = load_digits()
    x = (data.data[:256] / 16.0).astype("float32")
    y = data.target[:256].astype("int32")
    if case.startswith("arrays"):
        inputs = dict(x=x, y=y, batch_size=32, shuffle=True)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        inputs = dict(x=dataset.shuffle(256, seed=11, reshuffle_each_iteration=True).batch(32),
                      shuffle=False)
    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
                if case.endswith("replicas") else tf.distribute.get_strategy())
    with strategy.scope():
        model = build()
    record = Record()
    callbacks = [BackupAndRestore(os.path.join(directory, "backup"), save_freq=SAVE_FREQ),
                 record]
    if pause_at is not None:
        callbacks.append(AtBatch(pause_at, then))
    model.fit(**inputs, epochs=EPOCHS, verbose=0, callbacks=callbacks)

    state = {f"model/{i}": v.numpy() for i, v in enumerate(model.variables)}
    state.update({f"optimizer/{i}": v.numpy()
                  for i, v in enumerate(model.optimizer.variables)})
    np.savez(os.path.join(directory, "final.npz"), **state)
    with open(os.path.join(directory, f"run-{os.getpid()}.json"), "w") as f:
        json.dump({"epochs": record.epochs, "batches": record.batches}, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--pause-once-at", default=None)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    marker = os.path.join(args.out, "paused")
    pause_at = None
    if args.pause_once_at and not os.path.exists(marker):
        pause_at = tuple(map(int, args.pause_once_at.split(":")))

    def pause():
        with open(marker, "w") as f:
            f.write(args.pause_once_at)
        time.sleep(300)  # killed here by the test

    def case_chain(index):
        if index == len(CASES):
            return pause
        return lambda: run_case(CASES[index], args.out, pause_at, case_chain(index + 1))

    if pause_at is not None:
        case_chain(0)()  # never returns: paused inside the last case
    for case in CASES:
        run_case(case, args.out, None, None)


if __name__ == "__main__":
    main()
