"""Saving and resuming: a run continued from a file equals one that never
stopped, bit for bit; bad files give clear errors and change nothing."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit.callbacks import BackupAndRestore, ModelCheckpoint
from tests import models

N, BATCH = 256, 64


@keras.saving.register_keras_serializable(package="customfit_tests")
class Net(customfit.CustomModel):
    """Subclassed, with an argument (so `get_config`), Dropout and BatchNorm."""

    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.drop = keras.layers.Dropout(0.3)
        self.out = keras.layers.Dense(10, activation="softmax")

    def build(self, input_shape):
        self.hidden.build(input_shape)
        self.norm.build((None, self.units))
        self.out.build((None, self.units))

    def call(self, x, training=False):
        h = self.norm(self.hidden(x), training=training)
        return self.out(self.drop(h, training=training))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="customfit_tests")
class TwoOptimizers(customfit.CustomModel):
    """The head has its own optimizer, created and built eagerly."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = keras.layers.Dense(16, activation="relu")
        self.drop = keras.layers.Dropout(0.2)
        self.head = keras.layers.Dense(10, activation="softmax")
        self.head_optimizer = keras.optimizers.Adam(3e-3)

    def build(self, input_shape):
        self.body.build(input_shape)
        self.head.build((None, 16))
        self.head_optimizer.build(self.head.trainable_variables)

    def call(self, x, training=False):
        return self.head(self.drop(self.body(x), training=training))

    def apply_gradients(self, gradients, variables):
        n = len(self.body.trainable_variables)
        super().apply_gradients(gradients[:n], variables[:n])
        self.head_optimizer.apply(gradients[n:], variables[n:])


def functional():
    return models.mlp(customfit.CustomModel, dropout=0.3)


def subclassed():
    model = Net(units=16)
    model.build((None, 64))
    return model


def two_optimizers():
    model = TwoOptimizers()
    model.build((None, 64))
    return model


BUILDERS = {"functional": functional, "subclassed": subclassed,
            "two_optimizers": two_optimizers}


def compiled(build):
    keras.utils.set_random_seed(3)
    model = build()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def state(model):
    """Weights, random-layer state and every optimizer's variables, in order
    (variable names differ between instances, so keys are positions)."""
    values = {f"model/{i}": v.numpy() for i, v in enumerate(model.variables)}
    for name in ("optimizer", "head_optimizer"):
        optimizer = getattr(model, name, None)
        if optimizer is not None:
            values.update({f"{name}/{i}": v.numpy()
                           for i, v in enumerate(optimizer.variables)})
    return values


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def fit(model, data, **kwargs):
    x, y = data
    return model.fit(x[:N], y[:N], batch_size=BATCH, verbose=0, **kwargs).history


_uninterrupted = {}


def uninterrupted_run(name, data):
    """State and History after 2 epochs, trained once per model kind."""
    if name not in _uninterrupted:
        model = compiled(BUILDERS[name])
        history = fit(model, data, epochs=2)
        _uninterrupted[name] = state(model), history
    return _uninterrupted[name]


@pytest.mark.parametrize("name, how", [
    ("functional", "keras_file"), ("subclassed", "weights_file"),
    ("two_optimizers", "keras_file"), ("two_optimizers", "weights_file")])
@pytest.mark.slow
def test_training_resumed_from_a_file_equals_uninterrupted(digits, tmp_path, name, how):
    build = BUILDERS[name]
    expected_state, history = uninterrupted_run(name, digits)

    first = compiled(build)
    fit(first, digits, epochs=1)
    if how == "keras_file":
        first.save(tmp_path / "model.keras")
        resumed = keras.saving.load_model(tmp_path / "model.keras")
    else:
        first.save_weights(tmp_path / "model.weights.h5")
        keras.utils.set_random_seed(99)  # another initialization, overwritten
        resumed = compiled(build)
        resumed.load_weights(tmp_path / "model.weights.h5")
    assert_same_state(state(resumed), state(first))
    resumed_history = fit(resumed, digits, epochs=2, initial_epoch=1)

    assert_same_state(state(resumed), expected_state)
    for key in history:
        assert resumed_history[key] == history[key][1:], key
    if name == "two_optimizers":
        assert int(resumed.optimizer.iterations) == 2 * N // BATCH
        assert int(resumed.head_optimizer.iterations) == 2 * N // BATCH


