"""SkipNonFinite: a step with a non-finite loss or gradient (or one the user's
predicate rejects) updates nothing, as if its batch were absent; the skips
are counted, saved, limited, and agreed across replicas. Runs on TensorFlow
(the suite) and on JAX (`nox -s jax`), but for the subprocess tests of
`tf.distribute` and XLA."""

import json

import keras
import numpy as np
import pytest
from keras import ops

import customfit
from customfit import recipes
from tests import models
from tests.parity import train
from tests.subproc import run_python
from customfit.testing import assert_same_training

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute and XLA subprocesses")

BATCH = 32


def data(digits, n=160, bad_batches=()):
    """`n` samples in batches of 32; a NaN pixel in each of `bad_batches`."""
    x, y = digits[0][:n].copy(), digits[1][:n]
    for b in bad_batches:
        x[b * BATCH + 5, 10] = np.nan
    return x, y


def without(x, y, batches):
    keep = np.concatenate([np.arange(b * BATCH, (b + 1) * BATCH)
                           for b in range(len(x) // BATCH) if b not in batches])
    return x[keep], y[keep]


def fit(base, x, y, epochs=1, optimizer=None, compile_kwargs=None, **fit_kwargs):
    keras.utils.set_random_seed(0)
    model = models.mlp(base, dropout=0)
    model.compile(optimizer or keras.optimizers.Adam(1e-2),
                  "sparse_categorical_crossentropy", **(compile_kwargs or {}))
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0,
                        shuffle=False, **fit_kwargs)
    return model, history.history


def assert_same_state(model, reference):
    """Weights and every optimizer variable (iterations, Adam's moments) bit
    for bit."""
    for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, reference.optimizer.variables,
                    strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def skipping(base=recipes.SkipNonFinite, **options):
    return lambda inputs, outputs: base(inputs, outputs, **options)


@pytest.mark.parametrize("compile_kwargs", [
    {}, {"steps_per_execution": 3}, {"run_eagerly": True},
], ids=["graph", "steps_per_execution", "eager"])
def test_nan_batch_is_left_out_of_the_update_exactly(digits, compile_kwargs):
    """The exact reference: the same run on the data without that batch
    (Adam's moments and iterations included: the skip does not advance them)."""
    x, y = data(digits, bad_batches=[1])
    model, history = fit(recipes.SkipNonFinite, x, y, epochs=2,
                         compile_kwargs=compile_kwargs)
    reference, _ = fit(customfit.CustomModel, *without(x, y, [1]), epochs=2,
                       compile_kwargs=compile_kwargs)
    assert int(model.optimizer.iterations) == 8  # 2 epochs x (5 - 1) batches
    assert_same_state(model, reference)
    assert model.skipped_steps == 2
    assert history["skipped_steps"] == [1, 2]  # cumulative, not an average


def test_stock_fit_writes_nan_into_the_weights(digits):
    """Only what every CPU does: the NaN pixel's row of the first kernel gets a
    NaN gradient (NaN times anything is NaN in a matrix product), and Adam
    writes it into the weights. How far it spreads, and whether the loss
    shows it, depends on the kernels (`relu(NaN)` is NaN on some CPUs, 0 on
    others), so that is not asserted."""
    x, y = data(digits, bad_batches=[1])
    model, _ = fit(keras.Model, x, y)
    first_kernel = model.get_weights()[0]
    assert np.isnan(first_kernel[10]).all()


def test_without_non_finite_values_it_trains_like_stock_fit(digits):
    """Dropout and all: bit for bit, plus a column of zeros."""
    x, y = digits[0][:192], digits[1][:192]
    expected = train(keras.Model, models.mlp, x, y)
    actual = train(recipes.SkipNonFinite, models.mlp, x, y)
    assert actual.history.pop("skipped_steps") == [0, 0]
    assert_same_training(expected, actual)


def test_predicate_skips_the_steps_it_rejects(digits):
    seen = []

    class SkipSecond(recipes.SkipNonFinite, customfit.CustomModel):
        def should_skip_update(self, loss, gradients):
            seen.append((keras.backend.standardize_dtype(loss.dtype), len(gradients)))
            self.log("loss_seen", loss)
            # The second step: one update made, none skipped yet.
            return ops.logical_and(self.optimizer.iterations == 1,
                                   self._skip_state.total.value == 0)

    x, y = data(digits)
    model, history = fit(SkipSecond, x, y)
    reference, ref_history = fit(customfit.CustomModel, *without(x, y, [1]))
    assert_same_state(model, reference)
    assert model.skipped_steps == 1
    assert seen and set(seen) == {("float32", 4)}  # the loss, 4 gradients
    assert history["skipped_steps"] == [1]
    # Logged on every step, the skipped one included.
    assert history["loss_seen"] == pytest.approx(history["loss"], rel=1e-6)


def test_predicate_must_return_a_boolean_scalar(digits):
    class Bad(recipes.SkipNonFinite, customfit.CustomModel):
        def should_skip_update(self, loss, gradients):
            return loss

    with pytest.raises(TypeError, match="should_skip_update.. must return a boolean"):
        fit(Bad, *data(digits))


@pytest.mark.parametrize("steps_per_execution", [1, 5])
def test_too_many_consecutive_skips_stop_fit_with_the_weights_intact(
        digits, steps_per_execution):
    """Batches 1, 2, 3 are NaN, the limit is 2: fit stops at batch 3 with the
    weights after batch 0, also when batch 4 ran in the same execution."""
    x, y = data(digits, bad_batches=[1, 2, 3])
    keras.utils.set_random_seed(0)
    model = models.mlp(skipping(max_consecutive_skips=2), dropout=0)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  steps_per_execution=steps_per_execution)
    with pytest.raises(RuntimeError) as error:
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    message = str(error.value)
    assert "3 training steps in a row were skipped (max_consecutive_skips=2" in message
    for fix in ("Lower the learning rate", "check the data", "raise max_consecutive_skips"):
        assert fix in message
    reference, _ = fit(customfit.CustomModel, x[:BATCH], y[:BATCH])
    assert_same_state(model, reference)
    assert model.skipped_steps == 3


def test_total_skips_limit_and_zero_limit(digits):
    x, y = data(digits, bad_batches=[1, 3])
    with pytest.raises(RuntimeError, match=r"2 training steps were skipped in all "
                                           r"\(max_skipped_steps=1\)"):
        fit(skipping(max_skipped_steps=1), x, y)
    with pytest.raises(RuntimeError, match=r"1 training steps in a row .*=0"):
        fit(skipping(max_consecutive_skips=0), x, y)
    model, _ = fit(skipping(max_consecutive_skips=None), x, y)  # no limit
    assert model.skipped_steps == 2


@keras.saving.register_keras_serializable(package="customfit_tests")
class SkippingNet(recipes.SkipNonFinite, customfit.CustomModel):
    pass


def test_count_survives_save_and_load(digits, tmp_path):
    x, y = data(digits, bad_batches=[4])
    model, _ = fit(skipping(SkippingNet, max_consecutive_skips=3, count_log_name="skips"),
                   x, y)
    assert model.skipped_steps == 1
    model.save(tmp_path / "skipping.keras")
    loaded = keras.saving.load_model(tmp_path / "skipping.keras")
    assert isinstance(loaded, SkippingNet)
    assert (loaded.max_consecutive_skips, loaded.count_log_name) == (3, "skips")
    assert loaded.skipped_steps == 1
    assert int(loaded._skip_state.consecutive.numpy()) == 1
    history = loaded.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False).history
    assert history["skips"] == [2] and loaded.skipped_steps == 2
    fresh = models.mlp(skipping(), dropout=0)
    fresh.load_weights(_saved_weights(loaded, tmp_path))
    assert fresh.skipped_steps == 2


