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


class TorchWayGAN:
    """The guide's end-to-end GAN, on 8x8 digits: the discriminator's and
    the generator's updates each by `zero_grad()`, `backward()` and `.grad`,
    with two optimizers set in an overridden `compile`, noise from a
    `SeedGenerator`, and a torch `DataLoader` as the data."""

    LATENT = 16

    @staticmethod
    def players():
        discriminator = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, strides=2, padding="same"),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(1),
        ])
        generator = keras.Sequential([
            keras.Input((TorchWayGAN.LATENT,)),
            keras.layers.Dense(4 * 4 * 8),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.Reshape((4, 4, 8)),
            keras.layers.Conv2DTranspose(8, 4, strides=2, padding="same"),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid"),
        ])
        return discriminator, generator

    @staticmethod
    def model_class(base):
        class GAN(base):
            def __init__(self, discriminator, generator):
                super().__init__()
                self.discriminator = discriminator
                self.generator = generator
                self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
                self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
                self.seed_generator = keras.random.SeedGenerator(7)
                self.built = True

            @property
            def metrics(self):
                return [self.d_loss_tracker, self.g_loss_tracker]

            def compile(self, d_optimizer, g_optimizer, loss_fn, **kwargs):
                super().compile(**kwargs)
                self.d_optimizer = d_optimizer
                self.g_optimizer = g_optimizer
                self.loss_fn = loss_fn

            def _noise(self, batch_size):
                return keras.random.normal((batch_size, TorchWayGAN.LATENT),
                                           seed=self.seed_generator)

            def train_step(self, data):
                real = data[0] if isinstance(data, (tuple, list)) else data
                batch_size = real.shape[0]
                fake = self.generator(self._noise(batch_size))
                labels = torch.cat([torch.ones((batch_size, 1)), torch.zeros((batch_size, 1))])
                labels = labels + 0.05 * keras.random.uniform(labels.shape,
                                                              seed=self.seed_generator)
                self.zero_grad()
                d_loss = self.loss_fn(labels, self.discriminator(torch.cat([fake, real])))
                _apply(self, d_loss, self.discriminator.trainable_weights, self.d_optimizer)

                self.zero_grad()
                predictions = self.discriminator(self.generator(self._noise(batch_size)))
                g_loss = self.loss_fn(torch.zeros((batch_size, 1)), predictions)
                _apply(self, g_loss, self.generator.trainable_weights, self.g_optimizer)

                self.d_loss_tracker.update_state(d_loss)
                self.g_loss_tracker.update_state(g_loss)
                return {"d_loss": self.d_loss_tracker.result(),
                        "g_loss": self.g_loss_tracker.result()}

        return GAN


def trained_gan(base, digits, steps_per_execution=1):
    keras.utils.set_random_seed(0)
    gan = TorchWayGAN.model_class(base)(*TorchWayGAN.players())
    gan.compile(keras.optimizers.Adam(3e-4), keras.optimizers.Adam(3e-4),
                keras.losses.BinaryCrossentropy(from_logits=True),
                steps_per_execution=steps_per_execution)
    images = torch.from_numpy(digits[0][:320].reshape(-1, 8, 8, 1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, images),
                                         batch_size=32, shuffle=True)
    # The loader shuffles; fit's own shuffle does not apply to it.
    history = gan.fit(loader, epochs=2, verbose=0, shuffle=False).history
    return history, gan.get_weights()


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_the_guides_gan_trains_as_on_keras_model(digits, steps_per_execution):
    stock_history, stock_weights = trained_gan(keras.Model, digits)
    history, weights = trained_gan(customfit.CustomModel, digits, steps_per_execution)
    assert history == stock_history
    assert set(history) == {"d_loss", "g_loss"}
    for a, b in zip(weights, stock_weights, strict=True):
        np.testing.assert_array_equal(a, b)
