"""`CustomModel.fit`'s developer run modes: a quick run, overfitting a few
batches, and validation every N batches."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from customfit import _auto_steps, _resume
from customfit._keras import internals


@dataclass(frozen=True)
class DevModes:
    """The run modes asked of one `fit` call (`None`: off).

    Attributes:
        quick_run: Train one epoch of at most this many batches, then validate
            on at most this many batches.
        overfit_batches: Train every epoch on the same first batches of the
            training data, in the same order; validate on at most as many.
        validate_every_n_batches: Run validation after every this many
            training batches, as well as at the end of each epoch.
    """

    quick_run: int | None = None
    overfit_batches: int | None = None
    validate_every_n_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("quick_run", "overfit_batches", "validate_every_n_batches"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(
                    f"fit({name}={value!r}): pass a whole number of batches, at "
                    f"least 1 (e.g. {name}=2), or leave it out."
                )

    @property
    def any(self) -> bool:
        return any(
            v is not None
            for v in (self.quick_run, self.overfit_batches, self.validate_every_n_batches)
        )


def applied(model: keras.Model, arguments: dict[str, Any], modes: DevModes) -> dict[str, Any]:
    """Keras `fit`'s arguments, by name, rewritten for `modes`."""
    if not modes.any:
        return arguments
    arguments = dict(arguments)
    if modes.overfit_batches or modes.validate_every_n_batches:
        _split_validation_here(arguments)
    if modes.overfit_batches:
        _keep_first_batches(arguments, modes.overfit_batches)
        _cap_validation_steps(arguments, modes.overfit_batches)
    if modes.quick_run:
        arguments["epochs"] = 1
        steps = arguments.get("steps_per_epoch")
        arguments["steps_per_epoch"] = min(steps or modes.quick_run, modes.quick_run)
        _cap_validation_steps(arguments, modes.quick_run)
    if modes.validate_every_n_batches:
        every = modes.validate_every_n_batches
        if arguments.get("validation_data") is None:
            raise ValueError(
                f"fit(validate_every_n_batches={every}) has no data to validate "
                "on: pass validation_data=(x_val, y_val) or validation_split=..."
            )
        if every % model.steps_per_execution:
            raise ValueError(
                f"fit(validate_every_n_batches={every}) with "
                f"steps_per_execution={model.steps_per_execution}: weights are "
                "only seen between executions, so pass a multiple of "
                "steps_per_execution."
            )
        callbacks = arguments.get("callbacks")
        if isinstance(callbacks, keras.callbacks.CallbackList):
            raise ValueError(
                "fit(validate_every_n_batches=...) takes callbacks as a list, "
                "not a keras.callbacks.CallbackList."
            )
        arguments["callbacks"] = [MidEpochValidation(every, arguments), *(callbacks or [])]
    return arguments


class MidEpochValidation(keras.callbacks.Callback):
    """Runs `evaluate` on fit's validation data every `every` training batches.

    Goes first in fit's callbacks, so every callback after it sees the results
    as `val_<name>` in that batch's logs (the progress bar shows them;
    TensorBoard writes them as `batch_val_<name>` when its `update_freq`
    includes the batch). The training metrics' running values are put back
    after each evaluation, so the epoch's training logs are the same as
    without it; the usual validation at the end of each epoch still runs.

    Attributes:
        every: Number of training batches between two validations.
        results: `(epoch, batch, logs)` for each mid-epoch validation, `batch`
            being the 0-based index of the last batch trained before it.
    """

    def __init__(self, every: int, fit_arguments: dict[str, Any]) -> None:
        super().__init__()
        self.every = every
        self.results: list[tuple[int, int, dict[str, float]]] = []
        self._epoch = 0
        val_x, val_y, val_sample_weight = keras.utils.unpack_x_y_sample_weight(
            fit_arguments["validation_data"]
        )
        self._evaluate_arguments = dict(
            x=val_x,
            y=val_y,
            sample_weight=val_sample_weight,
            batch_size=fit_arguments.get("validation_batch_size")
            or fit_arguments.get("batch_size"),
            steps=fit_arguments.get("validation_steps"),
            verbose=0,
            return_dict=True,
        )

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def _customfit_execution_limit(self, batch: int) -> int:
        """`steps_per_execution="auto"`: an execution ends at each batch
        after which it validates."""
        return _auto_steps.every_n_batches(self.every, batch)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if (batch + 1) % self.every:
            return
        with kept_metric_state(self.model):
            val_logs = self.model.evaluate(**self._evaluate_arguments)
        val_logs = {f"val_{name}": float(value) for name, value in val_logs.items()}
        self.results.append((self._epoch, batch, val_logs))
        if logs is not None:
            logs.update(val_logs)


