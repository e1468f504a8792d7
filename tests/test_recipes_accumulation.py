"""GradientAccumulation: k micro-batches update like one k-times batch, the
hooks see the averaged gradient once per update, iterations count updates,
partial accumulations carry over epochs and survive save/load."""

import keras
import numpy as np
import pytest
from keras import ops
from keras.ops import convert_to_numpy

import customfit
from customfit import recipes
from tests import models, recipes_mirrored
from tests.recipe_checks import EAGER_FIRST_BATCH_RUNS, assert_trains_like, global_norm

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute subprocesses")

# Equal in exact arithmetic; in float32 the micro-batch means are summed in
# another order than the large batch's, which moves weights by a few ulps
# (observed: at most 3e-8 absolute after 4 updates).
CLOSE = dict(rtol=1e-5, atol=1e-7)


def accumulating(k, cls=recipes.GradientAccumulation):
    return lambda inputs, outputs: cls(inputs, outputs, accumulation_steps=k)


def fit(base, x, y, batch_size, epochs=1, optimizer=None, **compile_kwargs):
    keras.utils.set_random_seed(0)
    model = models.mlp(base, dropout=0)
    model.compile(optimizer or keras.optimizers.SGD(0.1),
                  "sparse_categorical_crossentropy", **compile_kwargs)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
                        shuffle=False)
    return model, history.history


def test_k_micro_batches_update_like_one_k_times_batch(digits):
    x, y = digits[0][:256], digits[1][:256]
    accumulated, _ = fit(accumulating(4), x, y, batch_size=32, epochs=2)
    large, _ = fit(customfit.CustomModel, x, y, batch_size=128, epochs=2)
    assert int(accumulated.optimizer.iterations) == int(large.optimizer.iterations) == 4
    for a, b in zip(accumulated.get_weights(), large.get_weights()):
        np.testing.assert_allclose(a, b, **CLOSE)
    assert accumulated.accumulated_micro_batches == 0


def test_one_step_is_the_default_step_bit_for_bit(digits):
    x, y = digits[0][:128], digits[1][:128]
    build = lambda base: models.mlp(base, dropout=0.2, batchnorm=True)
    assert_trains_like(customfit.CustomModel, accumulating(1), build, x, y)


def large_batch_gradient(x, y):
    """The default step's gradient of the whole of `x` at the initial weights."""
    seen = []

    class Recorded(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            seen.append([convert_to_numpy(g) for g in gradients])
            return gradients

    keras.utils.set_random_seed(0)
    model = models.mlp(Recorded, dropout=0)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                  run_eagerly=True)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return seen[-1]


def test_hooks_see_the_averaged_gradient_once_per_update(digits):
    x, y = digits[0][:128], digits[1][:128]
    seen = []

    class Recorded(recipes.GradientAccumulation, customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            seen.append([convert_to_numpy(g) for g in gradients])
            self.log("grad_norm", global_norm(gradients))
            return gradients

    keras.utils.set_random_seed(0)
    model = models.mlp(accumulating(4, Recorded), dropout=0)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                  run_eagerly=True)
    expected = large_batch_gradient(x, y)
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    # One update of 4 micro-batches (on JAX, also the first batch's run that
    # finds the names the step logs, which runs both sides of the decision).
    assert len(seen) == EAGER_FIRST_BATCH_RUNS and int(model.optimizer.iterations) == 1
    for a, b in zip(seen[-1], expected):
        np.testing.assert_allclose(a, b, **CLOSE)
    norm = float(global_norm(expected))
    assert history.history["grad_norm"] == [pytest.approx(norm, rel=1e-6)]


def test_epochs_not_divisible_by_k_carry_the_partial_sum_over(digits):
    """5 micro-batches per epoch, k=2: the 3rd update takes the last
    micro-batch of epoch 1 and the first of epoch 2."""
    x, y = digits[0][:160], digits[1][:160]
    model, _ = fit(accumulating(2), x, y, batch_size=32, epochs=1)
    assert int(model.optimizer.iterations) == 2
    assert model.accumulated_micro_batches == 1
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations) == 5
    assert model.accumulated_micro_batches == 0
    stream = np.concatenate([x, x]), np.concatenate([y, y])
    large, _ = fit(customfit.CustomModel, *stream, batch_size=64)
    for a, b in zip(model.get_weights(), large.get_weights()):
        np.testing.assert_allclose(a, b, **CLOSE)