def test_dropout_generator_state_is_saved_and_restored(tmp_path):
    keras.utils.set_random_seed(3)
    model = functional()
    (seed_state,) = [v for v in model.variables if "seed_generator" in v.path]
    seed_state.assign([123, 45])
    model.save_weights(tmp_path / "m.weights.h5")
    seed_state.assign([0, 0])
    model.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(seed_state.numpy(), [123, 45])


def test_a_file_from_stock_keras_model_still_loads(digits, tmp_path):
    keras.utils.set_random_seed(3)
    stock = models.mlp(keras.Model)
    stock.save_weights(tmp_path / "stock.weights.h5")
    keras.utils.set_random_seed(4)
    model = functional()
    model.load_weights(tmp_path / "stock.weights.h5")
    for a, b in zip(model.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ bad input


def other_architecture():
    return models.mlp(customfit.CustomModel, dropout=0.3, batchnorm=True)


def test_loading_another_architecture_is_a_clear_error_and_changes_nothing(tmp_path):
    compiled(other_architecture).save_weights(tmp_path / "other.weights.h5")
    model = compiled(functional)
    before = state(model)
    with pytest.raises(ValueError, match="(?s)written by a different architecture.*"
                       "layers/batch_normalization.*left unchanged"):
        model.load_weights(tmp_path / "other.weights.h5")
    assert_same_state(state(model), before)
    assert not model.optimizer.built


def test_missing_file_is_a_clear_error(tmp_path):
    model = compiled(functional)
    with pytest.raises(FileNotFoundError, match="No checkpoint at .*nothing.weights.h5"):
        model.load_weights(tmp_path / "nothing.weights.h5")


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_is_a_clear_error_and_changes_nothing(tmp_path, suffix, damage):
    model = compiled(functional)
    good = tmp_path / f"good{suffix}"
    model.save_weights(good) if suffix == ".weights.h5" else model.save(good)
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    before = state(model)
    # An OSError, as Keras' own callbacks expect of a damaged file (and as
    # h5py raises), and a ValueError, as earlier releases raised.
    with pytest.raises(OSError, match="not a readable Keras checkpoint") as error:
        model.load_weights(bad)
    assert isinstance(error.value, ValueError)
    assert_same_state(state(model), before)


def test_keras_backup_falls_back_to_its_previous_backup_on_a_corrupt_file(digits, tmp_path):
    """Keras' BackupAndRestore(double_checkpoint=True) catches an OSError from
    load_weights to fall back on its previous backup."""

    class StopAfterOneEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup", double_checkpoint=True)
    model = compiled(functional)
    stock_backup = pytest.warns(customfit.ResumeWarning, match="keras.callbacks.BackupAndRestore")
    with pytest.raises(KeyboardInterrupt), stock_backup:
        fit(model, digits, epochs=3, callbacks=[backup, StopAfterOneEpoch()])
    latest = tmp_path / "backup" / "latest.weights.h5"
    assert (tmp_path / "backup" / "latest.weights.h5.bkp").exists()
    latest.write_bytes(b"\x00garbage" * 64)
    with stock_backup:
        history = fit(compiled(functional), digits, epochs=3, callbacks=[backup])
    assert len(history["loss"]) == 2  # resumed from the previous backup, after epoch 1


def test_a_layer_reached_under_another_name_loads(tmp_path):
    """Keras loads a file whose layer this model reaches through a property
    alias (saved under another path): so does CustomModel."""

    class Plain(customfit.CustomModel):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    class Aliased(customfit.CustomModel):
        def __init__(self):
            super().__init__()
            self.a_dense = keras.layers.Dense(3)

        @property
        def dense(self):
            return self.a_dense

        def call(self, x):
            return self.dense(x)

    x = np.ones((2, 4), "float32")
    plain, aliased = Plain(), Aliased()
    plain(x), aliased(x)
    plain.save_weights(tmp_path / "plain.weights.h5")
    aliased.load_weights(tmp_path / "plain.weights.h5")
    np.testing.assert_array_equal(aliased.dense.kernel.numpy(), plain.dense.kernel.numpy())


def test_a_file_with_more_layers_is_refused_and_changes_nothing(tmp_path):
    """Keras loads the first layers of a bigger model's file without a word;
    CustomModel refuses it before loading anything."""

    def stack(*units):
        inputs = keras.Input((4,))
        outputs = inputs
        for n in units:
            outputs = keras.layers.Dense(n)(outputs)
        return customfit.CustomModel(inputs, outputs)

    stack(8, 3, 2).save_weights(tmp_path / "bigger.weights.h5")
    model = stack(8, 3)
    before = state(model)
    with pytest.raises(ValueError, match=r"different architecture.*Weights not taken "
                       r"\(shape\): layers/dense_2/vars/0 \(3, 2\).*left unchanged"):
        model.load_weights(tmp_path / "bigger.weights.h5")
    assert_same_state(state(model), before)
    model.load_weights(tmp_path / "bigger.weights.h5", skip_mismatch=True)  # Keras' way


def test_optimizer_state_of_a_compiled_sublayer_is_no_obstacle(digits, tmp_path):
    """A teacher compiled and trained before it was wrapped saves its
    optimizer inside the wrapper's file; a fresh wrapper without it loads the
    file, as Keras does."""
    x, y = digits[0][:64], digits[1][:64]

    def wrapper(teacher):
        inputs = keras.Input((64,))
        return customfit.CustomModel(inputs, teacher(inputs))

    keras.utils.set_random_seed(0)
    teacher = models.mlp(keras.Model, dropout=0)
    teacher.compile("adam", "sparse_categorical_crossentropy")
    teacher.fit(x, y, verbose=0)
    wrapper(teacher).save_weights(tmp_path / "wrapped.weights.h5")
    fresh = wrapper(models.mlp(keras.Model, dropout=0))
    fresh.load_weights(tmp_path / "wrapped.weights.h5")
    for a, b in zip(fresh.get_weights(), teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def break_saving_midway(monkeypatch):
    """Saving fails after the file is opened and its first layer written."""
    original = keras.layers.Dense.save_own_variables

    def failing(self, store):
        if self.units == 10:  # the output layer, saved after the hidden one
            raise OSError("disk full")
        original(self, store)

    monkeypatch.setattr(keras.layers.Dense, "save_own_variables", failing)


@pytest.mark.parametrize("weights_only", [True, False], ids=["weights", "keras"])
def test_failed_checkpoint_write_keeps_the_previous_checkpoint(
        digits, tmp_path, monkeypatch, weights_only):
    path = tmp_path / ("best.weights.h5" if weights_only else "best.keras")
    model = compiled(functional)
    callback = ModelCheckpoint(path, monitor="loss", save_weights_only=weights_only)
    fit(model, digits, epochs=1, callbacks=[callback])
    good = path.read_bytes()

    break_saving_midway(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        fit(model, digits, epochs=1, callbacks=[callback])
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no leftovers

    # Keras' own callback writes into the checkpoint itself: the reason for ours.
    stock = keras.callbacks.ModelCheckpoint(path, monitor="loss", save_weights_only=weights_only)
    with pytest.raises(OSError, match="disk full"):
        fit(model, digits, epochs=1, callbacks=[stock])
    assert path.read_bytes() != good


def test_backup_of_another_model_is_refused_and_left_untouched(digits, tmp_path):
    backup = tmp_path / "backup"
    source = compiled(other_architecture)
    fit(source, digits, epochs=1, callbacks=[BackupAndRestore(backup, delete_checkpoint=False)])
    files = {p.name: p.read_bytes() for p in backup.iterdir()}
    assert "backup.json" in files

    model = compiled(functional)
    with pytest.raises(ValueError, match="written by a different model"):
        fit(model, digits, epochs=2, callbacks=[BackupAndRestore(backup)])
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == files


def test_directory_of_something_else_is_refused(digits, tmp_path):
    backup = tmp_path / "backup"
    stock = keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)
    with pytest.warns(customfit.ResumeWarning, match="keras.callbacks.BackupAndRestore"):
        fit(compiled(functional), digits, epochs=1, callbacks=[stock])
    model = compiled(functional)
    with pytest.raises(ValueError, match="not a customfit backup.*latest.weights.h5"):
        fit(model, digits, epochs=2, callbacks=[BackupAndRestore(backup)])


def test_leftovers_of_a_kill_while_deleting_are_not_a_backup(digits, tmp_path):
    """backup.json goes first; weights left without it mean: start afresh."""
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "epoch-3.weights.h5").write_bytes(b"partly deleted")
    (backup / ".tmp-0123-backup.json").write_text("{")
    history = fit(compiled(functional), digits, epochs=1, callbacks=[BackupAndRestore(backup)])
    assert len(history["loss"]) == 1 and not backup.exists()


def test_corrupt_backup_is_a_clear_error(digits, tmp_path):
    backup = tmp_path / "backup"
    fit(compiled(functional), digits, epochs=1,
        callbacks=[BackupAndRestore(backup, delete_checkpoint=False)])
    (weights,) = backup.glob("*.weights.h5")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="Cannot restore the backup.*truncated or corrupt"):
        fit(compiled(functional), digits, epochs=2, callbacks=[BackupAndRestore(backup)])
    (backup / "backup.json").write_text("{not json")
    with pytest.raises(ValueError, match="backup.json is not a readable backup"):
        fit(compiled(functional), digits, epochs=2, callbacks=[BackupAndRestore(backup)])


