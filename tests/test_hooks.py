"""Each hook overridden alone changes exactly what it says, nothing else."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models
from tests.parity import assert_identical, train


def test_transform_gradients_sees_the_gradient_of_the_loss(digits):
    x, y = digits[0][:64], digits[1][:64]
    seen = {}

    class Recorder(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            seen["gradients"] = [tf.identity(g) for g in gradients]
            seen["variables"] = list(variables)
            return gradients

    keras.utils.set_random_seed(3)
    model = models.mlp(Recorder, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy", run_eagerly=True)
    with tf.GradientTape() as tape:
        expected_loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True))
    expected = tape.gradient(expected_loss, model.trainable_weights)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    assert seen["variables"] == model.trainable_weights
    for got, want in zip(seen["gradients"], expected):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_clipping_in_transform_gradients_equals_optimizer_global_clipnorm(digits):
    """Tolerance 1e-6 relative: Keras clips with its own ops, this hook with
    tf.clip_by_global_norm; the two differ in the last bits of the norm."""
    x, y = digits[0][:256], digits[1][:256]

    class Clipped(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            clipped, norm = tf.clip_by_global_norm(gradients, 0.05)
            self.log("grad_norm", norm)
            return clipped

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


def test_zero_gradients_leave_weights_unchanged(digits):
    class Frozen(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            return [tf.zeros_like(g) for g in gradients]

    model = models.mlp(Frozen, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    model.fit(*digits, batch_size=256, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_apply_gradients_override_controls_the_update(digits):
    """Updating only the last layer: the first layer keeps its weights, the
    last one moves; super().apply_gradients does the optimizer's update."""

    class HeadOnly(customfit.CustomModel):
        def apply_gradients(self, gradients, variables):
            super().apply_gradients(gradients[-2:], variables[-2:])

    model = models.mlp(HeadOnly, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    model.fit(*digits, batch_size=256, epochs=1, verbose=0)
    after = model.get_weights()
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.array_equal(after[-2], before[-2])


def _custom_loss_model(base):
    class CustomLoss(base):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            loss = super().compute_loss(x, y, y_pred, sample_weight, training)
            return loss + 0.1 * keras.ops.mean(keras.ops.square(y_pred))

        def compute_metrics(self, x, y, y_pred, sample_weight=None):
            logs = super().compute_metrics(x, y, y_pred, sample_weight)
            return {**logs, "mean_confidence": keras.ops.mean(keras.ops.max(y_pred, axis=-1))}

    return CustomLoss


def test_compute_loss_and_compute_metrics_overrides_equal_stock(digits):
    x, y = digits[0][:256], digits[1][:256]
    build = lambda base: models.mlp(_custom_loss_model(base))
    expected = train(keras.Model, build, x, y)
    actual = train(customfit.CustomModel, build, x, y)
    assert "mean_confidence" in actual.history
    assert_identical(expected, actual)


class Counter(customfit.CustomModel):
    """Logs the optimizer's step counter before each update, and a constant
    from test_step, so the averages are known exactly."""

    def transform_gradients(self, gradients, variables):
        self.log("step", tf.cast(self.optimizer.iterations, "float32"))
        return gradients

    def test_step(self, data):
        self.log("evaluated", 2.0)
        return super().test_step(data)


@pytest.mark.parametrize("compile_kwargs", [
    dict(), dict(run_eagerly=True), dict(steps_per_execution=2)],
    ids=["graph", "eager", "steps_per_execution_2"])
def test_log_is_averaged_per_epoch_and_reported_everywhere(digits, compile_kwargs):
    x, y = digits[0][:320], digits[1][:320]  # 5 batches of 64
    model = models.mlp(Counter)
    model.compile("sgd", "sparse_categorical_crossentropy", **compile_kwargs)
    batch_logs = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs)))
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0,
                        validation_data=(x[:64], y[:64]), callbacks=[record])
    # Steps 0..4 in epoch 1, 5..9 in epoch 2: the mean resets each epoch.
    assert history.history["step"] == [2.0, 7.0]
    assert history.history["val_evaluated"] == [2.0, 2.0]
    assert "evaluated" not in history.history
    assert all("step" in logs for logs in batch_logs)
    assert model.evaluate(x, y, verbose=0, return_dict=True)["evaluated"] == 2.0


def test_log_reaches_the_progress_bar(digits, capsys):
    model = models.mlp(Counter)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(digits[0][:128], digits[1][:128], batch_size=64, epochs=1, verbose=2)
    assert "step: 0.5000" in capsys.readouterr().out


def test_log_in_a_whole_custom_train_step(digits):
    class Whole(customfit.CustomModel):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compiled_loss(y, self(x, training=True))
            grads = tape.gradient(loss, self.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
            self.log("global_norm", tf.linalg.global_norm(grads))
            return {"loss": loss}

    model = models.mlp(Whole)
    model.compile("sgd", "sparse_categorical_crossentropy")
    history = model.fit(digits[0][:128], digits[1][:128], batch_size=64, epochs=1, verbose=0)
    assert history.history["global_norm"][0] > 0


def test_log_rejects_clashing_names(digits):
    class Clash(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            self.log("loss", 1.0)
            return gradients

    model = models.mlp(Clash)
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="clashes"):
        model.fit(digits[0][:64], digits[1][:64], epochs=1, verbose=0)
