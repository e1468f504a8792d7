"""Run as a script: trains the same model with CustomModel and keras.Model on
the same global batches of 64, either in one JAX process or as one of two
processes under keras.distribution.DataParallel, and prints what
tests/jax_backend/test_two_processes.py compares, as JSON.

    two_processes.py one                     # one process: on one device, then
                                             # DataParallel over two CPU devices
    two_processes.py process COORDINATOR ID  # process ID (0 or 1) of two, one
                                             # CPU device each, DataParallel

Each of the two processes feeds its half of every global batch (rows 0-31 of
each batch of 64 to process 0, rows 32-63 to process 1), as
`auto_shard_dataset=False` asks; Keras assembles the global batch from both.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
# Two CPU devices in one process; one in each of two.
DEVICES = 2 if sys.argv[1] == "one" else 1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

import jax  # noqa: E402
import keras  # noqa: E402
from keras import ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import customfit  # noqa: E402

GLOBAL_BATCH = 64


class Logged(customfit.CustomModel):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        self.log("twice_loss", 2.0 * loss, weight=ops.shape(x)[0])
        self.log("batch_rows", ops.shape(x)[0])  # the global batch's
        return loss


def build(base):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    hidden = keras.layers.Dropout(0.2)(hidden)
    hidden = keras.layers.BatchNormalization()(hidden)
    return base(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


def local(array, process, processes):
    """This process's part of each global batch."""
    if processes == 1:
        return array
    per_process = GLOBAL_BATCH // processes
    batches = array.reshape(-1, processes, per_process, *array.shape[1:])
    return batches[:, process].reshape(-1, *array.shape[1:])


def train(base, process, processes):
    keras.utils.set_random_seed(1)
    model = build(base)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    data = load_digits()
    x = (data.data[:512] / 16.0).astype("float32")
    y = data.target[:512].astype("int32")
    x, y = local(x, process, processes), local(y, process, processes)
    split = 384 // processes
    batch_size = GLOBAL_BATCH // processes
    history = model.fit(x[:split], y[:split], batch_size=batch_size, epochs=3, shuffle=False,
                        validation_data=(x[split:], y[split:]), verbose=0)
    return {
        "history": history.history,
        "weights": [w.tolist() for w in model.get_weights()],
        "optimizer": [ops.convert_to_numpy(v).tolist() for v in model.optimizer.variables],
        "evaluate": model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True),
        "kernel_sharding": str(model.layers[1].kernel.value.sharding),
    }


def one_process():
    # Without a distribution, Keras places everything on the first device.
    one_device = {"custom": train(customfit.CustomModel, 0, 1),
                  "stock": train(keras.Model, 0, 1)}
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    return {
        "devices": len(jax.devices()),
        "one_device": one_device,
        "two_devices": {"custom": train(customfit.CustomModel, 0, 1),
                        "stock": train(keras.Model, 0, 1)},
    }


def one_of_two_processes(coordinator, process):
    # Cross-process collectives on CPU: gloo (JAX's default since 0.5.1,
    # named here all the same).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(job_addresses=coordinator, num_processes=2,
                                  process_id=process)
    # Each process passes its own part of the data: not sharded again.
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False))
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "custom": train(customfit.CustomModel, process, 2),
        "stock": train(keras.Model, process, 2),
        "logged": train(Logged, process, 2),
    }


if __name__ == "__main__":
    if sys.argv[1] == "one":
        result = one_process()
    else:
        result = one_of_two_processes(sys.argv[2], int(sys.argv[3]))
    # The last line (gloo prints to stdout when it connects).
    print(json.dumps(result))
    sys.stdout.flush()
