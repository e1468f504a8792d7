"""`Lookahead` (Zhang et al., 2019): k fast updates, then one slow step.

Written with public names only (`customfit.CustomModel`, its seams and
`customfit.steptools`), as the guide "Write your own recipe" shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

from customfit import CustomModel, steptools


@keras.saving.register_keras_serializable(package="customfit")
class Lookahead(CustomModel):
    """Lookahead: the optimizer updates the "fast" weights; after every
    `sync_period` updates the "slow" weights move toward them,

        slow <- slow + slow_step_size * (fast - slow),    fast <- slow,

    and training goes on from there. The slow weights start as the weights
    when training starts.

    **When it runs.** In `apply_gradients`, after the optimizer's update,
    so it counts updates, not batches: with `GradientAccumulation`, one per
    `accumulation_steps` micro-batches; with `SkipNonFinite`, skipped steps
    do not count; clipping recipes clip the gradient the fast update uses.
    (Under mixed precision a step the `LossScaleOptimizer` skips for an
    overflow still counts.) After training, the model holds the fast
    weights; they equal the slow ones right after a synchronisation, e.g.
    with `steps_per_epoch` a multiple of `sync_period`.

    **`tf.distribute`.** It runs on every replica, on the mirrored weights
    the optimizer has just updated, so the replicas stay equal: two
    replicas train as one device (tested within float32 rounding).

    **State.** The update counter and the slow weights (`slow_weights`)
    are created before the first training step, saved and loaded with the
    model (`.keras`, `.weights.h5`, `BackupAndRestore`).

    Args:
        sync_period: `k`, optimizer updates between synchronisations, `>= 1`.
        slow_step_size: `alpha`, in `[0, 1]` (the paper uses 0.5).

    Example:

    ```python
    model = customfit.recipes.Lookahead(inputs, outputs, sync_period=5,
                                        slow_step_size=0.5)
    ```
    """

    def __init__(
        self, *args: Any, sync_period: int = 5, slow_step_size: float = 0.5, **kwargs: Any
    ) -> None:
        if not isinstance(sync_period, int) or isinstance(sync_period, bool) or sync_period < 1:
            raise ValueError(
                f"Lookahead: sync_period must be an integer >= 1; got {sync_period!r}. "
                "Pass e.g. sync_period=5."
            )
        if not isinstance(slow_step_size, (int, float)) or not 0 <= slow_step_size <= 1:
            raise ValueError(
                "Lookahead: slow_step_size must be a number in [0, 1]; got "
                f"{slow_step_size!r}. Pass e.g. slow_step_size=0.5."
            )
        super().__init__(*args, **kwargs)
        self.sync_period = sync_period
        self.slow_step_size = slow_step_size
        # Not tracked by Keras (a built model's state is locked): saved below.
        object.__setattr__(self, "_slow", steptools.PerWeightState("lookahead"))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(sync_period=self.sync_period, slow_step_size=self.slow_step_size)
        return config

    @property
    def slow_weights(self) -> list[keras.Variable]:
        """The slow weights, one per trainable weight (empty before the
        first training step)."""
        return list(self._slow.values)

    def step_variables(self) -> list[keras.Variable]:
        return [*super().step_variables(), *self._slow.build(self).variables]

    def apply_gradients(
        self, gradients: Sequence[Any], variables: Sequence[keras.Variable]
    ) -> None:
        super().apply_gradients(gradients, variables)
        slow = self._slow.build(self)
        slow.count.assign_add(1)
        alpha = self.slow_step_size

        def synchronise() -> None:
            for slow_weight, fast_weight in zip(slow.values, self.trainable_weights):
                moved = slow_weight.value + alpha * (fast_weight.value - slow_weight.value)
                slow_weight.assign(moved)
                fast_weight.assign(moved)

        steptools.cond(slow.count.value % self.sync_period == 0, synchronise, lambda: None)

    def save_own_variables(self, store: Any) -> None:
        super().save_own_variables(store)
        self._slow.save(store)

    def load_own_variables(self, store: Any) -> None:
        super().load_own_variables(self._slow.load(self, store))
