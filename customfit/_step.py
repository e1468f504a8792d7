"""The default training and evaluation step: the maths of `CustomModel`.

`train_step(model, data)`, per batch, in this order:

1. `model.compute_gradients(x, y, sample_weight)` (its default in the
   backend's loop, `_backend.loop.loss_gradients`): the forward pass
   `model(x, training=True)` and `compute_loss`, tracked in the `loss`
   metric as stock `fit` tracks it (the full loss, weighted by batch size);
   the loss scaled for mixed precision (`optimizer.scale_loss`),
   differentiated w.r.t. `trainable_weights`, the gradients unscaled.
   Returns `StepGradients(y_pred, loss, gradients, variables)`.
2. `model.update_weights(loss, gradients, variables)`:
   `transform_gradients`, the gradient checks, `apply_gradients` (which
   re-applies the loss scale for a `LossScaleOptimizer`).
3. `compute_metrics(...)`: the batch's logs.

Both are the public seams recipes override (`customfit.recipes`, and a
user's own): the public hooks run inside them, so they compose with a user's
overrides. What a seam returns is checked here (`checked_gradients_result`),
naming the class whose override returned it.

`checked_logs(model, logs, step_name)` checks what a step returns and
flattens the logs as Keras flattens them, with the values from `log`; each
backend's loop applies it to every step.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import keras

from customfit._keras import internals
from customfit._keras2 import track_loss


def train_step(model: keras.Model, data: Any) -> dict[str, Any]:
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    result = checked_gradients_result(model, model.compute_gradients(x, y, sample_weight))
    y_pred, loss, gradients, variables = result
    if variables:
        updated = model.update_weights(loss, gradients, variables)
        if updated is not None:
            raise TypeError(
                f"{_defining_class(model, 'update_weights')}.update_weights() "
                f"returned {type(updated).__name__}; it must return None. It "
                "updates the weights itself: call super().update_weights(loss, "
                "gradients, variables) (or apply_gradients) and return nothing."
            )
    else:
        warnings.warn("The model does not have any trainable weights.", stacklevel=2)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def test_step(model: keras.Model, data: Any) -> dict[str, Any]:
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred = forward(model, x, training=False)
    tracked_loss(model, x, y, y_pred, sample_weight, training=False)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def checked_gradients_result(model: keras.Model, result: Any) -> Any:
    """What `compute_gradients` returned, if it is `(y_pred, loss, gradients,
    variables)` with one gradient per variable; else a TypeError naming the
    class whose override returned it."""
    ok = isinstance(result, tuple) and len(result) == 4
    if ok:
        gradients, variables = result[2], result[3]
        ok = isinstance(gradients, (list, tuple)) and isinstance(variables, (list, tuple))
        ok = ok and len(gradients) == len(variables)
    if not ok:
        owner = _defining_class(model, "compute_gradients")
        if (
            isinstance(result, tuple)
            and len(result) == 4
            and all(isinstance(part, (list, tuple)) for part in result[2:])
        ):
            got = f"{len(result[2])} gradients for {len(result[3])} variables"
        else:
            got = type(result).__name__
        raise TypeError(
            f"{owner}.compute_gradients() must return StepGradients(y_pred, "
            "loss, gradients, variables) with one gradient per variable; got "
            f"{got}. Return super().compute_gradients(x, y, sample_weight), "
            "or that result with fields replaced: result._replace(gradients=...)."
        )
    return result


def checked_step_variables(model: keras.Model) -> list:
    """`model.step_variables()`, if it is a list of `keras.Variable`s; else
    a TypeError naming the class whose override returned it."""
    variables = model.step_variables()
    if not isinstance(variables, (list, tuple)) or not all(
        isinstance(v, keras.Variable) for v in variables
    ):
        got = (
            [type(v).__name__ for v in variables]
            if isinstance(variables, (list, tuple))
            else type(variables).__name__
        )
        raise TypeError(
            f"{_defining_class(model, 'step_variables')}.step_variables() must "
            f"return a list of keras.Variable; got {got}. Return "
            "[*super().step_variables(), *your_variables]."
        )
    return list(variables)


def _defining_class(model: keras.Model, method: str) -> str:
    """The class of `model` whose `method` runs (the leftmost override)."""
    for cls in type(model).__mro__:
        if method in vars(cls):
            return cls.__name__
    return type(model).__name__


def update_weights(model: keras.Model, loss: Any, gradients: list, variables: list) -> None:
    """`CustomModel.update_weights`' default: `transform_gradients`, the checks, `apply_gradients`.
    The default does not use `loss`."""
    del loss
    gradients = model.transform_gradients(gradients, variables)
    gradients = checked_gradients(gradients, variables, model.require_all_gradients)
    model.apply_gradients(gradients, variables)


def forward(model: keras.Model, x: Any, training: bool) -> Any:
    if internals.call_has_training_arg(model):
        return model(x, training=training)
    return model(x)


def tracked_loss(
    model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any, training: bool
) -> Any:
    """`compute_loss`, added to the `loss` metric as stock `fit` does."""
    loss = internals.compute_loss(
        model, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )
    track_loss(model, loss, batch_of=x)
    return loss


def non_trainable_values(model: keras.Model) -> list[tuple[Any, Any]]:
    """`(variable, a copy of its value)` for each non-trainable variable."""
    return [(v, keras.ops.copy(v.value)) for v in model.non_trainable_variables]


def unscaled(model: keras.Model, gradients: list) -> list:
    """Gradients of a loss `model.optimizer.scale_loss` scaled, unscaled."""
    scale = internals.loss_scale_in_use(model.optimizer)
    if scale is None:
        return gradients
    return [multiply(g, 1.0 / scale) for g in gradients]


def checked_logs(model: keras.Model, logs: Any, step_name: str) -> dict[str, Any]:
    """A step's logs checked and flattened as Keras flattens them, with the
    values from `log` added."""
    if not isinstance(logs, Mapping):
        raise TypeError(_bad_logs_message(step_name, logs))
    logs = _flattened(logs, step_name)
    # Read now, after everything the step logged (a step may log after
    # `compute_metrics` has read the metrics).
    logs.update(model._step_logs.results())
    return logs


def multiply(gradient: Any, factor: Any) -> Any:
    if gradient is None:
        return None
    return gradient * keras.ops.cast(factor, gradient.dtype)


def checked_gradients(gradients: Any, variables: list, require_all: bool) -> list:
    gradients = list(gradients)
    if len(gradients) != len(variables):
        raise ValueError(
            f"transform_gradients() returned {len(gradients)} gradients for "
            f"{len(variables)} variables. Return exactly one gradient per "
            "variable, in the order received (None or "
            "tf.zeros_like(variable) to leave one unchanged)."
        )
    missing = [v.path for g, v in zip(gradients, variables) if g is None]
    if missing and require_all:
        raise ValueError(
            f"No gradient for {len(missing)} trainable variable(s): "
            f"{', '.join(missing)}. They do not affect the loss. Use them in "
            "call(), freeze them (layer.trainable = False, then compile() "
            "again), or set require_all_gradients = False to leave them "
            "unchanged, as Keras does."
        )
    return gradients


def _flattened(logs: Mapping, step_name: str) -> dict[str, Any]:
    """A step's logs as one flat dict of numeric tensors, flattened as Keras
    flattens them for callbacks (`pythonify_logs`): a nested dict, such as
    `CompileMetrics.result()`, contributes its entries, keys taken in sorted
    order, later ones winning."""
    if not all(isinstance(name, str) for name in logs):
        raise TypeError(_bad_logs_message(step_name, logs))
    flat: dict[str, Any] = {}
    for name, value in sorted(logs.items()):
        if isinstance(value, Mapping):
            flat.update(_flattened(value, step_name))
        elif _is_numeric(value):
            flat[name] = keras.ops.convert_to_tensor(value)
        else:
            raise TypeError(_bad_logs_message(step_name, logs))
    return flat


def _is_numeric(value: Any) -> bool:
    """A number or a numeric tensor of any shape (a metric may be a vector,
    such as `F1Score(average=None)`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    dtype = getattr(value, "dtype", None)
    if getattr(value, "shape", None) is None or dtype is None:
        return False
    try:
        name = keras.backend.standardize_dtype(dtype)
    except (TypeError, ValueError):
        return False
    return name == "bool" or name.startswith(("float", "bfloat", "int", "uint"))


def _bad_logs_message(step_name: str, logs: Any) -> str:
    got: dict[Any, Any] | str
    if isinstance(logs, Mapping):
        got = {k: getattr(v, "shape", type(v).__name__) for k, v in logs.items()}
    else:
        got = type(logs).__name__
    return (
        f"{step_name}() must return a dict mapping metric names to numbers or "
        "numeric tensors (or to such dicts), e.g. "
        f"`return {{m.name: m.result() for m in self.metrics}}`; got {got}."
    )
