"""`customfit.recipes.GAN`: two players, two optimizers, on the bundled digits."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from customfit.recipes import GAN, GlobalNormClipping, GradientAccumulation
from examples.gan_digits import build_gan, frechet_distance
from tests.subproc import run_python

LATENT = 16
# fit's epoch logs: both losses (constant learning rates are not logged).
EPOCH_LOGS = {"d_loss", "g_loss"}


def tiny_gan(seed=0, units=16):
    generator = keras.Sequential([
        keras.Input((LATENT,)), keras.layers.Dense(units), keras.layers.LeakyReLU(0.2),
        keras.layers.Dense(64, activation="tanh"),
    ])
    discriminator = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(units), keras.layers.LeakyReLU(0.2),
        keras.layers.Dense(1),
    ])
    return GAN(generator, discriminator, latent_dim=LATENT, seed=seed)


def compiled(gan, **kwargs):
    gan.compile(keras.optimizers.Adam(1e-3, beta_1=0.5),
                keras.optimizers.Adam(1e-3, beta_1=0.5), **kwargs)
    return gan


@pytest.fixture(scope="module")
def images(digits):
    return digits[0] * 2 - 1  # the generator's tanh range


def test_generator_samples_move_toward_the_digits(images):
    gan = build_gan()
    z = np.random.default_rng(1).normal(size=(1000, LATENT)).astype("float32")
    before = frechet_distance(images, gan.predict(z, verbose=0))
    history = gan.fit(images, batch_size=64, epochs=5, verbose=0).history
    after = frechet_distance(images, gan.predict(z, verbose=0))
    # Observed: 40.7 -> 11.4 (two halves of the real data: 0.28).
    assert after < 0.5 * before, (before, after)
    assert set(history) == EPOCH_LOGS
    steps = 5 * int(np.ceil(len(images) / 64))
    assert int(gan.steps) == steps
    assert int(gan.generator_optimizer.iterations) == steps
    assert int(gan.discriminator_optimizer.iterations) == steps


def test_losses_are_batch_weighted_epoch_means(images):
    seen = {"d": [], "g": [], "batch": []}

    class Recording(GAN):
        def discriminator_loss(self, real_logits, fake_logits):
            loss = super().discriminator_loss(real_logits, fake_logits)
            seen["d"].append(float(loss))
            seen["batch"].append(int(tf.shape(real_logits)[0]))
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
                self.log("g_grad_norm", tf.linalg.global_norm(gradients))
                return [tf.zeros_like(g) for g in gradients]
            self.log("d_grad_norm", tf.linalg.global_norm(gradients))
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
    gan.save(tmp_path / "clipped.keras")
    loaded = keras.models.load_model(tmp_path / "clipped.keras",
                                     custom_objects={"ClippedGAN": ClippedGAN})
    assert loaded.clip_norm == 1e-3


def test_keras_file_restores_both_optimizers_and_resumes_exactly(images, tmp_path):
    x = images[:256]
    fit = dict(batch_size=64, verbose=0, shuffle=False)
    uninterrupted = compiled(tiny_gan())
    full = uninterrupted.fit(x, epochs=2, **fit).history

    keras.utils.set_random_seed(0)
    first = compiled(tiny_gan())
    first.fit(x, epochs=1, **fit)
    first.save(tmp_path / "gan.keras")
    loaded = keras.models.load_model(tmp_path / "gan.keras")

    assert type(loaded) is GAN
    for name in ("generator_optimizer", "discriminator_optimizer"):
        saved, restored = getattr(first, name), getattr(loaded, name)
        assert int(restored.iterations) == 4
        assert len(restored.variables) == len(saved.variables) > 2  # slots exist
        for a, b in zip(saved.variables, restored.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(loaded.steps) == 4

    resumed = loaded.fit(x, epochs=1, **fit).history
    assert resumed["d_loss"] == full["d_loss"][1:]
    assert resumed["g_loss"] == full["g_loss"][1:]
    for a, b in zip(uninterrupted.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for name in ("generator_optimizer", "discriminator_optimizer"):
        for a, b in zip(getattr(uninterrupted, name).variables, getattr(loaded, name).variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_callbacks_and_weights_checkpoint_hold_both_optimizers(images, tmp_path):
    trained = compiled(tiny_gan())
    epochs_seen = []
    trained.fit(images[:128], batch_size=64, epochs=1, verbose=1, callbacks=[
        keras.callbacks.ModelCheckpoint(tmp_path / "gan.weights.h5", save_weights_only=True),
        keras.callbacks.TensorBoard(tmp_path / "tb"),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: epochs_seen.append(logs)),
    ])
    assert set(epochs_seen[0]) == EPOCH_LOGS
    assert list((tmp_path / "tb" / "train").iterdir())
    fresh = compiled(tiny_gan(seed=0))
    assert int(fresh.generator_optimizer.iterations) == 0
    fresh.load_weights(tmp_path / "gan.weights.h5")
    for name in ("generator_optimizer", "discriminator_optimizer"):
        for a, b in zip(getattr(trained, name).variables, getattr(fresh, name).variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(fresh.steps) == 2


def test_mixed_precision_scales_each_players_loss(images, mixed_float16):
    norms = []

    class Recorder(GAN):
        def transform_gradients(self, gradients, variables):
            norms.append(float(tf.linalg.global_norm(gradients)))
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
        loss = gan.discriminator_loss(gan._logits(x, True), gan._logits(gan.generator(z), True))
    reference = float(tf.linalg.global_norm(tape.gradient(loss, gan.discriminator.trainable_weights)))

    history = gan.fit(images[:256], batch_size=64, epochs=1, verbose=0, shuffle=False).history
    assert float(gan.discriminator_optimizer.scale_loss(1.0)) >= 2**14  # scaling is on
    assert norms[0] == pytest.approx(reference, rel=1e-2)  # float16 forward passes
    assert np.isfinite(history["d_loss"] + history["g_loss"]).all()
    assert all(np.isfinite(w).all() for w in gan.get_weights())
    assert int(gan.generator_optimizer.iterations) == 4


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
    with pytest.raises(ValueError, match="reduce_mean"):
        per_sample.fit(np.zeros((8, 64), "float32"), verbose=0)
    class AccumulatedGAN(GradientAccumulation, GAN):
        pass

    with pytest.raises(TypeError, match="would be ignored"):
        AccumulatedGAN(gan.generator, gan.discriminator, latent_dim=LATENT,
                       accumulation_steps=2)
    unbuilt = keras.Sequential([keras.layers.Dense(64)])
    with pytest.raises(ValueError, match="keras.Input"):
        GAN(unbuilt, gan.discriminator, latent_dim=LATENT)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_match_one_for_gan_and_distiller():
    """One subprocess for both wrapping recipes: TensorFlow's start-up and
    the logical devices dominate its cost."""
    out = run_python(two_cpus=True, code="""
        import json
        import keras, numpy as np
        from sklearn.datasets import load_digits
        from customfit.recipes import Distiller
        from tests import test_recipes_distillation as distillation
        from tests.test_recipes_gan import compiled, tiny_gan

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
                distiller = distillation.compiled(Distiller(
                    distillation.logits_mlp(16, seed=1),
                    distillation.logits_mlp(32, seed=0), 4.0, 0.3))
            results[name] = {
                "gan": gan.fit(2 * x - 1, **fit).history,
                "gan_weights": [w.tolist() for w in gan.get_weights()],
                "iterations": [int(gan.generator_optimizer.iterations.numpy()),
                               int(gan.discriminator_optimizer.iterations.numpy())],
                "distiller": distiller.fit(x, y, **fit).history,
                "distiller_weights": [w.tolist() for w in distiller.get_weights()],
            }
        print("RESULTS" + json.dumps(results))
    """)
    results = json.loads(out.split("RESULTS", 1)[1])
    one, two = results["one"], results["two"]
    assert one["iterations"] == two["iterations"] == [4, 4]
    assert set(one["gan"]) == EPOCH_LOGS
    assert set(one["distiller"]) == {"loss", "accuracy", "student_loss", "distillation_loss"}
    # Same data (and, for the GAN, the same noise) on either layout; only the
    # order of float32 sums differs (per-replica means, gradients summed over
    # replicas), while a per-replica loss column would be off by half.
    # Observed for the GAN: losses within 1e-7 relative, weights within 1.5e-8.
    for recipe in ("gan", "distiller"):
        assert one[recipe].keys() == two[recipe].keys()
        for key in one[recipe]:
            np.testing.assert_allclose(two[recipe][key], one[recipe][key], rtol=1e-5)
        for a, b in zip(one[f"{recipe}_weights"], two[f"{recipe}_weights"]):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=0, atol=1e-6)
