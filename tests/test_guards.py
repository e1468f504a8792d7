"""The first-step guards: a hand-written step that would train silently wrong
raises a clear error in the first step instead; stock Keras trains wrong."""

import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests.subproc import run_python, run_python_once
from tests.test_keras2_helpers import keras2_model


def stepped(base, scale_loss=False, via_hook=False):
    """A hand-written step; `scale_loss` as the docs ask, `via_hook` hands
    unscaled gradients to CustomModel.apply_gradients."""

    class Step(base):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred)
                if scale_loss:
                    loss = self.optimizer.scale_loss(loss)
            gradients = tape.gradient(loss, self.trainable_weights)
            if via_hook:
                self.apply_gradients(gradients, self.trainable_weights)
            else:  # the LossScaleOptimizer unscales them
                self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
            return self.compute_metrics(x, y, y_pred)

    return Step


def compiled(base, run_eagerly=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    model = base(inputs, keras.layers.Dense(10, activation="softmax")(inputs))
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy",
                  run_eagerly=run_eagerly)
    return model


def fit_once(base, data, run_eagerly=False):
    """One epoch of two batches; returns the model and its first kernel before."""
    x, y = data
    model = compiled(base, run_eagerly)
    start = np.array(model.get_weights()[0], copy=True)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    return model, start


def moved(model, start):
    return float(np.max(np.abs(model.get_weights()[0] - start)))


@pytest.fixture
def data(digits):
    return digits[0][:128], digits[1][:128]


# ------------------------------------------------- (a) loss scaling forgotten


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
@pytest.mark.parametrize("step", ["forgotten", "keras2_tutorial"])
def test_forgotten_scale_loss_raises_in_the_first_step(data, mixed_float16, run_eagerly, step):
    base = (stepped(customfit.CustomModel) if step == "forgotten"
            else keras2_model(customfit.CustomModel))
    x, y = data
    model = compiled(base, run_eagerly)
    before = [np.array(w, copy=True) for w in model.get_weights()]
    with pytest.raises(customfit.TrainingGuardError, match=r"never passed the loss to its scale_loss\(\)"
                       r"[\s\S]*self\.optimizer\.scale_loss\(loss\)[\s\S]*"
                       r"training_guards = False"):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 0  # stopped before any update
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_stock_keras_trains_silently_without_scale_loss(data, mixed_float16):
    """Pins the upstream behaviour the guard exists for: no error, and the
    weights move about 2**15 times less than with scale_loss."""
    wrong, start = fit_once(stepped(keras.Model), data)
    right, right_start = fit_once(stepped(keras.Model, scale_loss=True), data)
    np.testing.assert_array_equal(start, right_start)
    assert int(wrong.optimizer.iterations) == 2
    assert moved(right, right_start) > 1e-2
    assert moved(wrong, start) < moved(right, right_start) / 1e3


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_correct_steps_do_not_raise(data, mixed_float16, run_eagerly):
    default, start = fit_once(customfit.CustomModel, data, run_eagerly)
    scaled, _ = fit_once(stepped(customfit.CustomModel, scale_loss=True), data, run_eagerly)
    hook, _ = fit_once(stepped(customfit.CustomModel, via_hook=True), data, run_eagerly)
    reference = moved(default, start)
    assert reference > 1e-2
    # The same maths; float16 gradients of an unscaled loss round differently.
    assert moved(scaled, start) == pytest.approx(reference, rel=1e-2)
    assert moved(hook, start) == pytest.approx(reference, rel=1e-2)


