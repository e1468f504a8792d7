"""`GradientAccumulation`: k micro-batches, one update, as one k-times batch."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from customfit import _saving, steptools
from customfit._backend import replicas
from customfit._model import CustomModel, Tensor
from customfit.recipes import _options as options

_COUNT_KEY = "accumulation_count"
_SUM_KEY = "accumulation_{}"


@keras.saving.register_keras_serializable(package="customfit")
class GradientAccumulation(CustomModel):
    """Gradient accumulation: one optimizer update per `accumulation_steps`
    training batches ("micro-batches"), with their averaged gradient.

    Each micro-batch's unscaled gradient is added to an accumulator; on every
    `accumulation_steps`-th micro-batch the sum divided by
    `accumulation_steps` goes through `transform_gradients` and
    `apply_gradients` (so clipping, logging and the optimizer see the
    accumulated gradient, once per update), and the accumulators are reset.
    `optimizer.iterations` (and so learning-rate schedules) advance once per
    update. For equal-size micro-batches and a loss averaged over the batch
    (Keras' default), the update equals the one a batch `accumulation_steps`
    times larger gives, up to float rounding of the different summation
    order, for models without batch statistics.

    **BatchNormalization** (and any layer that updates state in its forward
    pass) still runs per micro-batch: it normalizes with the micro-batch's
    statistics and updates its moving statistics every micro-batch, so a
    model with it does not match the large batch.

    **Epochs not divisible by `accumulation_steps`.** Micro-batches are
    counted across epochs and `fit` calls: a partial accumulation at the end
    of an epoch is completed by the first micro-batches of the next one
    (nothing is dropped or applied early). After the last `fit`, a partial
    sum stays in the accumulators; it is saved with the model and finished by
    the next `fit`. A short last micro-batch counts as a full one (its mean
    gradient gets the same weight).

    **Mixed precision.** Accumulators hold unscaled float32 gradients; a
    `LossScaleOptimizer` re-scales the average at the update, so an overflow
    in any micro-batch skips that one update (and lowers the scale).

    **`tf.distribute`.** Each replica accumulates its own gradients; at the
    update the optimizer sums the replicas' averages, as for one batch of
    the global size. (Keras' own `gradient_accumulation_steps` optimizer
    argument fails under `MirroredStrategy`, keras-team/keras#20582; here the
    update decision is taken once, across replicas.)

    Keras' `gradient_accumulation_steps` accumulates inside the optimizer,
    after `transform_gradients`: hooks and `log` would see each micro-batch's
    gradient, and `optimizer.iterations` there counts updates while its
    internal counter counts micro-batches. This recipe sits before the
    hooks.

    **Composition.** It replaces only when and with which gradient the update
    runs. With `SAM`, each micro-batch gets its own SAM gradient, and those
    are averaged.

    The accumulators are model state: created eagerly before the first
    training step (`step_variables`, when the train function is made, or
    when a saved state is loaded), saved and loaded with the model through `save_own_variables` /
    `load_own_variables` (`.keras`, `.weights.h5`, `BackupAndRestore`), and
    re-created empty if the trainable variables change (e.g. after freezing
    a layer and compiling again). They are not in `model.variables`: Keras
    locks a built subclassed model's state, and they only exist once the
    trainable variables are known.

    Args:
        accumulation_steps: Micro-batches per update, an integer `>= 1`
            (`1` is the default step).

    Example:

    ```python
    model = customfit.recipes.GradientAccumulation(inputs, outputs,
                                                   accumulation_steps=4)
    model.fit(x, y, batch_size=32)   # updates like batch_size=128
    ```
    """

    def __init__(self, *args: Any, accumulation_steps: int, **kwargs: Any) -> None:
        accumulation_steps = options.integer(
            "GradientAccumulation", "accumulation_steps", accumulation_steps
        )
        super().__init__(*args, **kwargs)
        self.accumulation_steps = accumulation_steps
        # Built for the trainable variables once they are known (`_accumulators`).
        object.__setattr__(self, "_accumulation", _Accumulators())

    def get_config(self) -> dict:
        config = super().get_config()
        config["accumulation_steps"] = self.accumulation_steps
        return config

    @property
    def accumulated_micro_batches(self) -> int:
        """Micro-batches in the accumulators now (`0` right after an update)."""
        state = self._accumulation
        if state.count is None:
            return 0
        return int(state.count.numpy()) % self.accumulation_steps

    def _accumulators(self) -> _Accumulators:
        """The accumulators, built for the trainable variables now (again,
        empty, when those changed since)."""
        state = self._accumulation
        variables = self.trainable_weights
        if not state.built_for(variables):
            with steptools.state_scope(self):
                state.build(variables)
        return state

    def step_variables(self) -> list[keras.Variable]:
        state = self._accumulators()
        return [*super().step_variables(), state.count, *state.sums]

    def update_weights(self, loss: Tensor, gradients: list, variables: list) -> None:
        state = self._accumulation
        if not state.built_for(variables):
            state = self._accumulators()
        for total, gradient in zip(state.sums, gradients):
            if gradient is not None:
                total.assign_add(gradient)
        state.count.assign_add(1)
        steps = self.accumulation_steps

        def update() -> None:
            averaged = [
                None if g is None else total.value / ops.cast(steps, total.dtype)
                for g, total in zip(gradients, state.sums)
            ]
            super(GradientAccumulation, self).update_weights(loss, averaged, variables)
            for total in state.sums:
                total.assign(ops.zeros_like(total.value))

        if replicas.in_replica_context():
            replicas.update_on_every_replica_if(lambda: state.count.value % steps == 0, update)
        else:
            steptools.cond(state.count.value % steps == 0, update, lambda: None)

    def save_own_variables(self, store: Any) -> None:
        super().save_own_variables(store)
        state = self._accumulation
        if state.count is not None:
            store[_COUNT_KEY] = _saving.array(state.count)
            for i, total in enumerate(state.sums):
                store[_SUM_KEY.format(i)] = _saving.array(total)

    def load_own_variables(self, store: Any) -> None:
        keys = list(store.keys())
        ours = [k for k in keys if k == _COUNT_KEY or k.startswith("accumulation_")]
        super().load_own_variables({k: store[k] for k in keys if k not in ours})
        if _COUNT_KEY not in ours:
            return
        state = self._accumulators()
        if len(ours) - 1 != len(state.sums):
            raise ValueError(
                f"The saved GradientAccumulation state has {len(ours) - 1} "
                f"accumulators but the model has {len(state.sums)} trainable "
                "variables. Load it into the same architecture it was saved "
                "from."
            )
        state.count.assign(store[_COUNT_KEY])
        for i, total in enumerate(state.sums):
            total.assign(store[_SUM_KEY.format(i)])


class _Accumulators:
    """The micro-batch counter and one accumulator per trainable variable,
    built (`build`) once the trainable variables are known.

    Accumulators are per replica (sync-on-read, summed when read across
    replicas, e.g. for saving); the counter is the same on all replicas.

    Attributes:
        count: Micro-batches accumulated since training began; None until
            built.
        sums: The accumulated gradient of each trainable variable, in their
            order; empty until built.
    """

    def __init__(self) -> None:
        self._ids: list[int] | None = None
        self.count: Any = None  # a keras.Variable once built
        self.sums: list[keras.Variable] = []

    def built_for(self, variables: list) -> bool:
        return self._ids == [id(v) for v in variables]

    def build(self, variables: list) -> None:
        """New, empty accumulators for `variables`."""
        self._ids = [id(v) for v in variables]
        self.count = keras.Variable(
            0,
            dtype="int",  # int64 on TensorFlow, int32 on JAX, as Keras counts
            trainable=False,
            aggregation="only_first_replica",
            name="accumulation_count",
        )
        self.sums = [
            keras.Variable(
                "zeros",
                shape=v.shape,
                dtype=v.dtype,
                trainable=False,
                autocast=False,
                synchronization="on_read",
                aggregation="sum",
                name=f"accumulation_{i}",
            )
            for i, v in enumerate(variables)
        ]
