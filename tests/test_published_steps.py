"""Whole `train_step`s written the way published Keras code writes them (the
official "customizing fit" guide, its GAN, a VAE, knowledge distillation), on
`keras.Model` and on `CustomModel` with the same seeds: the same `History`
keys and values, weights and `evaluate` results, bit for bit.

The steps follow the published patterns (`self.metrics` loops, trackers and
a `metrics` property, `compile()` overridden for extra optimizers, a
`compute_loss` override); the models are small and train on the digits.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models

BATCH = 32


def regression(digits, n=192):
    """Digits regressed onto the label scaled to [0, 1] (the guide's `mse`
    model), with a positive weight per sample."""
    x, y = digits[0][:n], (digits[1][:n, None] / 9).astype("float32")
    weights = (1 + np.arange(n) % 3).astype("float32")
    return x, y, weights


def dense_regressor(base):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    return base(inputs, keras.layers.Dense(1)(hidden))


# ------------------------------------------------- the guide's model steps


def loops_over_metrics(base):
    """The guide's first and third models: `loss` updated with the loss,
    every other metric in `self.metrics` with `(y, y_pred[, sample_weight])`;
    the guide's fourth model: `test_step` the same way."""

    class LoopsOverMetrics(base):
        def train_step(self, data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(y=y, y_pred=y_pred, sample_weight=sample_weight)
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                else:
                    metric.update_state(y, y_pred, sample_weight=sample_weight)
            return {m.name: m.result() for m in self.metrics}

        def test_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            y_pred = self(x, training=False)
            loss = self.compute_loss(y=y, y_pred=y_pred)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(loss)
                else:
                    metric.update_state(y, y_pred)
            return {m.name: m.result() for m in self.metrics}

    return LoopsOverMetrics


def own_trackers(base, metrics_property=True):
    """The guide's second model: its own loss function and trackers, listed
    in a `metrics` property (or only tracked as attributes); `compile()`
    gets only the optimizer."""

    class OwnTrackers(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
            self.loss_fn = keras.losses.MeanSquaredError()

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.loss_fn(y, y_pred)
            gradients = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(gradients, self.trainable_variables)
            self.loss_tracker.update_state(loss)
            self.mae_metric.update_state(y, y_pred)
            return {"loss": self.loss_tracker.result(), "mae": self.mae_metric.result()}

    if metrics_property:
        OwnTrackers.metrics = property(lambda self: [self.loss_tracker, self.mae_metric])
    return OwnTrackers


def run(base, build, x, y, compile_kwargs, evaluate=True, **fit_kwargs):
    keras.utils.set_random_seed(1)
    model = build(base)
    model.compile(**compile_kwargs)
    metrics_before = [m.name for m in model.metrics]
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False,
                        **fit_kwargs).history
    evaluated = (flat(model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True))
                 if evaluate else None)
    return dict(metrics_before=metrics_before, history=history, evaluated=evaluated,
                weights=model.get_weights())


def assert_same_run(expected, actual):
    assert actual["metrics_before"] == expected["metrics_before"]
    assert actual["history"] == expected["history"]
    assert actual["evaluated"] == expected["evaluated"]
    for a, b in zip(actual["weights"], expected["weights"], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "sample_weight"])
def test_guide_metrics_loop_reports_compiled_metrics_as_stock(digits, weighted):
    """Before the first step `metrics` holds the compiled metrics too, so the
    loop updates (and builds) them: `mae` and `val_mae` are in History."""
    x, y, weights = regression(digits)
    kwargs = dict(optimizer="adam", loss="mse", metrics=["mae"])
    runs = [run(base, lambda b: dense_regressor(loops_over_metrics(b)), x, y, kwargs,
                sample_weight=weights if weighted else None,
                validation_data=(x[:64], y[:64]))
            for base in (keras.Model, customfit.CustomModel)]
    stock, ours = runs
    assert set(ours["history"]) == {"loss", "mae", "val_loss", "val_mae"}
    assert ours["metrics_before"] == ["loss", "compile_metrics"]
    if "val_mae" not in stock["history"]:
        # Keras 3.10 prefixes only the top-level keys of the validation logs:
        # the nested compiled metrics come back unprefixed and overwrite the
        # training ones. customfit flattens first, as Keras 3.11 and later do.
        assert ours["history"].pop("val_mae") == stock["history"].pop("mae")
        ours["history"].pop("mae")
    assert_same_run(stock, ours)


