"""Run as a script (four CPU devices, set before JAX starts): trains the same
model with keras.Model and CustomModel under keras.distribution.ModelParallel
(a 2x2 mesh, `batch` by `model`, variables laid out by a LayoutMap) and prints
what tests/jax_backend/test_model_parallel.py compares, as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import keras  # noqa: E402
from keras import ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import customfit  # noqa: E402

# Variable path (a regular expression, as LayoutMap reads it) -> the mesh
# axis each dimension is split over. The hidden layer is split by columns and
# the head by rows (its matmul sums over the split dimension); the head's
# bias, the BatchNormalization counters, the seed and everything else not
# named here are replicated.
LAYOUTS = {
    "hidden/kernel": (None, "model"),
    "hidden/bias": ("model",),
    "norm/(gamma|beta|moving_mean|moving_variance)": ("model",),
    "head/kernel": ("model", None),
}


def distribution():
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), devices=jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    for path, axes in LAYOUTS.items():
        layout_map[path] = axes
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def penalized(base):
    """`base` with compute_loss overridden: an L2 penalty on the (sharded)
    hidden kernel; on CustomModel also logged, with twice the loss."""

    class Penalized(base):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            loss = super().compute_loss(x, y, y_pred, sample_weight, training)
            penalty = 1e-3 * ops.sum(ops.square(self.get_layer("hidden").kernel))
            loss = loss + penalty
            if isinstance(self, customfit.CustomModel):
                self.log("penalty", penalty)
                self.log("twice_loss", 2.0 * loss, weight=ops.shape(x)[0])
            return loss

    return Penalized


def build(base):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    hidden = keras.layers.Dropout(0.2)(hidden)
    hidden = keras.layers.BatchNormalization(name="norm")(hidden)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(hidden)
    return base(inputs, outputs)


def spec(variable):
    """The variable's PartitionSpec as a list of axis names (None: not
    split), one entry per dimension."""
    axes = list(variable.value.sharding.spec)
    return axes + [None] * (len(variable.shape) - len(axes))


def train(base):
    keras.utils.set_random_seed(1)
    model = build(base)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    data = load_digits()
    x = (data.data[:512] / 16.0).astype("float32")
    y = data.target[:512].astype("int32")
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, validation_split=0.25)
    # The layouts right after fit, before evaluate and predict run.
    layouts = {
        # The seed generator's name differs from model to model: named by the layer.
        ("dropout/seed" if "seed_generator" in v.path else v.path): {
            "spec": spec(v),
            "mesh": dict(v.value.sharding.mesh.shape),
            "shards": sorted({tuple(s.data.shape) for s in v.value.addressable_shards}),
        }
        for v in model.variables
    }
    # Adam's moments of each trainable variable: their specs and its spec.
    moments = [
        [spec(momentum), spec(velocity), spec(variable)]
        for variable, momentum, velocity in zip(
            model.trainable_variables, model.optimizer._momentums, model.optimizer._velocities)
    ]
    return {
        "history": history.history,
        "weights": [w.tolist() for w in model.get_weights()],
        "optimizer": [ops.convert_to_numpy(v).tolist() for v in model.optimizer.variables],
        "evaluate": model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True),
        "predict": model.predict(x, batch_size=64, verbose=0).tolist(),
        "layouts": layouts,
        "moments": moments,
    }


if __name__ == "__main__":
    keras.distribution.set_distribution(distribution())
    print(json.dumps({
        "devices": len(jax.devices()),
        "layouts": LAYOUTS,
        "stock": train(keras.Model),
        "custom": train(customfit.CustomModel),
        "stock_penalized": train(penalized(keras.Model)),
        "penalized": train(penalized(customfit.CustomModel)),
    }))
    sys.stdout.flush()
