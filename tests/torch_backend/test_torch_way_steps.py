"""Steps written the PyTorch way, as the keras-io guide "Customizing what
happens in `fit()` with PyTorch" teaches them (`self.zero_grad()`,
`loss.backward()`, the gradients read from `.grad`, `optimizer.apply`
under `torch.no_grad()`), run on CustomModel exactly as on keras.Model:
`History`, `evaluate` and the weights equal bit for bit. With several
batches per execution (which stock Keras refuses on PyTorch) they equal
stock Keras with one."""

import keras
import numpy as np
import pytest
import torch

import customfit


def _apply(model, loss, variables, optimizer=None):
    loss.backward()
    gradients = [v.value.grad for v in variables]
    with torch.no_grad():
        (optimizer or model.optimizer).apply(gradients, variables)


def compiled_loss_and_metrics(base):
    class Step(base):
        def train_step(self, data):
            x, y = data
            self.zero_grad()
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred)
            _apply(self, loss, list(self.trainable_weights))
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                else:
                    metric.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

    return Step, dict(loss="mse", metrics=["mae"])


def own_metrics(base):
    class Step(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
            self.loss_fn = keras.losses.MeanSquaredError()

        def train_step(self, data):
            x, y = data
            self.zero_grad()
            y_pred = self(x, training=True)
            loss = self.loss_fn(y, y_pred)
            _apply(self, loss, list(self.trainable_weights))
            self.loss_tracker.update_state(loss)
            self.mae_metric.update_state(y, y_pred)
            return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

        @property
        def metrics(self):
            return [self.loss_tracker, self.mae_metric]

    return Step, {}


def sample_weighted(base):
    class Step(base):
        def train_step(self, data):
            x, y, sample_weight = data if len(data) == 3 else (*data, None)
            self.zero_grad()
            y_pred = self(x, training=True)
            loss = self.compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)
            _apply(self, loss, list(self.trainable_weights))
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                else:
                    metric.update_state(y, y_pred, sample_weight=sample_weight)
            return {m.name: m.result() for m in self.metrics}

    return Step, dict(loss="mse", metrics=["mae"])


def own_test_step(base):
    class Step(base):
        def test_step(self, data):
            x, y = data
            y_pred = self(x, training=False)
            loss = self.compute_loss(y=y, y_pred=y_pred)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                else:
                    metric.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

    return Step, dict(loss="mse", metrics=["mae"])


STEPS = {"compiled_loss_and_metrics": compiled_loss_and_metrics, "own_metrics": own_metrics,
         "sample_weighted": sample_weighted, "own_test_step": own_test_step}


def trained(case, base, steps_per_execution=1):
    keras.utils.set_random_seed(0)
    cls, compile_kwargs = STEPS[case](base)
    inputs = keras.Input(shape=(32,))
    model = cls(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="adam", steps_per_execution=steps_per_execution, **compile_kwargs)
    rng = np.random.default_rng(0)
    x, y = rng.random((320, 32), "float32"), rng.random((320, 1), "float32")
    fit = dict(sample_weight=rng.random((320, 1), "float32")) if case == "sample_weighted" else {}
    history = model.fit(x, y, epochs=3, verbose=0, **fit).history
    # Compiled without a loss, the model has nothing to evaluate (stock's
    # `test_step` raises), and the guide does not evaluate it.
    evaluation = model.evaluate(x, y, verbose=0) if "loss" in compile_kwargs else None
    return history, model.get_weights(), evaluation


@pytest.mark.parametrize("steps_per_execution", [1, 4])
@pytest.mark.parametrize("case", STEPS)
def test_a_step_written_the_torch_way_trains_as_on_keras_model(case, steps_per_execution):
    stock_history, stock_weights, stock_evaluation = trained(case, keras.Model)
    history, weights, evaluation = trained(case, customfit.CustomModel, steps_per_execution)
    assert history == stock_history
    for a, b in zip(weights, stock_weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert evaluation == stock_evaluation
