"""The hooks, written with keras.ops, on JAX: each changes what it says and
nothing else; `log` reports like a `Mean` tracker."""

import keras
import numpy as np
import pytest
from keras import ops

import customfit
from customfit.testing import assert_trains_like_keras
from tests.jax_backend import models


def compile_kwargs(**overrides):
    return {"optimizer": keras.optimizers.Adam(1e-2), "loss": "sparse_categorical_crossentropy",
            "metrics": ["accuracy"], **overrides}


class Overridden(customfit.CustomModel):
    """Every hook overridden by a call to the default: the same training."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return super().compute_loss(x, y, y_pred, sample_weight, training)

    def transform_gradients(self, gradients, variables):
        return [g for g in super().transform_gradients(gradients, variables)]

    def apply_gradients(self, gradients, variables):
        super().apply_gradients(gradients, variables)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred, sample_weight)


def test_hooks_calling_their_defaults_train_like_stock(digits):
    x, y = digits[0][:256], digits[1][:256]
    assert_trains_like_keras(models.mlp, x, y, model_class=Overridden,
                             compile_kwargs=compile_kwargs,
                             fit_kwargs={"batch_size": 64, "validation_split": 0.25})


def global_norm(gradients):
    return ops.sqrt(sum(ops.sum(ops.square(g)) for g in gradients))


class Clipped(customfit.CustomModel):
    def transform_gradients(self, gradients, variables):
        norm = global_norm(gradients)
        self.log("grad_norm", norm)
        scale = ops.minimum(1.0, 0.05 / norm)
        return [g * scale for g in gradients]


def test_clipping_in_transform_gradients_equals_optimizer_global_clipnorm(digits):
    """Tolerance 1e-6 relative: Keras clips with its own expression of the
    same maths; the two may differ in the last bits of the norm."""
    x, y = digits[0][:256], digits[1][:256]
    keras.utils.set_random_seed(5)
    stock = models.mlp(keras.Model)
    stock.compile(keras.optimizers.SGD(0.5, global_clipnorm=0.05),
                  "sparse_categorical_crossentropy")
    stock.fit(x, y, batch_size=64, epochs=2, verbose=0)
    keras.utils.set_random_seed(5)
    hooked = models.mlp(Clipped)
    hooked.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    history = hooked.fit(x, y, batch_size=64, epochs=2, verbose=0)
    assert history.history["grad_norm"][0] > 0.05  # clipping was active
    for a, b in zip(hooked.get_weights(), stock.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class TwoOptimizers(customfit.CustomModel):
    """The output layer updated by an optimizer of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_optimizer = keras.optimizers.Adam(1e-2)

    def apply_gradients(self, gradients, variables):
        head = len(self.layers[-1].trainable_weights)
        super().apply_gradients(gradients[:-head], variables[:-head])
        self.head_optimizer.apply(gradients[-head:], variables[-head:])


def test_a_second_optimizer_keeps_its_state_across_steps(digits):
    """Two Adams with the same settings update as one does: each variable's
    update reads only its own slots. Equal to stock, with the second
    optimizer's slots and count carried from step to step."""
    x, y = digits[0][:256], digits[1][:256]
    _, record = assert_trains_like_keras(
        models.mlp, x, y, model_class=TwoOptimizers,
        compile_kwargs=lambda: compile_kwargs(metrics=[]),
        fit_kwargs={"batch_size": 64}, epochs=2)
    del record
    keras.utils.set_random_seed(0)
    model = models.mlp(TwoOptimizers)
    model.compile(**compile_kwargs())
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    assert int(model.head_optimizer.iterations.numpy()) == 8
    assert int(model.optimizer.iterations.numpy()) == 8
    assert list(model.optimizers) == ["optimizer", "head_optimizer"]


class Logged(customfit.CustomModel):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        batch_size = ops.shape(x)[0]
        self.log("twice_loss", 2.0 * loss, weight=batch_size)
        self.log("last_batch_size", ops.cast(batch_size, "float32"), reduction="last")
        # A per-example vector, reduced as Mean.update_state reduces it.
        self.log("mean_confidence", ops.max(y_pred, axis=-1))
        return loss


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_log_is_reported_like_a_mean_tracker(digits, steps_per_execution):
    x, y = digits[0][:300], digits[1][:300]
    keras.utils.set_random_seed(2)
    model = models.mlp(Logged)
    model.compile(**compile_kwargs(steps_per_execution=steps_per_execution))
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0,
                        validation_data=(x[:100], y[:100])).history
    # Doubling is exact, so the weighted epoch mean is twice the loss column.
    assert history["twice_loss"] == [2 * v for v in history["loss"]]
    assert history["val_twice_loss"] == [2 * v for v in history["val_loss"]]
    assert history["last_batch_size"] == [300 - 4 * 64] * 2
    assert history["val_last_batch_size"] == [100 - 64] * 2
    predictions = model.predict(x[:100], verbose=0)
    confidence = model.evaluate(x[:100], y[:100], verbose=0, return_dict=True)["mean_confidence"]
    np.testing.assert_allclose(confidence, predictions.max(axis=-1).mean(), rtol=1e-6)


def test_log_clashing_with_a_metric_is_an_error(digits):
    class Clash(customfit.CustomModel):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            self.log("accuracy", loss)
            return loss

    model = models.mlp(Clash)
    model.compile(**compile_kwargs())
    with pytest.raises(ValueError, match="clashes with the metric"):
        model.fit(digits[0][:64], digits[1][:64], verbose=0)
