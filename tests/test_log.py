"""`CustomModel.log` against the `keras.metrics.Mean` trackers it replaces.

Each case is a published tracker pattern, written once on `keras.Model` with
hand-written trackers and a `metrics` property, and once on `CustomModel`
with `self.log` instead: the same `History` and per-batch logs, bit for bit.
The data has a short last batch (203 examples, batches of 32), which is where
an unweighted per-call mean and a tracker part ways.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models
from tests.subproc import run_python

N, BATCH = 203, 32


class Batches(keras.callbacks.Callback):
    """Each batch's logs. With `read_metrics`, where a metric of
    `model.metrics` has the name, its result read here instead: under
    `tf.distribute` that is the weighted mean over replicas, where Keras'
    per-batch log of it is the mean of the replicas' own means."""

    def __init__(self, read_metrics=False):
        super().__init__()
        self.read_metrics = read_metrics
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        metrics = {m.name: m for m in self.model.metrics} if self.read_metrics else {}
        self.logs.append({k: float(metrics[k].result() if k in metrics else v)
                          for k, v in logs.items()})


def classifier(base):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    return base(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


# --- SimCLR's pattern: a per-example loss vector into a tracker -------------


def per_example_loss(base, with_log):
    class PerExample(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not with_log:
                self.loss_tracker_ = keras.metrics.Mean(name="contrastive_loss")
                self.confidence_tracker = keras.metrics.Mean(name="confidence")

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(y, y_pred)
                loss = tf.nn.compute_average_loss(per_example)
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            confidence = tf.reduce_max(y_pred, axis=-1, keepdims=True)  # (batch, 1)
            if with_log:
                self.log("contrastive_loss", per_example)
                self.log("confidence", confidence)
                return {}
            self.loss_tracker_.update_state(per_example)
            self.confidence_tracker.update_state(confidence)
            return {m.name: m.result() for m in self.metrics}

    if not with_log:
        PerExample.metrics = property(
            lambda self: [self.loss_tracker_, self.confidence_tracker])
    return classifier(PerExample)


# --- a VAE whose logged parts add up to its `loss` column -------------------


def replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def vae_parts(model, x):
    z_mean, z_log_var, z = model.encoder(x)
    reconstruction = model.decoder(z)
    reconstruction_loss = 64 * tf.reduce_mean(
        keras.losses.mean_squared_error(x, reconstruction))
    kl_loss = -0.5 * (1 + z_log_var - tf.square(z_mean) - tf.exp(z_log_var))
    return reconstruction_loss, tf.reduce_mean(tf.reduce_sum(kl_loss, axis=1))


def vae(base, with_log):
    """With trackers: the Keras example's VAE, its trackers weighted by the
    batch size. With `log`: the loss from `compute_loss`, so that the default
    step reports it as `loss` (weighted by batch size, as Keras' `loss`
    column is), the parts logged with the same weight. Both divide the loss
    they differentiate by the number of replicas, as a loss under
    `tf.distribute` must be."""

    class TrackedVAE(base):
        def __init__(self, encoder, decoder):
            super().__init__()
            self.encoder, self.decoder = encoder, decoder
            self.trackers = [keras.metrics.Mean(name=name) for name in
                             ("loss", "reconstruction_loss", "kl_loss")]

        @property
        def metrics(self):
            return self.trackers

        def call(self, x):  # Keras builds a model under tf.distribute with it
            return x

        def train_step(self, x):
            with tf.GradientTape() as tape:
                reconstruction_loss, kl_loss = vae_parts(self, x)
                total_loss = reconstruction_loss + kl_loss
                scaled = total_loss / replicas()
            grads = tape.gradient(scaled, self.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
            batch_size = tf.shape(x)[0]
            for tracker, value in zip(self.trackers,
                                      (total_loss, reconstruction_loss, kl_loss)):
                tracker.update_state(value, sample_weight=batch_size)
            return {m.name: m.result() for m in self.metrics}

    class LoggedVAE(base):
        def __init__(self, encoder, decoder):
            super().__init__()
            self.encoder, self.decoder = encoder, decoder

        def call(self, x):
            return x

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            reconstruction_loss, kl_loss = vae_parts(self, x)
            batch_size = tf.shape(x)[0]
            self.log("reconstruction_loss", reconstruction_loss, weight=batch_size)
            self.log("kl_loss", kl_loss, weight=batch_size)
            return (reconstruction_loss + kl_loss) / replicas()

    return (LoggedVAE if with_log else TrackedVAE)(*models.vae_networks())


# --- the GAN guide's pattern: the step returns this batch's values ----------


def last_value(base, with_log):
    class LastValue(base):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = tf.nn.compute_average_loss(
                    keras.losses.sparse_categorical_crossentropy(y, y_pred))
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            norm = tf.linalg.global_norm(gradients)
            if with_log:
                self.log("batch_loss", loss, reduction="last")
                self.log("grad_norm", norm, reduction="last")
                return {}
            return {"batch_loss": loss, "grad_norm": norm}

    return classifier(LastValue)


CASES = {
    "per_example_vector": (per_example_loss, True),
    "weighted_parts_of_the_loss": (vae, False),
    "last_value": (last_value, True),
}


def fit(build, base, with_log, digits, labels, read_metrics=False, **compile_kwargs):
    keras.utils.set_random_seed(3)
    model = build(base, with_log)
    model.compile(keras.optimizers.Adam(1e-2), **compile_kwargs)
    batches = Batches(read_metrics)
    x, y = digits[0][:N], digits[1][:N]
    history = model.fit(x, y if labels else None, batch_size=BATCH, epochs=2,
                        shuffle=False, verbose=0, callbacks=[batches]).history
    return history, batches.logs, model.get_weights()


@pytest.mark.parametrize("case", CASES)
def test_log_reports_what_the_hand_written_trackers_report(digits, case):
    build, labels = CASES[case]
    stock_history, stock_batches, stock_weights = fit(
        build, keras.Model, False, digits, labels)
    history, batches, weights = fit(
        build, customfit.CustomModel, True, digits, labels)
    assert history == stock_history
    assert batches == stock_batches
    for a, b in zip(weights, stock_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_weighted_parts_add_up_to_the_loss_column(digits):
    history, batches, _ = fit(vae, customfit.CustomModel, True, digits, labels=False)
    for logs in [*batches, {k: v[-1] for k, v in history.items()}]:
        # Two float32 sums of the same terms in another order.
        np.testing.assert_allclose(
            logs["reconstruction_loss"] + logs["kl_loss"], logs["loss"], rtol=1e-6)


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_each_batch_sees_its_own_running_values_with_several_steps_per_call(
        digits, steps_per_execution):
    one = fit(vae, customfit.CustomModel, True, digits, labels=False)
    several = fit(vae, customfit.CustomModel, True, digits, labels=False,
                  steps_per_execution=steps_per_execution)
    assert several[:2] == one[:2]


def test_log_arguments_are_checked(digits):
    class BadReduction(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            self.log("norm", 1.0, reduction="max")
            return gradients

    class TwoReductions(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            self.log("norm", 1.0)
            self.log("norm", 2.0, reduction="last")
            return gradients

    for cls, message in [(BadReduction, "reduction is one of 'mean', 'last'"),
                         (TwoReductions, "Use one reduction per name")]:
        model = classifier(cls)
        model.compile("sgd", "sparse_categorical_crossentropy")
        with pytest.raises(ValueError, match=message):
            model.fit(digits[0][:64], digits[1][:64], epochs=1, verbose=0)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_report_the_trackers_weighted_mean_over_replicas():
    """Two replicas, each with half of every batch (the short last one split
    unevenly, 6 and 5): `log` reports the trackers' weighted mean over
    replicas, per batch and per epoch."""
    out = run_python(two_cpus=True, code="""
        import json
        import keras
        from sklearn.datasets import load_digits
        import customfit
        from tests.test_log import CASES, fit

        d = load_digits()
        digits = (d.data / 16).astype("float32"), d.target.astype("int32")
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        results = {}
        for case, (build, labels) in CASES.items():
            for name, base, with_log in [("stock", keras.Model, False),
                                         ("log", customfit.CustomModel, True)]:
                with strategy.scope():
                    history, batches, _ = fit(build, base, with_log, digits, labels,
                                              read_metrics=True)
                results[f"{case}/{name}"] = [history, batches]
        print("RESULTS" + json.dumps(results))
    """)
    results = json.loads(out.split("RESULTS", 1)[1])
    for case in CASES:
        assert results[f"{case}/log"] == results[f"{case}/stock"], case
