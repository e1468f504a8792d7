"""The benchmarked models, written with Keras APIs only, so that every
backend builds the same ones (`variants.py` on TensorFlow, `side_by_side.py`
on each backend)."""

from __future__ import annotations

import keras
import numpy as np

BATCH_SIZE = 32


def mlp(base: type, width: int = 512) -> keras.Model:
    """The 784-512-10 MLP with Dropout of the Keras-2 era tutorials."""
    inputs = keras.Input((784,))
    hidden = keras.layers.Dense(width, activation="relu")(inputs)
    hidden = keras.layers.Dropout(0.2)(hidden)
    return base(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


def cnn(base: type) -> keras.Model:
    """A small convnet on 28x28 images."""
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Conv2D(32, 3, activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Dropout(0.2)(keras.layers.Flatten()(h))
    return base(inputs, keras.layers.Dense(10, activation="softmax")(h))


MODELS = {"mlp": mlp, "cnn": cnn}


def arrays(
    model_name: str, steps: int, seed: int = 0, batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """`steps` batches of generated data shaped like MNIST, as NumPy arrays
    `(x, y)` (timing does not depend on pixel values; nothing is
    downloaded)."""
    rng = np.random.default_rng(seed)
    shape = (784,) if model_name == "mlp" else (28, 28, 1)
    x = rng.random((steps * batch_size, *shape), dtype=np.float32)
    y = rng.integers(0, 10, steps * batch_size).astype("int32")
    return x, y
