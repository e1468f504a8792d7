"""Train the same model on two base classes under the same seeds; compare."""

import dataclasses
from typing import Any, Callable

import keras
import numpy as np

MODES = {
    "graph": dict(run_eagerly=False, jit_compile=False),
    "eager": dict(run_eagerly=True),
    "xla": dict(run_eagerly=False, jit_compile=True),
}


@dataclasses.dataclass
class Run:
    history: dict
    weights: list
    evaluation: Any
    predictions: Any


def train(base, build: Callable, x, y, compile_kwargs=None, fit_kwargs=None,
          mode="graph", seed=7, epochs=2) -> Run:
    keras.utils.set_random_seed(seed)
    model = build(base)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        **{"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
           **(compile_kwargs or {}), **MODES[mode]},
    )
    history = model.fit(x, y, epochs=epochs, batch_size=64, verbose=0,
                        **(fit_kwargs or {}))
    return Run(
        history=history.history,
        weights=[w.copy() for w in model.get_weights()],
        evaluation=model.evaluate(x, y, batch_size=100, verbose=0),
        predictions=model.predict(x, batch_size=100, verbose=0),
    )


def assert_identical(expected: Run, actual: Run) -> None:
    """Bit-for-bit: same History keys and values, weights, evaluate, predict."""
    assert actual.history.keys() == expected.history.keys()
    for key in expected.history:
        assert actual.history[key] == expected.history[key], key
    assert len(actual.weights) == len(expected.weights)
    for i, (a, e) in enumerate(zip(actual.weights, expected.weights)):
        np.testing.assert_array_equal(a, e, err_msg=f"weight #{i}")
    assert actual.evaluation == expected.evaluation
    expected_outputs, actual_outputs = _outputs(expected), _outputs(actual)
    assert actual_outputs.keys() == expected_outputs.keys()
    for name in expected_outputs:
        np.testing.assert_array_equal(actual_outputs[name], expected_outputs[name])


def _outputs(run: Run) -> dict:
    predictions = run.predictions
    return dict(predictions) if isinstance(predictions, dict) else {"": predictions}
