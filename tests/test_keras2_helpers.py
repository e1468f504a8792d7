"""The Keras-2 `train_step` from tutorials and books, verbatim but for the base
class, trains and reports exactly like stock fit (bit-for-bit)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit.testing import assert_trains_like_keras
from tests import models
from tests.parity import SEED, compile_kwargs, fit_kwargs


def keras2_model(base):
    """The tf.keras 'customizing what happens in fit' step, unchanged."""

    class Keras2Style(base):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compiled_loss(y, y_pred, regularization_losses=self.losses)
            gradients = tape.gradient(loss, self.trainable_weights)
            self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
            self.compiled_metrics.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

        def test_step(self, data):
            x, y = data
            y_pred = self(x, training=False)
            self.compiled_loss(y, y_pred, regularization_losses=self.losses)
            self.compiled_metrics.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

    return Keras2Style


def weighted_keras2_model(base):
    """The tutorial's sample-weight variant."""

    class Keras2Weighted(base):
        def train_step(self, data):
            x, y, sample_weight = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compiled_loss(
                    y, y_pred, sample_weight=sample_weight,
                    regularization_losses=self.losses,
                )
            gradients = tape.gradient(loss, self.trainable_weights)
            self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
            self.compiled_metrics.update_state(y, y_pred, sample_weight=sample_weight)
            return {m.name: m.result() for m in self.metrics}

    return Keras2Weighted


@pytest.mark.parametrize("regularize", [False, True], ids=["plain", "l2_regularized"])
def test_keras2_step_equals_stock_fit(digits, regularize):
    x, y = digits
    x, y = x[:300], y[:300]
    fit = dict(validation_data=(digits[0][300:400], digits[1][300:400]))
    assert_trains_like_keras(
        lambda base: models.mlp(base, regularize=regularize), x, y,
        model_class=keras2_model(customfit.CustomModel),
        compile_kwargs=compile_kwargs(), fit_kwargs=fit_kwargs(fit), seed=SEED)


@pytest.mark.slow
def test_keras2_weighted_step_equals_stock_fit(digits):
    x, y = digits[0][:300], digits[1][:300]
    fit = dict(sample_weight=models.sample_weights(300))
    weighted = dict(metrics=None, weighted_metrics=["accuracy"])
    assert_trains_like_keras(
        models.mlp, x, y, model_class=weighted_keras2_model(customfit.CustomModel),
        compile_kwargs=compile_kwargs("graph", weighted), fit_kwargs=fit_kwargs(fit),
        seed=SEED)


@pytest.mark.slow
def test_keras2_step_on_multi_output_model_reports_stock_log_names(digits):
    x, y = models.multi_io_data(digits[0][:256], digits[1][:256])
    _, actual = assert_trains_like_keras(
        models.multi_io, x, y, model_class=keras2_model(customfit.CustomModel),
        compile_kwargs=compile_kwargs("graph", models.MULTI_IO_COMPILE),
        fit_kwargs=fit_kwargs(), seed=SEED)
    assert {"big_accuracy", "big_mse", "digit_accuracy", "digit_loss"} <= set(actual.history)


def test_same_step_on_stock_keras_reports_the_mean_prediction_as_loss(digits):
    """The pitfall customfit fixes: on keras.Model the tutorial step warns, and
    `loss` is the mean softmax output (exactly 1/10 here), not the loss."""
    x, y = digits[0][:128], digits[1][:128]
    keras.utils.set_random_seed(0)
    model = models.mlp(keras2_model(keras.Model))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  run_eagerly=True)
    with pytest.warns(UserWarning, match="deprecated"):
        history = model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    assert history.history["loss"][0] == pytest.approx(0.1, abs=1e-6)

    keras.utils.set_random_seed(0)
    fixed = models.mlp(keras2_model(customfit.CustomModel))
    fixed.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    loss = fixed.fit(x, y, epochs=1, batch_size=64, verbose=0).history["loss"][0]
    assert loss > 2.0  # cross-entropy of an untrained 10-class model is ~2.3


def test_metrics_is_keras_list_and_compiled_metrics_lists_each(digits):
    """`metrics` is stock Keras' list (the compiled metrics as one object,
    before the first step too); `{m.name: m.result()}` over it, flattened as
    Keras flattens logs, equals the logs; `compiled_metrics.metrics` has one
    object per compiled column, under its log name."""
    x, y = models.multi_io_data(digits[0][:64], digits[1][:64])
    model = models.multi_io(customfit.CustomModel)
    model.compile("adam", **models.MULTI_IO_COMPILE)
    stock = models.multi_io(keras.Model)
    stock.compile("adam", **models.MULTI_IO_COMPILE)
    assert [m.name for m in model.metrics] == [m.name for m in stock.metrics]
    assert "compile_metrics" in [m.name for m in model.metrics]

    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    results = {}
    for metric in model.metrics:
        result = metric.result()
        results.update(result if isinstance(result, dict) else {metric.name: result})
    assert {name: float(value) for name, value in results.items()} == pytest.approx(logs)
    compiled = {m.name: float(m.result()) for m in model.compiled_metrics.metrics}
    assert len(compiled) == 3 and compiled == pytest.approx(
        {name: logs[name] for name in compiled})
    model.compiled_metrics.reset_state()
    assert all(float(m.result()) == 0.0 for m in model.compiled_metrics.metrics)


def test_compiled_loss_adds_explicit_regularization_once(digits):
    x, y = digits[0][:32], digits[1][:32]
    model = models.mlp(customfit.CustomModel, regularize=True, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    y_pred = model(x)
    plain = model.compiled_loss(y, y_pred, regularization_losses=[])
    default = model.compiled_loss(y, y_pred)
    explicit = model.compiled_loss(y, y_pred, regularization_losses=model.losses)
    penalty = float(sum(model.losses))
    assert penalty > 0
    assert float(default) == float(explicit)
    assert float(default) == pytest.approx(float(plain) + penalty, rel=1e-6)


def test_checkpoint_monitor_finds_direction_of_compiled_metric(digits, tmp_path):
    """ModelCheckpoint(mode='auto') finds that accuracy is maximized (Keras
    3.11 and later by looking inside the compiled metrics, which the metrics
    list must not hide; Keras 3.10 by the monitored name)."""
    x, y = digits[0][:128], digits[1][:128]
    model = models.mlp(customfit.CustomModel)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    checkpoint = keras.callbacks.ModelCheckpoint(
        tmp_path / "best.weights.h5", monitor="val_accuracy",
        save_best_only=True, save_weights_only=True)
    model.fit(x, y, validation_split=0.25, epochs=1, verbose=0, callbacks=[checkpoint])
    assert checkpoint.monitor_op(0.9, 0.8) and not checkpoint.monitor_op(0.8, 0.9)
    assert (tmp_path / "best.weights.h5").exists()
