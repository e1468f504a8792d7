"""Run as a script (two CPU devices, set before JAX starts): trains the same
model with keras.Model and CustomModel under keras.distribution.DataParallel
and prints what the test compares, as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
from keras import ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import customfit  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
from tests.jax_backend import models  # noqa: E402


class Logged(customfit.CustomModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_optimizer = keras.optimizers.Adam(1e-2)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        self.log("twice_loss", 2.0 * loss, weight=ops.shape(x)[0])
        return loss

    def apply_gradients(self, gradients, variables):
        head = len(self.layers[-1].trainable_weights)
        super().apply_gradients(gradients[:-head], variables[:-head])
        self.head_optimizer.apply(gradients[-head:], variables[-head:])


def train(base):
    keras.utils.set_random_seed(1)
    model = models.mlp(base, batchnorm=True)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    data = load_digits()
    x = (data.data[:512] / 16.0).astype("float32")
    y = data.target[:512].astype("int32")
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0, validation_split=0.25)
    return {
        "history": history.history,
        "weights": [w.tolist() for w in model.get_weights()],
        "evaluate": model.evaluate(x, y, verbose=0, return_dict=True),
        "kernel_sharding": str(model.layers[1].kernel.value.sharding),
    }


keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
print(json.dumps({
    "devices": len(jax.devices()),
    "stock": train(keras.Model),
    "custom": train(customfit.CustomModel),
    "logged": train(Logged),
}))
