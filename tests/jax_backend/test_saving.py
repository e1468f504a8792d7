"""Saving on JAX: weights, optimizer and random-layer state come back, so
training resumed from a file equals training that never stopped."""

import keras
import numpy as np
import pytest

import customfit
from tests.jax_backend import models


def compiled(seed=0):
    keras.utils.set_random_seed(seed)
    model = models.mlp(customfit.CustomModel, dropout=0.3)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_resumed_from_a_saved_model_equals_uninterrupted(digits, tmp_path):
    x, y = digits[0][:256], digits[1][:256]
    fit = dict(batch_size=64, verbose=0, shuffle=False)
    straight = compiled()
    straight.fit(x, y, epochs=2, **fit)

    first = compiled()
    first.fit(x, y, epochs=1, **fit)
    first.save(tmp_path / "model.keras")
    keras.utils.set_random_seed(123)  # a fresh process draws other seeds
    resumed = keras.models.load_model(tmp_path / "model.keras")
    assert type(resumed) is type(straight)
    resumed.fit(x, y, epochs=1, **fit)
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.optimizer.variables, straight.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


def test_load_weights_of_another_architecture_is_refused_whole(digits, tmp_path):
    model = compiled()
    model.fit(digits[0][:64], digits[1][:64], verbose=0)
    model.save_weights(tmp_path / "model.weights.h5")
    other = models.mlp(customfit.CustomModel, batchnorm=True)
    before = [w.copy() for w in other.get_weights()]
    try:
        other.load_weights(tmp_path / "model.weights.h5")
    except ValueError as error:
        assert "architecture" in str(error)
    else:
        raise AssertionError("loading another architecture's weights did not fail")
    for a, b in zip(other.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_keras_backup_and_restore_resumes_an_interrupted_fit(digits, tmp_path):
    """Keras' own BackupAndRestore (epoch backups): a fit stopped by an error
    in epoch 2 and run again with the same callback ends with the weights of
    a fit that never stopped. (Without dropout: a new model would draw other
    dropout masks than the uninterrupted one.)"""
    x, y = digits[0][:256], digits[1][:256]
    fit = dict(batch_size=64, epochs=3, verbose=0, shuffle=False)

    def model():
        keras.utils.set_random_seed(0)
        built = models.mlp(customfit.CustomModel, dropout=0)
        built.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
        return built

    straight = model()
    expected = straight.fit(x, y, **fit).history

    class Crash(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("crash")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = model()
    # customfit says what Keras' callback loses against its own.
    with pytest.raises(RuntimeError, match="crash"), pytest.warns(customfit.ResumeWarning):
        interrupted.fit(x, y, callbacks=[backup, Crash()], **fit)
    resumed = model()
    with pytest.warns(customfit.ResumeWarning, match="customfit.callbacks.BackupAndRestore"):
        history = resumed.fit(x, y, callbacks=[backup], **fit).history
    assert history["loss"] == expected["loss"][1:]
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
