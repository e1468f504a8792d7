"""SAM: one step equals a hand-computed SAM update, rho=0 is the default step
bit for bit, BatchNormalization statistics advance once per step, two
replicas equal one device with per-micro-batch SAM, mixed precision,
save/load."""

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


def softmax_regression(base, **options):
    inputs = keras.Input((64,))
    return base(inputs, keras.layers.Dense(10, activation="softmax")(inputs), **options)


def numpy_gradient(w, b, x, y):
    """Mean cross-entropy gradient of softmax(x @ w + b), in float64."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(axis=0)


def test_one_step_equals_the_hand_computed_sam_update(digits):
    x, y = digits[0][:32], digits[1][:32]
    seen = []

    class Recorded(recipes.SAM, customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            seen.append([convert_to_numpy(g) for g in gradients])
            return super().transform_gradients(gradients, variables)

    model = softmax_regression(Recorded, rho=0.5)
    model.compile(keras.optimizers.SGD(1.0), "sparse_categorical_crossentropy",
                  run_eagerly=True)
    w, b = (v.astype("float64") for v in model.get_weights())
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)

    x64 = x.astype("float64")
    gw, gb = numpy_gradient(w, b, x64, y)
    scale = 0.5 / (np.sqrt((gw**2).sum() + (gb**2).sum()) + 1e-12)
    sam_w, sam_b = numpy_gradient(w + scale * gw, b + scale * gb, x64, y)
    # float32 TF against a float64 numpy reference: agreement to float32
    # rounding of a 64-term matmul, far below the SAM-vs-plain difference.
    tolerance = dict(rtol=1e-5, atol=1e-7)
    # transform_gradients saw the SAM gradient, once per step
    assert len(seen) == EAGER_FIRST_BATCH_RUNS
    np.testing.assert_allclose(seen[-1][0], sam_w, **tolerance)
    np.testing.assert_allclose(seen[-1][1], sam_b, **tolerance)
    new_w, new_b = model.get_weights()
    np.testing.assert_allclose(new_w, w - sam_w, **tolerance)
    np.testing.assert_allclose(new_b, b - sam_b, **tolerance)
    assert np.abs(sam_w - gw).max() > 1e-3  # and it is not the plain gradient


def test_rho_zero_is_the_default_step_bit_for_bit(digits):
    """With Dropout and BatchNormalization: the second pass uses the first
    pass's dropout masks and model state, so at rho=0 its gradient is the
    first pass's, bit for bit."""
    x, y = digits[0][:128], digits[1][:128]
    build = lambda base: models.mlp(base, dropout=0.2, batchnorm=True)
    assert_trains_like(customfit.CustomModel,
                       lambda i, o: recipes.SAM(i, o, rho=0.0), build, x, y)


def test_batchnorm_statistics_advance_once_per_step(digits):
    x, y = digits[0][:64], digits[1][:64]
    runs = {}
    for name, base in [("default", customfit.CustomModel),
                       ("sam", lambda i, o: recipes.SAM(i, o, rho=0.5))]:
        keras.utils.set_random_seed(3)
        model = models.mlp(base, dropout=0, batchnorm=True)
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        runs[name] = [(w.path.split("/")[-1], w.numpy()) for w in model.weights]
    sam, default = runs["sam"], runs["default"]
    statistics = [i for i, (name, _) in enumerate(sam) if name.startswith("moving")]
    assert len(statistics) == 2
    for i in statistics:  # from the first pass only: as the default step
        np.testing.assert_array_equal(sam[i][1], default[i][1])
    assert not np.array_equal(sam[-2][1], default[-2][1])  # output kernel


@tensorflow_only
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_equal_one_device_with_sam_per_micro_batch():
    """Each replica perturbs with its own gradient (m-sharpness): two replicas
    of 32 equal one device running SAM on micro-batches of 32 accumulated
    over 2 (bit for bit here), and differ from SAM on the whole batch of 64."""
    results = recipes_mirrored.results()
    two, per_micro_batch = results["sam_two"], results["sam_one_accumulated"]
    for a, b in zip(two["weights"], per_micro_batch["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert two["history"]["loss"] == pytest.approx(
        per_micro_batch["history"]["loss"], rel=1e-6)
    whole_batch = results["sam_one"]
    differences = [np.abs(np.subtract(a, b)).max()
                   for a, b in zip(two["weights"], whole_batch["weights"])]
    assert max(differences) > 1e-4


def test_mixed_precision_scales_both_passes(digits, mixed_float16):
    """The SAM gradient under mixed_float16 (both passes scaled by 2**15 and
    unscaled) matches float32's to float16 precision."""
    x, y = digits[0][:64], digits[1][:64]
    norms = {}

    class Recorded(recipes.SAM, customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            norms.setdefault(keras.mixed_precision.global_policy().name,
                             float(global_norm(gradients)))
            return gradients

    for policy in ["float32", "mixed_float16"]:
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(0)
        model = models.mlp(lambda i, o: Recorded(i, o, rho=0.1), dropout=0)
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                      run_eagerly=True)
        before = [w.copy() for w in model.get_weights()]
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        after = model.get_weights()
        assert all(np.isfinite(w).all() for w in after)
        assert all(not np.array_equal(a, b) for a, b in zip(after, before))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert float(model.optimizer.scale_loss(1.0)) >= 2**14
    assert norms["mixed_float16"] == pytest.approx(norms["float32"], rel=2e-2)


@keras.saving.register_keras_serializable(package="customfit_tests")
class SAMNet(recipes.SAM, customfit.CustomModel):
    pass


def test_save_load_round_trip(digits, tmp_path):
    x, y = digits[0][:128], digits[1][:128]
    # No Dropout: .keras files do not keep random-generator state, so a
    # reloaded Dropout draws other masks (plain keras.Model too).
    model = models.mlp(lambda i, o: SAMNet(i, o, rho=0.07), dropout=0)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "sam.keras")
    loaded = keras.saving.load_model(tmp_path / "sam.keras")
    assert isinstance(loaded, SAMNet) and loaded.rho == 0.07
    np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    keras.utils.set_random_seed(5)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    keras.utils.set_random_seed(5)
    loaded.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rho", [-0.1, "0.05", float("nan"), True])
def test_bad_rho_is_a_clear_error(rho):
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        softmax_regression(recipes.SAM, rho=rho)
