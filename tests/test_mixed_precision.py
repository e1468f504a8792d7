"""Mixed precision: loss scaling happens in the library, hooks see unscaled
gradients, and CustomModel equals stock fit under the same policy, bit for bit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models
from tests.parity import assert_identical, train

POLICIES = ["mixed_float16", "mixed_bfloat16"]


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_default_step_equals_stock_fit(digits, policy):
    x, y = digits[0][:300], digits[1][:300]
    expected = train(keras.Model, models.mlp, x, y)
    actual = train(customfit.CustomModel, models.mlp, x, y)
    assert_identical(expected, actual)


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_every_hook_overridden_equals_stock_fit(digits, policy):
    x, y = digits[0][:300], digits[1][:300]
    expected = train(keras.Model, models.mlp, x, y)
    actual = train(models.every_hook(customfit.CustomModel), models.mlp, x, y)
    for name in models.HOOK_LOGS:
        assert np.all(np.isfinite(actual.history.pop(name)))
        actual.history.pop(f"val_{name}", None)
    actual.evaluation = actual.evaluation[:len(expected.evaluation)]
    assert_identical(expected, actual)


@pytest.mark.parametrize("policy", ["mixed_float16"], indirect=True)
def test_loss_scale_falls_after_overflow_as_in_stock_fit(policy):
    """Targets of 1000 overflow float16 gradients at the initial scale 2**15:
    the dynamic scale halves until they fit, skipping those updates."""
    x = np.ones((64, 4), "float32")
    y = np.full((64, 1), 1000.0, "float32")
    runs = {}
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = base(inputs, keras.layers.Dense(1)(inputs))
        model.compile(keras.optimizers.SGD(1e-4), "mse")
        history = model.fit(x, y, batch_size=64, epochs=30, verbose=0).history
        runs[base] = (history, model.get_weights(), model.optimizer)
    (expected, expected_weights, _), (actual, weights, optimizer) = runs.values()
    assert float(optimizer.dynamic_scale) < 2**15
    assert 0 < int(optimizer.iterations) < 30  # some updates skipped, then training
    assert actual == expected
    for a, e in zip(weights, expected_weights, strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_transform_gradients_sees_unscaled_gradients(digits, policy):
    x, y = digits[0][:64], digits[1][:64]
    norms = []

    class Recorder(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            norms.append(tf.linalg.global_norm(gradients))
            return gradients

    model = models.mlp(Recorder, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy", run_eagerly=True)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    reference = float(tf.linalg.global_norm(tape.gradient(loss, model.trainable_weights)))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert float(model.optimizer.scale_loss(1.0)) >= 2**14  # scaling is active
    else:
        # bfloat16 has float32's exponent range: Keras does not scale losses.
        assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # Same maths, unscaled; low-precision forward passes differ in rounding only.
    assert float(norms[0]) == pytest.approx(reference, rel=1e-3)
