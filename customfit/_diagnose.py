"""Find the usual mistakes in a training step by replaying it on one batch.

The step under test and Keras' stock `train_step` each run once, eagerly, on
the same batch from the same state (weights, optimizer slots, random seed
state restored in between). What the user's step reports and hands to the
optimizer is then compared with what the stock step does.

Each replay runs where the backend's training step runs (`loop.run_once`):
on JAX gradients are taken only inside customfit's step, so there the
replayed step is a `CustomModel`'s `train_step(data)`, and Keras' stock
step, which on JAX is stateless (`train_step(state, data)`), is replayed as
the same maths through the loop (`_stock_train_step`). Values computed
inside a differentiated function are traced on JAX, not readable: the first
forward pass is then run again after the step, from the same state, to
read its predictions and regularization.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from customfit import _step
from customfit._backend import BACKEND, loop
from customfit._keras import internals
from customfit._model import CustomModel


@dataclasses.dataclass(frozen=True)
class Finding:
    """One mistake found in a training step.

    Attributes:
        mistake: A stable identifier, e.g. "training_not_passed".
        message: What is wrong, with the numbers seen, and the fix.
    """

    mistake: str
    message: str

    def __str__(self) -> str:
        return f"[{self.mistake}] {self.message}"


@dataclasses.dataclass
class _Replay:
    logs: dict[str, float] = dataclasses.field(default_factory=dict)
    training: list[Any] = dataclasses.field(default_factory=list)
    predictions: list[list[np.ndarray]] = dataclasses.field(default_factory=list)
    gradients: list[Any] | None = None
    variables: list[Any] | None = None
    regularization: float = 0.0
    tracked_loss: float | None = None
    not_reset: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    error: BaseException | None = None


class _State:
    """Values of the model's variables (weights, seed generator states) and the
    optimizer's, to put back between replays. Metric variables are left out on
    purpose: `reset_metrics()` must be what resets them."""

    def __init__(self, model: keras.Model) -> None:
        variables = list(model.variables)
        if model.optimizer is not None:
            variables += list(model.optimizer.variables)
        self._saved = [(v, np.array(v.numpy(), copy=True)) for v in variables]

    def restore(self) -> None:
        for variable, value in self._saved:
            variable.assign(value)


def diagnose(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    *,
    seed: int = 0,
) -> list[Finding]:
    if not model.compiled:
        raise RuntimeError(
            "diagnose() runs the model's train_step, which needs compile() "
            "first: call model.compile(optimizer=..., loss=...) and pass the "
            "compiled model."
        )
    _check_replayable(model)
    data = tuple(
        keras.tree.map_structure(keras.ops.convert_to_tensor, part)
        for part in (x, y, sample_weight)
        if part is not None
    )
    if not model.built:
        model(data[0])
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    state = _State(model)
    try:
        stock = _replay(model, _stock_train_step, data, state, seed)
        user = _replay(model, type(model).train_step, data, state, seed, check_reset=True)
        training_matters = _training_changes_outputs(model, data[0], state, seed)
    finally:
        state.restore()
        model.reset_metrics()

    findings = (
        _loss_findings(stock, user)
        + _metric_reset_findings(user)
        + _training_findings(stock, user, training_matters)
        + _gradient_findings(model, user)
    )
    if user.error is not None and not findings:
        raise RuntimeError(
            f"{type(model).__name__}.train_step raised on one batch; fix this "
            f"first: {type(user.error).__name__}: {user.error}"
        ) from user.error
    return findings


def _takes_state(step: Callable) -> bool:
    """Whether a (bound) `train_step` is written for Keras' stateless JAX
    trainer: `train_step(state, data)`, two required positional arguments."""
    try:
        parameters = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return len([p for p in parameters if p.kind in positional and p.default is p.empty]) >= 2


def _check_replayable(model: keras.Model) -> None:
    refusal = replay_refusal(model)
    if refusal is not None:
        raise TypeError(refusal)


def replay_refusal(model: keras.Model) -> str | None:
    """Why `diagnose` cannot replay the model's step, or None. On JAX a
    step is replayed only as a `CustomModel`'s `train_step(data)`."""
    if BACKEND == "tensorflow":
        return None
    name = type(model).__name__
    if not isinstance(model, CustomModel):
        return (
            f"On the {BACKEND} backend diagnose() replays the step of a "
            f"customfit.CustomModel (gradients are taken inside customfit's "
            f"step there); {name} is not one. Fix: build the model on "
            "customfit.CustomModel, a drop-in replacement for keras.Model."
        )
    if _takes_state(model.train_step):
        return (
            f"diagnose() replays train_step(self, data); {name}.train_step(self, "
            "state, data) is written for Keras' stateless JAX trainer and "
            "threads every variable by hand, which diagnose() cannot follow. "
            "To diagnose it, write it as train_step(self, data) on "
            "customfit.CustomModel, with self.value_and_gradients(...) for the "
            "gradients (docs/guides/jax.md)."
        )
    return None