def test_batchnorm_statistics_update_every_micro_batch(digits):
    x, y = digits[0][:128], digits[1][:128]
    keras.utils.set_random_seed(0)
    model = models.mlp(accumulating(4), dropout=0, batchnorm=True)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    kernel, bias = (w.numpy() for w in model.trainable_weights[:2])
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    # The single update comes after the 4th micro-batch: all four forward
    # passes ran with the initial weights, and each moved the statistics.
    mean = np.zeros(32, "float32")
    for start in range(0, 128, 32):
        hidden = np.maximum(x[start:start + 32] @ kernel + bias, 0)
        mean = 0.99 * mean + 0.01 * hidden.mean(axis=0)
    moving_mean = next(w for w in model.non_trainable_weights if "moving_mean" in w.path)
    np.testing.assert_allclose(moving_mean.numpy(), mean, rtol=1e-5, atol=1e-7)


def test_keras_optimizer_accumulation_hides_the_average_from_hooks(digits):
    """Keras' own gradient_accumulation_steps gives the same weights, but
    transform_gradients runs on every micro-batch's own gradient."""
    x, y = digits[0][:128], digits[1][:128]
    calls = {"recipe": 0, "keras": 0}

    def counting(key, cls):
        class Counted(cls):
            def transform_gradients(self, gradients, variables):
                calls[key] += 1
                return gradients
        return Counted

    recipe, _ = fit(accumulating(4, counting("recipe", recipes.GradientAccumulation)),
                    x, y, batch_size=32, run_eagerly=True)
    stock, _ = fit(counting("keras", customfit.CustomModel), x, y, batch_size=32,
                   optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=4),
                   run_eagerly=True)
    first = EAGER_FIRST_BATCH_RUNS - 1  # the first batch's extra run, on JAX
    assert calls == {"recipe": 1 + first, "keras": 4 + first}
    for a, b in zip(recipe.get_weights(), stock.get_weights()):
        np.testing.assert_allclose(a, b, **CLOSE)


@tensorflow_only
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_equal_one_device():
    """With GlobalNormClipping stacked: the update, its clipping and its log
    run once across replicas."""
    results = recipes_mirrored.results()
    two, one = results["accumulation_two"], results["accumulation_one"]
    assert two["iterations"] == one["iterations"] == 2  # 2 epochs of 2 x 64, k=2
    for a, b in zip(two["weights"], one["weights"]):
        np.testing.assert_allclose(a, b, **CLOSE)
    for key in ("loss", "grad_norm"):
        assert two["history"][key] == pytest.approx(one["history"][key], rel=1e-6)


def test_mixed_precision_trains(digits, mixed_float16):
    x, y = digits[0][:128], digits[1][:128]
    keras.utils.set_random_seed(0)
    model = models.mlp(accumulating(2), dropout=0)
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0).history
    after = model.get_weights()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(model.optimizer.iterations) == 6
    assert all(np.isfinite(w).all() and not np.array_equal(w, b)
               for w, b in zip(after, before))
    assert history["loss"][-1] < history["loss"][0]


@keras.saving.register_keras_serializable(package="customfit_tests")
class AccumulatingNet(recipes.GradientAccumulation, customfit.CustomModel):
    pass


def test_save_load_keeps_a_partial_accumulation(digits, tmp_path):
    x, y = digits[0][:96], digits[1][:96]
    model, _ = fit(accumulating(2, AccumulatingNet), x, y, batch_size=32,
                   optimizer="adam")
    assert model.accumulated_micro_batches == 1  # 3 micro-batches, k=2
    model.save(tmp_path / "accumulating.keras")
    loaded = keras.saving.load_model(tmp_path / "accumulating.keras")
    assert isinstance(loaded, AccumulatingNet) and loaded.accumulation_steps == 2
    assert loaded.accumulated_micro_batches == 1
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    for a, b in zip(loaded._accumulation.sums, model._accumulation.sums, strict=True):
        assert np.abs(b.numpy()).max() > 0
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 3
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("steps", [0, 2.0, True, None])
def test_bad_accumulation_steps_is_a_clear_error(steps):
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="accumulation_steps must be an integer >= 1"):
        recipes.GradientAccumulation(inputs, keras.layers.Dense(1)(inputs),
                                     accumulation_steps=steps)
