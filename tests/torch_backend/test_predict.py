"""`predict` on PyTorch with batches left over after the last full
execution: stock Keras refuses several batches per execution there, and
Keras' epoch iterator would draw a whole execution past the data's end;
`CustomModel` runs one batch per execution and equals stock Keras."""

import keras
import numpy as np
import pytest

import customfit
from tests.jax_backend import models
from tests.jax_backend.test_parity import compile_kwargs


@pytest.mark.parametrize("steps_per_execution", [1, 3, "auto"])
def test_predict_with_batches_left_over_equals_stock(digits, steps_per_execution):
    """5 batches with 3 per execution: nothing is dropped, nothing warns."""
    x = digits[0][:300]
    outputs = []
    for base, steps in ((keras.Model, 1), (customfit.CustomModel, steps_per_execution)):
        keras.utils.set_random_seed(5)
        model = models.mlp(base)
        model.compile(**compile_kwargs(steps_per_execution=steps))
        outputs.append(model.predict(x, batch_size=64, verbose=0))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert outputs[1].shape == (300, 10)
