"""`customfit.testing.diagnose` on JAX: the step replayed inside customfit's
step scope, not jitted, each mistake that can happen on JAX named with its
fix (`tests/test_testing.py` on TensorFlow). `none_gradients` cannot: a
variable the loss does not reach gets a zero gradient on JAX, not None."""

import keras
import numpy as np
import pytest

import customfit
from customfit.testing import diagnose
from tests.jax_backend import models
from tests.jax_backend.step_mistakes import MISTAKES, Net, with_mistake
from tests.jax_backend.test_keras2_helpers import Keras2Hooks


def _compiled(model):
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def _state(model):
    return [np.array(v.numpy(), copy=True)
            for v in [*model.variables, *model.optimizer.variables, *model.metrics_variables]]


def test_diagnose_finds_nothing_in_a_correct_step(digits):
    x, y = digits[0][:32], digits[1][:32]
    model = _compiled(Net())
    model(x)
    model.optimizer.build(model.trainable_variables)
    before = _state(model)
    assert diagnose(model, x, y) == []
    for a, b in zip(before, _state(model), strict=True):  # the model ends as it started
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations) == 0
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # and still trains
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("mistake", MISTAKES)
def test_diagnose_names_each_mistake_and_its_fix(mistake, digits):
    x, y = digits[0][:32], digits[1][:32]
    findings = diagnose(_compiled(with_mistake(mistake)()), x, y)
    assert [f.mistake for f in findings] == [mistake]
    assert "Fix:" in findings[0].message


def test_diagnose_on_the_default_step_hooks_and_log(digits):
    """CustomModel's default step (regularizers, BatchNormalization, Dropout,
    a compiled metric), the Keras-2 helpers in its hooks, and a step that
    logs a new name make none of the mistakes."""
    x, y = digits[0][:32], digits[1][:32]

    class Logged(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            self.log("grad_norm", keras.ops.sqrt(sum(keras.ops.sum(g * g) for g in gradients)))
            return gradients

    for base in (customfit.CustomModel, Keras2Hooks, Logged):
        model = models.mlp(base, regularize=True, batchnorm=True)
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        assert diagnose(model, x, y) == [], base


def test_a_variable_the_loss_does_not_reach_is_not_found_on_jax(digits):
    """Pins the limit: JAX differentiates every input, so an unused
    trainable variable gets zeros, not None (TensorFlow: `none_gradients`)."""

    class Unused(Net):
        def __init__(self):
            super().__init__()
            self.unused = keras.layers.Dense(3)
            self.unused.build((None, 4))

    assert diagnose(_compiled(Unused()), digits[0][:32], digits[1][:32]) == []


def test_diagnose_needs_a_compiled_model(digits):
    with pytest.raises(RuntimeError, match="needs compile"):
        diagnose(Net(), digits[0][:8], digits[1][:8])


def test_diagnose_names_the_steps_it_cannot_replay(digits):
    x, y = digits[0][:8], digits[1][:8]
    stock = models.mlp(keras.Model)
    stock.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(TypeError, match=r"Functional is not one\. Fix: build the model on "
                                        r"customfit\.CustomModel"):
        diagnose(stock, x, y)

    class Stateless(customfit.CustomModel):
        def train_step(self, state, data):
            return keras.Model.train_step(self, state, data)

    model = models.mlp(Stateless)
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(TypeError, match=r"train_step\(self, state, data\)[\s\S]*"
                                        r"self\.value_and_gradients"):
        diagnose(model, x, y)
