"""`CustomModel.value_and_gradients`: a `train_step` overridden whole that
takes its own gradients, on TensorFlow (the suite) and on JAX (`nox -s jax`)."""

import keras
import numpy as np
import pytest
from keras import ops

import customfit
from tests import models

MODES = {"compiled": {}, "eager": {"run_eagerly": True}}


class OwnStep(customfit.CustomModel):
    """The default step's maths, written as a user writes a whole step."""

    def train_step(self, data):
        x, y = data

        def loss_fn():
            y_pred = self(x, training=True)
            return self.compute_loss(x, y, y_pred), y_pred

        variables = self.trainable_variables
        (loss, y_pred), gradients = self.value_and_gradients(loss_fn, variables, has_aux=True)
        self.apply_gradients(gradients, variables)
        self.log("own_loss", loss, weight=ops.shape(x)[0])
        return self.compute_metrics(x, y, y_pred)


def fit(base, digits, **compile_kwargs):
    keras.utils.set_random_seed(3)
    model = models.mlp(base, dropout=0.2, batchnorm=True)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], **compile_kwargs)
    history = model.fit(digits[0][:256], digits[1][:256], batch_size=64, epochs=2,
                        verbose=0, shuffle=False).history
    return model, history


@pytest.mark.parametrize("mode", MODES)
def test_a_whole_step_with_its_own_gradients_trains_like_the_default(digits, mode):
    """Bit for bit: weights, BatchNormalization statistics (assigned inside
    the differentiated function), optimizer state and accuracy."""
    default, expected = fit(customfit.CustomModel, digits, **MODES[mode])
    own, history = fit(OwnStep, digits, **MODES[mode])
    for a, b in zip(own.get_weights(), default.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(own.optimizer.variables, default.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert history["accuracy"] == expected["accuracy"]
    # The loss as returned, averaged like the `loss` column.
    np.testing.assert_allclose(history["own_loss"], expected["loss"], rtol=1e-6)


def test_gradients_of_part_of_the_variables_and_a_plain_loss(digits):
    """Only the variables asked for change; `has_aux=False` returns the loss."""
    seen = {}

    class HeadOnly(customfit.CustomModel):
        def train_step(self, data):
            x, y = data
            head = self.get_layer("digit").trainable_variables

            def loss_fn():
                return self.compute_loss(x, y, self(x, training=True))

            loss, gradients = self.value_and_gradients(loss_fn, head)
            seen["count"] = len(gradients)
            self.optimizer.apply(gradients, head)
            self.log("head_loss", loss)
            return {}

    keras.utils.set_random_seed(0)
    model = models.mlp(HeadOnly, dropout=0)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    hidden_before = model.get_layer(index=1).get_weights()
    head_before = model.get_layer("digit").get_weights()
    history = model.fit(digits[0][:128], digits[1][:128], batch_size=64, verbose=0).history
    assert seen["count"] == 2
    for a, b in zip(model.get_layer(index=1).get_weights(), hidden_before):
        np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b)
               for a, b in zip(model.get_layer("digit").get_weights(), head_before))
    assert np.isfinite(history["head_loss"]).all()
