"""The Keras-2 helpers on JAX: `compiled_loss` in `compute_loss`,
`compiled_metrics` and `metrics` in `compute_metrics`, and a Keras-2
`test_step` verbatim, all equal to stock fit bit for bit. (A whole Keras-2
`train_step` differentiates with `tf.GradientTape`, which JAX has not.)"""

import keras
import numpy as np

import customfit
from customfit.testing import assert_trains_like_keras
from tests.jax_backend import models


class Keras2Hooks(customfit.CustomModel):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.compiled_loss(y, y_pred, sample_weight, regularization_losses=self.losses)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data
        y_pred = self(x, training=False)
        self.compiled_loss(y, y_pred, regularization_losses=self.losses)
        self.compiled_metrics.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def test_keras2_helpers_equal_stock_fit(digits):
    x, y = digits[0][:256], digits[1][:256]
    assert_trains_like_keras(
        lambda base: models.mlp(base, regularize=True), x, y, model_class=Keras2Hooks,
        compile_kwargs=lambda: {"optimizer": "adam", "loss": "sparse_categorical_crossentropy",
                                "metrics": ["accuracy"]},
        fit_kwargs={"batch_size": 64, "validation_split": 0.25})


def test_metrics_is_keras_list_and_compiled_metrics_lists_each(digits):
    """As on TensorFlow: `metrics` is stock Keras' list; `compiled_metrics.
    metrics` has one object per compiled column, under its log name."""
    x, y = digits[0][:64], digits[1][:64]
    top3 = keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3")
    model = models.mlp(Keras2Hooks)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy", top3])
    stock = models.mlp(keras.Model)
    stock.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    assert [m.name for m in model.metrics] == [m.name for m in stock.metrics]
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    compiled = {m.name: float(m.result()) for m in model.compiled_metrics.metrics}
    assert compiled == {"accuracy": logs["accuracy"], "top3": logs["top3"]}
    model.compiled_metrics.reset_state()
    assert all(float(m.result()) == 0.0 for m in model.compiled_metrics.metrics)
    assert np.isfinite(logs["loss"])
