"""`customfit.recipes.GAN`: two players, two optimizers, on the bundled digits.
Runs on TensorFlow (the suite) and on JAX (`nox -s jax`), but for the tests
of TensorFlow-only features and those that read values inside the
differentiated losses (tracers under `jax.grad`, even when run eagerly)."""

import json

import keras
import numpy as np
import pytest
from keras import ops

import customfit
from customfit.recipes import GAN, GlobalNormClipping, GradientAccumulation
from examples.gan_digits import build_gan, frechet_distance
from tests.recipe_checks import global_norm
from tests.subproc import run_python

TENSORFLOW = keras.backend.backend() == "tensorflow"
tensorflow_only = pytest.mark.skipif(
    not TENSORFLOW, reason="tf.distribute, tf.random, or values read inside jax.grad")

LATENT = 16
# fit's epoch logs: both losses (constant learning rates are not logged).
EPOCH_LOGS = {"d_loss", "g_loss"}


# The published GAN family, each kept to the recipe's guarantees below.
VARIANTS = {
    "non_saturating": {},
    "probabilities": dict(from_logits=False),  # DCGAN's sigmoid discriminator
    "wgan_gp": dict(objective="wasserstein", gradient_penalty_weight=10.0,
                    discriminator_steps=3),
}


GAN_OPTIONS = ("discriminator_steps", "objective", "from_logits", "gradient_penalty_weight")


def tiny_gan(seed=0, units=16, **options):
    generator = keras.Sequential([
        keras.Input((LATENT,)), keras.layers.Dense(units), keras.layers.LeakyReLU(0.2),
        keras.layers.Dense(64, activation="tanh"),
    ])
    sigmoid = options.get("from_logits", True) is False
    discriminator = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(units), keras.layers.LeakyReLU(0.2),
        keras.layers.Dense(1, activation="sigmoid" if sigmoid else None),
    ])
    return GAN(generator, discriminator, latent_dim=LATENT, seed=seed, **options)


def epoch_logs(options):
    return EPOCH_LOGS | ({"gradient_penalty"} if options.get("gradient_penalty_weight") else set())


def compiled(gan, **kwargs):
    gan.compile(keras.optimizers.Adam(1e-3, beta_1=0.5),
                keras.optimizers.Adam(1e-3, beta_1=0.5), **kwargs)
    return gan


@pytest.fixture(scope="module")
def images(digits):
    return digits[0] * 2 - 1  # the generator's tanh range


@pytest.mark.parametrize("wgan_gp", [False, True], ids=["non_saturating", "wgan_gp"])
def test_generator_samples_move_toward_the_digits(images, wgan_gp):
    """The reference models of examples/gan_digits.py, 5 of its 30 epochs."""
    gan = build_gan(wgan_gp=wgan_gp)
    z = np.random.default_rng(1).normal(size=(1000, LATENT)).astype("float32")
    before = frechet_distance(images, gan.predict(z, verbose=0))
    history = gan.fit(images, batch_size=64, epochs=5, verbose=0).history
    after = frechet_distance(images, gan.predict(z, verbose=0))
    # Observed: 40.7 -> 11.4 (non-saturating), 40.7 -> 16.8 (WGAN-GP); two
    # halves of the real data: 0.28.
    assert after < 0.5 * before, (before, after)
    assert set(history) == EPOCH_LOGS | ({"gradient_penalty"} if wgan_gp else set())
    steps = 5 * int(np.ceil(len(images) / 64))
    assert int(gan.steps) == steps
    assert int(gan.generator_optimizer.iterations) == steps
    assert int(gan.discriminator_optimizer.iterations) == steps * (5 if wgan_gp else 1)


def test_model_optimizer_stays_none_and_fit_writes_no_stand_in(images):
    """`model.optimizer` is None before, after and (on TensorFlow) during
    `fit`; on JAX, Keras' trainer reads an empty stand-in there, and nothing
    is written to the model for it."""
    gan = compiled(tiny_gan())
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(
            (gan.__dict__["optimizer"], gan.optimizer)))
    assert gan.optimizer is None
    gan.fit(images[:64], batch_size=32, epochs=1, verbose=0, callbacks=[record])
    assert gan.optimizer is None and gan.__dict__["optimizer"] is None
    assert [stored for stored, _ in seen] == [None, None]
    if keras.backend.backend() == "jax":
        assert all(read is not None and read.variables == [] for _, read in seen)
    else:
        assert [read for _, read in seen] == [None, None]


