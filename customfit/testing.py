"""Test helpers: prove in your own unit tests that a custom step trains right.

- `assert_trains_like_keras`: your model trains like stock `keras.Model.fit`
  (History, weights, `evaluate`, `predict`), bit for bit or within a tolerance.
- `check_step`: the same step eagerly and compiled, with
  `steps_per_execution > 1`, and on two replicas, compared.
- `diagnose`: the usual mistakes in a step, each with the fix.

The pytest fixture `customfit_deterministic` (registered through the
package's `pytest11` entry point) seeds a test and turns on op determinism.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from customfit._diagnose import Finding
from customfit._diagnose import diagnose as _diagnose
from customfit._model import CustomModel
from customfit._step_check import Comparison, StepReport
from customfit._step_check import check_step as _check_step
from customfit._training_parity import (
    TrainingRecord,
    differences,
    enable_determinism,
    format_differences,
)
from customfit._training_parity import record_training as _record_training

__all__ = [
    "Comparison",
    "Finding",
    "StepReport",
    "TrainingRecord",
    "assert_same_training",
    "assert_trains_like_keras",
    "check_step",
    "diagnose",
    "record_training",
]


def assert_trains_like_keras(
    build: Callable[[type], keras.Model],
    x: Any,
    y: Any = None,
    *,
    model_class: type | None = None,
    reference_class: type = keras.Model,
    compile_kwargs: dict | Callable[[], dict] | None = None,
    fit_kwargs: dict | None = None,
    epochs: int = 2,
    seed: int = 0,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> tuple[TrainingRecord, TrainingRecord]:
    """Asserts that `build(model_class)` trains like `build(keras.Model)`.

    Both models are built and trained under the same seed with op determinism
    on (`tf.config.experimental.enable_op_determinism()`, which stays on for
    the rest of the process), then compared: every `History` value of every
    epoch, every weight, `evaluate(x, y)` and `predict(x)`. With the default
    `rtol=atol=0` the comparison is bit for bit: right for a step with its
    custom logic switched off, or logic that must be equivalent. Otherwise a
    value passes when `|actual - expected| <= atol + rtol * |expected|`.

    Args:
        build: `build(base)` builds the model on the base class it is given:
            `base(inputs, outputs)` for a functional model, or a subclass of
            `base` defined inside `build`.
        x: Training inputs, as for `fit`.
        y: Training targets, as for `fit`.
        model_class: The class under test (default `customfit.CustomModel`).
        reference_class: The class of the reference (default `keras.Model`).
        compile_kwargs: Arguments for `compile()`, or a function returning
            them. Optimizer, loss and metric objects are rebuilt from their
            config for each model, so the two never share state.
        fit_kwargs: Extra `fit()` arguments (`batch_size`, `validation_data`,
            `sample_weight`...); `verbose=0` unless given.
        epochs: Epochs to train.
        seed: Passed to `keras.utils.set_random_seed` before each build.
        rtol: Relative tolerance; 0 (with `atol=0`) means equal.
        atol: Absolute tolerance.

    Returns:
        The two records `(reference, actual)`, for further checks.

    Raises:
        AssertionError: listing each difference: History key and epoch, weight
            (by `variable.path`) with how many elements differ and the largest
            absolute and relative difference, `evaluate`, `predict`.

    Example:

    ```python
    def test_clipping_off_trains_like_fit(customfit_deterministic):
        assert_trains_like_keras(build, x, y, model_class=Clipped,
                                 compile_kwargs={"loss": "mse"})
    ```
    """
    if model_class is None:
        model_class = CustomModel
    common: dict[str, Any] = dict(
        compile_kwargs=compile_kwargs, fit_kwargs=fit_kwargs, epochs=epochs, seed=seed
    )
    enable_determinism(seed)
    reference = record_training(lambda: build(reference_class), x, y, **common)
    actual = record_training(lambda: build(model_class), x, y, **common)
    assert_same_training(reference, actual, rtol=rtol, atol=atol)
    return reference, actual


def assert_same_training(
    expected: TrainingRecord,
    actual: TrainingRecord,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> None:
    """Asserts two `TrainingRecord`s agree, with the same readable diff as
    `assert_trains_like_keras`. Use it with `record_training` when the
    reference cannot be built by the same function (e.g. a subclassed model
    whose architecture lives in its own `__init__`)."""
    lines = differences(expected, actual, rtol=rtol, atol=atol)
    if lines:
        raise AssertionError(format_differences(expected, actual, lines, rtol, atol))


def record_training(
    build: Callable[[], keras.Model],
    x: Any,
    y: Any = None,
    *,
    compile_kwargs: dict | Callable[[], dict] | None = None,
    fit_kwargs: dict | None = None,
    epochs: int = 2,
    seed: int = 0,
    evaluate: bool = True,
    predict: bool = True,
) -> TrainingRecord:
    """Trains `build()` and records what `fit` produced.

    Seeds with `keras.utils.set_random_seed(seed)`, builds, compiles with
    `compile_kwargs` (objects rebuilt from their config, as in
    `assert_trains_like_keras`), fits for `epochs` with `fit_kwargs`, then
    evaluates and predicts on `x` (with `fit_kwargs`' batch size). It does not
    turn on op determinism: use the `customfit_deterministic` fixture.

    Example:

    ```python
    expected = record_training(lambda: StockNet(), x, y, compile_kwargs=kw)
    actual = record_training(lambda: MyNet(), x, y, compile_kwargs=kw)
    assert_same_training(expected, actual)
    ```
    """
    return _record_training(
        build,
        x,
        y,
        compile_kwargs=compile_kwargs,
        fit_kwargs=fit_kwargs,
        epochs=epochs,
        seed=seed,
        evaluate=evaluate,
        predict=predict,
    )


def check_step(
    build: str | Callable[[], keras.Model],
    x: Any,
    y: Any = None,
    *,
    compile_kwargs: dict | None = None,
    batch_size: int = 32,
    steps: int = 3,
    replicas: bool = True,
    seed: int = 0,
    timeout: float = 300,
) -> StepReport:
    """Runs a step in several execution settings and reports disagreements.

    The first `steps` batches of `x, y` are trained for one epoch, unshuffled,
    from the same seed, compiled on one replica with `steps_per_execution=1`
    (the reference) and then:

    - eagerly (`run_eagerly=True`), compared bit for bit (on JAX within
      rtol=1e-5, atol=1e-6: XLA fuses the jitted step and rounds float32
      differently from the eager one);
    - with `steps_per_execution=steps`, compared bit for bit;
    - on two replicas (`MirroredStrategy` over two logical CPUs; on JAX,
      `keras.distribution.DataParallel` over two CPU devices; the same global
      batch), in a fresh Python process; compared within rtol=1e-5,
      atol=1e-6, because two replicas sum gradients in a different order.
      A step whose update doubles or whose `loss` halves is diagnosed.

    `diagnose` also runs on the first batch (on JAX, where it replays only a
    `CustomModel`'s `train_step(data)`, the report notes when it did not).
    Layers that draw per-replica randomness (Dropout) or per-replica
    statistics (BatchNormalization) make two replicas legitimately differ:
    check the step on a model without them.
    On JAX, the eager comparison finds Python side effects that a jitted
    step runs only when traced.

    Args:
        build: A function with no arguments returning the (uncompiled) model,
            defined at module level of an importable module, or its name as
            "package.module:function": the two-replica process imports it.
        x: Inputs; the first `batch_size * steps` samples are used.
        y: Targets, as many.
        compile_kwargs: Arguments for `compile()`; the optimizer defaults to
            `SGD(0.1)` (adaptive optimizers such as Adam hide a gradient
            scaled by a constant). Strings, numbers and Keras objects only.
        batch_size: The global batch size.
        steps: Batches trained, and the `steps_per_execution` compared.
        replicas: Whether to run the two-replica comparison (on PyTorch,
            which has no `keras.distribution`, the report notes that it was
            not run).
        seed: For `keras.utils.set_random_seed`.
        timeout: Seconds allowed for the two-replica process.

    Returns:
        A `StepReport`: `report.ok`, and `str(report)` as a table.

    Example:

    ```python
    def test_step_is_consistent(customfit_deterministic):
        report = check_step("mypackage.models:build_model", x, y,
                            compile_kwargs={"loss": "mse"})
        assert report.ok, report
    ```
    """
    return _check_step(
        build,
        x,
        y,
        compile_kwargs=compile_kwargs,
        batch_size=batch_size,
        steps=steps,
        replicas=replicas,
        seed=seed,
        timeout=timeout,
    )


def diagnose(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    *,
    seed: int = 0,
) -> list[Finding]:
    """Looks for the usual mistakes in `model.train_step` on one batch.

    Runs the model's `train_step` and Keras' stock one eagerly on the batch
    from the same state (put back afterwards; the model ends as it started)
    and compares them. Each `Finding` names the fix:

    - `loss_not_tracked`: the `loss` column stays 0 (no tracker update);
    - `loss_tracks_predictions`: `loss` is the mean of the predictions;
    - `metric_not_reset`: a metric updated in the step but missing from
      `model.metrics`, so never reset between epochs;
    - `training_not_passed`: `self(x)` without `training=True` while the model
      has layers that train differently (Dropout, BatchNormalization);
    - `gradients_on_weights`: non-trainable variables handed to the optimizer;
    - `regularization_dropped`: the loss leaves out `self.losses`;
    - `none_gradients`: `None` gradients for trainable variables (TensorFlow
      only: on JAX a variable the loss does not reach gets a zero gradient,
      not None, so it cannot be told apart).

    Distribution mistakes (loss not divided by replicas, loss tracked per
    replica) need two replicas: `check_step` finds those.

    On JAX the step is replayed inside customfit's step scope (gradients
    are taken only there), not jitted; the model must be a `CustomModel`
    whose `train_step(self, data)` takes its gradients with
    `self.value_and_gradients`, and a step written for Keras' stateless JAX
    trainer (`train_step(self, state, data)`) raises a `TypeError` naming
    the fix. Keras' stock step, stateless on JAX, is replayed as the same
    maths (`compute_loss`, the gradients, `compute_metrics`).

    Args:
        model: A compiled model.
        x: One batch of inputs.
        y: Its targets.
        sample_weight: Its sample weights, or None.
        seed: For `keras.utils.set_random_seed` before each replay.

    Returns:
        The findings; empty when none of the mistakes was seen.

    Example:

    ```python
    def test_step_has_no_known_mistake(customfit_deterministic):
        model = build_model()
        model.compile("sgd", "sparse_categorical_crossentropy")
        assert diagnose(model, x[:32], y[:32]) == []
    ```
    """
    return _diagnose(model, x, y, sample_weight, seed=seed)
