"""Loss scaling happens in the library: hooks see unscaled gradients, and the
default step still equals stock fit under mixed_float16 (bit-for-bit)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models
from tests.parity import assert_identical, train


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_default_step_equals_stock_fit(digits, mixed_float16):
    x, y = digits[0][:300], digits[1][:300]
    expected = train(keras.Model, models.mlp, x, y)
    actual = train(customfit.CustomModel, models.mlp, x, y)
    assert_identical(expected, actual)


def test_transform_gradients_sees_unscaled_gradients(digits, mixed_float16):
    x, y = digits[0][:64], digits[1][:64]
    norms = []

    class Recorder(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            norms.append(tf.linalg.global_norm(gradients))
            return gradients

    model = models.mlp(Recorder, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy", run_eagerly=True)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    reference = float(tf.linalg.global_norm(tape.gradient(loss, model.trainable_weights)))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    assert float(model.optimizer.scale_loss(1.0)) >= 2**14  # scaling is active
    assert float(norms[0]) == pytest.approx(reference, rel=1e-3)
