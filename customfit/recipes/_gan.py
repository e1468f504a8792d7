"""`GAN`: two-player training, each player with its own optimizer."""

from __future__ import annotations

import contextvars
from typing import Any

import keras
import numpy as np
from keras import ops

from customfit import _step
from customfit._backend import loop, replicas
from customfit._keras import internals
from customfit._model import CustomModel, Tensor
from customfit.recipes._wrapped import deserialize_wrapped, serialize_wrapped

# Which discriminator update of the step runs (`gradient_penalty` draws its
# interpolation weights for it): step-local, not model state.
_DISCRIMINATOR_UPDATE: contextvars.ContextVar[int] = contextvars.ContextVar(
    "customfit_gan_discriminator_update", default=0
)


@keras.saving.register_keras_serializable(package="customfit")
class GAN(CustomModel):
    """A generator and a discriminator trained against each other by `fit`.

    Each training batch of real samples `x` runs, in order:

    1. `discriminator_steps` discriminator updates, each on `x` and on
       `generator(z)` for fresh `z`: `discriminator_loss(real_output,
       fake_output) + gradient_penalty(x, generator(z))`, minimized by
       `discriminator_optimizer`;
    2. one generator update: `generator_loss(fake_output)` on fresh samples,
       minimized by `generator_optimizer`.

    Several discriminator (critic) updates reuse the batch, as Keras' WGAN-GP
    example does. Between differentiation and each update, the inherited hook
    `transform_gradients(gradients, variables)` runs once per update with
    that player's unscaled, per-replica gradients and trainable weights, so a
    gradient hook (clipping, logging) applies to both players; tell them apart
    with `variables[0] is self.generator.trainable_weights[0]`. `self.log`
    works as in any `CustomModel`.

    `objective` picks the default losses: `"non_saturating"` (Goodfellow et
    al., 2014: binary cross-entropy, on logits or, with `from_logits=False`,
    on probabilities from a sigmoid discriminator, as in DCGAN),
    `"wasserstein"` (Arjovsky et al., 2017: the critic's mean score on fake
    minus real; the generator's minus the mean fake score) or `"hinge"`.
    WGAN-GP (Gulrajani et al., 2017) is `objective="wasserstein",
    gradient_penalty_weight=10.0, discriminator_steps=5`. Override
    `discriminator_loss`, `generator_loss` or `gradient_penalty` for others.

    The latent vectors (and the penalty's interpolation weights) are drawn
    from `seed` and the model's step counter `steps`, the same for any number
    of replicas: under `tf.distribute` each replica takes its rows of the
    noise of the global batch. Training is therefore reproducible, and
    resumes exactly after saving and loading. `evaluate` scores both losses
    (without the penalty) on the data given against samples drawn for the
    current step, without updating anything.

    `fit` reports `d_loss` (the last discriminator update's, penalty
    included) and `g_loss`, averaged over the epoch weighted by batch size,
    as stock `fit` averages `loss`, and, when a penalty is used,
    `gradient_penalty` the same way. Calling the model (or `predict`) on
    latent vectors returns `generator(z, training=False)`.

    Args:
        generator: A built `keras.Model` mapping `(batch, latent_dim)` latent
            vectors to samples shaped like the data.
        discriminator: A built `keras.Model` mapping samples to `(batch, 1)`
            outputs: logits, probabilities (`from_logits=False`) or critic
            scores (`"wasserstein"`, `"hinge"`).
        latent_dim: Size of the latent vectors.
        seed: Seed of the latent noise.
        discriminator_steps: Discriminator updates per generator update.
        objective: `"non_saturating"`, `"wasserstein"` or `"hinge"`.
        from_logits: Whether the discriminator outputs logits (True) or
            probabilities (False); `"non_saturating"` only.
        gradient_penalty_weight: Weight of the WGAN-GP gradient penalty,
            `E[(||grad D(x_hat)||_2 - 1)^2]` at random interpolates `x_hat`
            of real and generated samples; 0 (the default) turns it off.

    Example:

    ```python
    gan = customfit.recipes.GAN(generator, discriminator, latent_dim=16)
    gan.compile(generator_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                discriminator_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5))
    gan.fit(images, batch_size=64, epochs=20)
    samples = gan.predict(np.random.normal(size=(16, 16)))

    wgan_gp = customfit.recipes.GAN(
        generator, critic, latent_dim=16, objective="wasserstein",
        gradient_penalty_weight=10.0, discriminator_steps=5)
    ```
    """

    def __init__(
        self,
        generator: keras.Model,
        discriminator: keras.Model,
        latent_dim: int,
        seed: int = 0,
        discriminator_steps: int = 1,
        objective: str = "non_saturating",
        from_logits: bool = True,
        gradient_penalty_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        for seam in ("compute_gradients", "update_weights"):
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
        _check_options(discriminator_steps, objective, from_logits, gradient_penalty_weight)
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim
        self.seed = int(seed)
        self.discriminator_steps = discriminator_steps
        self.objective = objective
        self.from_logits = bool(from_logits)
        self.gradient_penalty_weight = float(gradient_penalty_weight)
        self.steps = keras.Variable(
            0,
            dtype="int",  # int64 on TensorFlow, int32 on JAX, as Keras counts
            trainable=False,
            name="steps",
            aggregation="only_first_replica",
        )
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        # Keras optimizers once compiled (Any: Keras is untyped, and the
        # steps only run after compile()).
        self.generator_optimizer: Any = None
        self.discriminator_optimizer: Any = None
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
        for unsupported in ("optimizer", "loss", "loss_weights", "metrics", "weighted_metrics"):
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
                opt
                if isinstance(opt, keras.optimizers.LossScaleOptimizer)
                else keras.optimizers.LossScaleOptimizer(opt, name=f"{role}_loss_scale")
                for opt, role in ((g_opt, "generator"), (d_opt, "discriminator"))
            )
        with loop.state_scope(self):
            for opt, model in ((g_opt, self.generator), (d_opt, self.discriminator)):
                if not opt.built:
                    opt.build(model.trainable_weights)
        self.generator_optimizer = g_opt
        self.discriminator_optimizer = d_opt
        # A plain attribute: what compile() was given, not state to track.
        object.__setattr__(
            self,
            "_gan_compile_config",
            {
                "generator_optimizer": generator_optimizer,
                "discriminator_optimizer": discriminator_optimizer,
                **kwargs,
            },
        )

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

    def discriminator_loss(self, real_output: Tensor, fake_output: Tensor) -> Tensor:
        """The discriminator's loss on one batch: the mean over the batch.

        Runs inside every discriminator update and every test step, with the
        discriminator's float32 outputs on this replica's real and generated
        samples. Default, by `objective`: binary cross-entropy with real
        labelled 1 and generated 0, summed over the two halves
        (`"non_saturating"`); `mean(fake) - mean(real)` (`"wasserstein"`);
        `mean(relu(1 - real)) + mean(relu(1 + fake))` (`"hinge"`). Return a
        float32 scalar; the number of replicas is accounted for by the caller.
        """
        if self.objective == "wasserstein":
            return ops.mean(fake_output) - ops.mean(real_output)
        if self.objective == "hinge":
            return ops.mean(ops.relu(1.0 - real_output)) + ops.mean(ops.relu(1.0 + fake_output))
        bce = keras.losses.binary_crossentropy
        real = bce(ops.ones_like(real_output), real_output, from_logits=self.from_logits)
        fake = bce(ops.zeros_like(fake_output), fake_output, from_logits=self.from_logits)
        return ops.mean(real) + ops.mean(fake)

    def generator_loss(self, fake_output: Tensor) -> Tensor:
        """The generator's loss on one batch: the mean over the batch.

        Runs inside every generator update and every test step. Default: the
        non-saturating loss, binary cross-entropy of the generated samples
        labelled real (`"non_saturating"`), or `-mean(fake)` (`"wasserstein"`,
        `"hinge"`).
        """
        if self.objective in ("wasserstein", "hinge"):
            return -ops.mean(fake_output)
        bce = keras.losses.binary_crossentropy
        return ops.mean(bce(ops.ones_like(fake_output), fake_output, from_logits=self.from_logits))

    def gradient_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        """A term added to the discriminator's loss, already weighted.

        Runs inside the differentiation of every discriminator update (not in
        `evaluate`), with this replica's real samples and the generated ones
        of that update, so the gradients of what it returns reach the
        discriminator's weights. Default: WGAN-GP's
        `gradient_penalty_weight * mean((||grad D(x_hat)||_2 - 1)^2)`, at
        `x_hat = real + eps * (fake - real)`, one `eps ~ U(0, 1)` per sample
        drawn like the latent noise; 0 when `gradient_penalty_weight` is 0.
        Return a scalar (the mean over the batch).

        Example, R1 (Mescheder et al., 2018) on real samples, on either
        backend (`discriminator_gradients`):

        ```python
        def gradient_penalty(self, real, fake):
            grads = self.discriminator_gradients(real)
            return 5.0 * keras.ops.mean(keras.ops.sum(keras.ops.square(grads), axis=-1))
        ```
        """
        if self.gradient_penalty_weight == 0:
            return ops.zeros((), "float32")
        batch = ops.shape(real)[0]
        eps = self._noise(batch, [], "interpolation", _DISCRIMINATOR_UPDATE.get())
        eps = ops.reshape(eps, (-1,) + (1,) * (len(real.shape) - 1))
        real = ops.cast(real, "float32")
        interpolated = real + eps * (ops.cast(fake, "float32") - real)
        grads = ops.reshape(self.discriminator_gradients(interpolated), (batch, -1))
        norms = ops.sqrt(ops.sum(ops.square(grads), axis=1) + 1e-12)
        return self.gradient_penalty_weight * ops.mean(ops.square(norms - 1.0))

    def discriminator_gradients(self, samples: Tensor) -> Tensor:
        """The gradient of the discriminator's summed float32 outputs
        (`training=True`) w.r.t. `samples`: per sample, `grad D(x)`. For
        gradient penalties, on TensorFlow and JAX alike.

        It is differentiable, so a penalty built from it reaches the
        discriminator's weights. What the discriminator updates in this call
        (BatchNormalization statistics) is discarded.
        """

        def summed_outputs(inputs: list) -> Tensor:
            return ops.sum(self._outputs(inputs[0], training=True))

        _, (grads,) = loop.stateless_gradients(summed_outputs, [samples])
        return grads

    # ----------------------------------------------------------------- steps

    def train_step(self, data: Any) -> dict[str, Tensor]:
        real = self._real_samples(data)
        batch = ops.shape(real)[0]
        d_vars = self.discriminator.trainable_weights
        g_vars = self.generator.trainable_weights

        for update in range(self.discriminator_steps):
            z = self._latent(batch, stream=update)

            def discriminator_objective(z: Tensor = z) -> tuple[Tensor, tuple]:
                fake = self.generator(z, training=True)
                d_loss = self.discriminator_loss(
                    self._outputs(real, training=True), self._outputs(fake, training=True)
                )
                penalty = None
                if self._penalized:
                    penalty = _scalar(self.gradient_penalty(real, fake), "gradient_penalty()")
                    d_loss = d_loss + penalty
                d_loss = self._replica_loss(d_loss)
                return self.discriminator_optimizer.scale_loss(d_loss), (d_loss, penalty)

            # The step is traced once: `update` is a Python int here, read by
            # `gradient_penalty`'s noise.
            running = _DISCRIMINATOR_UPDATE.set(update)
            try:
                (d_loss, penalty), grads = loop.gradients(discriminator_objective, d_vars)
            finally:
                _DISCRIMINATOR_UPDATE.reset(running)
            self._update(self.discriminator_optimizer, grads, d_vars)

        z = self._latent(batch, stream=self.discriminator_steps)

        def generator_objective() -> tuple[Tensor, Tensor]:
            fake = self.generator(z, training=True)
            g_loss = self._replica_loss(self.generator_loss(self._outputs(fake, training=True)))
            return self.generator_optimizer.scale_loss(g_loss), g_loss

        g_loss, grads = loop.gradients(generator_objective, g_vars)
        self._update(self.generator_optimizer, grads, g_vars)

        self.steps.assign_add(1)
        if self._penalized:
            self.log("gradient_penalty", penalty, weight=batch)
        return self._report(d_loss, g_loss, batch)

    def test_step(self, data: Any) -> dict[str, Tensor]:
        real = self._real_samples(data)
        batch = ops.shape(real)[0]
        z = self._latent(batch, stream=0)
        fake = self.generator(z, training=False)
        fake_output = self._outputs(fake, training=False)
        d_loss = self._replica_loss(
            self.discriminator_loss(self._outputs(real, training=False), fake_output)
        )
        g_loss = self._replica_loss(self.generator_loss(fake_output))
        return self._report(d_loss, g_loss, batch)

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        # The compiled `loss` column would stay 0: a GAN has two losses.
        tracker = internals.loss_tracker(self) if self.compiled else None
        return [m for m in super().metrics if m is not tracker]

    # -------------------------------------------------------------- plumbing

    def _real_samples(self, data: Any) -> Tensor:
        x, _, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(
                "GAN does not weight samples: call fit()/evaluate() without "
                "sample_weight (or class_weight)."
            )
        if not (ops.is_tensor(x) or isinstance(x, np.ndarray)):
            raise TypeError(
                "GAN trains on one array of real samples: call fit(x) with x "
                f"an array or a dataset of arrays; got {type(x).__name__}."
            )
        return x

    def _outputs(self, samples: Tensor, training: bool) -> Tensor:
        return ops.cast(self.discriminator(samples, training=training), "float32")

    @property
    def _penalized(self) -> bool:
        return (
            self.gradient_penalty_weight > 0
            or type(self).gradient_penalty is not GAN.gradient_penalty
        )

    def _latent(self, batch: Any, stream: int) -> Tensor:
        """This replica's rows of the global batch's latent vectors; stream
        `i < discriminator_steps` for discriminator update `i`, stream
        `discriminator_steps` for the generator's."""
        return self._noise(batch, [self.latent_dim], "latent", stream)

    def _noise(self, batch: Any, shape: list, kind: str, stream: int) -> Tensor:
        """This replica's rows of `(global batch, *shape)` numbers drawn from
        `seed`, `steps` and `stream`: `N(0, 1)` latent vectors, or `U(0, 1)`
        interpolation weights (a key of their own, one stream per
        discriminator update)."""
        streams = self.discriminator_steps + 1 if kind == "latent" else self.discriminator_steps
        counter = streams * self.steps.value + stream
        return replicas.global_batch_noise(self.seed, counter, batch, shape, kind)

    @staticmethod
    def _replica_loss(loss: Tensor) -> Tensor:
        """This replica's share: the optimizers sum gradients over replicas."""
        loss = _scalar(loss, "discriminator_loss(), generator_loss() and gradient_penalty()")
        replica_count = replicas.count()
        if replica_count > 1:
            loss = loss * ops.cast(1.0 / replica_count, loss.dtype)
        return loss

    def _update(self, optimizer: Any, gradients: list, variables: list) -> None:
        scale = internals.loss_scale_in_use(optimizer)
        if scale is not None:
            gradients = [_step.multiply(g, 1.0 / scale) for g in gradients]
        gradients = _step.checked_gradients(
            self.transform_gradients(gradients, variables), variables, self.require_all_gradients
        )
        if scale is not None:
            # Exact (a power of two); keeps the optimizer's finite check and
            # dynamic scale update working.
            gradients = [_step.multiply(g, scale) for g in gradients]
        loop.apply(optimizer, gradients, variables)

    def _report(self, d_loss: Tensor, g_loss: Tensor, batch: Any) -> dict:
        for tracker, loss in ((self.d_loss_tracker, d_loss), (self.g_loss_tracker, g_loss)):
            tracker.update_state(internals.unscale_loss_for_distribution(loss), sample_weight=batch)
        return self.get_metrics_result()

    # ---------------------------------------------------------------- config

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            generator=serialize_wrapped(self.generator),
            discriminator=serialize_wrapped(self.discriminator),
            latent_dim=self.latent_dim,
            seed=self.seed,
            discriminator_steps=self.discriminator_steps,
            objective=self.objective,
            from_logits=self.from_logits,
            gradient_penalty_weight=self.gradient_penalty_weight,
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> GAN:
        config = dict(config)
        for key in ("generator", "discriminator"):
            config[key] = deserialize_wrapped(config[key])
        return cls(**config)


