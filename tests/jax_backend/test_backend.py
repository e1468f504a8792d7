"""What customfit needs on JAX, and what it says where JAX differs."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import customfit
from customfit import recipes
from customfit._keras import internals
from tests.jax_backend import models


@pytest.mark.multiprocess
def test_import_loads_no_tensorflow():
    code = ("import sys, customfit; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_a_name_logged_only_after_the_first_trace_is_an_error(digits):
    class Late(customfit.CustomModel):
        def compute_metrics(self, x, y, y_pred, sample_weight=None):
            if x.shape[0] != 64:  # the short last batch: traced again
                self.log("late", keras.ops.mean(y_pred))
            return super().compute_metrics(x, y, y_pred, sample_weight)

    model = models.mlp(Late)
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(RuntimeError, match="log it on every batch"):
        model.fit(digits[0][:100], digits[1][:100], batch_size=64, verbose=0)


def test_private_keras_symbols_used_on_jax():
    """customfit.\\_keras.internals' JAX entries, probed on the installed Keras."""
    model = models.mlp(keras.Model)
    model.compile("sgd", "mse")
    function = internals.make_jax_function(model, lambda state, batch: (batch, state))
    assert function(0, iter([1])) == (1, 0)
    assert internals.current_stateless_scope() is None
    variable = keras.Variable(1.0)
    with keras.StatelessScope([(variable, 2.0)]) as scope:
        assert internals.current_stateless_scope() is scope
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    optimizer.build(model.trainable_variables)
    assert internals.optimizer_variables_built_over(optimizer) == model.trainable_variables
    # After jax_state_put_back, Keras' state sync leaves the variables alone.
    kernel = model.trainable_variables[0]
    before = keras.ops.convert_to_numpy(kernel)
    model._jax_state = {"trainable_variables": [keras.ops.zeros(kernel.shape)]}
    model._jax_state_synced = False
    internals.jax_state_put_back(model)
    model.jax_state_sync()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel), before)


def test_a_step_that_raises_leaves_the_model_usable(digits):
    """Keras' JAX fit takes the values out of the variables while it trains;
    an error in the step must not leave them empty."""
    class Broken(customfit.CustomModel):
        def compute_loss(self, *args, **kwargs):
            raise ValueError("a mistake in the step")

    model = models.mlp(Broken)
    model.compile("adam", "sparse_categorical_crossentropy")
    x = digits[0][:64]
    before = model.predict(x, verbose=0)
    with pytest.raises(ValueError, match="a mistake in the step"):
        model.fit(x, digits[1][:64], verbose=0)
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)


def test_a_check_that_raises_after_some_batches_leaves_the_model_usable(digits):
    """A recipe's check after a step (SkipNonFinite's limit) raises on the
    third batch: the weights are those after that batch, not the consumed
    values of the batch before."""
    x, y = digits[0][:160].copy(), digits[1][:160]
    x[2 * 32 + 5, 10] = np.nan
    model = models.mlp(lambda i, o: recipes.SkipNonFinite(i, o, max_consecutive_skips=0),
                       dropout=0)
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(RuntimeError, match="SkipNonFinite stopped training"):
        model.fit(x, y, batch_size=32, verbose=0, shuffle=False)
    assert int(model.optimizer.iterations) == 2
    assert np.isfinite(model.predict(x[:32], verbose=0)).all()


@pytest.mark.parametrize("count, longest, lengths", [
    (20, 16, [16, 4]),            # "auto": more than one scan holds
    (64, 16, [16, 16, 16, 16]),
    (20, 20, [20]),               # a fixed steps_per_execution: one scan
    (7, 10, [4, 1, 1, 1]),        # the data ended: powers of 4
    (1, 4, [1]),
])
def test_an_execution_is_cut_into_few_scan_lengths(count, longest, lengths):
    from customfit._jax import loop
    batches = [(np.zeros((8, 3)), np.zeros(8))] * count
    assert [len(chunk) for chunk in loop._chunks(batches, longest)] == lengths


def test_a_batch_of_another_shape_starts_a_new_scan():
    from customfit._jax import loop
    batches = [np.zeros((8, 3))] * 5 + [np.zeros((2, 3))]
    assert [len(chunk) for chunk in loop._chunks(batches, 16)] == [4, 1, 1]
