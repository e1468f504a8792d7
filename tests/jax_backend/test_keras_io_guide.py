"""The steps of the official keras-io guide "Customizing what happens in
`fit()` with JAX" (keras-team/keras-io, `guides/custom_train_step_in_jax.py`)
run on CustomModel exactly as on keras.Model.

The guide writes stock Keras' stateless JAX steps, `train_step(self, state,
data)` and `test_step(self, state, data)`, threading the trainable,
non-trainable, optimizer and metric variables by hand. Each of its three
models is built here on both base classes (nothing else differs), under the
same seed, on the same generated data, and `History`, `evaluate` and the
final weights must be equal bit for bit."""

import jax
import keras
import numpy as np
import pytest

import customfit

# ---------------------------------------------------------------------------
# The guide's models. The step code is copied from keras-team/keras-io,
# guides/custom_train_step_in_jax.py, unchanged; only the base class is a
# parameter (the guide names each class `CustomModel` and subclasses
# keras.Model).


def guide_compiled_loss_and_metrics(base):
    # keras-io guides/custom_train_step_in_jax.py, "A first simple example".
    class GuideModel(base):
        def compute_loss_and_updates(
            self,
            trainable_variables,
            non_trainable_variables,
            metrics_variables,
            x,
            y,
            sample_weight,
            training=False,
        ):
            y_pred, non_trainable_variables = self.stateless_call(
                trainable_variables,
                non_trainable_variables,
                x,
                training=training,
            )
            loss, (
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
            ) = self.stateless_compute_loss(
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=training,
            )
            return loss, (y_pred, non_trainable_variables, metrics_variables)

        def train_step(self, state, data):
            (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                metrics_variables,
            ) = state
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

            # Get the gradient function.
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)

            # Compute the gradients.
            (loss, (y_pred, non_trainable_variables, metrics_variables)), grads = grad_fn(
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
                x,
                y,
                sample_weight,
                training=True,
            )

            # Update trainable variables and optimizer variables.
            trainable_variables, optimizer_variables = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable_variables
            )

            # Update metrics.
            new_metrics_vars = []
            logs = {}
            for metric in self.metrics:
                this_metric_vars = metrics_variables[
                    len(new_metrics_vars) : len(new_metrics_vars) + len(metric.variables)
                ]
                if metric.name == "loss":
                    this_metric_vars = metric.stateless_update_state(
                        this_metric_vars, loss, sample_weight=sample_weight
                    )
                else:
                    this_metric_vars = metric.stateless_update_state(
                        this_metric_vars, y, y_pred, sample_weight=sample_weight
                    )
                logs[metric.name] = metric.stateless_result(this_metric_vars)
                new_metrics_vars += this_metric_vars

            # Return metric logs and updated state variables.
            state = (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                new_metrics_vars,
            )
            return logs, state

    return GuideModel


def guide_own_metrics(base):
    # keras-io guides/custom_train_step_in_jax.py, "Going lower-level".
    class GuideModel(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
            self.loss_fn = keras.losses.MeanSquaredError()

        def compute_loss_and_updates(
            self,
            trainable_variables,
            non_trainable_variables,
            x,
            y,
            sample_weight,
            training=False,
        ):
            y_pred, non_trainable_variables = self.stateless_call(
                trainable_variables,
                non_trainable_variables,
                x,
                training=training,
            )
            loss = self.loss_fn(y, y_pred, sample_weight=sample_weight)
            return loss, (y_pred, non_trainable_variables)

        def train_step(self, state, data):
            (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                metrics_variables,
            ) = state
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

            # Get the gradient function.
            grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)

            # Compute the gradients.
            (loss, (y_pred, non_trainable_variables)), grads = grad_fn(
                trainable_variables,
                non_trainable_variables,
                x,
                y,
                sample_weight,
                training=True,
            )

            # Update trainable variables and optimizer variables.
            trainable_variables, optimizer_variables = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable_variables
            )

            # Update metrics.
            loss_tracker_vars = metrics_variables[: len(self.loss_tracker.variables)]
            mae_metric_vars = metrics_variables[len(self.loss_tracker.variables) :]

            loss_tracker_vars = self.loss_tracker.stateless_update_state(
                loss_tracker_vars, loss, sample_weight=sample_weight
            )
            mae_metric_vars = self.mae_metric.stateless_update_state(
                mae_metric_vars, y, y_pred, sample_weight=sample_weight
            )

            logs = {}
            logs[self.loss_tracker.name] = self.loss_tracker.stateless_result(
                loss_tracker_vars
            )
            logs[self.mae_metric.name] = self.mae_metric.stateless_result(mae_metric_vars)

            new_metrics_vars = loss_tracker_vars + mae_metric_vars

            # Return metric logs and updated state variables.
            state = (
                trainable_variables,
                non_trainable_variables,
                optimizer_variables,
                new_metrics_vars,
            )
            return logs, state

        @property
        def metrics(self):
            # We list our `Metric` objects here so that `reset_states()` can be
            # called automatically at the start of each epoch
            # or at the start of `evaluate()`.
            return [self.loss_tracker, self.mae_metric]

    return GuideModel