def _stock_train_step(model: keras.Model, data: Any) -> Any:
    """Keras' stock `train_step`. On JAX Keras' own is stateless
    (`train_step(state, data)`): there the same maths through the loop,
    without the model's `CustomModel` hooks (equal to stock `fit`: the
    parity tests), Keras' `compute_loss` and `compute_metrics` included."""
    if not _takes_state(keras.Model.train_step.__get__(model)):
        return keras.Model.train_step(model, data)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    y_pred, _, gradients, variables = loop.loss_gradients(model, x, y, sample_weight)
    if variables and model.optimizer is not None:
        scale = internals.loss_scale_in_use(model.optimizer)
        if scale is not None:
            gradients = [_step.multiply(g, scale) for g in gradients]
        loop.apply(model.optimizer, gradients, variables)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _numpy(structure: Any) -> list[np.ndarray]:
    """The tensors of `structure` as arrays (on PyTorch, detached); raises
    for traced ones."""
    return [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(structure)]


def _regularization(model: keras.Model) -> float:
    return float(sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses))


def _replay(
    model: keras.Model,
    step: Callable[[keras.Model, Any], Any],
    data: tuple[Any, ...],
    state: _State,
    seed: int,
    check_reset: bool = False,
) -> _Replay:
    state.restore()
    model.reset_metrics()
    tracker = internals.loss_tracker(model)
    if tracker is not None:
        tracker.reset_state()
    metrics = _attribute_metrics(model)
    before = [_values(m) for m in metrics]
    # What is read after the step, also where the step carries only the
    # metrics `model.metrics` lists (JAX).
    read_after = [v for m in [*metrics, tracker] if m is not None for v in m.variables]
    keras.utils.set_random_seed(seed)
    replay = _Replay()
    optimizer = model.optimizer
    # None only without an optimizer, when `recording_apply` is never installed.
    original_apply: Any = optimizer.apply if optimizer is not None else None
    original_call = model.call
    traced_first_call: list[tuple[tuple, dict]] = []

    def recording_call(*args: Any, **kwargs: Any) -> Any:
        replay.training.append(kwargs.get("training"))
        outputs = original_call(*args, **kwargs)
        if len(replay.training) == 1:
            try:
                replay.predictions.append(_numpy(outputs))
                # Regularizers as the forward pass saw them, before the update.
                replay.regularization = _regularization(model)
            except Exception:  # noqa: BLE001 - traced (JAX, differentiated): run again
                replay.predictions = []
                traced_first_call.append((args, kwargs))
        return outputs

    def recording_apply(grads: Any, trainable_variables: Any = None) -> Any:
        if replay.gradients is None:
            replay.gradients = list(grads)
            replay.variables = (
                list(trainable_variables) if trainable_variables is not None else None
            )
        return original_apply(grads, trainable_variables)

    with contextlib.ExitStack() as stack:
        stack.enter_context(internals.intercepted(model, "call", recording_call))
        if optimizer is not None:
            stack.enter_context(internals.intercepted(optimizer, "apply", recording_apply))
        try:
            with warnings.catch_warnings():
                # Stock steps warn about None gradients; a finding reports them.
                warnings.simplefilter("ignore")
                logs = loop.run_once(model, lambda: step(model, data), read_after)
            replay.logs = _scalars(logs)
            if tracker is not None:
                replay.tracked_loss = float(tracker.result())
            if check_reset:
                changed = [m for m, b in zip(metrics, before) if not _same(_values(m), b)]
                model.reset_metrics()
                replay.not_reset = [
                    (m.name, float(keras.ops.convert_to_numpy(m.result()).ravel()[0]))
                    for m in changed
                    if m.name in replay.logs and not _is_reset(m)
                ]
        except Exception as error:  # noqa: BLE001 - reported as a finding or raised
            replay.error = error
    if traced_first_call:
        _first_forward_again(model, *traced_first_call[0], replay, state, seed)
    return replay


