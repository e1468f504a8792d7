"""Bad input gets an error that names the fix, and leaves the model usable."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _assert_unchanged(model, before):
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call", ["fit", "evaluate", "train_on_batch", "test_on_batch"])
def test_use_before_compile(digits, call):
    model = models.mlp(customfit.CustomModel)
    with pytest.raises(RuntimeError, match=r"needs compile\(\) first"):
        getattr(model, call)(digits[0][:8], digits[1][:8])


def test_no_loss_configured_and_none_computed(digits):
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd")
    before = _weights(model)
    with pytest.raises(ValueError, match="no loss to minimize.*loss=.*add_loss"):
        model.fit(digits[0][:64], digits[1][:64], verbose=0)
    _assert_unchanged(model, before)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(digits[0][:64], digits[1][:64], verbose=0)  # usable after the fix


def test_data_without_targets_while_loss_needs_them(digits):
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    before = _weights(model)
    with pytest.raises(ValueError, match="no targets.*Pass y"):
        model.fit(digits[0][:64], verbose=0)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no targets"):
        model.evaluate(digits[0][:64], verbose=0)
    model.fit(digits[0][:64], digits[1][:64], verbose=0)


class ReturnsLoss(customfit.CustomModel):
    def train_step(self, data):
        super().train_step(data)
        return tf.constant(1.0)


class ReturnsText(customfit.CustomModel):
    def train_step(self, data):
        logs = super().train_step(data)
        return {**logs, "note": "epoch went well"}


@pytest.mark.parametrize("cls,got", [(ReturnsLoss, "got .*Tensor"),
                                     (ReturnsText, "note")])
def test_step_returning_something_other_than_a_dict_of_numbers(digits, cls, got):
    model = models.mlp(cls)
    model.compile("sgd", "sparse_categorical_crossentropy")
    before = _weights(model)
    with pytest.raises(TypeError, match=r"train_step\(\) must return a dict .*" + got):
        model.fit(digits[0][:64], digits[1][:64], verbose=0)
    _assert_unchanged(model, before)  # the check runs when the step is traced


class DropsAGradient(customfit.CustomModel):
    def transform_gradients(self, gradients, variables):
        return gradients[:-1]


def test_transform_gradients_returning_a_different_number(digits):
    model = models.mlp(DropsAGradient)
    model.compile("sgd", "sparse_categorical_crossentropy")
    before = _weights(model)
    with pytest.raises(ValueError, match="returned 3 gradients for 4 variables"):
        model.fit(digits[0][:64], digits[1][:64], verbose=0)
    _assert_unchanged(model, before)


def with_an_unused_layer(base):
    """A model with a layer `call` never uses: its variables get no gradient."""

    class Unused(base):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.Dense(10, activation="softmax")
            self.unused = keras.layers.Dense(3, name="never_called")

        def build(self, input_shape):
            self.used.build(input_shape)
            self.unused.build(input_shape)

        def call(self, x):
            return self.used(x)

    model = Unused()
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.build((None, 64))
    return model


def test_missing_gradients_warn_and_train_as_in_keras(digits):
    """Keras' behaviour: the optimizer warns, leaves those variables alone
    and updates the others, bit for bit as stock fit."""
    x, y = digits[0][:64], digits[1][:64]
    results = []
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(0)
        model = with_an_unused_layer(base)
        before = _weights(model)
        with pytest.warns(UserWarning, match="Gradients do not exist for variables "
                          r"\['\w+/never_called/kernel', '\w+/never_called/bias'\]"):
            history = model.fit(x, y, verbose=0).history
        np.testing.assert_array_equal(model.unused.kernel.numpy(), before[2])
        results.append((history, _weights(model)))
    (stock_history, stock_weights), (history, weights) = results
    assert history == stock_history
    for a, b in zip(weights, stock_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_missing_gradients_can_be_an_error_naming_the_variables(digits):
    model = with_an_unused_layer(customfit.CustomModel)
    model.require_all_gradients = True
    before = _weights(model)
    with pytest.raises(ValueError, match=r"never_called/kernel, .*never_called/bias.*trainable = False"):
        model.fit(digits[0][:64], digits[1][:64], verbose=0)
    _assert_unchanged(model, before)