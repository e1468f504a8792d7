"""The compute-only limit on PyTorch: the step's maths alone, eagerly, as
Keras' PyTorch trainer runs its step: per batch, the forward pass and the
loss, `torch.autograd.grad` over the trainable variables and the
optimizer's `apply` under `torch.no_grad()`; no metrics, no logs, no
callbacks. The batches are tensors before the epoch starts (no data
pipeline)."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import torch
from models import MODELS


def prepare(model_name: str, x: np.ndarray, y: np.ndarray, batch_size: int) -> Callable[[], None]:
    """One epoch of the limit over `(x, y)` in batches of `batch_size`."""
    model = MODELS[model_name](keras.Model)
    optimizer = keras.optimizers.RMSprop(1e-3)
    variables = model.trainable_variables
    optimizer.build(variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    steps = len(x) // batch_size
    batches = [
        (torch.from_numpy(x[i * batch_size:(i + 1) * batch_size]),
         torch.from_numpy(y[i * batch_size:(i + 1) * batch_size]))
        for i in range(steps)
    ]

    def run() -> None:
        for xb, yb in batches:
            loss = loss_fn(yb, model(xb, training=True))
            grads = torch.autograd.grad(loss, [v.value for v in variables])
            with torch.no_grad():
                optimizer.apply(grads, variables)
        float(loss.detach())  # as fit's logs read the last loss

    return run
