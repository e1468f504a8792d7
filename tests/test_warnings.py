"""customfit's own code adds no warning to what stock Keras emits for the
same work (Keras 3.15's TensorFlow variables make NumPy 2 warn when NumPy
converts them; customfit reads them with `.numpy()`)."""

import collections
import warnings

import keras
import pytest

import customfit
from customfit import recipes
from tests import models


def warnings_during(work):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        work()
    return collections.Counter((w.category.__name__, str(w.message)[:80]) for w in caught)


def fit_save_load(base, digits, tmp_path):
    def work():
        keras.utils.set_random_seed(0)
        model = models.mlp(base)  # Dropout: customfit saves its random state
        schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 2, 0.5)
        model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy")
        model.fit(digits[0][:128], digits[1][:128], batch_size=32, epochs=2, verbose=0)
        path = tmp_path / f"{base.__name__}.weights.h5"
        model.save_weights(path)
        model.load_weights(path)
        model.save(tmp_path / f"{base.__name__}.keras")
        keras.saving.load_model(tmp_path / f"{base.__name__}.keras")

    return warnings_during(work)


def test_fit_save_and_load_warn_no_more_than_stock_keras(digits, tmp_path):
    stock = fit_save_load(keras.Model, digits, tmp_path)
    ours = fit_save_load(customfit.CustomModel, digits, tmp_path)
    assert ours - stock == collections.Counter()


@pytest.mark.parametrize("recipe", [
    lambda i, o: recipes.GradientAccumulation(i, o, accumulation_steps=2),
    lambda i, o: recipes.SkipNonFinite(i, o),
], ids=["accumulation", "skipping"])
@pytest.mark.slow
def test_recipes_with_saved_state_warn_no_more_than_custom_model(digits, tmp_path, recipe):
    def saved(build):
        def work():
            model = models.mlp(build)
            model.compile("sgd", "sparse_categorical_crossentropy")
            model.fit(digits[0][:64], digits[1][:64], batch_size=32, verbose=0)
            model.save_weights(tmp_path / "r.weights.h5")
            model.load_weights(tmp_path / "r.weights.h5")

        return warnings_during(work)

    assert saved(recipe) - saved(customfit.CustomModel) == collections.Counter()
