"""The compute-only limit on JAX: the step's maths alone, the whole epoch
in one jitted `jax.lax.scan` over its batches: the model's
`stateless_call` differentiated by `jax.value_and_grad`, the optimizer's
`stateless_apply`; no metrics, no logs, no callbacks. The batches are on
the device before the epoch starts (no data pipeline)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from models import MODELS


def prepare(model_name: str, x: np.ndarray, y: np.ndarray, batch_size: int) -> Callable[[], None]:
    """One epoch of the limit over `(x, y)` in batches of `batch_size`."""
    model = MODELS[model_name](keras.Model)
    optimizer = keras.optimizers.RMSprop(1e-3)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    steps = len(x) // batch_size
    xs = jnp.asarray(x[: steps * batch_size].reshape(steps, batch_size, *x.shape[1:]))
    ys = jnp.asarray(y[: steps * batch_size].reshape(steps, batch_size, *y.shape[1:]))

    def loss(trainable: list, non_trainable: list, x: Any, y: Any) -> tuple[Any, list]:
        y_pred, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, y_pred), non_trainable

    def step(state: tuple, batch: tuple) -> tuple[tuple, Any]:
        trainable, non_trainable, optimizer_values = state
        (value, non_trainable), grads = jax.value_and_grad(loss, has_aux=True)(
            trainable, non_trainable, *batch
        )
        trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
        return (trainable, non_trainable, optimizer_values), value

    @partial(jax.jit, donate_argnums=0)
    def epoch(state: tuple, xs: Any, ys: Any) -> tuple[tuple, Any]:
        state, losses = jax.lax.scan(step, state, (xs, ys))
        return state, losses[-1]

    state = tuple(
        [jnp.array(v.value) for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables,
                          optimizer.variables)
    )

    def run() -> None:
        nonlocal state
        state, last_loss = epoch(state, xs, ys)
        float(last_loss)  # wait for the epoch, as fit's logs do

    return run
