"""With nothing overridden, CustomModel trains like keras.Model on PyTorch,
bit for bit: History, weights, evaluate and predict (`customfit.testing`),
over the cases the JAX tests run (stock Keras refuses several batches per
execution on PyTorch: `tests/test_every_backend.py` compares those with
one), plus dict inputs and outputs with sample weights, `*_on_batch` and
mixed precision."""

import keras
import numpy as np
import pytest

import customfit
from customfit.testing import assert_trains_like_keras
from tests.jax_backend import models
from tests.jax_backend.test_parity import CASES, compile_kwargs

TORCH_CASES = [case for case in CASES if case != "steps_per_execution_3"]


@pytest.mark.parametrize("case", TORCH_CASES)
def test_default_step_equals_stock_fit(digits, case):
    build, compile_overrides, fit_overrides = CASES[case]
    x, y = digits[0][:384], digits[1][:384]
    assert_trains_like_keras(
        build, x, y, compile_kwargs=lambda: compile_kwargs(**compile_overrides),
        fit_kwargs={"batch_size": 64, **fit_overrides}, epochs=2, seed=3)


def test_sample_weights_and_dict_inputs_and_outputs(digits):
    x, y = digits[0][:256], digits[1][:256]
    inputs, targets = models.multi_io_data(x, y)
    weights = np.linspace(0.5, 1.5, len(x)).astype("float32")
    assert_trains_like_keras(
        models.multi_io, inputs, targets,
        compile_kwargs=lambda: {
            "optimizer": "adam",
            "loss": {"digit": "sparse_categorical_crossentropy", "size": "mse"},
            "metrics": {"digit": ["accuracy"], "size": ["mae"]},
        },
        fit_kwargs={"batch_size": 64, "sample_weight": weights}, seed=4)


def test_train_and_test_on_batch_equal_stock(digits):
    x, y = digits[0][:64], digits[1][:64]
    results = []
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(5)
        model = models.mlp(base)
        model.compile(**compile_kwargs())
        train = model.train_on_batch(x, y, return_dict=True)
        test = model.test_on_batch(x, y, return_dict=True)
        results.append((train, test, model.get_weights(), model.predict_on_batch(x)))
    (train_a, test_a, w_a, p_a), (train_b, test_b, w_b, p_b) = results
    assert train_a == train_b and test_a == test_b
    for a, b in zip(w_a, w_b, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p_a, p_b)


def test_mixed_precision_equals_stock(digits, mixed_float16):
    x, y = digits[0][:256], digits[1][:256]
    _, actual = assert_trains_like_keras(
        models.mlp, x, y, compile_kwargs=compile_kwargs, fit_kwargs={"batch_size": 64})
    assert actual.history["loss"][-1] < actual.history["loss"][0]


@pytest.mark.parametrize("steps_per_execution", [1, 3, "auto"])
def test_predict_with_batches_left_over_equals_stock(digits, steps_per_execution):
    """5 batches with 3 per execution: nothing is dropped, nothing warns
    (`predict` on PyTorch runs one batch per execution)."""
    x = digits[0][:300]
    outputs = []
    for base, steps in ((keras.Model, 1), (customfit.CustomModel, steps_per_execution)):
        keras.utils.set_random_seed(5)
        model = models.mlp(base)
        model.compile(**compile_kwargs(steps_per_execution=steps))
        outputs.append(model.predict(x, batch_size=64, verbose=0))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert outputs[1].shape == (300, 10)