def _saved_weights(model, tmp_path):
    path = tmp_path / "skipping.weights.h5"
    model.save_weights(path)
    return path


class SkippedAccumulation(recipes.SkipNonFinite, recipes.GradientAccumulation):
    pass


def test_with_accumulation_a_bad_micro_batch_stays_out(digits):
    x, y = data(digits, n=160, bad_batches=[2])
    accumulate = dict(accumulation_steps=2)
    model, _ = fit(skipping(SkippedAccumulation, **accumulate), x, y,
                   optimizer=keras.optimizers.SGD(0.1))
    reference, _ = fit(skipping(recipes.GradientAccumulation, **accumulate),
                       *without(x, y, [2]), optimizer=keras.optimizers.SGD(0.1))
    assert int(model.optimizer.iterations) == 2 and model.skipped_steps == 1
    assert_same_state(model, reference)

    with pytest.raises(TypeError, match="List SkipNonFinite first"):
        class WrongOrder(recipes.GradientAccumulation, recipes.SkipNonFinite):
            pass


class SkippedClipping(recipes.SkipNonFinite, recipes.GlobalNormClipping):
    def apply_gradients(self, gradients, variables):
        self.log("applied", 1.0)
        super().apply_gradients(gradients, variables)


def test_hooks_and_clipping_never_see_a_skipped_step(digits):
    """The decision comes before transform_gradients: the clipping recipe's
    norm and a user's apply_gradients run (and log) only for applied steps."""
    x, y = data(digits, bad_batches=[3])
    clip = dict(clip_norm=0.5)
    model, history = fit(skipping(SkippedClipping, **clip), x, y)
    reference, ref_history = fit(skipping(recipes.GlobalNormClipping, **clip),
                                 *without(x, y, [3]))
    assert_same_state(model, reference)
    assert history["applied"] == [1.0] and history["skipped_steps"] == [1]
    assert history["grad_norm"] == ref_history["grad_norm"]  # 4 finite norms