def test_switch_turns_the_guard_off(data, mixed_float16):
    class Unguarded(stepped(customfit.CustomModel)):
        training_guards = False

    expected, _ = fit_once(stepped(keras.Model), data)
    actual, _ = fit_once(Unguarded, data)
    for a, e in zip(actual.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_array_equal(a, e)

    x, y = data
    inputs = keras.Input((64,))
    model = stepped(customfit.CustomModel)(inputs, keras.layers.Dense(10)(inputs))
    model.training_guards = False  # per model
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 2


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_nothing_stays_intercepted_after_the_first_step(data, mixed_float16, run_eagerly):
    original_gradient = tf.GradientTape.gradient
    seen = []

    class Spy(customfit.CustomModel):
        def train_step(self, data):
            seen.append(sorted(vars(self.optimizer).keys() & {"apply", "scale_loss"}))
            return super().train_step(data)

    model, _ = fit_once(Spy, data, run_eagerly)
    assert int(model.optimizer.iterations) == 2
    # Intercepted while the first step runs (traced once when compiled).
    assert seen[0] == ["apply", "scale_loss"]
    assert seen[1:] == ([[]] if run_eagerly else [])
    assert not vars(model.optimizer).keys() & {"apply", "scale_loss"}
    assert tf.GradientTape.gradient is original_gradient  # never changed
    assert sys.getprofile() is None


# ------------------------------------------ (b) loss not scaled for replicas

TWO_REPLICAS = """
    import json
    import keras, numpy as np
    from sklearn.datasets import load_digits
    import customfit
    from tests.test_keras2_helpers import keras2_model

    d = load_digits()
    x, y = (d.data / 16).astype("float32")[:64], d.target.astype("int32")[:64]
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    one = tf.distribute.get_strategy()

    def losses(how, model, x, y, y_pred):
        per_example = keras.losses.sparse_categorical_crossentropy(y, y_pred)
        replicas = model.distribute_strategy.num_replicas_in_sync
        penalty = tf.add_n([1e-3 * tf.reduce_sum(tf.square(w))
                            for w in model.trainable_weights])
        return {
            # mistakes
            "reduce_mean": lambda: tf.reduce_mean(per_example),
            "sum_over_local_batch": lambda: tf.reduce_sum(per_example) / tf.cast(
                tf.shape(per_example)[0], tf.float32),
            "unscaled_penalty": lambda: model.compute_loss(x, y, y_pred) + penalty,
            # correct
            "divided_by_replicas": lambda: tf.reduce_mean(per_example) / replicas,
            "compute_average_loss": lambda: tf.nn.compute_average_loss(per_example),
            "compute_average_loss_global": lambda: tf.nn.compute_average_loss(
                per_example, global_batch_size=64),
            "compute_loss": lambda: model.compute_loss(x, y, y_pred),
        }[how]()

    def stepped(base, how):
        class Step(base):
            def train_step(self, data):
                x, y = data
                with tf.GradientTape() as tape:
                    y_pred = self(x, training=True)
                    loss = losses(how, self, x, y, y_pred)
                gradients = tape.gradient(loss, self.trainable_weights)
                self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
                return {"loss": loss}
        return Step

    def update(strategy, base):
        # One step of batch 64 (two replicas: 32 each) from the same weights.
        keras.utils.set_random_seed(0)
        with strategy.scope():
            inputs = keras.Input((64,))
            model = base(inputs, keras.layers.Dense(10, activation="softmax")(inputs))
            model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
        start = [np.array(w, copy=True) for w in model.get_weights()]
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
        return [(w - s).tolist() for w, s in zip(model.get_weights(), start)]

    class Unguarded(stepped(customfit.CustomModel, "reduce_mean")):
        training_guards = False

    results = {"one": update(one, customfit.CustomModel),
               "stock_reduce_mean": update(two, stepped(keras.Model, "reduce_mean")),
               "unguarded_reduce_mean": update(two, Unguarded)}
    errors = {}
    for how in ["reduce_mean", "sum_over_local_batch", "unscaled_penalty"]:
        try:
            update(two, stepped(customfit.CustomModel, how))
        except ValueError as error:
            errors[how] = str(error)
    bases = {how: stepped(customfit.CustomModel, how) for how in [
        "divided_by_replicas", "compute_average_loss", "compute_average_loss_global",
        "compute_loss"]}
    # (The default step on two replicas: tests/test_mirrored.py, bit for bit.)
    bases["keras2"] = keras2_model(customfit.CustomModel)
    for name, base in bases.items():
        results[name] = update(two, base)
    print("RESULTS" + json.dumps({"results": results, "errors": errors}))
"""


@pytest.fixture(scope="module")
def two_replicas():
    out = run_python_once(TWO_REPLICAS, two_cpus=True)
    return json.loads(out.split("RESULTS", 1)[1])


def _updates(run):
    return [np.asarray(u) for u in run]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_loss_not_scaled_for_replicas_raises_in_the_first_step(two_replicas):
    errors = two_replicas["errors"]
    assert sorted(errors) == ["reduce_mean", "sum_over_local_batch", "unscaled_penalty"]
    for message in errors.values():
        assert "not scaled for the 2 replicas" in message
        assert "would be 2 times too large" in message
        for fix in ["self.compute_loss(x, y, y_pred)", "self.compiled_loss(y, y_pred)",
                    "tf.nn.compute_average_loss", "num_replicas_in_sync",
                    "training_guards = False"]:
            assert fix in message


@pytest.mark.slow
@pytest.mark.multiprocess
def test_stock_keras_updates_twice_as_far_on_two_replicas(two_replicas):
    """Pins upstream: the hand-written reduce_mean step, on two replicas,
    moves every weight twice as far as on one device; so does CustomModel
    with the guard turned off."""
    one = _updates(two_replicas["results"]["one"])
    for name in ["stock_reduce_mean", "unguarded_reduce_mean"]:
        for u, o in zip(_updates(two_replicas["results"][name]), one, strict=True):
            np.testing.assert_allclose(u, 2 * o, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [
    "divided_by_replicas", "compute_average_loss", "compute_average_loss_global",
    "compute_loss", "keras2"])
def test_scaled_losses_do_not_raise_and_train_like_one_device(two_replicas, name):
    # Two replicas sum their halves of the batch in another order than one
    # device: float32 rounding of a few ulps, far below a doubled update.
    one = _updates(two_replicas["results"]["one"])
    assert np.max(np.abs(one[0])) > 1e-3
    for u, o in zip(_updates(two_replicas["results"][name]), one, strict=True):
        np.testing.assert_allclose(u, o, rtol=1e-5, atol=1e-6)