@contextlib.contextmanager
def kept_metric_state(model: keras.Model) -> Iterator[None]:
    """Puts every metric variable of `model` back as it was on entry, replica
    by replica (`evaluate` resets them all, training metrics included)."""
    saved = _resume.metric_values(model)
    try:
        yield
    finally:
        _resume.assign_metric_values(model, saved)


def _split_validation_here(arguments: dict[str, Any]) -> None:
    """Does `validation_split` as Keras would (the last fraction of the arrays
    becomes validation data), so that the run modes see both parts."""
    split = arguments.get("validation_split") or 0.0
    if not split or arguments.get("validation_data") is not None:
        return
    arrays = (arguments.get("x"), arguments.get("y"), arguments.get("sample_weight"))
    flat = [a for a in keras.tree.flatten(arrays) if a is not None]
    if not flat or not all(hasattr(a, "shape") and hasattr(a, "__getitem__") for a in flat):
        raise ValueError(
            "validation_split needs NumPy arrays or tensors; for other inputs "
            "pass validation_data=..."
        )
    size = int(flat[0].shape[0])
    split_at = int(math.floor(size * (1.0 - split)))
    if split_at in (0, size):
        raise ValueError(
            f"validation_split={split} leaves no training or no validation "
            f"sample of {size}: pass a value that splits the data."
        )

    def part(start: int, stop: int) -> Any:
        return keras.tree.map_structure(lambda a: None if a is None else a[start:stop], arrays)

    (arguments["x"], arguments["y"], arguments["sample_weight"]) = part(0, split_at)
    arguments["validation_data"] = part(split_at, size)
    arguments["validation_split"] = 0.0


def _keep_first_batches(arguments: dict[str, Any], batches: int) -> None:
    """Training data cut to its first `batches` batches, unshuffled."""
    x = arguments.get("x")
    if x is not None and internals.is_tf_dataset(x):
        # cache() keeps the first pass's batches, so a shuffling pipeline
        # gives the same batches every epoch.
        arguments["x"] = x.take(batches).cache()
    elif _is_array_like(x):
        size = (arguments.get("batch_size") or 32) * batches
        for name in ("x", "y", "sample_weight"):
            if arguments.get(name) is not None:
                arguments[name] = keras.tree.map_structure(lambda a: a[:size], arguments[name])
    else:
        raise ValueError(
            f"fit(overfit_batches={batches}) takes NumPy arrays, tensors or a "
            f"batched tf.data.Dataset; got {type(x).__name__}. Collect a few "
            "batches into arrays and pass those."
        )
    arguments["shuffle"] = False
    arguments["steps_per_epoch"] = None


def _cap_validation_steps(arguments: dict[str, Any], batches: int) -> None:
    if arguments.get("validation_data") is None and not arguments.get("validation_split"):
        return
    steps = arguments.get("validation_steps")
    arguments["validation_steps"] = min(steps or batches, batches)


def _is_array_like(x: Any) -> bool:
    flat = keras.tree.flatten(x)
    return bool(flat) and all(isinstance(a, np.ndarray) or hasattr(a, "__array__") for a in flat)
