"""Clipping recipes: clipped gradients equal a numpy reference, the norm before
clipping is a History column, composition order, two replicas clip as one
device, mixed precision, save/load. Runs on TensorFlow (the suite) and on JAX
(`nox -s jax`), but for the tests of TensorFlow-only features."""

import keras
import numpy as np
import pytest
from keras.ops import convert_to_numpy

import customfit
from customfit import recipes
from tests import models
from tests.recipe_checks import EAGER_FIRST_BATCH_RUNS

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute and the TensorFlow-only recipes")

# float32 TF against a float64 numpy reference of the same formula.
CLOSE = dict(rtol=1e-5, atol=1e-7)


def recorded(cls):
    """`cls` with the user's own transform_gradients around the recipe's."""
    seen = {"raw": [], "clipped": []}

    class Recorded(cls, customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            seen["raw"].append([convert_to_numpy(g).astype("float64") for g in gradients])
            gradients = super().transform_gradients(gradients, variables)
            seen["clipped"].append([convert_to_numpy(g).astype("float64") for g in gradients])
            return gradients

    return Recorded, seen


def one_batch(cls, digits, **options):
    x, y = digits[0][:64], digits[1][:64]
    keras.utils.set_random_seed(0)
    model = models.mlp(lambda i, o: cls(i, o, **options), dropout=0)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                  run_eagerly=True)
    weights = [w.astype("float64") for w in model.get_weights()]
    history = model.fit(x, y, batch_size=64, epochs=1, verbose=0).history
    return model, weights, history


def test_global_norm_clipping_equals_reference_and_logs_the_norm(digits):
    cls, seen = recorded(recipes.GlobalNormClipping)
    _, _, history = one_batch(cls, digits, clip_norm=0.3)
    raw, clipped = seen["raw"][0], seen["clipped"][0]
    norm = np.sqrt(sum((g**2).sum() for g in raw))
    assert norm > 0.3  # clipping is active
    for c, g in zip(clipped, raw):
        np.testing.assert_allclose(c, g * 0.3 / norm, **CLOSE)
    assert history["grad_norm"] == [pytest.approx(norm, rel=1e-6)]


def test_global_norm_clipping_leaves_small_gradients_alone(digits):
    cls, seen = recorded(recipes.GlobalNormClipping)
    one_batch(cls, digits, clip_norm=100.0)
    for c, g in zip(seen["clipped"][0], seen["raw"][0]):
        np.testing.assert_array_equal(c, g)


def numpy_agc(gradient, weight, clip_factor, unit_epsilon):
    def unitwise(a):
        if a.ndim <= 1:
            return np.abs(a)
        return np.sqrt((a**2).sum(axis=tuple(range(a.ndim - 1)), keepdims=True))

    max_norm = clip_factor * np.maximum(unitwise(weight), unit_epsilon)
    grad_norm = unitwise(gradient)
    clipped = gradient * max_norm / np.maximum(grad_norm, 1e-6)
    return np.where(grad_norm > max_norm, clipped, gradient), grad_norm > max_norm


def test_adaptive_clipping_equals_reference_unit_by_unit(digits):
    cls, seen = recorded(recipes.AdaptiveGradientClipping)
    model, weights, history = one_batch(cls, digits, clip_factor=0.05,
                                        unit_epsilon=1e-3)
    raw, clipped = seen["raw"][0], seen["clipped"][0]
    units_clipped, units_kept = 0, 0
    for c, g, w in zip(clipped, raw, weights):
        expected, mask = numpy_agc(g, w, 0.05, 1e-3)
        np.testing.assert_allclose(c, expected, **CLOSE)
        units_clipped += int(mask.sum())
        units_kept += int((~mask).sum())
    assert units_clipped > 0 and units_kept > 0  # both branches exercised
    norm = np.sqrt(sum((g**2).sum() for g in raw))
    assert history["grad_norm"] == [pytest.approx(norm, rel=1e-6)]


def test_recipes_listed_left_to_right_clip_in_that_order(digits):
    class Both(recipes.GlobalNormClipping, recipes.AdaptiveGradientClipping):
        pass

    cls, seen = recorded(Both)
    _, weights, history = one_batch(cls, digits, clip_norm=0.3, clip_factor=0.05,
                                    log_name="norm")
    raw = seen["raw"][0]
    norm = np.sqrt(sum((g**2).sum() for g in raw))
    for c, g, w in zip(seen["clipped"][0], raw, weights):
        expected, _ = numpy_agc(g * 0.3 / norm, w, 0.05, 1e-3)
        np.testing.assert_allclose(c, expected, **CLOSE)
    # One column, logged by the recipe listed first: the norm before clipping
    # (not a mean of the two recipes' norms).
    assert history["norm"] == [pytest.approx(norm, rel=1e-6)]


def test_history_has_the_norm_every_epoch(digits):
    x, y = digits[0][:128], digits[1][:128]
    model = models.mlp(lambda i, o: recipes.GlobalNormClipping(i, o, clip_norm=0.5))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0,
                        validation_data=(x[:32], y[:32])).history
    assert len(history["grad_norm"]) == 2
    assert all(0 < n < 100 for n in history["grad_norm"])
    assert "val_grad_norm" not in history  # a training-only column


