"""`SkipNonFinite`: a step whose loss or gradients are not finite updates nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, cast

import keras
from keras import ops

from customfit import _saving, steptools
from customfit._backend import replicas
from customfit._model import CustomModel, Tensor
from customfit.recipes import _options as options
from customfit.recipes._accumulation import GradientAccumulation

_TOTAL_KEY = "skipped_steps_total"
_CONSECUTIVE_KEY = "skipped_steps_consecutive"


@keras.saving.register_keras_serializable(package="customfit")
class SkipNonFinite(CustomModel):
    """Skips the weight update of a training step whose loss or gradients are
    not finite (NaN or inf), or that `should_skip_update` rejects.

    A skipped step changes no weight and no optimizer state:
    `optimizer.iterations` (and so learning-rate schedules and Adam's bias
    correction) does not advance, so the weights after the run are exactly
    those of a run whose data lacked that batch (for models without
    dropout or batch statistics, whose forward pass changes no state). The
    forward pass still runs: BatchNormalization moving statistics and the
    compiled metrics see the batch, and the epoch's `loss` column is NaN if
    the batch's loss was.

    **Counting.** Skipped steps are counted in a non-trainable integer
    variable, `skipped_steps` (a property), created with the model, saved and
    loaded with it (`.keras`, `.weights.h5`, `BackupAndRestore`), so the
    count survives a restart. The column `count_log_name` (default
    `"skipped_steps"`) reports that cumulative count at the end of each
    epoch (and batch), not an epoch average: its growth between epochs is
    the number skipped in the epoch. `count_log_name=None` leaves it out.

    **Too many skips.** More than `max_consecutive_skips` skipped steps in
    a row, or more than `max_skipped_steps` in all, stop `fit` with a
    `RuntimeError` that says so. The limits are checked in the step; once
    one is exceeded, the remaining steps of that execution
    (`steps_per_execution > 1`) update nothing, and the error is raised on
    the host when the execution returns, so the weights are those
    `steps_per_execution=1` would leave. (An in-graph assert would vanish
    under XLA.)

    **`tf.distribute`.** Each replica decides on its own share of the batch;
    the decisions are all-reduced, so if any replica skips, all skip, the
    mirrored variables stay equal, and the step counts once.

    **Mixed precision.** With a `LossScaleOptimizer`, a finite loss whose
    (unscaled) gradients are not finite is an overflow of the loss scale:
    that step is left to the optimizer, which skips it and halves the scale
    as usual, and is not counted here. A non-finite loss is skipped here,
    before the optimizer, so the scale does not fall for a bad batch. Under
    `MirroredStrategy`, an overflow on any replica is made visible on all of
    them: Keras' `LossScaleOptimizer` checks the first replica's gradients
    only, so an overflow on another one turns stock `fit`'s weights inf.

    **Composition.** The decision is taken before `transform_gradients`, so
    a skipped step never reaches the user's hooks; clipping recipes, `SAM`
    (the SAM gradient is checked) and `AdversarialTraining` compose in any
    order. With `GradientAccumulation`, list `SkipNonFinite` first (it then
    keeps a bad micro-batch out of the accumulators). It works through the
    default `train_step` (a `train_step` overridden whole that calls
    `super().train_step` is fine; one that applies gradients itself is not
    covered). The limits are read when the train function is made: after
    changing them on a compiled model, call `compile()` again.

    Args:
        max_consecutive_skips: The most steps skipped in a row before `fit`
            stops, an integer `>= 0` (`0`: stop at the first skipped step,
            with the weights intact), or `None` for no limit.
        max_skipped_steps: The most steps skipped in all (the count of the
            `skipped_steps` variable, over all `fit` calls), or `None`.
        count_log_name: The History column of the cumulative count, or
            `None` for none. (Not `log_name`, which the clipping recipes
            take for their norm.)

    Example:

    ```python
    model = customfit.recipes.SkipNonFinite(inputs, outputs,
                                            max_consecutive_skips=5)
    history = model.fit(x, y)
    history.history["skipped_steps"], model.skipped_steps
    ```
    """

    def __init__(
        self,
        *args: Any,
        max_consecutive_skips: int | None = 10,
        max_skipped_steps: int | None = None,
        count_log_name: str | None = "skipped_steps",
        **kwargs: Any,
    ) -> None:
        recipe = "SkipNonFinite"
        if max_consecutive_skips is not None:
            max_consecutive_skips = options.integer(
                recipe, "max_consecutive_skips", max_consecutive_skips, minimum=0
            )
        if max_skipped_steps is not None:
            max_skipped_steps = options.integer(
                recipe, "max_skipped_steps", max_skipped_steps, minimum=0
            )
        if count_log_name is not None and (
            not isinstance(count_log_name, str) or not count_log_name
        ):
            raise ValueError(
                f"{recipe}: count_log_name must be a non-empty string (the "
                f"History column) or None; got {count_log_name!r}. Pass e.g. "
                'count_log_name="skipped_steps".'
            )
        super().__init__(*args, **kwargs)
        self.max_consecutive_skips = max_consecutive_skips
        self.max_skipped_steps = max_skipped_steps
        self.count_log_name = count_log_name
        with steptools.state_scope(self):
            state = _State()
        # Plain attributes: saved through save_own_variables, not as weights.
        object.__setattr__(self, "_skip_state", state)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_bases(cls)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            max_consecutive_skips=self.max_consecutive_skips,
            max_skipped_steps=self.max_skipped_steps,
            count_log_name=self.count_log_name,
        )
        return config

    @property
    def skipped_steps(self) -> int:
        """Training steps skipped so far (saved and loaded with the model)."""
        return int(self._skip_state.total.numpy())

    def should_skip_update(self, loss: Tensor, gradients: list) -> Tensor:
        """Whether to skip this step's update besides non-finite values.
        Default: never.

        Runs once per training step, in the default `train_step`, after the
        gradients are computed and before `transform_gradients`; the
        non-finite checks are made apart from it (it need not repeat them).
        Under `tf.distribute` it runs on every replica with that replica's
        values, and the step is skipped on all replicas if it returns `True`
        on any. A skipped step is counted and limited like a non-finite one.

        Args:
            loss: This replica's loss as `compute_loss` returned it (unscaled;
                under `tf.distribute` divided by the number of replicas).
            gradients: This replica's unscaled gradients, one per trainable
                variable (`None` for a variable the loss does not reach);
                with `SAM`, the SAM gradients.

        Returns:
            A boolean scalar (tensor or Python bool).

        Example:

        ```python
        def should_skip_update(self, loss, gradients):  # from keras import ops
            squares = [ops.sum(ops.square(g)) for g in gradients if g is not None]
            return ops.sqrt(sum(squares)) > 1e3  # a spike
        ```
        """
        return ops.convert_to_tensor(False)

    # ------------------------------------------------------------ the step

    def step_variables(self) -> list[keras.Variable]:
        state = self._skip_state
        return [*super().step_variables(), state.total, state.consecutive, state.halted]

    def update_weights(self, loss: Tensor, gradients: list, variables: list) -> None:
        skip = self._replica_skips(loss, gradients)

        def update(gradients: list) -> None:
            super(SkipNonFinite, self).update_weights(loss, list(gradients), variables)

        if replicas.in_replica_context():
            replicas.skip_on_every_replica_if(self, skip, gradients, update)
            return
        steptools.cond(
            self._skip_state.halted.value | skip,
            self._count_skip,
            lambda: self._updated(lambda: update(gradients)),
        )

    def _replica_skips(self, loss: Tensor, gradients: list) -> Tensor:
        """This replica's decision: non-finite loss or gradients (gradients
        left to a LossScaleOptimizer), or `should_skip_update`."""
        skip = ops.logical_not(_all_finite([loss]))
        if steptools.loss_scale(self.optimizer) is None:
            skip = ops.logical_or(skip, ops.logical_not(_all_finite(gradients)))
        wanted = ops.convert_to_tensor(self.should_skip_update(loss, gradients))
        shape = tuple(wanted.shape)
        if (
            keras.backend.standardize_dtype(wanted.dtype) != "bool"
            or None in shape
            or math.prod(shape) != 1
        ):
            raise TypeError(
                "should_skip_update() must return a boolean scalar; got "
                f"{keras.backend.standardize_dtype(wanted.dtype)} of shape {shape}. "
                "Return a boolean scalar, e.g. the global norm of the "
                "gradients > 1e3: ops.sqrt(sum(ops.sum(ops.square(g)) for g in "
                "gradients)) > 1e3."
            )
        return ops.logical_or(skip, ops.reshape(wanted, ()))

    def _count_skip(self) -> None:
        """A skipped step: counted unless a limit already stopped the run."""
        state = self._skip_state

        def count() -> None:
            state.total.assign_add(1)
            state.consecutive.assign_add(1)
            over = ops.convert_to_tensor(False)
            if self.max_consecutive_skips is not None:
                over = ops.logical_or(over, state.consecutive.value > self.max_consecutive_skips)
            if self.max_skipped_steps is not None:
                over = ops.logical_or(over, state.total.value > self.max_skipped_steps)
            state.halted.assign(over)

        steptools.cond(state.halted.value, lambda: None, count)

    def _updated(self, update: Callable[[], Any]) -> None:
        update()
        self._skip_state.consecutive.assign(0)

    def train_step(self, data: Any) -> dict[str, Tensor]:
        logs = super().train_step(data)
        if self.count_log_name is None:
            return logs
        logs = dict(logs)
        logs[self.count_log_name] = ops.copy(self._skip_state.total.value)
        return logs

    # ---------------------------------------------------- the host's check

    def make_train_function(self, force: bool = False) -> Callable:
        function = super().make_train_function(force)
        checks = cast(_ChecksAfterEachExecution, function).after_each_execution
        if self._stop_if_halted not in checks:
            checks.append(self._stop_if_halted)
        return function

    def _stop_if_halted(self) -> None:
        """After each execution, on the host (XLA drops in-graph asserts)."""
        if bool(self._skip_state.halted.numpy()):
            self._raise_too_many_skips()

    def _raise_too_many_skips(self) -> None:
        state = self._skip_state
        total = int(state.total.numpy())
        consecutive = int(state.consecutive.numpy())
        state.halted.assign(False)
        if self.max_consecutive_skips is not None and consecutive > self.max_consecutive_skips:
            what = (
                f"{consecutive} training steps in a row were skipped "
                f"(max_consecutive_skips={self.max_consecutive_skips}; "
                f"{total} skipped in all)"
            )
            limit = "max_consecutive_skips"
        else:
            what = (
                f"{total} training steps were skipped in all "
                f"(max_skipped_steps={self.max_skipped_steps})"
            )
            limit = "max_skipped_steps"
        raise RuntimeError(
            f"SkipNonFinite stopped training: {what}, because their loss or "
            "gradients were not finite (NaN or inf) or should_skip_update() "
            "returned True. Their updates were not applied: the weights are "
            "finite. Lower the learning rate (or clip the gradients), check "
            "the data for NaN/inf (e.g. np.isfinite(x).all()), or raise "
            f"{limit} (None for no limit)."
        )

    # ---------------------------------------------------------------- saving

    def save_own_variables(self, store: Any) -> None:
        super().save_own_variables(store)
        store[_TOTAL_KEY] = _saving.array(self._skip_state.total)
        store[_CONSECUTIVE_KEY] = _saving.array(self._skip_state.consecutive)

    def load_own_variables(self, store: Any) -> None:
        keys = list(store.keys())
        ours = {_TOTAL_KEY, _CONSECUTIVE_KEY}
        super().load_own_variables({k: store[k] for k in keys if k not in ours})
        if _TOTAL_KEY in keys:
            self._skip_state.total.assign(store[_TOTAL_KEY])
        if _CONSECUTIVE_KEY in keys:
            self._skip_state.consecutive.assign(store[_CONSECUTIVE_KEY])


class _State:
    """The skip counters (the same on every replica, updated in cross-replica
    context) and the flag a limit sets for the host's check."""

    def __init__(self) -> None:
        def counter(name: str, dtype: str = "int") -> keras.Variable:
            return keras.Variable(
                0, dtype=dtype, trainable=False, aggregation="only_first_replica", name=name
            )

        self.total = counter("skipped_steps")
        self.consecutive = counter("consecutive_skipped_steps")
        self.halted = counter("skipping_halted", dtype="bool")


class _ChecksAfterEachExecution(Protocol):
    """CustomModel's train function on either backend (`StepFunction`,
    `StatelessStep`)."""

    after_each_execution: list[Callable[[], None]]


def _all_finite(tensors: list) -> Tensor:
    finite = ops.convert_to_tensor(True)
    for t in tensors:
        if t is None:
            continue
        values = getattr(t, "values", t)  # a tf.IndexedSlices' values
        if not callable(values):  # (a torch tensor's `values` is a method)
            t = values
        finite = ops.logical_and(finite, ops.all(ops.isfinite(t)))
    return finite


def _check_bases(cls: type) -> None:
    """Refuses, when the class is defined, the order without a defined
    meaning."""
    mro = cls.__mro__
    if GradientAccumulation in mro and mro.index(GradientAccumulation) < mro.index(SkipNonFinite):
        raise TypeError(
            f"{cls.__name__} lists GradientAccumulation before SkipNonFinite: "
            "the accumulators would take in a non-finite micro-batch that "
            "SkipNonFinite then could not take out. List SkipNonFinite first, "
            "e.g. class Net(SkipNonFinite, GradientAccumulation), so a bad "
            "micro-batch is skipped before it reaches the accumulators."
        )
