"""Gradient clipping by global norm, and adaptive gradient clipping (AGC)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from customfit import steptools
from customfit._model import CustomModel
from customfit.recipes import _options as options


@keras.saving.register_keras_serializable(package="customfit")
class GlobalNormClipping(CustomModel):
    """Clips the gradients by their global norm and logs the norm.

    In `transform_gradients` (once per update): if the global L2 norm of all
    gradients exceeds `clip_norm`, all are scaled by `clip_norm / norm`, as
    `tf.clip_by_global_norm` does (written with `keras.ops`: it runs on
    TensorFlow and JAX). The norm before clipping is logged with
    `self.log(log_name, norm)`: a column in `History`, the progress bar and
    TensorBoard, averaged over the epoch.

    **Per replica.** Under `tf.distribute`, `transform_gradients` sees each
    replica's share; the norms that decide the clipping are those of the
    replicas' sum (one all-reduce), the gradient the optimizer will apply, so
    two replicas clip exactly as one device does. (Keras' own `clipnorm`,
    `global_clipnorm` clip each replica's share before summing.)

    **Composition.** The recipe transforms the gradients, then passes them to
    `super().transform_gradients`: bases listed to its right (another
    clipping recipe) see the clipped gradients, and a `transform_gradients`
    of the user's own class that calls `super()` gets them back clipped.
    With `GradientAccumulation` it clips the accumulated gradient; with `SAM`
    the SAM gradient. With both clipping recipes, the one listed first
    clips first, and only it logs (the norm before any clipping).

    Args:
        clip_norm: The largest global norm, `> 0`.
        log_name: The logged column of the norm before clipping.

    Example:

    ```python
    model = customfit.recipes.GlobalNormClipping(inputs, outputs, clip_norm=1.0)
    model.fit(x, y).history["grad_norm"]
    ```
    """

    def __init__(
        self, *args: Any, clip_norm: float = 1.0, log_name: str = "grad_norm", **kwargs: Any
    ) -> None:
        clip_norm = options.number("GlobalNormClipping", "clip_norm", clip_norm, inclusive=False)
        log_name = options.log_name("GlobalNormClipping", log_name)
        super().__init__(*args, **kwargs)
        self.clip_norm = clip_norm
        self.log_name = log_name

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(clip_norm=self.clip_norm, log_name=self.log_name)
        return config

    def transform_gradients(self, gradients: list, variables: list) -> list:
        norm = global_norm(steptools.summed_over_replicas(gradients))
        if _logs_norm(self, GlobalNormClipping):
            self.log(self.log_name, norm)
        # As tf.clip_by_global_norm scales: 1 while the norm is within bounds.
        scale = self.clip_norm * ops.minimum(1.0 / norm, 1.0 / self.clip_norm)
        clipped = [None if g is None else g * ops.cast(scale, g.dtype) for g in gradients]
        return super().transform_gradients(clipped, variables)


@keras.saving.register_keras_serializable(package="customfit")
class AdaptiveGradientClipping(CustomModel):
    """Adaptive gradient clipping (AGC, Brock et al., 2021), unit-wise.

    In `transform_gradients` (once per update), for every unit `u` of every
    variable `W` with gradient `G`:

        if ||G_u|| > clip_factor * max(||W_u||, unit_epsilon):
            G_u <- G_u * clip_factor * max(||W_u||, unit_epsilon) / max(||G_u||, 1e-6)

    A unit is one output unit: the norm runs over all axes but the last
    (Keras' `Dense` kernels are `(in, out)`, convolution kernels
    `(..., in, out)`); for scalars and vectors (biases, BatchNormalization
    scales) each element is a unit, as in the paper's code. The paper does
    not clip the final classifier layer; this recipe clips every trainable
    variable. The global norm before clipping is logged with
    `self.log(log_name, norm)`.

    **Per replica.** Under `tf.distribute`, `transform_gradients` sees each
    replica's share; the norms that decide the clipping are those of the
    replicas' sum (one all-reduce), the gradient the optimizer will apply, so
    two replicas clip exactly as one device does. (Keras' own `clipnorm`,
    `global_clipnorm` clip each replica's share before summing.)

    **Composition.** The recipe transforms the gradients, then passes them to
    `super().transform_gradients`: bases listed to its right (another
    clipping recipe) see the clipped gradients, and a `transform_gradients`
    of the user's own class that calls `super()` gets them back clipped.
    With `GradientAccumulation` it clips the accumulated gradient; with `SAM`
    the SAM gradient. With both clipping recipes, the one listed first
    clips first, and only it logs (the norm before any clipping).

    Args:
        clip_factor: `lambda > 0`, the largest ratio of gradient norm to
            weight norm per unit (the paper uses 0.01 to 0.16, smaller for
            larger batches).
        unit_epsilon: The smallest weight norm used, `> 0`, so that units
            initialized at zero (biases) can move.
        log_name: The logged column of the global norm before clipping.

    Example:

    ```python
    model = customfit.recipes.AdaptiveGradientClipping(inputs, outputs,
                                                       clip_factor=0.01)
    ```
    """

    def __init__(
        self,
        *args: Any,
        clip_factor: float = 0.01,
        unit_epsilon: float = 1e-3,
        log_name: str = "grad_norm",
        **kwargs: Any,
    ) -> None:
        recipe = "AdaptiveGradientClipping"
        clip_factor = options.number(recipe, "clip_factor", clip_factor, inclusive=False)
        unit_epsilon = options.number(recipe, "unit_epsilon", unit_epsilon, inclusive=False)
        log_name = options.log_name(recipe, log_name)
        super().__init__(*args, **kwargs)
        self.clip_factor = clip_factor
        self.unit_epsilon = unit_epsilon
        self.log_name = log_name

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            clip_factor=self.clip_factor, unit_epsilon=self.unit_epsilon, log_name=self.log_name
        )
        return config

    def transform_gradients(self, gradients: list, variables: list) -> list:
        totals = steptools.summed_over_replicas(gradients)
        if _logs_norm(self, AdaptiveGradientClipping):
            self.log(self.log_name, global_norm(totals))
        clipped = [
            None if g is None else g * self._unit_factor(total, variable)
            for g, total, variable in zip(gradients, totals, variables)
        ]
        return super().transform_gradients(clipped, variables)

    def _unit_factor(self, total: Any, variable: Any) -> Any:
        """Per unit: 1, or the factor that brings `||G_u||` down to the bound."""
        weight = ops.cast(variable.value, total.dtype)
        max_norm = self.clip_factor * ops.maximum(unitwise_norm(weight), self.unit_epsilon)
        grad_norm = unitwise_norm(total)
        factor = max_norm / ops.maximum(grad_norm, 1e-6)
        return ops.where(grad_norm > max_norm, factor, ops.ones_like(factor))


def global_norm(gradients: list) -> Any:
    """The L2 norm of all gradients together (None ones left out)."""
    return ops.sqrt(sum(ops.sum(ops.square(g)) for g in gradients if g is not None))


def unitwise_norm(x: Any) -> Any:
    """L2 norm per output unit (all axes but the last), broadcastable to `x`;
    the absolute value for scalars and vectors."""
    if len(x.shape) <= 1:
        return ops.abs(x)
    axes = tuple(range(len(x.shape) - 1))
    return ops.sqrt(ops.sum(ops.square(x), axis=axes, keepdims=True))


def _logs_norm(model: CustomModel, recipe: type) -> bool:
    """Whether `recipe` is the leftmost clipping recipe of `model`'s class:
    with both, only it logs (`log_name` is one option, one column: the
    norm before any clipping)."""
    for cls in type(model).__mro__:
        if cls in (GlobalNormClipping, AdaptiveGradientClipping):
            return cls is recipe
    return False
