"""The first-step guard against forgotten loss scaling, on JAX: the same
error as on TensorFlow (`tests/test_guards.py`), before any update, the
model usable afterwards. (The other guard, a loss not scaled for
`tf.distribute`'s replicas, has nothing to guard on JAX: under
`keras.distribution` the step sees the whole batch.) The same tests run on
PyTorch (`nox -s torch`), where the step runs eagerly either way."""

import keras
import numpy as np
import pytest

import customfit

FORGOTTEN = (r"never passed the loss to its scale_loss\(\)[\s\S]*"
             r"self\.optimizer\.scale_loss\(loss\)[\s\S]*training_guards = False")


def stepped(base, scale_loss=False, via_hook=False):
    """A hand-written step (`value_and_gradients` for the tape);
    `scale_loss` as the docs ask, `via_hook` hands unscaled gradients to
    CustomModel.apply_gradients. Otherwise it applies them with the
    LossScaleOptimizer's own `apply_gradients`."""

    class Step(base):
        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)

            def loss_fn():
                y_pred = self(x, training=True)
                loss = self.compute_loss(x, y, y_pred)
                if scale_loss:
                    loss = self.optimizer.scale_loss(loss)
                return loss, y_pred

            variables = self.trainable_weights
            (_, y_pred), gradients = self.value_and_gradients(loss_fn, variables, has_aux=True)
            if via_hook:
                if scale_loss:
                    scale = self.optimizer.scale_loss(1.0)
                    gradients = [g / keras.ops.cast(scale, g.dtype) for g in gradients]
                self.apply_gradients(gradients, variables)
            else:
                self.optimizer.apply_gradients(zip(gradients, variables))
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


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["jitted", "eager"])
def test_forgotten_scale_loss_raises_in_the_first_step(data, mixed_float16, run_eagerly):
    x, y = data
    model = compiled(stepped(customfit.CustomModel), run_eagerly)
    before = [np.array(w, copy=True) for w in model.get_weights()]
    predicted = model.predict(x, verbose=0)
    with pytest.raises(customfit.TrainingGuardError, match=FORGOTTEN):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 0  # stopped before any update
    for w, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)
    # The model is usable afterwards, and the guard still armed.
    np.testing.assert_array_equal(model.predict(x, verbose=0), predicted)
    assert model.evaluate(x, y, verbose=0) > 0
    with pytest.raises(customfit.TrainingGuardError, match=FORGOTTEN):
        model.train_on_batch(x[:64], y[:64])
    assert not vars(model.optimizer).keys() & {"apply", "scale_loss"}


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["jitted", "eager"])
def test_correct_steps_do_not_raise(data, mixed_float16, run_eagerly):
    default, start = fit_once(customfit.CustomModel, data, run_eagerly)
    scaled, _ = fit_once(stepped(customfit.CustomModel, scale_loss=True, via_hook=True), data,
                         run_eagerly)
    hook, _ = fit_once(stepped(customfit.CustomModel, via_hook=True), data, run_eagerly)
    reference = moved(default, start)
    assert reference > 1e-2
    assert int(scaled.optimizer.iterations) == int(hook.optimizer.iterations) == 2
    # The same maths; float16 gradients of an unscaled loss round differently.
    assert moved(scaled, start) == pytest.approx(reference, rel=1e-2)
    assert moved(hook, start) == pytest.approx(reference, rel=1e-2)
    # Nothing stays intercepted after the first step.
    for model in (default, scaled, hook):
        assert not vars(model.optimizer).keys() & {"apply", "scale_loss"}


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's tracer error")
def test_switch_turns_the_guard_off(data, mixed_float16):
    """Unguarded, the forgotten step gets what it gets without customfit's
    check: a LossScaleOptimizer's own `apply` cannot run inside the step on
    JAX (its update branches with ops.cond), scaled or not."""
    import jax

    class Unguarded(stepped(customfit.CustomModel)):
        training_guards = False

    with pytest.raises(jax.errors.UnexpectedTracerError):
        fit_once(Unguarded, data)
    with pytest.raises(jax.errors.UnexpectedTracerError):
        fit_once(stepped(customfit.CustomModel, scale_loss=True), data)

    x, y = data
    model = compiled(stepped(customfit.CustomModel))
    model.training_guards = False  # per model
    with pytest.raises(jax.errors.UnexpectedTracerError):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)


def test_float32_steps_are_not_checked(data):
    """Without mixed precision there is no LossScaleOptimizer to watch."""
    model, start = fit_once(stepped(customfit.CustomModel), data)
    assert int(model.optimizer.iterations) == 2
    assert moved(model, start) > 1e-2
