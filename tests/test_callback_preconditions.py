"""customfit's callbacks refuse what they could not do before the first batch
trains, naming the fix, instead of failing at their first save (or, for a
backup, at the restart it was meant for)."""

import keras
import numpy as np
import pytest

import customfit
from customfit.callbacks import BackupAndRestore, ModelCheckpoint, TrainingPlot
from tests import models


class Subclassed(customfit.CustomModel):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(10)

    def call(self, x):
        return self.dense(x)


def fit(model, digits, callback, batches):
    """Two epochs of 4 batches; each trained batch's index goes to `batches`."""
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batches.append(batch))
    model.fit(digits[0][:64], digits[1][:64], batch_size=16, epochs=2, verbose=0,
              callbacks=[callback, record])


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="Keras' JAX and PyTorch fit build the model from the data before any "
                           "callback runs (see the next test)")
@pytest.mark.parametrize("save_freq", ["epoch", 2])
def test_backup_of_an_unbuilt_model_is_refused_before_training(digits, tmp_path, save_freq):
    model, batches = Subclassed(), []
    with pytest.raises(ValueError, match=r"BackupAndRestore needs a built model.*"
                       r"model\(x\[:1\]\).*Nothing was trained"):
        fit(model, digits, BackupAndRestore(tmp_path / "b", save_freq=save_freq), batches)
    assert batches == []
    assert not model.built

    model(digits[0][:1])  # the fix the message names
    fit(model, digits, BackupAndRestore(tmp_path / "b", save_freq=save_freq), batches)
    assert len(batches) == 8


@pytest.mark.skipif(keras.backend.backend() == "tensorflow",
                    reason="Keras' TensorFlow fit builds the model in its first step")
def test_backup_of_a_model_built_by_fit_trains(digits, tmp_path):
    model, batches = Subclassed(), []
    fit(model, digits, BackupAndRestore(tmp_path / "b", save_freq=2), batches)
    assert model.built and len(batches) == 8


@pytest.mark.parametrize("make", [
    lambda blocked: BackupAndRestore(blocked / "backup"),
    lambda blocked: ModelCheckpoint(blocked / "best.weights.h5", save_weights_only=True),
    lambda blocked: TrainingPlot(blocked / "plots" / "training"),
], ids=["BackupAndRestore", "ModelCheckpoint", "TrainingPlot"])
def test_a_directory_that_cannot_be_written_is_refused_before_training(
        digits, tmp_path, make):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")  # fails for root too, unlike chmod
    callback = make(blocked)
    model, batches = models.mlp(customfit.CustomModel), []
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(OSError, match=f"{type(callback).__name__} cannot write to "
                       f".*a-file.*Nothing was trained"):
        fit(model, digits, callback, batches)
    assert batches == []
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
