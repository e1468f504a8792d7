"""`python -m customfit check`: does CustomModel train like stock `fit` on
this install (its Keras, backend, processor or GPU)?

Each check trains a small model twice under the same seeds, with op
determinism, on generated data (nothing is downloaded), and compares
`History`, weights, `evaluate` and `predict`, or the logs every callback
receives; the table says what matches bit for bit and, where something
differs, by how much.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

import customfit
from customfit._backend import BACKEND
from customfit._keras import versions
from customfit._model import CustomModel
from customfit._training_parity import differences, enable_determinism, record_training

BATCH = 32
SAMPLES = 8 * BATCH
COMPILE = dict(
    optimizer=keras.optimizers.Adam(1e-2),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
FIT = dict(batch_size=BATCH)


@dataclasses.dataclass
class Result:
    """One row of the table.

    Attributes:
        name: What was compared.
        compared: Against what, in words.
        lines: One line per difference; empty when everything matched bit
            for bit.
    """

    name: str
    compared: str
    lines: list[str]


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 16)).astype("float32")
    y = (x[:, :4].argmax(axis=1) + (x[:, 4] > 1)).astype("int32") % 4
    return x, y


def mlp(base: type) -> keras.Model:
    inputs = keras.Input((16,))
    hidden = keras.layers.Dropout(0.2)(keras.layers.Dense(32, activation="relu")(inputs))
    return base(inputs, keras.layers.Dense(4, activation="softmax")(hidden))


class Keras2Step(CustomModel):
    """A whole `train_step` the tf.keras way, with the Keras-2 helpers (the
    gradients taken by `value_and_gradients`, a `tf.GradientTape` on
    TensorFlow)."""

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y = data

        def loss_fn() -> tuple[Any, Any]:
            y_pred = self(x, training=True)
            return self.compiled_loss(y, y_pred, regularization_losses=self.losses), y_pred

        (_, y_pred), gradients = self.value_and_gradients(
            loss_fn, self.trainable_weights, has_aux=True
        )
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        self.compiled_metrics.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


class Logging(CustomModel):
    """A hook that logs the gradient norm and leaves the gradients alone."""

    def transform_gradients(self, gradients: list, variables: list) -> list:
        self.log("grad_norm", ops.sqrt(sum(ops.sum(ops.square(g)) for g in gradients)))
        return gradients


def compare_fit(
    name: str,
    model_class: type,
    fit_overrides: dict | None = None,
    compile_overrides: dict | None = None,
    logged: tuple = (),
) -> Result:
    """`model_class` against `keras.Model`, both `mlp`, the same seeds."""
    x, y = data()
    compile_kwargs = {**COMPILE, **(compile_overrides or {})}
    fit_kwargs = {**FIT, **(fit_overrides or {})}
    expected = record_training(
        lambda: mlp(keras.Model), x, y, compile_kwargs=COMPILE, fit_kwargs=FIT
    )
    actual = record_training(
        lambda: mlp(model_class), x, y, compile_kwargs=compile_kwargs, fit_kwargs=fit_kwargs
    )
    lines = []
    for column in logged:
        values = actual.history.pop(column, None)
        if values is None or not np.all(np.isfinite(values)):
            lines.append(f"History[{column!r}]: {values!r}, expected finite values")
    return Result(name, "stock keras.Model.fit", lines + differences(expected, actual))


def compare_batch_logs(steps_per_execution: int | str) -> Result:
    """Every batch's callback logs with `steps_per_execution` (a number or
    "auto") against 1."""
    x, y = data()
    runs = []
    for k in (1, steps_per_execution):
        record = _BatchLogs()
        keras.utils.set_random_seed(0)
        model = mlp(CustomModel)
        model.compile(
            **{**COMPILE, "optimizer": keras.optimizers.Adam(1e-2)}, steps_per_execution=k
        )
        model.fit(x, y, **FIT, epochs=2, verbose=0, callbacks=[record])
        runs.append(record.logs)
    (reference, actual) = runs
    lines = []
    if [b for b, _ in actual] != [b for b, _ in reference]:
        lines.append(
            f"batches reported: {[b for b, _ in actual]}, expected {[b for b, _ in reference]}"
        )
    for (batch, got), (_, want) in zip(actual, reference):
        for key in want:
            if got.get(key) != want[key]:
                lines.append(f"batch {batch} {key!r}: {got.get(key)!r}, expected {want[key]!r}")
    return Result(
        f"every batch's logs, steps_per_execution={steps_per_execution}",
        "steps_per_execution=1",
        lines,
    )


class _BatchLogs(keras.callbacks.Callback):
    reads_only_logs = True

    def __init__(self) -> None:
        super().__init__()
        self.logs: list[tuple[int, dict]] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.logs.append((batch, dict(logs or {})))


CHECKS: tuple[Callable[[], Result], ...] = (
    lambda: compare_fit("default step", CustomModel),
    lambda: compare_fit(
        "Keras-2 train_step (compiled_loss, compiled_metrics, metrics)", Keras2Step
    ),
    lambda: compare_fit("self.log in a hook", Logging, logged=("grad_norm",)),
    lambda: compare_fit(
        "steps_per_execution=4", CustomModel, compile_overrides=dict(steps_per_execution=4)
    ),
    lambda: compare_batch_logs(4),
    lambda: compare_batch_logs("auto"),
)


def device() -> str:
    try:
        gpus = keras.distribution.list_devices("gpu")
    except (RuntimeError, ValueError):  # JAX without a GPU backend
        gpus = []
    except AttributeError:  # PyTorch: no keras.distribution
        gpus = []
    if gpus:
        return f"{len(gpus)} GPU(s)"
    return f"CPU ({platform.processor() or platform.machine()})"


BACKEND_NAME = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}.get(BACKEND, BACKEND)


def backend_version() -> str:
    """The backend library and its release, e.g. "TensorFlow 2.21.0"."""
    return f"{BACKEND_NAME} {sys.modules[BACKEND].__version__}"


def stack_lines(found: list[str]) -> list[str]:
    """What `versions.problems()` compared, in words, and what it found."""
    tensorflow = BACKEND == "tensorflow"
    installed = f"Keras {keras.version()}" + (f" and {backend_version()}" if tensorflow else "")
    tested = f"Keras {versions.release_range(versions.TESTED_KERAS)}" + (
        f" and TensorFlow {versions.release_range(versions.TESTED_TENSORFLOW)}"
        if tensorflow
        else ""
    )
    # The installed backend's `COPIES`: on JAX, Keras' JAX trainer (its
    # stateless step, `fit`, state handling), on PyTorch Keras' PyTorch
    # trainer, and the backend-neutral code.
    copies = f"the {len(versions.COPIES)} Keras functions customfit " + (
        "copies or reproduces"
        if tensorflow
        else f"reproduces or relies on with Keras' {BACKEND_NAME} trainer"
    )
    if found:
        code = f"Copied Keras code: the source of {copies}, compared with the tested releases'."
    else:
        code = f"Copied Keras code: {copies} have their source in a tested release."
    if found:
        return [
            f"Releases: {installed} installed; tested with {tested}.",
            code,
            f"Differences from the tested stack ({len(found)}):",
            *(f"  - {problem}" for problem in found),
        ]
    return [f"Releases: {installed}, within the tested {tested}.", code]


def main() -> int:
    """Prints the table; 0 if every check matched bit for bit, else 1."""
    started = time.monotonic()
    enable_determinism(0)
    print(
        f"customfit {customfit.__version__}: Keras {keras.version()}, "
        f"{backend_version()}, Python {platform.python_version()}, {device()}"
    )
    for line in stack_lines(versions.problems()):
        print(line)
    print()
    with warnings.catch_warnings():
        # Said above already.
        warnings.simplefilter("ignore", versions.CompatibilityWarning)
        results = [check() for check in CHECKS]
    width = max(len(r.name) for r in results)
    print(f"{'check':{width}}  result")
    for result in results:
        verdict = (
            "bit for bit" if not result.lines else f"DIFFERS ({len(result.lines)} difference(s))"
        )
        print(f"{result.name:{width}}  {verdict}, against {result.compared}")
        for line in result.lines[:5]:
            print(f"{'':{width}}    {line}")
        if len(result.lines) > 5:
            print(f"{'':{width}}    ... {len(result.lines) - 5} more")
    print(
        f"\n{sum(not r.lines for r in results)} of {len(results)} checks match bit "
        f"for bit ({time.monotonic() - started:.0f} s)."
    )
    return 0 if all(not r.lines for r in results) else 1
