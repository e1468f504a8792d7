"""Record a training run (History, weights, evaluate, predict) and compare two."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np


@dataclasses.dataclass
class TrainingRecord:
    """What one `fit` produced, ready to compare with another run.

    Attributes:
        model_name: The model's class name, for messages.
        history: `History.history`: log name -> one value per epoch (a
            float, or an array for a metric with one value per class).
        weights: `(variable.path, value)` for each of `model.weights`, in order.
        evaluation: `model.evaluate(x, y)` after training (None if skipped).
        predictions: `model.predict(x)` after training (None if skipped).
    """

    model_name: str
    history: dict[str, list[Any]]
    weights: list[tuple[str, np.ndarray]]
    evaluation: Any = None
    predictions: Any = None


def fresh_compile_kwargs(compile_kwargs: Any) -> dict:
    """`compile_kwargs` for one model: a callable is called; optimizer, loss
    and metric objects are rebuilt from their config so two models never share
    state (an optimizer instance is bound to the first model it updates)."""
    if callable(compile_kwargs):
        compile_kwargs = compile_kwargs()
    return {k: _fresh(v) for k, v in dict(compile_kwargs or {}).items()}


def _fresh(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v) for v in value)
    if isinstance(value, (keras.optimizers.Optimizer, keras.losses.Loss, keras.metrics.Metric)):
        return type(value).from_config(value.get_config())
    return value


def record_training(
    build: Callable[[], keras.Model],
    x: Any,
    y: Any = None,
    *,
    compile_kwargs: Any = None,
    fit_kwargs: dict | None = None,
    epochs: int = 2,
    seed: int = 0,
    evaluate: bool = True,
    predict: bool = True,
) -> TrainingRecord:
    keras.utils.set_random_seed(seed)
    model = build()
    model.compile(**fresh_compile_kwargs(compile_kwargs))
    fit_kwargs = {"verbose": 0, **(fit_kwargs or {})}
    history = model.fit(x, y, epochs=epochs, **fit_kwargs)
    batch_size = fit_kwargs.get("batch_size")
    return TrainingRecord(
        model_name=type(model).__name__,
        history={k: [_value(v) for v in vs] for k, vs in history.history.items()},
        weights=[(w.path, np.array(w.numpy(), copy=True)) for w in model.weights],
        evaluation=(model.evaluate(x, y, batch_size=batch_size, verbose=0) if evaluate else None),
        predictions=(model.predict(x, batch_size=batch_size, verbose=0) if predict else None),
    )


def differences(
    expected: TrainingRecord,
    actual: TrainingRecord,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> list[str]:
    """One readable line per difference beyond `atol + rtol * |expected|`."""
    lines: list[str] = []
    # Reused below for History values, weights, evaluate() and predict() results.
    want: Any
    got: Any
    missing = [k for k in expected.history if k not in actual.history]
    extra = [k for k in actual.history if k not in expected.history]
    if missing or extra:
        lines.append(
            f"History keys differ: missing {missing}, unexpected {extra} "
            f"(expected {list(expected.history)})"
        )
    for key in expected.history:
        if key not in actual.history:
            continue
        want, got = expected.history[key], actual.history[key]
        if len(want) != len(got):
            lines.append(f"History[{key!r}]: {len(got)} epochs, expected {len(want)}")
            continue
        for epoch, (w, g) in enumerate(zip(want, got)):
            if np.ndim(w) or np.ndim(g):
                line = _array_difference(f"History[{key!r}] epoch {epoch}", g, w, rtol, atol)
                if line:
                    lines.append(line)
            elif not _close(np.float64(g), np.float64(w), rtol, atol):
                lines.append(
                    f"History[{key!r}] epoch {epoch}: {g!r}, expected {w!r} "
                    f"(abs diff {abs(g - w):.3g}, rel {_relative(g, w):.3g})"
                )
    if len(actual.weights) != len(expected.weights):
        lines.append(
            f"{len(actual.weights)} weights, expected {len(expected.weights)}: "
            f"{[p for p, _ in actual.weights]} vs {[p for p, _ in expected.weights]}"
        )
    else:
        for (path, got), (_, want) in zip(actual.weights, expected.weights):
            line = _array_difference(f"weight {path!r}", got, want, rtol, atol)
            if line:
                lines.append(line)
    if expected.evaluation is not None and actual.evaluation is not None:
        want, got = _flat(expected.evaluation), _flat(actual.evaluation)
        line = _array_difference("evaluate()", got, want, rtol, atol)
        if line:
            lines.append(line)
    if expected.predictions is not None and actual.predictions is not None:
        want, got = _named(expected.predictions), _named(actual.predictions)
        if want.keys() != got.keys():
            lines.append(f"predict() outputs {list(got)}, expected {list(want)}")
        else:
            for name in want:
                label = f"predict()[{name!r}]" if name else "predict()"
                line = _array_difference(label, got[name], want[name], rtol, atol)
                if line:
                    lines.append(line)
    return lines


def format_differences(
    expected: TrainingRecord,
    actual: TrainingRecord,
    lines: list[str],
    rtol: float,
    atol: float,
) -> str:
    tolerance = "bit for bit" if rtol == 0 and atol == 0 else f"rtol={rtol}, atol={atol}"
    return (
        f"{actual.model_name} does not train like {expected.model_name} "
        f"({tolerance}), {len(lines)} difference(s):\n  " + "\n  ".join(lines)
    )


def _value(value: Any) -> Any:
    """A History value: a float, or an array for a vector metric."""
    return float(value) if np.ndim(value) == 0 else np.asarray(value)


def _flat(values: Any) -> np.ndarray:
    """`evaluate()`'s result (a float, or a list that may hold arrays) as one
    float64 vector."""
    parts = values if isinstance(values, (list, tuple)) else [values]
    return np.concatenate([np.ravel(np.asarray(v, dtype="float64")) for v in parts])


def _named(predictions: Any) -> dict:
    if isinstance(predictions, dict):
        return dict(predictions)
    if isinstance(predictions, (list, tuple)):
        return {str(i): p for i, p in enumerate(predictions)}
    return {"": predictions}


def _close(got: Any, want: Any, rtol: float, atol: float) -> Any:
    got, want = np.asarray(got), np.asarray(want)
    with np.errstate(invalid="ignore", over="ignore"):
        within = np.abs(got.astype("float64") - want.astype("float64")) <= (
            atol + rtol * np.abs(want.astype("float64"))
        )
    return (got == want) | within | (np.isnan(got) & np.isnan(want))


def _relative(got: float, want: float) -> float:
    return abs(got - want) / abs(want) if want else float("inf") if got != want else 0.0


def _array_difference(label: str, got: Any, want: Any, rtol: float, atol: float) -> str:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{label}: shape {got.shape}, expected {want.shape}"
    close = _close(got, want, rtol, atol)
    if np.all(close):
        return ""
    diff = np.abs(got.astype("float64") - want.astype("float64"))
    diff = np.where(close, 0.0, np.nan_to_num(diff, nan=np.inf))
    worst = np.unravel_index(np.argmax(diff), diff.shape) if diff.ndim else ()
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = diff / np.abs(want.astype("float64"))
    rel = np.where(close, 0.0, np.nan_to_num(rel, nan=np.inf))
    where = f" at index {tuple(int(i) for i in worst)}" if worst else ""
    return (
        f"{label}: {int(np.sum(~close))} of {got.size} element(s) differ; "
        f"max abs diff {float(np.max(diff)):.3g}{where} "
        f"({_number(got[worst])} vs expected {_number(want[worst])}), max rel diff "
        f"{float(np.max(rel)):.3g}"
    )


def _number(value: Any) -> str:
    return (
        f"{float(value):.9g}" if np.issubdtype(np.asarray(value).dtype, np.number) else repr(value)
    )


def enable_determinism(seed: int) -> None:
    """Seeds Python, NumPy, the backend and Keras and, on TensorFlow, turns
    on op determinism (which TensorFlow offers no public way to turn off
    again)."""
    from customfit import _backend

    _backend.loop.enable_op_determinism()
    keras.utils.set_random_seed(seed)
