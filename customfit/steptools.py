"""What a recipe's step is written with, on every backend.

A recipe is a `CustomModel` subclass that overrides the step's seams
(`compute_gradients`, `update_weights`, `transform_gradients`,
`apply_gradients`, `step_variables`) and calls `super()`. Inside them, code
written with `keras.ops` and the functions below runs unchanged on
TensorFlow (in a `tf.function`, under `tf.distribute`), on JAX (in a jitted,
stateless step) and on PyTorch. The built-in recipes are written the same
way; see the guide "Write your own recipe".

Example, a recipe that updates the weights every other batch only:

```python
from customfit import steptools

class EveryOtherBatch(customfit.CustomModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with steptools.state_scope(self):
            self.batches = keras.Variable(0, dtype="int", trainable=False)

    def step_variables(self):
        return [*super().step_variables(), self.batches]

    def update_weights(self, loss, gradients, variables):
        self.batches.assign_add(1)
        steptools.cond(self.batches.value % 2 == 0,
                       lambda: super(EveryOtherBatch, self).update_weights(
                           loss, gradients, variables),
                       lambda: None)
```
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal

import keras
import numpy as np

from customfit import _step
from customfit._backend import loop, replicas
from customfit._keras import internals
from customfit._model import StepGradients

__all__ = [
    "PerWeightState",
    "StepGradients",
    "cond",
    "forward",
    "loss",
    "loss_scale",
    "pass_state",
    "state_scope",
    "stateless_gradients",
    "summed_over_replicas",
    "unscaled",
]


def cond(predicate: Any, if_true: Callable[[], None], if_false: Callable[[], None]) -> None:
    """Runs `if_true()` or `if_false()`, as the boolean scalar `predicate`
    says; each may assign variables (the model's, the optimizer's, the
    recipe's own from `step_variables`) and returns nothing.

    `keras.ops.cond` cannot assign variables on JAX (the jitted step is
    stateless); this can, on every backend."""
    loop.cond(predicate, if_true, if_false)


def state_scope(model: keras.Model) -> AbstractContextManager:
    """Where a recipe creates the variables its step assigns: outside any
    traced function, in the model's `tf.distribute` strategy on TensorFlow."""
    return loop.state_scope(model)


def pass_state(model: keras.Model) -> Any:
    """The model's state now (non-trainable values, random-generator state),
    for a second pass over the same batch to read, through
    `stateless_gradients(..., state=...)`: take it before the first pass."""
    return loop.pass_state(model)


def stateless_gradients(
    function: Callable[[list], Any],
    sources: list,
    variables: list | None = None,
    state: Any = (),
) -> tuple[Any, list]:
    """`(function(sources), gradients of it w.r.t. sources)`, with
    `variables` (if given) reading `sources` as their values, the model
    reading `state` (from `pass_state`) if given, and whatever `function`
    assigns discarded: a second forward and backward pass that leaves the
    model as it was (`SAM`'s pass at perturbed weights; an attack on the
    inputs)."""
    return loop.stateless_gradients(function, sources, variables, state)


def forward(model: keras.Model, x: Any, training: bool) -> Any:
    """`model(x, training=training)` (without `training` for a model whose
    `call` takes none)."""
    return _step.forward(model, x, training)


def loss(
    model: keras.Model,
    x: Any,
    y: Any,
    y_pred: Any,
    sample_weight: Any = None,
    training: bool = True,
) -> Any:
    """`model.compute_loss(...)`, not added to the `loss` metric: for a
    second pass whose loss is not the step's."""
    return internals.compute_loss(
        model, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


def loss_scale(optimizer: Any) -> Any:
    """The loss scale of a `LossScaleOptimizer` (the factor `scale_loss`
    multiplies by), or None for any other optimizer (and for None)."""
    return internals.loss_scale_in_use(optimizer)


def unscaled(model: keras.Model, gradients: list) -> list:
    """Gradients of `model.optimizer.scale_loss(loss)` divided by the loss
    scale (unchanged without a `LossScaleOptimizer`), as the seams see them."""
    return _step.unscaled(model, gradients)


def summed_over_replicas(tensors: list) -> list:
    """Under `tf.distribute`, in a replica's step: each tensor summed over
    the replicas (one all-reduce), e.g. the gradient the optimizer will
    apply. Elsewhere (one device, JAX, PyTorch): the tensors as given."""
    return replicas.summed(tensors)


class PerWeightState:
    """A recipe's state of one variable per trainable weight and a counter:
    Lookahead's slow weights, an average of the weights.

    `build(model)` creates the variables, under `state_scope`, the first
    time and again (afresh) when the model's trainable weights changed;
    call it from `step_variables`, which runs before the first training
    step, and return `variables`. `save`/`load` keep them in the model's
    weights store (`.keras`, `.weights.h5`, `ModelCheckpoint`,
    `BackupAndRestore`) under keys starting with `name`.

    Attributes:
        name: The prefix of the variables' names and store keys.
        count: An integer variable, 0 when built (the recipe's counter);
            None until built.
        values: One variable per trainable weight, in their order, each
            a copy of the weight's value when built (`initial="weights"`) or
            zeros (`initial="zeros"`), with its shape and dtype.
    """

    def __init__(self, name: str, initial: Literal["weights", "zeros"] = "weights") -> None:
        self.name = name
        self.initial = initial
        self.count: Any = None
        self.values: list[keras.Variable] = []
        self._built_for: list[int] | None = None

    @property
    def variables(self) -> list[keras.Variable]:
        """`count` and `values`, for `step_variables` (empty until built)."""
        return [] if self.count is None else [self.count, *self.values]

    def build(self, model: keras.Model) -> PerWeightState:
        """Creates the variables for `model.trainable_weights` unless they
        exist for those weights already; returns `self`."""
        weights = model.trainable_weights
        if self._built_for == [id(w) for w in weights]:
            return self
        with state_scope(model):
            self.count = keras.Variable(0, dtype="int", trainable=False, name=f"{self.name}_count")
            self.values = [
                keras.Variable(
                    # A copy: on PyTorch a tensor would share the weight's storage.
                    np.array(keras.ops.convert_to_numpy(w.value))
                    if self.initial == "weights"
                    else "zeros",
                    shape=w.shape,
                    dtype=w.dtype,
                    trainable=False,
                    autocast=False,
                    name=f"{self.name}_{i}",
                )
                for i, w in enumerate(weights)
            ]
        self._built_for = [id(w) for w in weights]
        return self

    def save(self, store: Any) -> None:
        """Adds the variables to a `save_own_variables` store."""
        if self.count is None:
            return
        store[f"{self.name}_count"] = np.asarray(self.count.numpy())
        for i, value in enumerate(self.values):
            store[f"{self.name}_{i}"] = np.asarray(value.numpy())

    def load(self, model: keras.Model, store: Any) -> dict:
        """Loads the variables from a `load_own_variables` store (building
        them for `model` first) if it has them; returns the rest of the
        store, for `super().load_own_variables`."""
        ours = {f"{self.name}_count"} | {f"{self.name}_{i}" for i in range(len(store.keys()))}
        keys = list(store.keys())
        rest = {k: store[k] for k in keys if k not in ours}
        found = [k for k in keys if k in ours]
        if not found:
            return rest
        self.build(model)
        if len(found) != 1 + len(self.values):
            raise ValueError(
                f"The saved {self.name} state has {len(found) - 1} values but the "
                f"model has {len(self.values)} trainable weights. Load it into "
                "the architecture it was saved from."
            )
        self.count.assign(store[f"{self.name}_count"])
        for i, value in enumerate(self.values):
            value.assign(store[f"{self.name}_{i}"])
        return rest