def test_mixed_precision_nan_batch_leaves_the_loss_scale_alone(digits, mixed_float16):
    x, y = data(digits, bad_batches=[1])
    model, _ = fit(recipes.SkipNonFinite, x, y)
    reference, _ = fit(customfit.CustomModel, *without(x, y, [1]))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.skipped_steps == 1
    assert float(model.optimizer.dynamic_scale) == 2.0**15
    assert_same_state(model, reference)


def test_mixed_precision_overflow_is_the_loss_scale_optimizers(mixed_float16):
    """Gradients that overflow float16 at the initial scale (finite loss): the
    optimizer skips those and lowers the scale, exactly as in stock fit; they
    are not counted."""
    x = np.ones((64 * 16, 4), "float32")
    y = np.full((64 * 16, 1), 1000.0, "float32")
    runs = []
    for base in (keras.Model, recipes.SkipNonFinite):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = base(inputs, keras.layers.Dense(1)(inputs))
        model.compile(keras.optimizers.SGD(1e-4), "mse")
        history = model.fit(x, y, batch_size=64, epochs=1, verbose=0).history
        runs.append((model, history))
    (stock, stock_history), (model, history) = runs
    assert float(model.optimizer.dynamic_scale) < 2**15
    assert 0 < int(model.optimizer.iterations) < 16
    assert model.skipped_steps == 0 and history.pop("skipped_steps") == [0]
    assert history == stock_history
    assert_same_state(model, stock)


@pytest.mark.parametrize("options, message", [
    (dict(max_consecutive_skips=-1), "max_consecutive_skips must be an integer >= 0"),
    (dict(max_consecutive_skips=2.5), "max_consecutive_skips must be an integer"),
    (dict(max_skipped_steps=True), "max_skipped_steps must be an integer >= 0"),
    (dict(count_log_name=""), "count_log_name must be a non-empty string"),
])
def test_bad_options_are_clear_errors(options, message):
    inputs = keras.Input((4,))
    with pytest.raises(ValueError, match=message):
        recipes.SkipNonFinite(inputs, keras.layers.Dense(1)(inputs), **options)