@pytest.mark.parametrize("metrics_property", [True, False], ids=["listed", "attributes"])
def test_guide_own_trackers(digits, metrics_property):
    """Without a loss in `compile()`, the `loss` column is the step's own."""
    x, y, _ = regression(digits)
    # No evaluate: its default test_step needs a compiled loss, here as in Keras.
    runs = [run(base, lambda b: dense_regressor(own_trackers(b, metrics_property)), x, y,
                dict(optimizer="adam"), evaluate=False)
            for base in (keras.Model, customfit.CustomModel)]
    assert set(runs[1]["history"]) == {"loss", "mae"}
    assert_same_run(*runs)


def test_guide_test_step_with_evaluate_only(digits):
    x, y, _ = regression(digits)
    results = []
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(1)
        model = dense_regressor(loops_over_metrics(base))
        model.compile(loss="mse", metrics=["mae"])
        results.append(flat(model.evaluate(x, y, batch_size=BATCH, verbose=0,
                                           return_dict=True)))
    assert results[1] == results[0] and set(results[1]) == {"loss", "mae"}


def flat(results):
    """`evaluate(return_dict=True)` as floats, nested dicts flattened (Keras
    before 3.15 returns a custom step's last logs as they are, nested)."""
    flattened = {}
    for name, value in results.items():
        flattened.update(flat(value) if isinstance(value, dict) else {name: float(value)})
    return flattened


def test_keras2_comprehension_over_metrics_gives_stock_columns(digits):
    """`{m.name: m.result() for m in self.metrics}` holds `compile_metrics`
    as a dict; its entries become the columns, as in stock fit."""

    def comprehension(base):
        class Comprehension(base):
            def train_step(self, data):
                x, y = data
                with tf.GradientTape() as tape:
                    y_pred = self(x, training=True)
                    loss = self.compute_loss(y=y, y_pred=y_pred)
                self.optimizer.apply(tape.gradient(loss, self.trainable_variables),
                                     self.trainable_variables)
                self.compute_metrics(x, y, y_pred)
                return {m.name: m.result() for m in self.metrics}

        return Comprehension

    x, y, _ = regression(digits)
    kwargs = dict(optimizer="adam", loss="mse", metrics=["mae", "mse"])
    runs = [run(base, lambda b: dense_regressor(comprehension(b)), x, y, kwargs)
            for base in (keras.Model, customfit.CustomModel)]
    assert set(runs[1]["history"]) == {"loss", "mae", "mse"}
    assert_same_run(*runs)


# ----------------------------------------- models with their own optimizers


