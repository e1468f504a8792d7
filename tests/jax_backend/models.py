"""Models for the JAX backend's tests, written with `keras.ops` only."""

import keras
import numpy as np
from keras import ops


def mlp(base, dropout=0.2, regularize=False, batchnorm=False):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(
        32, activation="relu", kernel_regularizer="l2" if regularize else None
    )(inputs)
    if dropout:
        hidden = keras.layers.Dropout(dropout)(hidden)
    if batchnorm:
        hidden = keras.layers.BatchNormalization()(hidden)
    return base(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


def subclassed(base):
    class Net(base):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(32, activation="relu")
            self.dropout = keras.layers.Dropout(0.1)
            self.out = keras.layers.Dense(10, activation="softmax")

        def call(self, x, training=False):
            hidden = self.dropout(self.hidden(x), training=training)
            self.add_loss(1e-3 * ops.mean(ops.square(hidden)))
            return self.out(hidden)

    return Net()


def multi_io(base):
    image = keras.Input((64,), name="image")
    extra = keras.Input((4,), name="extra")
    hidden = keras.layers.Dense(16, activation="relu")(
        keras.layers.Concatenate()([image, extra])
    )
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(hidden)
    size = keras.layers.Dense(1, name="size")(hidden)
    return base({"image": image, "extra": extra}, {"digit": digit, "size": size})


def multi_io_data(x, y):
    rng = np.random.default_rng(0)
    inputs = {"image": x, "extra": rng.normal(size=(len(x), 4)).astype("float32")}
    targets = {"digit": y, "size": x.sum(axis=1, keepdims=True) / 64.0}
    return inputs, targets
