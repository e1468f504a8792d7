"""Checks shared by the step recipes' tests."""

import keras
import numpy as np

# On JAX, a step run eagerly runs twice on its first batch: once, its updates
# discarded, to find the names it logs (traced abstractly, or, if it reads
# values with `.numpy()`, run; docs/guides/jax.md). A hook that records
# values or counts calls sees that run too.
EAGER_FIRST_BATCH_RUNS = 2 if keras.backend.backend() == "jax" else 1


def global_norm(tensors):
    return keras.ops.sqrt(sum(keras.ops.sum(keras.ops.square(t)) for t in tensors))


def assert_trains_like(expected_base, actual_base, build, x, y, epochs=1):
    """Bit for bit: same History and weights after `fit` under the same seed
    (the recipes change only `train_step`, so evaluate/predict follow)."""
    runs = []
    for base in (expected_base, actual_base):
        keras.utils.set_random_seed(7)
        model = build(base)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0).history
        runs.append((history, model.get_weights()))
    (expected_history, expected_weights), (history, weights) = runs
    assert history == expected_history
    assert len(weights) == len(expected_weights)
    for i, (a, e) in enumerate(zip(weights, expected_weights)):
        np.testing.assert_array_equal(a, e, err_msg=f"weight #{i}")
