"""A training run that survives being killed: ModelCheckpoint + BackupAndRestore.

    python tests/scripts/resumable_training.py OUT [--pause-once-at EPOCH:BATCH]

Run it again with the same command after a kill or a SIGTERM and it
resumes. It writes, in OUT: `best.weights.h5` (best val_loss), `final.npz`
(weights, random-layer state and optimizer variables at the end) and
`run-<pid>.json` (the epochs this process trained and their logs, and the
batches it trained; also when `fit` stops on SIGTERM). With --pause-once-at,
the first process to reach that batch writes OUT/paused and waits for a
signal, so a test can kill it or send it SIGTERM there.
"""

import argparse
import json
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import customfit  # noqa: E402
from customfit.callbacks import BackupAndRestore, ModelCheckpoint  # noqa: E402

EPOCHS = 5


class Noisy(customfit.CustomModel):
    def transform_gradients(self, gradients, variables):
        self.log("grad_norm", tf.linalg.global_norm(gradients))
        return gradients


class Record(keras.callbacks.Callback):
    """The epoch logs and every batch's logs of one `fit`."""

    def __init__(self):
        super().__init__()
        self.epochs, self.batches, self.epoch = {}, [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append([self.epoch, batch, {k: float(v) for k, v in logs.items()}])

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = {k: float(v) for k, v in logs.items()}


def build():
    """Dropout, a `log`ged column, momentum SGD: what a resume must restore."""
    inputs = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    h = keras.layers.Dropout(0.3, name="dropout")(h)
    model = Noisy(inputs, keras.layers.Dense(10, activation="softmax", name="digit")(h))
    model.compile(keras.optimizers.SGD(0.3, momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class AtBatch(keras.callbacks.Callback):
    """At the end of batch `at = (epoch, batch)`: runs `then()` (a pause for
    a test to kill the process, a kill, the next case)."""

    def __init__(self, at, then):
        super().__init__()
        self.at, self.then, self.epoch = tuple(at), then, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.then()


def pause_once(out, epoch, batch):
    """An `AtBatch` that stops the process there, the first time only."""
    marker = os.path.join(out, "paused")

    def pause():
        if not os.path.exists(marker):
            # Python writes a byte to `wake` for each signal it handles, in
            # whichever thread the signal lands, also before the read below.
            woken, wake = os.pipe()
            os.set_blocking(wake, False)
            previous = signal.set_wakeup_fd(wake)
            with open(marker, "w") as f:
                f.write(f"{epoch}:{batch}\n")
            os.read(woken, 1)  # until the test's signal; after a SIGTERM, fit goes on
            signal.set_wakeup_fd(previous)
            os.close(woken)
            os.close(wake)

    return AtBatch((epoch, batch), pause)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--pause-once-at", default=None)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(5)
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")

    inputs = keras.Input((64,))
    h = keras.layers.Dense(32, activation="relu")(inputs)
    h = keras.layers.Dropout(0.3)(h)
    model = Noisy(inputs, keras.layers.Dense(10, activation="softmax")(h))
    model.compile(keras.optimizers.SGD(float(os.environ.get("LR", "0.8")), momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])

    record = Record()
    callbacks = [
        BackupAndRestore(os.path.join(args.out, "backup")),
        ModelCheckpoint(os.path.join(args.out, "best.weights.h5"), monitor="val_loss",
                        save_best_only=True, save_weights_only=True),
        record,
    ]
    if args.pause_once_at:
        epoch, batch = map(int, args.pause_once_at.split(":"))
        callbacks.append(pause_once(args.out, epoch, batch))
    try:
        model.fit(x[:512], y[:512], validation_data=(x[512:768], y[512:768]),
                  batch_size=64, epochs=EPOCHS, verbose=0, callbacks=callbacks)
    finally:
        with open(os.path.join(args.out, f"run-{os.getpid()}.json"), "w") as f:
            json.dump({"epochs": record.epochs,
                       "batches": [[e, b] for e, b, _ in record.batches]}, f)

    state = {f"model/{i}": v.numpy() for i, v in enumerate(model.variables)}
    state.update({f"optimizer/{i}": v.numpy()
                  for i, v in enumerate(model.optimizer.variables)})
    np.savez(os.path.join(args.out, "final.npz"), **state)


if __name__ == "__main__":
    main()
