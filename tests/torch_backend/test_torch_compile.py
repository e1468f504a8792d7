"""`jit_compile=True` on PyTorch: the step runs through `torch.compile`, as
Keras' PyTorch trainer runs its own, and trains as stock Keras compiled."""

import keras
import numpy as np
import pytest
import torch

import customfit
from customfit.pytest_plugin import deterministic


def compiled_run(base, x, y):
    deterministic(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(32, activation="relu")(inputs)
    model = base(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=True)
    history = model.fit(x, y, batch_size=64, epochs=2, verbose=0).history
    return (history, model.get_weights(), model.evaluate(x, y, verbose=0),
            model.predict(x, verbose=0))


@pytest.mark.slow
# torch's inductor, imported by the first torch.compile, uses its own
# deprecated torch.jit.script_method (torch 2.13).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
# Dynamo reads `.grad` of the tensors it traces, stock Keras' step too.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
def test_jit_compile_runs_the_step_compiled_as_stock_keras(digits):
    x, y = digits[0][:256], digits[1][:256]
    history, weights, evaluation, predictions = compiled_run(keras.Model, x, y)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ours = compiled_run(customfit.CustomModel, x, y)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it compiled
    assert ours[0] == history
    for a, b in zip(ours[1], weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert ours[2] == evaluation
    np.testing.assert_array_equal(ours[3], predictions)
