"""`Lookahead` and `WeightEMA`, recipes written with public names only,
against NumPy references (tests/linear_reference.py), composed with clipping
and accumulation, against Keras' optimizer `use_ema`, and saved and resumed.
"""

import ast
import functools
from pathlib import Path

import keras
import numpy as np
import pytest

from customfit import recipes
from tests import linear_reference as ref

ROOT = Path(__file__).resolve().parent.parent
SYNC_PERIOD, SLOW_STEP_SIZE, MOMENTUM = 3, 0.5, 0.9


class LookaheadReference(ref.Reference):
    def __init__(self, weights, **options):
        super().__init__(weights, after_update=self._synchronise, **options)
        self.slow = [w.copy() for w in weights]

    def _synchronise(self, weights, updates):
        if updates % SYNC_PERIOD:
            return weights
        self.slow = [s + SLOW_STEP_SIZE * (w - s) for s, w in zip(self.slow, weights)]
        return [s.copy() for s in self.slow]


class AverageReference(ref.Reference):
    def __init__(self, weights, **options):
        super().__init__(weights, after_update=self._average, **options)
        self.average = [w.copy() for w in weights]

    def _average(self, weights, updates):
        momentum = 0.0 if updates == 1 else MOMENTUM
        self.average = [momentum * a + (1 - momentum) * w for a, w in zip(self.average, weights)]
        return weights


CLIPPED_ACCUMULATION = dict(
    accumulate=2,
    transforms=[functools.partial(ref.clip_by_global_norm, clip_norm=0.3)],
)
CASES = {
    "alone": ((), {}, {}),
    "with_accumulation_and_clipping": (
        (recipes.GradientAccumulation, recipes.GlobalNormClipping),
        dict(accumulation_steps=2, clip_norm=0.3),
        CLIPPED_ACCUMULATION,
    ),
}


def composed(recipe, case):
    bases, options, reference_options = CASES[case]
    return type(f"Composed{recipe.__name__}", (recipe, *bases), {}), options, reference_options


@pytest.mark.parametrize("case", CASES)
def test_lookahead_equals_reference(case):
    cls, options, reference_options = composed(recipes.Lookahead, case)
    options.update(sync_period=SYNC_PERIOD, slow_step_size=SLOW_STEP_SIZE)
    x, y = ref.data(batches=8)
    model = ref.fit_recipe(cls, x, y, epochs=2, **options)
    expected = LookaheadReference(ref.initial_weights(cls, **options), **reference_options)
    expected.fit(x, y, epochs=2)
    assert expected.updates >= 2 * SYNC_PERIOD
    for got, want in zip(model.get_weights(), expected.weights):
        np.testing.assert_allclose(got, want, **ref.CLOSE)
    for got, want in zip(model.slow_weights, expected.slow):
        np.testing.assert_allclose(got.numpy(), want, **ref.CLOSE)


@pytest.mark.parametrize("case", CASES)
def test_weight_average_equals_reference_and_is_evaluated(case):
    cls, options, reference_options = composed(recipes.WeightEMA, case)
    options.update(momentum=MOMENTUM)
    x, y = ref.data(batches=8)
    model = ref.fit_recipe(cls, x, y, epochs=2, **options)
    expected = AverageReference(ref.initial_weights(cls, **options), **reference_options)
    expected.fit(x, y, epochs=2)
    for got, want in zip(model.get_weights(), expected.weights):  # its own weights
        np.testing.assert_allclose(got, want, **ref.CLOSE)
    for got, want in zip(model.average_weights, expected.average):
        np.testing.assert_allclose(got.numpy(), want, **ref.CLOSE)
    kernel, bias = expected.average
    np.testing.assert_allclose(model.predict(x, verbose=0), x @ kernel + bias, **ref.CLOSE)
    loss = model.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(loss, ref.loss_and_gradients(expected.average, x, y)[0], rtol=1e-5)
    # And back: the model's own weights after evaluate and predict.
    for got, want in zip(model.get_weights(), expected.weights):
        np.testing.assert_allclose(got, want, **ref.CLOSE)