def guide_test_step(base):
    # keras-io guides/custom_train_step_in_jax.py, "Providing your own
    # evaluation step".
    class GuideModel(base):
        def test_step(self, state, data):
            # Unpack the data.
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            (
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
            ) = state

            # Compute predictions and loss.
            y_pred, non_trainable_variables = self.stateless_call(
                trainable_variables,
                non_trainable_variables,
                x,
                training=False,
            )
            loss, (
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
            ) = self.stateless_compute_loss(
                trainable_variables,
                non_trainable_variables,
                metrics_variables,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=False,
            )

            # Update metrics.
            new_metrics_vars = []
            logs = {}
            for metric in self.metrics:
                this_metric_vars = metrics_variables[
                    len(new_metrics_vars) : len(new_metrics_vars) + len(metric.variables)
                ]
                if metric.name == "loss":
                    this_metric_vars = metric.stateless_update_state(
                        this_metric_vars, loss, sample_weight=sample_weight
                    )
                else:
                    this_metric_vars = metric.stateless_update_state(
                        this_metric_vars, y, y_pred, sample_weight=sample_weight
                    )
                logs[metric.name] = metric.stateless_result(this_metric_vars)
                new_metrics_vars += this_metric_vars

            # Return metric logs and updated state variables.
            state = (
                trainable_variables,
                non_trainable_variables,
                new_metrics_vars,
            )
            return logs, state

    return GuideModel


# ---------------------------------------------------------------------------
# The runs: the guide's compile() arguments; a few of fit's features on top
# (a short last batch, validation, several epochs) so that the epoch
# results, the metric resets and the state written back are compared too.

CASES = {
    # The guide: compile(optimizer="adam", loss="mse", metrics=["mae"]), fit.
    "compute_loss_and_updates": (
        guide_compiled_loss_and_metrics,
        dict(optimizer="adam", loss="mse", metrics=["mae"]),
        False,
    ),
    # The guide: compile(optimizer="adam") only, fit.
    "own_metrics": (guide_own_metrics, dict(optimizer="adam"), False),
    # The guide: compile(loss="mse", metrics=["mae"]) (the default
    # optimizer), evaluate. Here trained with the default train_step first,
    # then validated and evaluated with the guide's test_step.
    "test_step_evaluate": (guide_test_step, dict(loss="mse", metrics=["mae"]), True),
}
# The first two models are trained only, as in the guide: each defines a
# `compute_loss_and_updates` of its own, which replaces the one stock Keras'
# JAX `test_step` calls (other arguments, another return), so on keras.Model
# their validation and `evaluate` fail (Keras 3.15.1: "ValueError: not
# enough values to unpack (expected 4, got 3)" for the first).


def guide_data(n, seed):
    # As in the guide (np.random.random((n, 32)), ((n, 1))), smaller.
    rng = np.random.default_rng(seed)
    x = rng.random((n, 32)).astype("float32")
    y = rng.random((n, 1)).astype("float32")
    return x, y


def run(base, build, compile_kwargs, evaluates):
    x, y = guide_data(200, seed=1)  # batches of 64: the last one of 8
    validation = guide_data(72, seed=2)
    keras.utils.set_random_seed(7)
    inputs = keras.Input(shape=(32,))
    outputs = keras.layers.Dense(1)(inputs)
    model = build(base)(inputs, outputs)
    assert isinstance(model, base)
    model.compile(**compile_kwargs)
    history = model.fit(
        x, y, batch_size=64, epochs=3, verbose=0,
        validation_data=validation if evaluates else None,
    )
    results = None
    if evaluates:
        results = model.evaluate(*validation, batch_size=64, verbose=0, return_dict=True)
    return history.history, results, model.get_weights()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_guide_step_trains_like_stock(case):
    build, compile_kwargs, evaluates = CASES[case]
    history_a, results_a, weights_a = run(keras.Model, build, compile_kwargs, evaluates)
    history_b, results_b, weights_b = run(customfit.CustomModel, build, compile_kwargs, evaluates)

    assert sorted(history_b) == sorted(history_a)
    for key in history_a:
        np.testing.assert_array_equal(history_b[key], history_a[key], err_msg=f"History[{key!r}]")
    if evaluates:
        assert sorted(results_b) == sorted(results_a)
        for key in results_a:
            np.testing.assert_array_equal(
                results_b[key], results_a[key], err_msg=f"evaluate {key!r}"
            )
    assert len(weights_b) == len(weights_a)
    for index, (b, a) in enumerate(zip(weights_b, weights_a)):
        np.testing.assert_array_equal(b, a, err_msg=f"weight {index}")
    # The guide's step trains (the loss goes down), on both classes.
    assert history_a["loss"][-1] < history_a["loss"][0]


def test_auto_steps_with_a_stateless_step_is_refused_before_any_step():
    x, y = guide_data(200, seed=1)
    inputs = keras.Input(shape=(32,))
    model = guide_compiled_loss_and_metrics(customfit.CustomModel)(
        inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="adam", loss="mse", metrics=["mae"], steps_per_execution="auto")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r'"auto".*train_step\(state, data\).*'
                                         r"steps_per_execution=32"):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
