"""A run with customfit's BackupAndRestore, on whichever backend
KERAS_BACKEND names, written with `keras.ops` only.

    python tests/scripts/backend_neutral_training.py OUT [--pause-once-at EPOCH:BATCH]

Run it again with the same command after a kill and it resumes. It writes
OUT/final.npz (weights and optimizer variables at the end) and
OUT/run-<pid>.json (the epochs this process trained, their logs, and the
batches it trained). With --pause-once-at, the first process to reach that
batch writes OUT/paused and sleeps until it is killed.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import customfit  # noqa: E402
from customfit.callbacks import BackupAndRestore  # noqa: E402
from customfit.pytest_plugin import deterministic  # noqa: E402

EPOCHS = 3
SAVE_FREQ = 5  # batches: the backups fall mid-epoch


class Logged(customfit.CustomModel):
    def transform_gradients(self, gradients, variables):
        self.log("grad_norm", ops.sqrt(sum(ops.sum(ops.square(g)) for g in gradients)))
        return gradients


class Record(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.batches, self.epoch = {}, [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append([self.epoch, batch])

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = {k: float(v) for k, v in logs.items()}


class PauseOnce(keras.callbacks.Callback):
    def __init__(self, out, at):
        super().__init__()
        self.marker, self.at, self.epoch = os.path.join(out, "paused"), at, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(f"{self.epoch}:{batch}\n")
            while True:  # until the test kills the process
                time.sleep(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--pause-once-at", default=None)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    deterministic(5)
    data = load_digits()
    x, y = (data.data[:640] / 16.0).astype("float32"), data.target[:640].astype("int32")

    inputs = keras.Input((64,))
    hidden = keras.layers.Dropout(0.3)(keras.layers.Dense(32, activation="relu")(inputs))
    model = Logged(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    model.compile(keras.optimizers.SGD(0.3, momentum=0.9), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    record = Record()
    callbacks = [BackupAndRestore(os.path.join(args.out, "backup"), save_freq=SAVE_FREQ), record]
    if args.pause_once_at:
        callbacks.append(PauseOnce(args.out, tuple(map(int, args.pause_once_at.split(":")))))
    model.fit(x, y, batch_size=32, epochs=EPOCHS, validation_split=0.2, callbacks=callbacks,
              verbose=0)
    with open(os.path.join(args.out, f"run-{os.getpid()}.json"), "w") as f:
        json.dump({"epochs": record.epochs, "batches": record.batches}, f)
    np.savez(os.path.join(args.out, "final.npz"),
             **{f"weight_{i}": w for i, w in enumerate(model.get_weights())},
             **{f"optimizer_{i}": np.asarray(v.value) for i, v in
                enumerate(model.optimizer.variables)})


if __name__ == "__main__":
    main()
