"""The compute-only limit on TensorFlow: the step's maths alone, the whole
epoch in one `tf.function` (no metrics, no logs, no callbacks), the
`compute_only` variant of `variants.py`, over the same data as `fit`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf
from variants import variants


def prepare(model_name: str, x: np.ndarray, y: np.ndarray, batch_size: int) -> Callable[[], None]:
    """One epoch of the limit over `(x, y)` in batches of `batch_size`,
    the data cached in memory as `fit`'s own pipeline would hold it."""
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()
    return variants(1)["compute_only"][1](model_name, data)