OBJECTIVES = ("non_saturating", "wasserstein", "hinge")


def _check_options(
    discriminator_steps: Any, objective: Any, from_logits: Any, penalty_weight: Any
) -> None:
    if (
        not isinstance(discriminator_steps, int)
        or isinstance(discriminator_steps, bool)
        or discriminator_steps < 1
    ):
        raise ValueError(
            "discriminator_steps must be a positive int (discriminator updates "
            f"per generator update); got {discriminator_steps!r}."
        )
    if objective not in OBJECTIVES:
        raise ValueError(
            f"objective must be one of {', '.join(map(repr, OBJECTIVES))}; got "
            f"{objective!r}. Override discriminator_loss() and generator_loss() "
            "for another."
        )
    if not from_logits and objective != "non_saturating":
        raise ValueError(
            f"from_logits=False (a discriminator ending in a sigmoid) is for the "
            f'"non_saturating" objective; a {objective} critic outputs unbounded '
            "scores. Remove the sigmoid and use from_logits=True."
        )
    if not isinstance(penalty_weight, (int, float)) or not penalty_weight >= 0:
        raise ValueError(
            "gradient_penalty_weight must be a number >= 0 (0 turns the penalty "
            f"off; WGAN-GP uses 10); got {penalty_weight!r}."
        )


def _scalar(loss: Any, source: str) -> Tensor:
    loss = ops.cast(loss, "float32")
    if len(loss.shape) != 0:
        raise ValueError(
            f"{source} must return a scalar (the mean over the batch); got shape "
            f"{tuple(loss.shape)}. Reduce it, e.g. return "
            "keras.ops.mean(per_sample_loss)."
        )
    return loss