@tensorflow_only
def test_losses_are_batch_weighted_epoch_means(images):
    seen = {"d": [], "g": [], "batch": []}

    class Recording(GAN):
        def discriminator_loss(self, real_logits, fake_logits):
            loss = super().discriminator_loss(real_logits, fake_logits)
            seen["d"].append(float(loss))
            seen["batch"].append(int(ops.shape(real_logits)[0]))
            return loss

        def generator_loss(self, fake_logits):
            loss = super().generator_loss(fake_logits)
            seen["g"].append(float(loss))
            return loss

    base = tiny_gan()
    gan = compiled(Recording(base.generator, base.discriminator, latent_dim=LATENT),
                   run_eagerly=True)
    history = gan.fit(images[:100], batch_size=32, epochs=1, verbose=0).history
    batch = np.array(seen["batch"])
    assert batch.tolist() == [32, 32, 32, 4]  # a ragged last batch weighs less
    # float32 running sums in the Mean metric vs float64 here.
    assert history["d_loss"][0] == pytest.approx(np.average(seen["d"], weights=batch), rel=1e-6)
    assert history["g_loss"][0] == pytest.approx(np.average(seen["g"], weights=batch), rel=1e-6)
    evaluation = gan.evaluate(images[:64], batch_size=64, verbose=0, return_dict=True)
    assert set(evaluation) == {"d_loss", "g_loss"}
    assert evaluation["d_loss"] == pytest.approx(seen["d"][-1], rel=1e-6)


def test_transform_gradients_runs_per_player(images):
    class FrozenGenerator(GAN):
        def transform_gradients(self, gradients, variables):
            if variables[0] is self.generator.trainable_weights[0]:
                self.log("g_grad_norm", global_norm(gradients))
                return [ops.zeros_like(g) for g in gradients]
            self.log("d_grad_norm", global_norm(gradients))
            return gradients

    base = tiny_gan()
    gan = FrozenGenerator(base.generator, base.discriminator, latent_dim=LATENT)
    gan.compile(keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1))
    g_before = [w.copy() for w in gan.generator.get_weights()]
    d_before = [w.copy() for w in gan.discriminator.get_weights()]
    history = gan.fit(images[:128], batch_size=64, epochs=1, verbose=0).history
    for before, after in zip(g_before, gan.generator.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(d_before, gan.discriminator.get_weights()))
    assert history["g_grad_norm"][0] > 0 and history["d_grad_norm"][0] > 0


