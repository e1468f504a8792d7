"""One worker of a two-worker training run backed up mid-epoch to a shared
directory, for a kill at any batch.

    TF_CONFIG=... python tests/scripts/two_workers_backed_up.py OUT [--kill-at EPOCH:BATCH] [--signal TERM]

Both workers are started with the same command (their `TF_CONFIG` differs).
They train a model with Dropout, a `log`ged column and momentum SGD on a
reshuffling `tf.data` pipeline, with `BackupAndRestore(OUT/backup,
save_freq=2)` and a `ModelCheckpoint(save_best_only=True)` writing to OUT,
as on a shared file system. Each worker writes OUT/worker-<index>/final.npz
(variables and optimizer variables at the end) and run-<pid>.json (its epoch
and per-batch logs).

With --kill-at, worker 1 kills itself with SIGKILL at the end of that batch
(with --signal TERM: sends itself SIGTERM there, and SIGKILL one batch later,
as a preempted VM gets them), unless OUT/killed exists (it writes it first):
run the same command again to resume.
"""

import argparse
import json
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

# A worker whose peer died fails its collectives after this long instead of
# waiting for ever.
strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=60))
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from customfit.callbacks import BackupAndRestore, ModelCheckpoint  # noqa: E402
from tests.scripts.resumable_training import AtBatch, Record, build  # noqa: E402

EPOCHS = 3
SAVE_FREQ = 2


def kill_marked(marker, at):
    """Leaves `marker` (so that the restarted worker is not killed again) and
    kills this process with SIGKILL."""
    with open(marker, "w") as f:
        f.write("{}:{}".format(*at))
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    args = parser.parse_args()
    worker = strategy.cluster_resolver.task_id
    directory = os.path.join(args.out, f"worker-{worker}")
    os.makedirs(directory, exist_ok=True)

    keras.utils.set_random_seed(5)
    data = load_digits()
    x = (data.data[:256] / 16.0).astype("float32")
    y = data.target[:256].astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(
        256, seed=11, reshuffle_each_iteration=True).batch(32)
    with strategy.scope():
        model = build()
    record = Record()
    callbacks = [
        BackupAndRestore(os.path.join(args.out, "backup"), save_freq=SAVE_FREQ),
        ModelCheckpoint(os.path.join(args.out, "best.weights.h5"), monitor="loss",
                        save_best_only=True, save_weights_only=True),
        record,
    ]
    marker = os.path.join(args.out, "killed")
    if args.kill_at and worker == 1 and not os.path.exists(marker):
        at = tuple(map(int, args.kill_at.split(":")))
        if args.signal == "TERM":
            callbacks.append(AtBatch(at, lambda: os.kill(os.getpid(), signal.SIGTERM)))
            at = (at[0], at[1] + 1)
        callbacks.append(AtBatch(at, lambda: kill_marked(marker, at)))
    model.fit(dataset, epochs=EPOCHS, verbose=0, shuffle=False, callbacks=callbacks)

    state = {f"model/{i}": v.numpy() for i, v in enumerate(model.variables)}
    state.update({f"optimizer/{i}": v.numpy()
                  for i, v in enumerate(model.optimizer.variables)})
    np.savez(os.path.join(directory, "final.npz"), **state)
    with open(os.path.join(directory, f"run-{os.getpid()}.json"), "w") as f:
        json.dump({"epochs": record.epochs, "batches": record.batches}, f)


if __name__ == "__main__":
    main()
