"""Train the same model on two base classes under the same seeds; compare.

Built on `customfit.testing`, the helpers users get for their own steps."""

from typing import Callable

import keras

from customfit.testing import TrainingRecord, assert_same_training, record_training

MODES = {
    "graph": dict(run_eagerly=False, jit_compile=False),
    "eager": dict(run_eagerly=True),
    "xla": dict(run_eagerly=False, jit_compile=True),
}
SEED = 7


def compile_kwargs(mode="graph", overrides=None) -> dict:
    """The tests' compile() arguments; the Adam instance is rebuilt from its
    config for each model by customfit.testing."""
    return {"optimizer": keras.optimizers.Adam(1e-2),
            "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
            **(overrides or {}), **MODES[mode]}


def fit_kwargs(overrides=None) -> dict:
    return {"batch_size": 64, **(overrides or {})}


def train(base, build: Callable, x, y, compile_overrides=None, fit_overrides=None,
          mode="graph", seed=SEED, epochs=2) -> TrainingRecord:
    return record_training(
        lambda: build(base), x, y, compile_kwargs=compile_kwargs(mode, compile_overrides),
        fit_kwargs=fit_kwargs(fit_overrides), seed=seed, epochs=epochs)


def assert_identical(expected: TrainingRecord, actual: TrainingRecord) -> None:
    """Bit-for-bit: same History keys and values, weights, evaluate, predict."""
    assert_same_training(expected, actual)
