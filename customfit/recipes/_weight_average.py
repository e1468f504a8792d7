"""`WeightEMA`: an exponential moving average of the weights, evaluated and
predicted with.

Written with public names only (`customfit.CustomModel`, its seams and
`customfit.steptools`), as the guide "Write your own recipe" shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
from keras import ops

from customfit import CustomModel, steptools


@keras.saving.register_keras_serializable(package="customfit")
class WeightEMA(CustomModel):
    """Keeps an exponential moving average of the trainable weights, and
    evaluates and predicts with it.

    After each optimizer update, for every trainable weight `w`:

        average <- momentum * average + (1 - momentum) * w,

    except after the first update, which sets `average = w`: Keras'
    optimizer `use_ema=True, ema_momentum=momentum` computes the same
    average, bit for bit.

    **Where the average is used.** `evaluate`, `predict`,
    `test_on_batch`, `predict_on_batch`, and so the validation inside
    `fit`, run with the averages in the trainable weights (swapped in and
    back out, exactly); training always updates the model's own weights.
    This is what Keras gives with `use_ema=True` and its `SwapEMAWeights`
    callback, except that Keras then overwrites the weights with the average
    at the end of `fit`, and here the model keeps training its own weights
    in the next `fit`. `with model.averaged_weights():` swaps them in for
    other code (exporting, saving the averaged model).

    **When it runs.** In `apply_gradients`, after the optimizer's update:
    with `GradientAccumulation`, once per update; with `SkipNonFinite`, not
    on skipped steps; clipping recipes clip the gradient of the update it
    averages. (Under mixed precision a step the `LossScaleOptimizer` skips
    for an overflow is still averaged in.)

    **`tf.distribute`.** It runs on every replica, on the mirrored weights
    the optimizer has just updated, so the replicas stay equal: two
    replicas train as one device (tested within float32 rounding).

    **State.** The averages (`average_weights`, a copy of the weights until
    the first update) and an update counter, created before the first
    training step, saved and loaded with the model (`.keras`,
    `.weights.h5`, `ModelCheckpoint`, `BackupAndRestore`).

    Args:
        momentum: In `[0, 1)`; typically 0.99 to 0.9999.

    Example:

    ```python
    model = customfit.recipes.WeightEMA(inputs, outputs, momentum=0.99)
    model.fit(x, y, validation_data=(xv, yv))  # val_ columns: the average
    model.evaluate(xv, yv)                     # the average
    ```
    """

    def __init__(self, *args: Any, momentum: float = 0.99, **kwargs: Any) -> None:
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(
                f"WeightEMA: momentum must be a number in [0, 1); got {momentum!r}. "
                "Pass e.g. momentum=0.99."
            )
        super().__init__(*args, **kwargs)
        self.momentum = momentum
        # Not tracked by Keras (a built model's state is locked): saved below.
        object.__setattr__(self, "_average", steptools.PerWeightState("weight_ema"))

    def get_config(self) -> dict:
        config = super().get_config()
        config["momentum"] = self.momentum
        return config

    @property
    def average_weights(self) -> list[keras.Variable]:
        """The averages, one per trainable weight (empty before the first
        training step, evaluation or prediction)."""
        return list(self._average.values)

    def step_variables(self) -> list[keras.Variable]:
        return [*super().step_variables(), *self._average.build(self).variables]

    def apply_gradients(
        self, gradients: Sequence[Any], variables: Sequence[keras.Variable]
    ) -> None:
        super().apply_gradients(gradients, variables)
        average = self._average.build(self)
        # As Keras' optimizer computes it (`use_ema`): momentum 0 at first.
        not_first = ops.not_equal(average.count.value, 0)
        for mean, weight in zip(average.values, self.trainable_weights):
            momentum = ops.multiply(ops.cast(not_first, weight.dtype), self.momentum)
            mean.assign(
                ops.add(
                    ops.multiply(momentum, mean.value),
                    ops.multiply(ops.subtract(1, momentum), weight.value),
                )
            )
        average.count.assign_add(1)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside it, the trainable weights hold the averages; outside, the
        model's own weights again (both exactly)."""
        average = self._average.build(self)
        self._swap(average.values)
        try:
            yield
        finally:
            self._swap(average.values)

    def _swap(self, averages: list[keras.Variable]) -> None:
        for mean, weight in zip(averages, self.trainable_weights):
            own = ops.copy(weight.value)
            weight.assign(mean.value)
            mean.assign(own)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        with self.averaged_weights():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self.averaged_weights():
            return super().predict(*args, **kwargs)

    def test_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        with self.averaged_weights():
            return super().test_on_batch(*args, **kwargs)

    def predict_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        with self.averaged_weights():
            return super().predict_on_batch(*args, **kwargs)

    def save_own_variables(self, store: Any) -> None:
        super().save_own_variables(store)
        self._average.save(store)

    def load_own_variables(self, store: Any) -> None:
        super().load_own_variables(self._average.load(self, store))