TWO_REPLICAS = """
import json
import keras, numpy as np
from sklearn.datasets import load_digits
import customfit
from customfit import recipes
from tests import models

d = load_digits()
x, y = (d.data / 16).astype("float32")[:256], d.target.astype("int32")[:256]
bad = x.copy()
bad[64 + 32 + 5, 10] = np.nan  # batch 1 of 64: the half that goes to replica 1
keep = np.r_[0:64, 128:256]
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def run(base, x, y, policy="float32"):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    with two.scope():
        model = models.mlp(base, dropout=0)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False).history
    replicas = [[c.numpy().tolist() for c in v.value.values]
                for v in model.trainable_variables]
    out = {"history": history, "replicas": replicas,
           "weights": [w.tolist() for w in model.get_weights()],
           "iterations": int(model.optimizer.iterations.numpy())}
    if hasattr(model, "skipped_steps"):
        out["skipped"] = model.skipped_steps
    keras.mixed_precision.set_global_policy("float32")
    return out


def overflow(base):
    # mixed_float16; float16 gradients overflow on replica 1's half only.
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    x = np.ones((64, 4), "float32")
    y = np.zeros((64, 1), "float32")
    y[32:] = 1000.0
    with two.scope():
        inputs = keras.Input((4,))
        model = base(inputs, keras.layers.Dense(1)(inputs))
        model.compile(keras.optimizers.SGD(1e-4), "mse")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    keras.mixed_precision.set_global_policy("float32")
    return {"weights": [w.tolist() for w in model.get_weights()],
            "scale": float(model.optimizer.dynamic_scale.numpy()),
            "iterations": int(model.optimizer.iterations.numpy()),
            "skipped": getattr(model, "skipped_steps", None)}


print("RESULTS" + json.dumps({
    "overflow_stock": overflow(keras.Model),
    "overflow": overflow(recipes.SkipNonFinite),
    "skipping": run(recipes.SkipNonFinite, bad, y),
    "reference": run(customfit.CustomModel, x[keep], y[keep]),
    "stock": run(keras.Model, bad, y),
    "mixed": run(recipes.SkipNonFinite, bad, y, "mixed_float16"),
}))
"""


@tensorflow_only
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_skip_together_when_one_sees_nan():
    results = json.loads(run_python(TWO_REPLICAS, two_cpus=True).split("RESULTS", 1)[1])
    skipping, reference = results["skipping"], results["reference"]
    assert skipping["skipped"] == 1 and skipping["history"]["skipped_steps"] == [1]
    assert skipping["iterations"] == reference["iterations"] == 3
    for first, second in skipping["replicas"]:  # mirrored copies stay equal
        np.testing.assert_array_equal(first, second)
        assert np.isfinite(first).all()
    # The same strategy on the data without the batch: equal bit for bit.
    for a, b in zip(skipping["weights"], reference["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    # Stock fit: replica 1's NaN reaches both replicas through the all-reduce
    # (the NaN pixel's row of the first kernel; see the one-device test).
    first_kernel_copies = results["stock"]["replicas"][0]
    assert all(np.isnan(np.asarray(copy)[10]).all() for copy in first_kernel_copies)
    mixed = results["mixed"]
    assert mixed["skipped"] == 1 and mixed["iterations"] == 3
    assert all(np.isfinite(w).all() for w in mixed["weights"])
    # An overflow on replica 1 only: Keras' LossScaleOptimizer looks at
    # replica 0's gradients, applies, and the bias turns inf; with the recipe
    # it skips the step and halves the scale, as on one device (not counted).
    stock, ours = results["overflow_stock"], results["overflow"]
    assert np.isinf(stock["weights"][1]).all() and stock["scale"] == 2.0**15
    assert ours["scale"] == 2.0**14 and ours["iterations"] == 0
    assert ours["skipped"] == 0
    assert all(np.isfinite(w).all() for w in ours["weights"])


XLA = """
import keras
import numpy as np
from sklearn.datasets import load_digits
import customfit
from customfit import recipes
from tests import models

d = load_digits()
x, y = (d.data / 16).astype("float32")[:160], d.target.astype("int32")[:160]
x[32 + 5, 10] = np.nan  # batch 1
keep = np.r_[0:32, 64:160]


def fit(base, x, y, **options):
    keras.utils.set_random_seed(0)
    model = models.mlp(lambda i, o: base(i, o, **options), dropout=0)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  jit_compile=True, steps_per_execution=2)
    assert model.jit_compile
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    return model


model = fit(recipes.SkipNonFinite, x, y)
reference = fit(customfit.CustomModel, x[keep], y[keep])
for a, b in zip(model.get_weights(), reference.get_weights(), strict=True):
    np.testing.assert_array_equal(a, b)
print("skipped", model.skipped_steps)
try:
    fit(recipes.SkipNonFinite, x, y, max_consecutive_skips=0)
except RuntimeError as error:
    print("stopped", "max_consecutive_skips=0" in str(error))
"""


@tensorflow_only
@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_xla_it_skips_and_stops_as_in_graph_mode():
    """XLA drops in-graph asserts; the limit is checked on the host, so it
    still stops. (Keras turns XLA off under op determinism, hence a fresh
    process without it; XLA on CPU is run-to-run reproducible.)"""
    assert run_python(XLA).split() == ["skipped", "1", "stopped", "True"]
