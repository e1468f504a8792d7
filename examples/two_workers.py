"""Train a CustomModel on the bundled digits with two workers.

Run one process per worker, each with its own TF_CONFIG (see README, "Scaling
out"). Each worker prints its History and evaluation; both print the same.
With --backup-dir (a directory both workers can reach), a job whose worker
died is resumed by starting every worker again with the same command.
"""

import argparse
import json
import os

import tensorflow as tf

# The strategy must exist before any other TensorFlow work in the process.
# A worker whose peer is gone fails its collectives after 60 s instead of
# waiting for ever (a peer process that dies on the same network is noticed
# at once).
strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=60))

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import customfit  # noqa: E402


class ClippedMLP(customfit.CustomModel):
    def transform_gradients(self, gradients, variables):
        clipped, norm = tf.clip_by_global_norm(gradients, 1.0)
        self.log("grad_norm", norm)  # per replica, averaged over all replicas
        return clipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--backup-dir", help="back up every 4 batches there, and "
                        "resume from it when started again")
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype("int32"), test_size=0.25, random_state=0)

    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((64,))
        hidden = keras.layers.Dense(64, activation="relu")(inputs)
        model = ClippedMLP(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = []
    if args.backup_dir:
        callbacks.append(customfit.callbacks.BackupAndRestore(args.backup_dir, save_freq=4))
    # The global batch: each of the two workers computes half of it.
    history = model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=0,
                        callbacks=callbacks)
    evaluation = model.evaluate(x_test, y_test, batch_size=64, verbose=0, return_dict=True)
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    print(json.dumps({
        "worker": task.get("index", 0),
        "replicas": strategy.num_replicas_in_sync,
        "history": {k: [round(v, 4) for v in vs] for k, vs in history.history.items()},
        "test": {k: round(v, 4) for k, v in evaluation.items()},
    }))


if __name__ == "__main__":
    main()