def test_composes_with_a_gradient_recipe_per_player(images, tmp_path):
    class ClippedGAN(GlobalNormClipping, GAN):
        pass

    base = tiny_gan()
    gan = ClippedGAN(base.generator, base.discriminator, latent_dim=LATENT, clip_norm=1e-3)
    gan.compile(keras.optimizers.SGD(1.0), keras.optimizers.SGD(1.0))
    players = (gan.generator, gan.discriminator)
    before = [[w.copy() for w in p.get_weights()] for p in players]
    gan.fit(images[:64], batch_size=64, epochs=1, verbose=0)
    for player, old in zip(players, before):
        step = np.sqrt(sum(((w - o) ** 2).sum() for w, o in zip(player.get_weights(), old)))
        assert 0 < step <= 1e-3 * (1 + 1e-5)  # each player clipped on its own
    with pytest.warns(customfit.SavingWarning, match="custom_objects"):  # not registered
        gan.save(tmp_path / "clipped.keras")
    loaded = keras.models.load_model(tmp_path / "clipped.keras",
                                     custom_objects={"ClippedGAN": ClippedGAN})
    assert loaded.clip_norm == 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_keras_file_restores_both_optimizers_and_resumes_exactly(images, tmp_path, variant):
    options = VARIANTS[variant]
    updates = options.get("discriminator_steps", 1)
    x = images[:256]
    fit = dict(batch_size=64, verbose=0, shuffle=False)
    uninterrupted = compiled(tiny_gan(**options))
    full = uninterrupted.fit(x, epochs=2, **fit).history
    assert set(full) == epoch_logs(options)

    keras.utils.set_random_seed(0)
    first = compiled(tiny_gan(**options))
    first.fit(x, epochs=1, **fit)
    first.save(tmp_path / "gan.keras")
    loaded = keras.models.load_model(tmp_path / "gan.keras")

    assert type(loaded) is GAN
    for option in ("latent_dim", "seed", *GAN_OPTIONS):
        assert getattr(loaded, option) == getattr(first, option)
    for name, iterations in (("generator_optimizer", 4),
                             ("discriminator_optimizer", 4 * updates)):
        saved, restored = getattr(first, name), getattr(loaded, name)
        assert int(restored.iterations) == iterations
        assert len(restored.variables) == len(saved.variables) > 2  # slots exist
        for a, b in zip(saved.variables, restored.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(loaded.steps) == 4

    resumed = loaded.fit(x, epochs=1, **fit).history
    assert resumed == {key: values[1:] for key, values in full.items()}
    for a, b in zip(uninterrupted.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for name in ("generator_optimizer", "discriminator_optimizer"):
        for a, b in zip(getattr(uninterrupted, name).variables, getattr(loaded, name).variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("variant", VARIANTS)
def test_callbacks_and_weights_checkpoint_hold_both_optimizers(images, tmp_path, variant):
    options = VARIANTS[variant]
    trained = compiled(tiny_gan(**options))
    epochs_seen = []
    callbacks = [
        keras.callbacks.ModelCheckpoint(tmp_path / "gan.weights.h5", save_weights_only=True),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: epochs_seen.append(logs)),
    ]
    if TENSORFLOW:  # Keras' TensorBoard writes with TensorFlow
        callbacks.append(keras.callbacks.TensorBoard(tmp_path / "tb"))
    trained.fit(images[:128], batch_size=64, epochs=1, verbose=1, callbacks=callbacks)
    assert set(epochs_seen[0]) == epoch_logs(options)
    if TENSORFLOW:
        assert list((tmp_path / "tb" / "train").iterdir())
    fresh = compiled(tiny_gan(seed=0, **options))
    assert int(fresh.generator_optimizer.iterations) == 0
    fresh.load_weights(tmp_path / "gan.weights.h5")
    for name in ("generator_optimizer", "discriminator_optimizer"):
        for a, b in zip(getattr(trained, name).variables, getattr(fresh, name).variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(fresh.steps) == 2


@tensorflow_only
def test_mixed_precision_scales_each_players_loss(images, mixed_float16):
    import tensorflow as tf

    norms = []

    class Recorder(GAN):
        def transform_gradients(self, gradients, variables):
            norms.append(float(global_norm(gradients)))
            return gradients

    base = tiny_gan()
    gan = Recorder(base.generator, base.discriminator, latent_dim=LATENT)
    gan.compile(keras.optimizers.SGD(0.01), keras.optimizers.SGD(0.01), run_eagerly=True)
    for name in ("generator_optimizer", "discriminator_optimizer"):
        assert isinstance(getattr(gan, name), keras.optimizers.LossScaleOptimizer)
    x = images[:64]
    # The discriminator's gradient at step 0, without any loss scaling.
    z = gan._latent(tf.constant(64), stream=0)
    with tf.GradientTape() as tape:
        loss = gan.discriminator_loss(gan._outputs(x, True), gan._outputs(gan.generator(z), True))
    reference = float(tf.linalg.global_norm(tape.gradient(loss, gan.discriminator.trainable_weights)))

    history = gan.fit(images[:256], batch_size=64, epochs=1, verbose=0, shuffle=False).history
    assert float(gan.discriminator_optimizer.scale_loss(1.0)) >= 2**14  # scaling is on
    assert norms[0] == pytest.approx(reference, rel=1e-2)  # float16 forward passes
    assert np.isfinite(history["d_loss"] + history["g_loss"]).all()
    assert all(np.isfinite(w).all() for w in gan.get_weights())
    assert int(gan.generator_optimizer.iterations) == 4


@pytest.mark.parametrize("variant", ["probabilities", "wgan_gp"])
def test_mixed_precision_trains_each_variant(images, mixed_float16, variant):
    options = VARIANTS[variant]
    gan = compiled(tiny_gan(**options))
    history = gan.fit(images[:256], batch_size=64, epochs=2, verbose=0).history
    assert set(history) == epoch_logs(options)
    assert all(np.isfinite(values).all() for values in history.values())
    assert all(np.isfinite(w).all() for w in gan.get_weights())
    # An update whose scaled gradients overflow float16 is skipped and halves
    # the loss scale (from 2**15), as LossScaleOptimizer does.
    for name, updates in (("generator_optimizer", 8),
                          ("discriminator_optimizer", 8 * options.get("discriminator_steps", 1))):
        optimizer = getattr(gan, name)
        skipped = np.log2(2**15 / float(optimizer.scale_loss(1.0)))
        assert int(optimizer.iterations) + skipped == updates, name


# ------------------------------------------------------- the GAN family


@tensorflow_only
def test_critic_steps_reuse_the_batch_with_fresh_noise_and_see_the_samples(images):
    """Each discriminator update gets the batch's real samples and samples
    generated for it (with their own noise); the penalty hook gets both."""
    import tensorflow as tf

    seen = []

    class Recording(GAN):
        def gradient_penalty(self, real, fake):
            seen.append((real.numpy(), fake.numpy(), self.generator.get_weights()))
            return tf.zeros(())

    base = tiny_gan()
    gan = compiled(Recording(base.generator, base.discriminator, latent_dim=LATENT,
                             discriminator_steps=3), run_eagerly=True)
    x = images[:64]
    history = gan.fit(x, batch_size=32, epochs=1, verbose=0, shuffle=False).history
    assert len(seen) == 6  # 2 batches, 3 updates each
    for i, (real, fake, generator_weights) in enumerate(seen):
        np.testing.assert_array_equal(real, x[32 * (i // 3):32 * (i // 3 + 1)])
        probe = keras.models.clone_model(gan.generator)
        probe.set_weights(generator_weights)
        z = tf.random.stateless_normal(
            [32, LATENT], tf.constant([0, 4 * (i // 3) + i % 3], "int64"))
        np.testing.assert_allclose(fake, probe(z, training=True), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(seen[0][1], seen[1][1])  # fresh noise per update
    assert history["gradient_penalty"] == [0.0]
    assert int(gan.discriminator_optimizer.iterations) == 6
    assert int(gan.generator_optimizer.iterations) == 2


def test_default_gradient_penalty_is_wgan_gps(images):
    """A linear critic's gradient is its weight vector at every point, so the
    penalty is `weight * (||w|| - 1)^2` whatever the interpolates."""
    gan = tiny_gan(objective="wasserstein", gradient_penalty_weight=10.0)
    critic = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1)])
    gan = GAN(gan.generator, critic, latent_dim=LATENT, objective="wasserstein",
              gradient_penalty_weight=10.0)
    w = critic.get_weights()[0][:, 0]
    fake = gan.generator(gan._latent(32, stream=0))
    penalty = float(gan.gradient_penalty(ops.convert_to_tensor(images[:32]), fake))
    expected = 10.0 * (np.linalg.norm(w.astype("float64")) - 1) ** 2
    assert penalty == pytest.approx(expected, rel=1e-5)


def test_wasserstein_and_hinge_losses(images):
    real = ops.convert_to_tensor([[1.0], [3.0]])
    fake = ops.convert_to_tensor([[-2.0], [0.5]])
    wasserstein = tiny_gan(objective="wasserstein")
    assert float(wasserstein.discriminator_loss(real, fake)) == pytest.approx(-0.75 - 2.0)
    assert float(wasserstein.generator_loss(fake)) == pytest.approx(0.75)
    hinge = tiny_gan(objective="hinge")
    # relu(1 - [1, 3]) = [0, 0]; relu(1 + [-2, 0.5]) = [0, 1.5]
    assert float(hinge.discriminator_loss(real, fake)) == pytest.approx(0.75)
    assert float(hinge.generator_loss(fake)) == pytest.approx(0.75)


def test_probability_discriminator_trains_like_the_logit_one(images):
    """A sigmoid discriminator with `from_logits=False` and the same network
    without the sigmoid: the same losses and updates up to the clipping of
    probabilities (1e-7) in Keras' cross-entropy on probabilities."""
    runs = []
    for from_logits in (True, False):
        keras.utils.set_random_seed(0)
        gan = compiled(tiny_gan(from_logits=from_logits))
        runs.append((gan.fit(images[:256], batch_size=64, epochs=2, verbose=0,
                             shuffle=False).history, gan.get_weights()))
    (logits, logit_weights), (probabilities, probability_weights) = runs
    for key in EPOCH_LOGS:
        np.testing.assert_allclose(probabilities[key], logits[key], rtol=1e-4)
    for a, b in zip(probability_weights, logit_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_bad_compile_and_models_say_what_to_do():
    gan = tiny_gan()
    adam = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="same object"):
        gan.compile(adam, adam)
    with pytest.raises(TypeError, match="generator_loss"):
        gan.compile(loss="binary_crossentropy")

    class PerSample(GAN):
        def generator_loss(self, fake_logits):
            return fake_logits[:, 0]

    per_sample = compiled(PerSample(gan.generator, gan.discriminator, latent_dim=LATENT))
    with pytest.raises(ValueError, match="keras.ops.mean"):
        per_sample.fit(np.zeros((8, 64), "float32"), verbose=0)
    class AccumulatedGAN(GradientAccumulation, GAN):
        pass

    with pytest.raises(TypeError, match="would be ignored"):
        AccumulatedGAN(gan.generator, gan.discriminator, latent_dim=LATENT,
                       accumulation_steps=2)
    unbuilt = keras.Sequential([keras.layers.Dense(64)])
    with pytest.raises(ValueError, match="keras.Input"):
        GAN(unbuilt, gan.discriminator, latent_dim=LATENT)
    for options, message in [
            (dict(discriminator_steps=0), "discriminator_steps must be a positive int"),
            (dict(objective="minimax"), "objective must be one of"),
            (dict(objective="wasserstein", from_logits=False), "Remove the sigmoid"),
            (dict(gradient_penalty_weight=-1.0), "WGAN-GP uses 10")]:
        with pytest.raises(ValueError, match=message):
            GAN(gan.generator, gan.discriminator, latent_dim=LATENT, **options)

    class VectorPenalty(GAN):
        def gradient_penalty(self, real, fake):
            return ops.sum(ops.square(real), axis=1)

    vector = compiled(VectorPenalty(gan.generator, gan.discriminator, latent_dim=LATENT))
    with pytest.raises(ValueError, match="gradient_penalty\\(\\) must return a scalar"):
        vector.fit(np.zeros((8, 64), "float32"), verbose=0)


@tensorflow_only
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_match_one_for_gan_wgan_gp_and_distiller():
    """One subprocess for both wrapping recipes: TensorFlow's start-up and
    the logical devices dominate its cost."""
    out = run_python(two_cpus=True, code="""
        import json
        import keras, numpy as np
        from sklearn.datasets import load_digits
        from customfit.recipes import Distiller
        from tests import test_recipes_distillation as distillation
        from tests.test_recipes_gan import VARIANTS, compiled, tiny_gan

        d = load_digits()
        x = (d.data[:200] / 16).astype("float32")  # last batch: 8
        y = d.target[:200].astype("int32")
        fit = dict(batch_size=64, epochs=1, verbose=0, shuffle=False)
        results = {}
        for name, strategy in [("one", tf.distribute.get_strategy()),
                               ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
            keras.utils.set_random_seed(0)
            with strategy.scope():
                gan = compiled(tiny_gan())
                wgan_gp = compiled(tiny_gan(**VARIANTS["wgan_gp"]))
                distiller = distillation.compiled(Distiller(
                    distillation.logits_mlp(16, seed=1),
                    distillation.logits_mlp(32, seed=0), 4.0, 0.3))
            results[name] = {
                "gan": gan.fit(2 * x - 1, **fit).history,
                "gan_weights": [w.tolist() for w in gan.get_weights()],
                "iterations": [int(gan.generator_optimizer.iterations.numpy()),
                               int(gan.discriminator_optimizer.iterations.numpy())],
                "wgan_gp": wgan_gp.fit(2 * x - 1, **fit).history,
                "wgan_gp_weights": [w.tolist() for w in wgan_gp.get_weights()],
                "distiller": distiller.fit(x, y, **fit).history,
                "distiller_weights": [w.tolist() for w in distiller.get_weights()],
            }
        print("RESULTS" + json.dumps(results))
    """)
    results = json.loads(out.split("RESULTS", 1)[1])
    one, two = results["one"], results["two"]
    assert one["iterations"] == two["iterations"] == [4, 4]
    assert set(one["gan"]) == EPOCH_LOGS
    assert set(one["wgan_gp"]) == EPOCH_LOGS | {"gradient_penalty"}
    assert set(one["distiller"]) == {"loss", "accuracy", "student_loss", "distillation_loss"}
    # Same data (and, for the GAN, the same noise) on either layout; only the
    # order of float32 sums differs (per-replica means, gradients summed over
    # replicas), while a per-replica loss column would be off by half.
    # Observed for the GAN: losses within 1e-7 relative, weights within 1.5e-8.
    # WGAN-GP's 12 critic updates with Adam, which divides each gradient by
    # its running RMS, magnify the rounding of near-zero gradient components
    # (observed: one weight of 2,417 off by 2.9e-6, Adam's step being 1e-3).
    weight_atol = {"gan": 1e-6, "wgan_gp": 1e-5, "distiller": 1e-6}
    for recipe, atol in weight_atol.items():
        assert one[recipe].keys() == two[recipe].keys()
        for key in one[recipe]:
            np.testing.assert_allclose(two[recipe][key], one[recipe][key], rtol=1e-5)
        for a, b in zip(one[f"{recipe}_weights"], two[f"{recipe}_weights"]):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=0, atol=atol)