def test_backup_resumes_in_process_and_next_fit_starts_at_its_own_epoch(digits, tmp_path):
    backup = tmp_path / "backup"
    expected_state, _ = uninterrupted_run("functional", digits)

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 1 and batch == 1:
                raise KeyboardInterrupt

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

    with pytest.raises(KeyboardInterrupt):
        fit(compiled(functional), digits, epochs=2,
            callbacks=[BackupAndRestore(backup), Interrupt()])
    resumed = compiled(functional)
    history = fit(resumed, digits, epochs=2, callbacks=[BackupAndRestore(backup)])
    assert len(history["loss"]) == 1  # the second epoch only
    assert_same_state(state(resumed), expected_state)
    assert not backup.exists()
    assert len(fit(resumed, digits, epochs=2)["loss"]) == 2


def test_unregistered_subclass_warns_at_save_and_keras_names_it_at_load(tmp_path):
    """A subclass Keras cannot find by name saves whole, with a warning that
    names both fixes; Keras' own load error names the class; each fix loads."""

    class Clipped(customfit.CustomModel):
        pass

    model = models.mlp(Clipped)
    # Serialized without a file to load: no warning (warnings fail tests).
    keras.models.clone_model(model)
    model.to_json()
    keras.Sequential([model]).get_config()
    with pytest.warns(customfit.SavingWarning,
                      match=r"(?s)Clipped.*register_keras_serializable.*custom_objects"):
        model.save(tmp_path / "clipped.keras")
    keras.saving.save_model(model, tmp_path / "again.keras")  # once per class
    with pytest.raises(TypeError, match=r"Could not locate class 'Clipped'.*"
                                        r"register_keras_serializable"):
        keras.models.load_model(tmp_path / "clipped.keras")
    loaded = keras.models.load_model(tmp_path / "clipped.keras",
                                     custom_objects={"Clipped": Clipped})
    assert isinstance(loaded, Clipped)

    registered = keras.saving.register_keras_serializable("tests")(
        type("Registered", (customfit.CustomModel,), {}))
    models.mlp(registered).save(tmp_path / "registered.keras")  # no warning
    assert isinstance(keras.models.load_model(tmp_path / "registered.keras"), registered)
    scoped = type("Scoped", (customfit.CustomModel,), {})
    with keras.saving.custom_object_scope({"Scoped": scoped}):  # found there: no warning
        models.mlp(scoped).save(tmp_path / "scoped.keras")


def test_whole_model_checkpoint_of_an_unregistered_subclass_warns(digits, tmp_path):
    class Unnamed(customfit.CustomModel):
        pass

    model = compiled(lambda: models.mlp(Unnamed))
    with pytest.warns(customfit.SavingWarning, match="Unnamed"):
        fit(model, digits, epochs=1,
            callbacks=[ModelCheckpoint(tmp_path / "model.keras", save_weights_only=False)])