def _first_forward_again(
    model: keras.Model, args: tuple, kwargs: dict, replay: _Replay, state: _State, seed: int
) -> None:
    """The step's first forward pass, whose values were traced (JAX, inside
    the differentiated function), run again outside the step from the state
    and seed it started from: its predictions and regularization. Nothing
    when its inputs were traced too."""
    state.restore()
    keras.utils.set_random_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = model(*args, **kwargs)
        predictions = _numpy(outputs)
        regularization = _regularization(model)
    except Exception:  # noqa: BLE001 - inputs computed inside the function
        return
    replay.predictions = [predictions]
    replay.regularization = regularization


def _scalars(logs: Any) -> dict[str, float]:
    """The step's logs as floats; Keras nests compiled metrics in a dict."""
    scalars = {}
    for name, value in dict(logs).items():
        if isinstance(value, dict):
            scalars.update(_scalars(value))
        elif np.ndim(value) == 0:
            scalars[name] = float(value)
    return scalars


def _training_changes_outputs(model: keras.Model, x: Any, state: _State, seed: int) -> bool:
    """Whether `training=True` changes the outputs (Dropout, BatchNorm...)."""
    results = []
    for training in (True, False):
        state.restore()
        keras.utils.set_random_seed(seed)
        outputs = model(x, training=training)
        results.append(_numpy(outputs))
    return any(not np.array_equal(a, b) for a, b in zip(*results))


def _loss_findings(stock: _Replay, user: _Replay) -> list[Finding]:
    if user.error is not None or stock.error is not None:
        return []
    expected = stock.tracked_loss
    got = user.logs.get("loss")
    if expected is None or expected == 0.0:
        return []
    if got is None or got == 0.0:
        shown = "has no `loss` column" if got is None else "reports `loss` = 0.0"
        return [
            Finding(
                "loss_not_tracked",
                f"The step {shown}, while stock fit reports {expected:.6g} on this "
                "batch: nothing adds the loss to the loss tracker. Fix: compute it "
                "with `loss = self.compute_loss(x, y, y_pred)` (it updates the "
                "tracker), or `self.compiled_loss(y, y_pred)` on CustomModel; with a "
                "tracker of your own, call `tracker.update_state(loss)` in the step "
                "and return `tracker.result()` as `loss`.",
            )
        ]
    if _close(got, expected):
        return []
    mean_prediction = _mean_prediction(user)
    if mean_prediction is not None and _close(got, mean_prediction, rtol=1e-5):
        return [
            Finding(
                "loss_tracks_predictions",
                f"`loss` is {got:.6g}, the mean of the predictions, not the loss "
                f"({expected:.6g}): the predictions go to the loss tracker. On "
                "keras.Model, `self.compiled_metrics.update_state(y, y_pred)` does "
                "this. Fix: use customfit.CustomModel, whose `compiled_metrics` "
                "updates only the compiled metrics, or track the loss with "
                "`self.compute_loss(x, y, y_pred)`.",
            )
        ]
    if user.regularization > 0 and _close(got, expected - stock.regularization, rtol=1e-4):
        return [
            Finding(
                "regularization_dropped",
                f"The loss is {got:.6g}; stock fit's is {expected:.6g}, which "
                f"includes {stock.regularization:.6g} of regularization "
                "(`self.losses`: kernel regularizers, add_loss()). The step leaves "
                "it out, so regularizers have no effect. Fix: compute the loss with "
                "`self.compute_loss(x, y, y_pred)` (it adds `self.losses`), or add "
                "`sum(self.losses)` to your loss before taking gradients.",
            )
        ]
    return []