@tensorflow_only
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["clipping", "agc"])
def test_two_replicas_clip_as_one_device(name):
    """The clipping decision uses the replica-summed gradient (weights within
    float32 summation-order ulps; the logged norm within 1e-6)."""
    from tests import recipes_mirrored

    results = recipes_mirrored.results()
    two, one = results[f"{name}_two"], results[f"{name}_one"]
    for a, b in zip(two["weights"], one["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert two["history"]["grad_norm"] == pytest.approx(
        one["history"]["grad_norm"], rel=1e-6)


def test_mixed_precision_logs_the_unscaled_norm(digits, mixed_float16):
    x, y = digits[0][:64], digits[1][:64]
    norms = {}
    for policy in ["float32", "mixed_float16"]:
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(0)
        model = models.mlp(lambda i, o: recipes.GlobalNormClipping(i, o, clip_norm=0.3),
                           dropout=0)
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        before = [w.copy() for w in model.get_weights()]
        norms[policy] = model.fit(x, y, batch_size=64, verbose=0).history["grad_norm"][0]
        assert all(np.isfinite(w).all() and not np.array_equal(w, b)
                   for w, b in zip(model.get_weights(), before))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    # Not the loss-scaled norm (2**15 times larger): float32's, to float16 precision.
    assert norms["mixed_float16"] == pytest.approx(norms["float32"], rel=2e-2)


@keras.saving.register_keras_serializable(package="customfit_tests")
class ClippedNet(recipes.AdaptiveGradientClipping, customfit.CustomModel):
    pass


def test_save_load_round_trip(digits, tmp_path):
    x, y = digits[0][:128], digits[1][:128]
    model = models.mlp(lambda i, o: ClippedNet(i, o, clip_factor=0.03,
                                               unit_epsilon=1e-2, log_name="gn"),
                       dropout=0)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "clipped.keras")
    loaded = keras.saving.load_model(tmp_path / "clipped.keras")
    assert isinstance(loaded, ClippedNet)
    assert (loaded.clip_factor, loaded.unit_epsilon, loaded.log_name) == (0.03, 1e-2, "gn")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    expected = model.fit(x, y, batch_size=32, verbose=0, shuffle=False).history
    actual = loaded.fit(x, y, batch_size=32, verbose=0, shuffle=False).history
    assert actual == expected and "gn" in actual
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("options, message", [
    (dict(clip_norm=0.0), "clip_norm must be a finite number > 0"),
    (dict(clip_norm="1"), "clip_norm must be a finite number > 0"),
    (dict(log_name=""), "log_name must be a non-empty string"),
])
def test_bad_options_are_clear_errors(options, message):
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match=message):
        recipes.GlobalNormClipping(inputs, keras.layers.Dense(1)(inputs), **options)


def test_bad_clip_factor_is_a_clear_error():
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match="clip_factor must be a finite number > 0"):
        recipes.AdaptiveGradientClipping(inputs, keras.layers.Dense(1)(inputs),
                                         clip_factor=-1)


def stacked_net_class():
    @keras.saving.register_keras_serializable(package="customfit_tests")
    class StackedNet(recipes.SAM, recipes.GradientAccumulation, recipes.GlobalNormClipping,
                     customfit.CustomModel):
        """A subclassed model with its own argument, three recipes and a hook."""

        def __init__(self, units=16, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.hidden = keras.layers.Dense(units, activation="relu")
            self.out = keras.layers.Dense(10, activation="softmax")
            self.hook_calls = 0

        def call(self, x):
            return self.out(self.hidden(x))

        def transform_gradients(self, gradients, variables):
            self.hook_calls += 1
            return super().transform_gradients(gradients, variables)

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    return StackedNet


def test_subclassed_model_stacks_recipes_and_hooks(digits, tmp_path):
    StackedNet = stacked_net_class()
    x, y = digits[0][:64], digits[1][:64]
    model = StackedNet(units=8, rho=0.05, accumulation_steps=2, clip_norm=0.5)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                  run_eagerly=True)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    # 4 micro-batches, k=2: the user's hook and the clipping log run per update
    # (on JAX, also in the first batch's run that finds the logged names).
    assert model.hook_calls == 1 + EAGER_FIRST_BATCH_RUNS
    assert int(model.optimizer.iterations) == 2
    assert len(history["grad_norm"]) == 1 and np.isfinite(history["grad_norm"][0])
    config = model.get_config()
    assert {k: config[k] for k in ("units", "rho", "accumulation_steps", "clip_norm")} == {
        "units": 8, "rho": 0.05, "accumulation_steps": 2, "clip_norm": 0.5}
    model.save(tmp_path / "stacked.keras")
    loaded = keras.saving.load_model(tmp_path / "stacked.keras")
    assert isinstance(loaded, StackedNet) and loaded.units == 8
    assert (loaded.rho, loaded.accumulation_steps, loaded.clip_norm) == (0.05, 2, 0.5)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