def gan(base):
    """The guide's GAN: `compile()` overridden to take two optimizers and a
    loss, trackers in a `metrics` property, a seeded latent stream."""

    class GAN(base):
        def __init__(self, discriminator, generator, latent_dim):
            super().__init__()
            self.discriminator = discriminator
            self.generator = generator
            self.latent_dim = latent_dim
            self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
            self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
            self.seed_generator = keras.random.SeedGenerator(1337)

        @property
        def metrics(self):
            return [self.d_loss_tracker, self.g_loss_tracker]

        def compile(self, d_optimizer, g_optimizer, loss_fn):
            super().compile()
            self.d_optimizer = d_optimizer
            self.g_optimizer = g_optimizer
            self.loss_fn = loss_fn

        def train_step(self, real_images):
            batch_size = tf.shape(real_images)[0]
            latent = keras.random.normal((batch_size, self.latent_dim),
                                         seed=self.seed_generator)
            images = tf.concat([self.generator(latent), real_images], axis=0)
            labels = tf.concat([tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))], axis=0)
            with tf.GradientTape() as tape:
                d_loss = self.loss_fn(labels, self.discriminator(images))
            weights = self.discriminator.trainable_weights
            self.d_optimizer.apply(tape.gradient(d_loss, weights), weights)

            latent = keras.random.normal((batch_size, self.latent_dim),
                                         seed=self.seed_generator)
            with tf.GradientTape() as tape:
                g_loss = self.loss_fn(tf.zeros((batch_size, 1)),
                                      self.discriminator(self.generator(latent)))
            weights = self.generator.trainable_weights
            self.g_optimizer.apply(tape.gradient(g_loss, weights), weights)

            self.d_loss_tracker.update_state(d_loss)
            self.g_loss_tracker.update_state(g_loss)
            return {"d_loss": self.d_loss_tracker.result(),
                    "g_loss": self.g_loss_tracker.result()}

    discriminator = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(16), keras.layers.LeakyReLU(0.2),
        keras.layers.Dense(1)])
    generator = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16), keras.layers.LeakyReLU(0.2),
        keras.layers.Dense(64, activation="sigmoid")])
    model = GAN(discriminator, generator, latent_dim=8)
    model.compile(keras.optimizers.Adam(3e-4), keras.optimizers.Adam(3e-4),
                  keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def test_guide_gan_history_equals_stock_without_extra_columns(digits):
    """No `loss` column (nothing computes one) and no learning-rate columns
    (constant rates; the default optimizer from `super().compile()` is
    never used)."""
    images = digits[0][:192]
    results = []
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(1)
        model = gan(base)
        history = model.fit(images, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
        results.append((history.history, model.get_weights()))
    (stock_history, stock_weights), (history, weights) = results
    assert set(history) == {"d_loss", "g_loss"}
    assert history == stock_history
    for a, b in zip(weights, stock_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def head_trained_apart(base):
    """A subclassed model that is built by its first call in `fit` (it never
    calls `build()`), its head updated by an optimizer of its own."""

    class HeadApart(base):
        def __init__(self):
            super().__init__()
            self.body = keras.layers.Dense(16, activation="relu")
            self.head = keras.layers.Dense(10)
            self.head_optimizer = keras.optimizers.Adam(1e-2)

        def call(self, x):
            return self.head(self.body(x))

        def train_step(self, data):
            x, y = data
            with tf.GradientTape(persistent=True) as tape:
                loss = self.compute_loss(y=y, y_pred=self(x, training=True))
            body, head = self.body.trainable_weights, self.head.trainable_weights
            self.optimizer.apply(tape.gradient(loss, body), body)
            self.head_optimizer.apply(tape.gradient(loss, head), head)
            return self.compute_metrics(x, y, self(x))

    model = HeadApart()
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    return model


def test_saved_state_of_an_optimizer_built_in_fit_is_restored(digits, tmp_path):
    """`fit` and `load_weights` build the head's optimizer over the same
    variables, so its saved slots come back (stock Keras builds it over the
    head in fit and skips the saved state, with a warning)."""
    x, y = digits[0][:128], digits[1][:128]
    model = head_trained_apart(customfit.CustomModel)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    model.save_weights(tmp_path / "apart.weights.h5")

    fresh = head_trained_apart(customfit.CustomModel)
    fresh(x[:1])  # built, as load_weights needs
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "Skipping variable loading"
        fresh.load_weights(tmp_path / "apart.weights.h5")
    assert len(fresh.head_optimizer.variables) == len(model.head_optimizer.variables)
    for a, b in zip(fresh.head_optimizer.variables, model.head_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    stock = head_trained_apart(keras.Model)
    stock.fit(x, y, batch_size=BATCH, verbose=0)
    stock.save_weights(tmp_path / "stock.weights.h5")
    fresh_stock = head_trained_apart(keras.Model)
    fresh_stock(x[:1])
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        fresh_stock.load_weights(tmp_path / "stock.weights.h5")


# ------------------------------------------------------ VAE, distillation


def vae(base):
    """A variational autoencoder as the Keras example writes it: three
    trackers in `metrics`, the step's `loss` key from the total tracker.
    The reconstruction loss is a squared error: binary cross-entropy's
    logarithm differs in the last bit from run to run on CPU, on stock Keras
    too, which no bit-for-bit comparison survives."""

    class VAE(base):
        def __init__(self, encoder, decoder):
            super().__init__()
            self.encoder = encoder
            self.decoder = decoder
            self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
            self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
            self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

        @property
        def metrics(self):
            return [self.total_loss_tracker, self.reconstruction_loss_tracker,
                    self.kl_loss_tracker]

        def train_step(self, data):
            with tf.GradientTape() as tape:
                z_mean, z_log_var, z = self.encoder(data)
                reconstruction = self.decoder(z)
                reconstruction_loss = 64 * tf.reduce_mean(
                    keras.losses.mean_squared_error(data, reconstruction))
                kl_loss = -0.5 * (1 + z_log_var - tf.square(z_mean) - tf.exp(z_log_var))
                kl_loss = tf.reduce_mean(tf.reduce_sum(kl_loss, axis=1))
                total_loss = reconstruction_loss + kl_loss
            grads = tape.gradient(total_loss, self.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
            self.total_loss_tracker.update_state(total_loss)
            self.reconstruction_loss_tracker.update_state(reconstruction_loss)
            self.kl_loss_tracker.update_state(kl_loss)
            return {"loss": self.total_loss_tracker.result(),
                    "reconstruction_loss": self.reconstruction_loss_tracker.result(),
                    "kl_loss": self.kl_loss_tracker.result()}

    model = VAE(*models.vae_networks())
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


@pytest.mark.slow
def test_vae_history_equals_stock(digits):
    images = digits[0][:192]
    results = []
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(1)
        model = vae(base)
        history = model.fit(images, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
        results.append((history.history, model.get_weights()))
    (stock_history, stock_weights), (history, weights) = results
    assert set(history) == {"loss", "reconstruction_loss", "kl_loss"}
    assert history == stock_history
    for a, b in zip(weights, stock_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def distiller(base, teacher):
    """Knowledge distillation as the Keras example writes it: the default
    `train_step`, `compute_loss` overridden, `compile()` extended."""

    class Distiller(base):
        def __init__(self, student, teacher):
            super().__init__()
            self.teacher = teacher
            self.student = student

        def compile(self, optimizer, metrics, student_loss_fn, distillation_loss_fn,
                    alpha=0.1, temperature=3):
            super().compile(optimizer=optimizer, metrics=metrics)
            self.student_loss_fn = student_loss_fn
            self.distillation_loss_fn = distillation_loss_fn
            self.alpha = alpha
            self.temperature = temperature

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         allow_empty=False):
            teacher_pred = self.teacher(x, training=False)
            student_loss = self.student_loss_fn(y, y_pred)
            distillation_loss = self.distillation_loss_fn(
                tf.nn.softmax(teacher_pred / self.temperature, axis=1),
                tf.nn.softmax(y_pred / self.temperature, axis=1),
            ) * (self.temperature ** 2)
            return self.alpha * student_loss + (1 - self.alpha) * distillation_loss

        def call(self, x):
            return self.student(x)

    student = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                                keras.layers.Dense(10)])
    model = Distiller(student, teacher)
    model.compile(keras.optimizers.Adam(1e-2), metrics=[keras.metrics.SparseCategoricalAccuracy()],
                  student_loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  distillation_loss_fn=keras.losses.KLDivergence(), alpha=0.1, temperature=10)
    return model


def trained_teacher(x, y):
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                                keras.layers.Dense(10)])
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    return teacher


@pytest.mark.slow
def test_distiller_history_equals_stock(digits):
    """The example's default step differentiates all trainable weights, the
    teacher's included: each run gets its own teacher."""
    x, y = digits[0][:192], digits[1][:192]
    runs = []
    for base in (keras.Model, customfit.CustomModel):
        teacher = trained_teacher(x, y)
        keras.utils.set_random_seed(1)
        model = distiller(base, teacher)
        history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, shuffle=False)
        runs.append((history.history, model.evaluate(x, y, verbose=0, return_dict=True),
                     model.get_weights()))
    (stock_history, stock_eval, stock_weights), (history, evaluated, weights) = runs
    assert set(history) == {"loss", "sparse_categorical_accuracy"}
    assert history == stock_history and evaluated == stock_eval
    for a, b in zip(weights, stock_weights, strict=True):
        np.testing.assert_array_equal(a, b)
