"""`GAN`: two-player training, each player with its own optimizer."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from customfit._keras import internals
from customfit import _step
from customfit._model import CustomModel
from customfit.recipes._wrapped import deserialize_wrapped, serialize_wrapped


@keras.saving.register_keras_serializable(package="customfit")
class GAN(CustomModel):
    """A generator and a discriminator trained against each other by `fit`.

    Each training batch of real samples `x` runs two updates, in order:

    1. the discriminator's: `discriminator_loss(real_logits, fake_logits)` on
       `x` and on `generator(z)`, minimized by `discriminator_optimizer`;
    2. the generator's: `generator_loss(fake_logits)` on fresh samples,
       minimized by `generator_optimizer`.

    Between differentiation and each update, the inherited hook
    `transform_gradients(gradients, variables)` runs once per player with that
    player's unscaled, per-replica gradients and trainable weights, so a
    gradient hook (clipping, logging) applies to both players; tell them apart
    with `variables[0] is self.generator.trainable_weights[0]`. `self.log`
    works as in any `CustomModel`.

    The discriminator must output one logit per sample (no sigmoid); the
    default losses are the non-saturating ones of Goodfellow et al. (2014),
    binary cross-entropy on logits. Override `discriminator_loss` and
    `generator_loss` for others (hinge, Wasserstein).

    The latent vectors are `N(0, 1)` draws determined by `seed` and the
    model's step counter `steps`, and the same for any number of replicas:
    under `tf.distribute` each replica takes its rows of the noise of the
    global batch. Training is therefore reproducible, and resumes exactly
    after saving and loading. `evaluate` scores both losses on the data given
    against samples drawn for the current step, without updating anything.

    `fit` reports `d_loss` and `g_loss`, averaged over the epoch weighted by
    batch size, as stock `fit` averages `loss`. Calling the model (or
    `predict`) on latent vectors returns `generator(z, training=False)`.

    Args:
        generator: A built `keras.Model` mapping `(batch, latent_dim)` latent
            vectors to samples shaped like the data.
        discriminator: A built `keras.Model` mapping samples to `(batch, 1)`
            logits.
        latent_dim: Size of the latent vectors.
        seed: Seed of the latent noise.

    Example:

    ```python
    gan = customfit.recipes.GAN(generator, discriminator, latent_dim=16)
    gan.compile(generator_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                discriminator_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5))
    gan.fit(images, batch_size=64, epochs=20)
    samples = gan.predict(np.random.normal(size=(16, 16)))
    ```
    """

    def __init__(
        self,
        generator: keras.Model,
        discriminator: keras.Model,
        latent_dim: int,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        for seam in ("_loss_gradients", "_update_weights"):
            if getattr(type(self), seam) is not getattr(CustomModel, seam):
                raise TypeError(
                    f"{type(self).__name__} mixes GAN with a recipe that changes "
                    "the single-optimizer step (such as SAM or "
                    "GradientAccumulation); GAN runs its own two-player step, so "
                    "that recipe would be ignored. Gradient transforms "
                    "(transform_gradients, e.g. GlobalNormClipping) do apply, "
                    "to each player."
                )
        super().__init__(**kwargs)
        for role, model in (("generator", generator), ("discriminator", discriminator)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"GAN needs a keras.Model as {role}; got "
                    f"{type(model).__name__}. Wrap the layers in keras.Sequential "
                    "or keras.Model(inputs, outputs)."
                )
            if not model.built:
                raise ValueError(
                    f"The {role} is not built, so its weights do not exist yet "
                    "and its optimizer cannot be built. Give it an input "
                    f"(keras.Input(...)) or call {role}.build(input_shape) first."
                )
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int; got {latent_dim!r}.")
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim
        self.seed = int(seed)
        self.steps = keras.Variable(
            0, dtype="int64", trainable=False, name="steps",
            aggregation="only_first_replica",
        )
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.generator_optimizer = None
        self.discriminator_optimizer = None
        self.built = True

    def call(self, z: Any, training: bool = False) -> Any:
        return self.generator(z, training=training)

    # --------------------------------------------------------------- compile

    def compile(
        self,
        generator_optimizer: str | keras.optimizers.Optimizer = "adam",
        discriminator_optimizer: str | keras.optimizers.Optimizer = "adam",
        **kwargs: Any,
    ) -> None:
        """Sets each player's optimizer and builds both.

        Under the `mixed_float16` policy each optimizer is wrapped in a
        `keras.optimizers.LossScaleOptimizer` (unless it already is one). Both
        are built here, so their `iterations` and slot variables exist before
        training and are saved with the model. Both are in `model.optimizers`
        (as "generator_optimizer" and "discriminator_optimizer"): `fit` logs
        their learning rates (`learning_rate_generator_optimizer`, ...) and
        `customfit.callbacks.LearningRateScheduler` and `ReduceLROnPlateau`
        change them. `model.optimizer` stays `None`, so Keras' own
        learning-rate callbacks, which change only `model.optimizer`, do not
        apply. Each optimizer's `iterations` counts its own updates.

        Args:
            generator_optimizer: Optimizer (or its name) for the generator.
            discriminator_optimizer: Optimizer (or its name) for the
                discriminator; must be a different object.
            **kwargs: `run_eagerly`, `steps_per_execution`, `jit_compile`, as
                for `keras.Model.compile`.
        """
        for unsupported in ("optimizer", "loss", "loss_weights", "metrics",
                            "weighted_metrics"):
            if unsupported in kwargs:
                raise TypeError(
                    f"GAN.compile() takes no {unsupported}=: pass "
                    "generator_optimizer= and discriminator_optimizer=, and "
                    "override generator_loss()/discriminator_loss() to change "
                    "the losses."
                )
        g_opt = keras.optimizers.get(generator_optimizer)
        d_opt = keras.optimizers.get(discriminator_optimizer)
        if g_opt is d_opt:
            raise ValueError(
                "generator_optimizer and discriminator_optimizer are the same "
                "object; each player needs its own optimizer state. Pass two "
                "optimizers, e.g. keras.optimizers.Adam(2e-4) twice."
            )
        super().compile(optimizer=None, **kwargs)
        if self.dtype_policy.name == "mixed_float16":
            g_opt, d_opt = (
                opt if isinstance(opt, keras.optimizers.LossScaleOptimizer)
                else keras.optimizers.LossScaleOptimizer(opt, name=f"{role}_loss_scale")
                for opt, role in ((g_opt, "generator"), (d_opt, "discriminator"))
            )
        with self.distribute_strategy.scope():
            for opt, model in ((g_opt, self.generator), (d_opt, self.discriminator)):
                if not opt.built:
                    opt.build(model.trainable_weights)
        self.generator_optimizer = g_opt
        self.discriminator_optimizer = d_opt
        # A plain attribute: what compile() was given, not state to track.
        object.__setattr__(self, "_gan_compile_config", {
            "generator_optimizer": generator_optimizer,
            "discriminator_optimizer": discriminator_optimizer,
            **kwargs,
        })

    def get_compile_config(self) -> dict:
        if not self.compiled:
            return {}
        config = dict(self._gan_compile_config)
        for key in ("generator_optimizer", "discriminator_optimizer"):
            config[key] = keras.optimizers.serialize(keras.optimizers.get(config[key]))
        return config

    def compile_from_config(self, config: dict) -> None:
        config = dict(config)
        for key in ("generator_optimizer", "discriminator_optimizer"):
            config[key] = keras.optimizers.deserialize(config[key])
        self.compile(**config)

    # ---------------------------------------------------------------- losses

    def discriminator_loss(self, real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tf.Tensor:
        """The discriminator's loss on one batch: the mean over the batch.

        Runs inside every train and test step. Default: binary cross-entropy
        on logits, real labelled 1 and generated 0, summed over the two
        halves. Return a float32 scalar; the number of replicas is accounted
        for by the caller.
        """
        bce = keras.losses.binary_crossentropy
        real = bce(tf.ones_like(real_logits), real_logits, from_logits=True)
        fake = bce(tf.zeros_like(fake_logits), fake_logits, from_logits=True)
        return tf.reduce_mean(real) + tf.reduce_mean(fake)

    def generator_loss(self, fake_logits: tf.Tensor) -> tf.Tensor:
        """The generator's loss on one batch: the mean over the batch.

        Runs inside every train and test step. Default: the non-saturating
        loss, binary cross-entropy of the generated samples labelled real.
        """
        bce = keras.losses.binary_crossentropy
        return tf.reduce_mean(bce(tf.ones_like(fake_logits), fake_logits, from_logits=True))

    # ----------------------------------------------------------------- steps

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        real = self._real_samples(data)
        batch = tf.shape(real)[0]
        d_vars = self.discriminator.trainable_weights
        g_vars = self.generator.trainable_weights

        z = self._latent(batch, stream=0)
        with tf.GradientTape() as tape:
            fake = self.generator(z, training=True)
            d_loss = self._replica_loss(
                self.discriminator_loss(
                    self._logits(real, training=True), self._logits(fake, training=True)
                )
            )
            scaled = self.discriminator_optimizer.scale_loss(d_loss)
        self._update(self.discriminator_optimizer, tape.gradient(scaled, d_vars), d_vars)

        z = self._latent(batch, stream=1)
        with tf.GradientTape() as tape:
            fake = self.generator(z, training=True)
            g_loss = self._replica_loss(
                self.generator_loss(self._logits(fake, training=True))
            )
            scaled = self.generator_optimizer.scale_loss(g_loss)
        self._update(self.generator_optimizer, tape.gradient(scaled, g_vars), g_vars)

        self.steps.assign_add(1)
        return self._report(d_loss, g_loss, batch)

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        real = self._real_samples(data)
        batch = tf.shape(real)[0]
        z = self._latent(batch, stream=0)
        fake = self.generator(z, training=False)
        fake_logits = self._logits(fake, training=False)
        d_loss = self._replica_loss(
            self.discriminator_loss(self._logits(real, training=False), fake_logits)
        )
        g_loss = self._replica_loss(self.generator_loss(fake_logits))
        return self._report(d_loss, g_loss, batch)

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        # The compiled `loss` column would stay 0: a GAN has two losses.
        tracker = internals.loss_tracker(self) if self.compiled else None
        return [m for m in super().metrics if m is not tracker]

    # -------------------------------------------------------------- plumbing

    def _real_samples(self, data: Any) -> tf.Tensor:
        x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(
                "GAN does not weight samples: call fit()/evaluate() without "
                "sample_weight (or class_weight)."
            )
        if not tf.is_tensor(x):
            raise TypeError(
                "GAN trains on one array of real samples: call fit(x) with x "
                f"an array or a dataset of arrays; got {type(x).__name__}."
            )
        return x

    def _logits(self, samples: tf.Tensor, training: bool) -> tf.Tensor:
        return tf.cast(self.discriminator(samples, training=training), "float32")

    def _latent(self, batch: tf.Tensor, stream: int) -> tf.Tensor:
        """This replica's rows of the global batch's latent vectors."""
        context = tf.distribute.get_replica_context()
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if context is None or replicas == 1:
            offset, total = tf.zeros((), "int32"), batch
        else:
            sizes = context.all_gather(tf.reshape(batch, [1]), axis=0)
            replica = tf.cast(context.replica_id_in_sync_group, "int32")
            offset = tf.reduce_sum(sizes[:replica])
            total = tf.reduce_sum(sizes)
        seed = tf.stack([tf.constant(self.seed, "int64"), 2 * self.steps + stream])
        noise = tf.random.stateless_normal(tf.stack([total, self.latent_dim]), seed)
        return noise[offset : offset + batch]

    @staticmethod
    def _replica_loss(loss: tf.Tensor) -> tf.Tensor:
        """This replica's share: the optimizers sum gradients over replicas."""
        loss = tf.cast(loss, "float32")
        if loss.shape.rank != 0:
            raise ValueError(
                "discriminator_loss() and generator_loss() must return a scalar "
                f"(the mean over the batch); got shape {loss.shape}. Reduce it, "
                "e.g. return tf.reduce_mean(per_sample_loss)."
            )
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            loss = loss * tf.cast(1.0 / replicas, loss.dtype)
        return loss

    def _update(self, optimizer: Any, gradients: list, variables: list) -> None:
        scale = internals.loss_scale_in_use(optimizer)
        if scale is not None:
            gradients = [_step.multiply(g, 1.0 / scale) for g in gradients]
        gradients = _step.checked_gradients(
            self.transform_gradients(gradients, variables), variables,
            self.require_all_gradients)
        if scale is not None:
            # Exact (a power of two); keeps the optimizer's finite check and
            # dynamic scale update working.
            gradients = [_step.multiply(g, scale) for g in gradients]
        optimizer.apply(gradients, variables)

    def _report(self, d_loss: tf.Tensor, g_loss: tf.Tensor, batch: tf.Tensor) -> dict:
        for tracker, loss in ((self.d_loss_tracker, d_loss), (self.g_loss_tracker, g_loss)):
            tracker.update_state(
                internals.unscale_loss_for_distribution(loss), sample_weight=batch
            )
        return self.get_metrics_result()

    # ---------------------------------------------------------------- config

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            generator=serialize_wrapped(self.generator),
            discriminator=serialize_wrapped(self.discriminator),
            latent_dim=self.latent_dim,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> "GAN":
        config = dict(config)
        for key in ("generator", "discriminator"):
            config[key] = deserialize_wrapped(config[key])
        return cls(**config)