def _attribute_metrics(model: keras.Model) -> list[keras.metrics.Metric]:
    """Metrics held by the model's attributes (also in lists and dicts)."""
    found: dict[int, keras.metrics.Metric] = {}
    pending = list(vars(model).values())
    while pending:
        value = pending.pop()
        if isinstance(value, keras.metrics.Metric):
            found.setdefault(id(value), value)
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, dict):
            pending.extend(value.values())
    return list(found.values())


def _values(metric: keras.metrics.Metric) -> list[np.ndarray]:
    return [np.array(v.numpy(), copy=True) for v in metric.variables]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _is_reset(metric: keras.metrics.Metric) -> bool:
    return all(not np.any(v) for v in _values(metric))


def _metric_reset_findings(user: _Replay) -> list[Finding]:
    return [
        Finding(
            "metric_not_reset",
            f"The metric `{name}` is updated in the step but `reset_metrics()` "
            f"does not reset it (it still holds {value:.6g} afterwards): it is "
            "missing from `model.metrics`, so fit never resets it at the start of "
            "an epoch and the column averages over all epochs so far. Fix: list it "
            "in your `metrics` property (`return [self.loss_tracker, "
            "self.accuracy]`), or drop the override: Keras 3 lists the metrics "
            "assigned to the model's attributes by itself.",
        )
        for name, value in user.not_reset
    ]


def _training_findings(stock: _Replay, user: _Replay, matters: bool) -> list[Finding]:
    if not matters or not stock.training or True not in stock.training:
        return []
    if not user.training or True in user.training:
        return []
    return [
        Finding(
            "training_not_passed",
            "The step calls the model without `training=True` (it passed "
            f"training={user.training[0]!r}), so Dropout, BatchNormalization and "
            "other layers that train differently run in inference mode: no "
            "dropout, no batch statistics. Fix: `y_pred = self(x, training=True)` "
            "in train_step.",
        )
    ]


def _gradient_findings(model: keras.Model, user: _Replay) -> list[Finding]:
    findings = []
    if user.variables is not None:
        frozen = [v.path for v in user.variables if not v.trainable]
        if frozen:
            findings.append(
                Finding(
                    "gradients_on_weights",
                    f"The optimizer is given {len(frozen)} non-trainable "
                    f"variable(s) ({', '.join(frozen)}): the gradients are taken on "
                    "`self.weights`, which includes BatchNormalization's moving "
                    "statistics and frozen layers. Fix: differentiate and apply "
                    "with `self.trainable_weights`: `tape.gradient(loss, "
                    "self.trainable_weights)`.",
                )
            )
    if user.gradients is not None:
        variables = user.variables or list(model.trainable_weights)
        missing = [
            getattr(v, "path", getattr(v, "name", "?"))
            for g, v in zip(user.gradients, variables)
            if g is None and getattr(v, "trainable", True)
        ]
        if missing:
            findings.append(_none_gradients(missing))
    elif user.error is not None and "No gradient for" in str(user.error):
        findings.append(Finding("none_gradients", str(user.error)))
    return findings


def _none_gradients(paths: list[str]) -> Finding:
    return Finding(
        "none_gradients",
        f"No gradient for {len(paths)} trainable variable(s): "
        f"{', '.join(paths)}. They do not affect the loss (the optimizer skips "
        "them with a warning). Fix: use them in call(), freeze them "
        "(layer.trainable = False, then compile() again), or leave them out of "
        "the variables you differentiate.",
    )


def _mean_prediction(replay: _Replay) -> float | None:
    if not replay.predictions:
        return None
    flat = [t.astype("float64").ravel() for t in replay.predictions[0]]
    return float(np.mean(np.concatenate(flat))) if flat else None


def _close(a: float, b: float, rtol: float = 1e-6) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)