def stock_with_ema(x, y, epochs, validation=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(keras.optimizers.SGD(ref.LEARNING_RATE, use_ema=True,
                                       ema_momentum=MOMENTUM), "mse")
    callbacks = [] if validation is None else [keras.callbacks.SwapEMAWeights()]
    history = model.fit(x, y, batch_size=ref.BATCH, epochs=epochs, shuffle=False, verbose=0,
                        validation_data=validation, callbacks=callbacks)
    return model, history.history


def weight_ema(x, y, epochs, validation=None):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = recipes.WeightEMA(inputs, keras.layers.Dense(2)(inputs), momentum=MOMENTUM)
    model.compile(keras.optimizers.SGD(ref.LEARNING_RATE), "mse")
    history = model.fit(x, y, batch_size=ref.BATCH, epochs=epochs, shuffle=False, verbose=0,
                        validation_data=validation)
    return model, history.history


def test_weight_average_equals_keras_use_ema_bit_for_bit():
    """Keras' optimizer keeps the same average (`use_ema`) and writes it
    into the weights at the end of `fit`."""
    x, y = ref.data(batches=8)
    stock, _ = stock_with_ema(x, y, 2)
    model, _ = weight_ema(x, y, 2)
    for average, finalized in zip(model.average_weights, stock.trainable_weights):
        np.testing.assert_array_equal(average.numpy(), finalized.numpy())
    np.testing.assert_array_equal(model.predict(x, verbose=0), stock.predict(x, verbose=0))


def test_validation_uses_the_average_as_keras_swap_ema_weights_does():
    """The `val_loss` of each epoch is the average's, as Keras' `use_ema`
    with its `SwapEMAWeights` callback gives it. Keras swaps by assignment on
    JAX and PyTorch (then the losses are equal) and on TensorFlow by
    arithmetic (`w += a; a = w - a; w -= a`), which rounds: there within
    float32 rounding of the weights (rtol 1e-6)."""
    x, y = ref.data(batches=8)
    validation = ref.data(batches=2, seed=1)
    _, stock = stock_with_ema(x, y, 3, validation)
    _, ours = weight_ema(x, y, 3, validation)
    if keras.backend.backend() == "tensorflow":
        np.testing.assert_allclose(ours["val_loss"], stock["val_loss"], rtol=1e-6)
    else:
        assert ours["val_loss"] == stock["val_loss"]
    assert ours["loss"] == stock["loss"]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute")
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["lookahead", "ema"])
def test_two_replicas_train_as_one_device(name):
    """Under MirroredStrategy the recipe's step runs once per replica, on
    mirrored weights: the weights and the recipe's state match one device
    within float32 summation-order ulps."""
    from tests import recipes_mirrored

    results = recipes_mirrored.results()
    two, one = results[f"{name}_two"], results[f"{name}_one"]
    assert two["state"] and len(two["state"]) == len(one["state"])
    for a, b in zip(two["weights"] + two["state"], one["weights"] + one["state"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recipe", ["Lookahead", "WeightEMA"])
def test_state_is_saved_and_training_resumes_exactly(recipe, tmp_path):
    cls = getattr(recipes, recipe)
    options = dict(sync_period=SYNC_PERIOD) if recipe == "Lookahead" else dict(momentum=MOMENTUM)
    x, y = ref.data(batches=4)
    uninterrupted = ref.fit_recipe(cls, x, y, epochs=2, **options)
    first = ref.fit_recipe(cls, x, y, epochs=1, **options)
    first.save(tmp_path / "recipe.keras")
    resumed = keras.saving.load_model(tmp_path / "recipe.keras")
    assert isinstance(resumed, cls)
    resumed.fit(x, y, batch_size=ref.BATCH, epochs=1, shuffle=False, verbose=0)
    state = "slow_weights" if recipe == "Lookahead" else "average_weights"
    for got, want in zip([*resumed.weights, *getattr(resumed, state)],
                         [*uninterrupted.weights, *getattr(uninterrupted, state)]):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # What BackupAndRestore and ModelCheckpoint(save_weights_only=True) keep.
    uninterrupted.save_weights(tmp_path / "recipe.weights.h5")
    fresh = ref.fit_recipe(cls, x, y, epochs=1, **options)
    fresh.load_weights(tmp_path / "recipe.weights.h5")
    for got, want in zip(getattr(fresh, state), getattr(uninterrupted, state)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("recipe, options, message", [
    ("Lookahead", dict(sync_period=0), "sync_period must be an integer >= 1"),
    ("Lookahead", dict(slow_step_size=1.5), r"slow_step_size must be a number in \[0, 1\]"),
    ("WeightEMA", dict(momentum=1.0), r"momentum must be a number in \[0, 1\)"),
])
def test_bad_options_name_the_fix(recipe, options, message):
    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match=f"{recipe}: {message}.*Pass e.g."):
        getattr(recipes, recipe)(inputs, keras.layers.Dense(2)(inputs), **options)


@pytest.mark.parametrize("module", ["_lookahead.py", "_weight_average.py"])
def test_written_with_public_names_only(module):
    """What the guide promises: these import only public customfit names
    and read no private attribute of anything but their own."""
    tree = ast.parse((ROOT / "customfit" / "recipes" / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("customfit"):
            assert node.module == "customfit", node.module
            assert all(not alias.name.startswith("_") for alias in node.names)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            assert isinstance(node.value, ast.Name) and node.value.id == "self", node.attr
