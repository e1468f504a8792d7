"""Run as a script: one of two JAX processes training with customfit's
BackupAndRestore(save_freq=3) into a directory both share, as
tests/jax_backend/test_two_processes_resume.py needs.

    two_processes_backed_up.py OUT COORDINATOR ID [--kill-at EPOCH:BATCH] [--victim V]
                               [--numpy-seed-per-process]

Both processes run the same command but for ID (0 or 1); the setup is
two_processes.py's (one CPU device each, gloo collectives,
`DataParallel(auto_shard_dataset=False)`, each process feeding its half of
every global batch of 64). The model has `Dropout`, `BatchNormalization`
and a `log`ged column; Adam; `shuffle=True` (Keras shuffles with NumPy's
global random state, which a backup records); validation each epoch.

Each process writes OUT/process-<ID>/final.npz (variables and optimizer
variables at the end) and OUT/process-<ID>/run-<pid>.json (the epochs it
trained, with their logs, and each batch it trained, with its logs).

With --kill-at, process V (default 1) kills itself with SIGKILL at the end
of that batch, unless OUT/killed exists (it writes it first, with its pid):
run the same command again to resume from the last backup.

With --numpy-seed-per-process, each process seeds NumPy (and so its
shuffling of its own part) with a seed of its own after Keras' seed.
"""

import argparse
import json
import os
import signal

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from two_processes import GLOBAL_BATCH, Logged, build, local  # noqa: E402

from customfit.callbacks import BackupAndRestore  # noqa: E402

EPOCHS = 3
SAVE_FREQ = 3  # batches: each epoch of 6 is backed up after its batch 3


class Record(keras.callbacks.Callback):
    """The epoch logs and every trained batch's logs of one `fit`."""

    def __init__(self):
        super().__init__()
        self.epochs, self.batches, self.epoch = {}, [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append([self.epoch, batch, {k: float(v) for k, v in logs.items()}])

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = {k: float(v) for k, v in logs.items()}


class KillAt(keras.callbacks.Callback):
    """SIGKILL to this process at the end of batch `at = (epoch, batch)`,
    after leaving `marker` (so that the restarted process trains on)."""

    def __init__(self, at, marker):
        super().__init__()
        self.at, self.marker, self.epoch = at, marker, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            with open(self.marker, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("coordinator")
    parser.add_argument("process", type=int)
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--victim", type=int, default=1)
    parser.add_argument("--numpy-seed-per-process", action="store_true")
    args = parser.parse_args()

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(job_addresses=args.coordinator, num_processes=2,
                                  process_id=args.process)
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False))
    directory = os.path.join(args.out, f"process-{args.process}")
    os.makedirs(directory, exist_ok=True)

    keras.utils.set_random_seed(1)
    if args.numpy_seed_per_process:
        np.random.seed(100 + args.process)
    model = build(Logged)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    data = load_digits()
    x = (data.data[:512] / 16.0).astype("float32")
    y = data.target[:512].astype("int32")
    x, y = local(x, args.process, 2), local(y, args.process, 2)
    split = 384 // 2
    record = Record()
    callbacks = [BackupAndRestore(os.path.join(args.out, "backup"), save_freq=SAVE_FREQ),
                 record]
    marker = os.path.join(args.out, "killed")
    if args.kill_at and args.process == args.victim and not os.path.exists(marker):
        callbacks.append(KillAt(tuple(map(int, args.kill_at.split(":"))), marker))
    model.fit(x[:split], y[:split], batch_size=GLOBAL_BATCH // 2, epochs=EPOCHS, shuffle=True,
              validation_data=(x[split:], y[split:]), callbacks=callbacks, verbose=0)

    state = {f"model/{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    state.update({f"optimizer/{i}": ops.convert_to_numpy(v)
                  for i, v in enumerate(model.optimizer.variables)})
    np.savez(os.path.join(directory, "final.npz"), **state)
    with open(os.path.join(directory, f"run-{os.getpid()}.json"), "w") as f:
        json.dump({"epochs": record.epochs, "batches": record.batches}, f)
    print("done", flush=True)


if __name__ == "__main__":
    main()
