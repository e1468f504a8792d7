"""Small models built the same way on any base class, for parity tests."""

import keras
import numpy as np


def mlp(base, dropout=0.2, regularize=False, batchnorm=False):
    inputs = keras.Input((64,), name="pixels")
    reg = keras.regularizers.L2(1e-3) if regularize else None
    h = keras.layers.Dense(32, activation="relu", kernel_regularizer=reg)(inputs)
    if batchnorm:
        h = keras.layers.BatchNormalization()(h)
    if dropout:
        h = keras.layers.Dropout(dropout)(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    return base(inputs, outputs)


def subclassed(base):
    class Net(base):
        def __init__(self, units=32, **kwargs):
            super().__init__(**kwargs)
            self.hidden = keras.layers.Dense(units, activation="relu")
            self.norm = keras.layers.BatchNormalization()
            self.drop = keras.layers.Dropout(0.2)
            self.out = keras.layers.Dense(10, activation="softmax")

        def call(self, x, training=False):
            h = self.norm(self.hidden(x), training=training)
            return self.out(self.drop(h, training=training))

    return Net(units=32)


def add_loss_model(base):
    class ActivityPenalty(keras.layers.Layer):
        def call(self, x):
            self.add_loss(1e-3 * keras.ops.mean(keras.ops.square(x)))
            return x

    inputs = keras.Input((64,))
    h = keras.layers.Dense(
        32, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3)
    )(inputs)
    h = ActivityPenalty()(h)
    outputs = keras.layers.Dense(10, activation="softmax")(h)
    return base(inputs, outputs)


def multi_io(base):
    """Two named inputs, two named outputs: class digit and 'is it >= 5'."""
    left = keras.Input((32,), name="left")
    right = keras.Input((32,), name="right")
    h = keras.layers.Concatenate()(
        [keras.layers.Dense(16, activation="relu")(left),
         keras.layers.Dense(16, activation="relu")(right)]
    )
    digit = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    big = keras.layers.Dense(1, activation="sigmoid", name="big")(h)
    return base({"left": left, "right": right}, {"digit": digit, "big": big})


def multi_io_data(x, y):
    inputs = {"left": x[:, :32], "right": x[:, 32:]}
    targets = {"digit": y, "big": (y >= 5).astype("float32")[:, None]}
    return inputs, targets


MULTI_IO_COMPILE = dict(
    loss={"digit": "sparse_categorical_crossentropy", "big": "binary_crossentropy"},
    loss_weights={"digit": 1.0, "big": 0.5},
    metrics={"digit": ["accuracy"], "big": ["accuracy", "mse"]},
)


def class_weights():
    return {c: 1.0 + 0.1 * c for c in range(10)}


def sample_weights(n):
    return np.linspace(0.5, 1.5, n).astype("float32")


def every_hook(base):
    """A subclass of `base` overriding every hook without changing the maths,
    logging from each: trains like `base`, with extra log columns."""
    import tensorflow as tf

    class EveryHook(base):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            self.log("loss_seen", loss)
            return loss

        def transform_gradients(self, gradients, variables):
            self.log("grad_norm", tf.linalg.global_norm(gradients))
            return gradients

        def apply_gradients(self, gradients, variables):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            self.log("replica_id", tf.cast(replica, "float32"))
            super().apply_gradients(gradients, variables)

        def compute_metrics(self, x, y, y_pred, sample_weight=None):
            return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    return EveryHook


HOOK_LOGS = ("loss_seen", "grad_norm", "replica_id")


class Sampling(keras.layers.Layer):
    """A VAE's reparameterized draw, seeded."""

    def __init__(self):
        super().__init__()
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        import tensorflow as tf

        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(tf.shape(z_mean), seed=self.seed_generator)
        return z_mean + tf.exp(0.5 * z_log_var) * epsilon


def vae_networks():
    """The encoder (64 -> 16 -> mean, log-variance, draw of 2) and decoder
    (2 -> 16 -> 64, sigmoid) of the Keras VAE example, at digits' size."""
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    z_mean, z_log_var = keras.layers.Dense(2)(hidden), keras.layers.Dense(2)(hidden)
    encoder = keras.Model(inputs, [z_mean, z_log_var, Sampling()([z_mean, z_log_var])])
    latent = keras.Input((2,))
    decoder = keras.Model(latent, keras.layers.Dense(64, activation="sigmoid")(
        keras.layers.Dense(16, activation="relu")(latent)))
    return encoder, decoder
