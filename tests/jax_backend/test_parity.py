"""With nothing overridden, CustomModel trains like keras.Model on JAX, bit for
bit: History, weights, evaluate and predict (`customfit.testing`). `nox -s
torch` runs this file on PyTorch too, without jit (`jit_compile=True` there
is `torch.compile`: tests/torch_backend/test_torch_compile.py) and without
several batches per execution, which stock Keras refuses on PyTorch
(tests/test_every_backend.py compares those with one)."""

import keras
import numpy as np
import pytest

import customfit
from customfit.testing import assert_trains_like_keras
from tests.jax_backend import models

# On JAX, run_eagerly=True and jit_compile=False are one path (the step not
# jitted), in Keras and in customfit.
MODES = {
    "jit": dict(jit_compile=True),
    "no_jit": dict(jit_compile=False),
}


def compile_kwargs(**overrides):
    return {"optimizer": keras.optimizers.Adam(1e-2), "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"], **overrides}


CASES = {
    "functional_dropout": (models.mlp, {}, {}),
    "l2_regularized": (lambda base: models.mlp(base, regularize=True), {}, {}),
    "batchnorm": (lambda base: models.mlp(base, batchnorm=True), {}, {}),
    "subclassed_add_loss": (models.subclassed, {}, {}),
    "validation_split": (models.mlp, {}, {"validation_split": 0.25}),
    "class_weight": (models.mlp, {}, {"class_weight": {i: 1.0 + i / 10 for i in range(10)}}),
    "steps_per_execution_3": (models.mlp, {"steps_per_execution": 3}, {}),
    "weighted_metrics": (models.mlp, {"weighted_metrics": ["accuracy"]}, {}),
}


# Every case jitted; three of them also without jit.
PARAMS = [(case, "jit") for case in CASES] + [
    (case, "no_jit") for case in ("functional_dropout", "batchnorm", "steps_per_execution_3")
]
if keras.backend.backend() == "torch":
    PARAMS = [(case, "no_jit") for case in CASES if case != "steps_per_execution_3"]


@pytest.mark.parametrize(("case", "mode"), PARAMS, ids=[f"{c}-{m}" for c, m in PARAMS])
def test_default_step_equals_stock_fit(digits, case, mode):
    build, compile_overrides, fit_overrides = CASES[case]
    x, y = digits[0][:384], digits[1][:384]
    assert_trains_like_keras(
        build, x, y,
        compile_kwargs=lambda: compile_kwargs(**compile_overrides, **MODES[mode]),
        fit_kwargs={"batch_size": 64, **fit_overrides}, epochs=2, seed=3,
    )


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
        fit_kwargs={"batch_size": 64, "sample_weight": weights}, seed=4,
    )


def test_train_and_test_on_batch_equal_stock(digits):
    x, y = digits[0][:64], digits[1][:64]
    results = []
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(5)
        model = models.mlp(base)
        model.compile(**compile_kwargs())
        train = model.train_on_batch(x, y, return_dict=True)
        test = model.test_on_batch(x, y, return_dict=True)
        results.append((train, test, model.get_weights()))
    (train_a, test_a, w_a), (train_b, test_b, w_b) = results
    assert train_a == train_b and test_a == test_b
    for a, b in zip(w_a, w_b):
        np.testing.assert_array_equal(a, b)


def test_mixed_precision_equals_stock(digits, mixed_float16):
    """Under mixed_float16 both use a LossScaleOptimizer: the loss scaled,
    the gradients unscaled before the hooks and scaled again to apply."""
    x, y = digits[0][:256], digits[1][:256]
    reference, actual = assert_trains_like_keras(
        models.mlp, x, y, compile_kwargs=compile_kwargs, fit_kwargs={"batch_size": 64})
    assert actual.history["loss"][-1] < actual.history["loss"][0]
