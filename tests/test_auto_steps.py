"""`compile(steps_per_execution="auto")`: executions of several batches,
sized from measured times, that no callback can tell from one batch per
execution: the same batch indices, logs and `History` bit for bit, and the
weights a callback reads (checkpoints, backups, mid-epoch validation) those
after the very batch it reads them at."""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit import _auto_steps
from tests import models

# 300 samples in batches of 16: 19 batches per epoch, the last one of 12.
N, BATCH, EPOCHS = 300, 16, 2
BATCHES = -(-N // BATCH)


class Record(keras.callbacks.Callback):
    """Every batch of `fit` and `evaluate`, in order, with its logs."""

    reads_only_logs = True

    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(("train_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("train_end", batch, dict(logs)))

    def on_test_batch_end(self, batch, logs=None):
        self.events.append(("test_end", batch, dict(logs)))


class FixedTuner(_auto_steps.StepsTuner):
    """Proposes `steps` batches per execution whatever the times, so that a
    test knows the executions' sizes."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def observe(self, steps, seconds):
        pass

    def fit_within(self, batches):
        pass


@pytest.fixture
def executions(monkeypatch):
    """Every execution's `(phase, first batch, batches)`, in order."""
    sizes = []
    next_steps = _auto_steps.ExecutionPlan.next_steps

    def recording(plan, batch, remaining):
        steps = next_steps(plan, batch, remaining)
        sizes.append((plan.phase, batch, steps))
        return steps

    monkeypatch.setattr(_auto_steps.ExecutionPlan, "next_steps", recording)
    return sizes


def data(digits, known_length=True):
    x, y = digits[0][:N], digits[1][:N]
    if known_length:
        return dict(x=x, y=y, batch_size=BATCH)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda x, y: True)
    return dict(x=dataset.batch(BATCH))


def train(digits, steps_per_execution, tuner_steps=None, callbacks=(), known_length=True,
          epochs=EPOCHS, compile_kwargs=None, **fit_kwargs):
    keras.utils.set_random_seed(3)
    model = models.mlp(customfit.CustomModel)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution,
                  **(compile_kwargs or {}))
    if tuner_steps is not None:
        model._auto_steps.tuners = {"train": FixedTuner(tuner_steps),
                                    "test": FixedTuner(tuner_steps)}
    record = Record()
    validation = (digits[0][N:N + 64], digits[1][N:N + 64])
    history = model.fit(**data(digits, known_length), epochs=epochs, verbose=0, shuffle=False,
                        validation_data=validation, callbacks=[record, *callbacks],
                        **fit_kwargs)
    model.evaluate(**data(digits, known_length), verbose=0, callbacks=[record])
    return model, record.events, history.history


@pytest.mark.parametrize("known_length, compile_kwargs", [
    (True, {}), (True, {"run_eagerly": True}), (False, {})],
    ids=["arrays", "arrays_eager", "unknown_length"])
def test_every_batch_as_with_one_batch_per_execution(digits, executions, known_length,
                                                     compile_kwargs):
    if known_length:
        expected = train(digits, 1, compile_kwargs=compile_kwargs)
        run = train(digits, "auto", tuner_steps=8, compile_kwargs=compile_kwargs)
    else:
        # One epoch: with one batch per execution, the call that finds the
        # data exhausted also counts an optimizer iteration (20 for 19
        # batches, in stock fit too), which executions of several batches do
        # not; from the second epoch on, Adam's bias correction differs.
        with warnings.catch_warnings():
            # Keras up to 3.15 warns here (tests/test_full_resolution_logs.py
            # pins it); 3.16 does not.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            expected = train(digits, 1, known_length=False, epochs=1)
            run = train(digits, "auto", tuner_steps=8, known_length=False, epochs=1)
    assert run[1] == expected[1]  # indices and logs of every batch, bit for bit
    assert run[2] == expected[2]  # History
    for got, want in zip(run[0].get_weights(), expected[0].get_weights()):
        np.testing.assert_array_equal(got, want)
    train_sizes = [steps for phase, _, steps in executions if phase == "train"]
    if known_length:
        # 19 batches: 8, 8 and the 3 left, each epoch.
        assert train_sizes == [8, 8, 3] * EPOCHS
    else:
        assert train_sizes[:3] == [8, 8, 8]  # the third one runs 3, then the data end
    assert run[0].steps_per_execution == 1


@pytest.mark.slow
def test_executions_end_where_callbacks_read_the_weights(digits, executions, tmp_path):
    """A checkpoint every 5 batches, a backup every 7 and a validation every
    6: with 8 batches proposed, each execution ends at the next of them."""
    saved = {}
    for name, steps_per_execution in (("one", 1), ("auto", "auto")):
        folder = tmp_path / name
        checkpoint = customfit.callbacks.ModelCheckpoint(
            str(folder / "{epoch}-{batch}.weights.h5"), save_weights_only=True, save_freq=5)
        backup = customfit.callbacks.BackupAndRestore(str(folder / "backup"), save_freq=7,
                                                      delete_checkpoint=False)
        model, events, history = train(
            digits, steps_per_execution, tuner_steps=8 if name == "auto" else None,
            callbacks=[checkpoint, backup], validate_every_n_batches=6)
        files = {}
        for path in sorted(folder.rglob("*.h5")) + sorted(folder.rglob("*.npz")):
            reloaded = models.mlp(customfit.CustomModel)
            if path.suffix == ".h5":
                reloaded.load_weights(path)
                files[path.name] = reloaded.get_weights()
            else:
                with np.load(path) as state:
                    files[path.name] = [state[key] for key in sorted(state.files)
                                        if "time" not in key]
        saved[name] = (files, events, history)
    one, auto = saved["one"], saved["auto"]
    assert sorted(auto[0]) == sorted(one[0]) and len(one[0]) > 8
    for name in one[0]:
        for got, want in zip(auto[0][name], one[0][name]):
            np.testing.assert_array_equal(got, want, err_msg=name)
    assert auto[1] == one[1]  # mid-epoch validation results included
    assert auto[2] == one[2]
    first_epoch = [(batch, steps) for phase, batch, steps in executions if phase == "train"]
    first_epoch = first_epoch[: next(i for i, (b, _) in enumerate(first_epoch[1:], 1) if b == 0)]
    # Ends after batches 4 (checkpoint), 5 (validation), 6 (backup before 7),
    # 9, 11, 13, 14, 17, 18 (the epoch's last).
    ends = [batch + steps - 1 for batch, steps in first_epoch]
    assert ends == [4, 5, 6, 9, 11, 13, 14, 17, 18]


@pytest.mark.slow
def test_a_callback_that_may_read_the_weights_makes_executions_one_batch(digits, executions):
    class EveryBatch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            pass

    with pytest.warns(UserWarning, match=r"one batch per execution.*EveryBatch.*reads_only_logs"):
        train(digits, "auto", tuner_steps=8, callbacks=[EveryBatch()])
    assert {steps for phase, _, steps in executions if phase == "train"} == {1}
    executions.clear()
    with pytest.warns(UserWarning, match=r"LambdaCallback"):
        train(digits, "auto", tuner_steps=8, epochs=1,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: None)])
    assert {steps for phase, _, steps in executions if phase == "train"} == {1}
    executions.clear()
    train(digits, "auto", tuner_steps=8, epochs=1, callbacks=[
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: None), keras.callbacks.EarlyStopping()])
    assert 8 in {steps for phase, _, steps in executions if phase == "train"}
    # Evaluation runs no per-batch method of it: 8 batches per execution.
    assert 8 in {steps for phase, _, steps in executions if phase == "test"}

    executions.clear()
    EveryBatch.reads_only_logs = True
    train(digits, "auto", tuner_steps=8, callbacks=[EveryBatch()])
    assert 8 in {steps for phase, _, steps in executions if phase == "train"}


def tuned(per_batch):
    """The numbers a new tuner proposes, in order, until it settles, given
    the seconds per batch at each number."""
    tuner = _auto_steps.StepsTuner()
    proposed = []
    while not tuner.settled:
        proposed.append(tuner.steps)
        tuner.observe(tuner.steps, per_batch[tuner.steps] * tuner.steps)
    return tuner, list(dict.fromkeys(proposed))


def test_tuner_grows_past_a_loss_within_noise():
    # 64 batches per execution measured 8% slower than 16: grows on.
    _, proposed = tuned({1: 1e-3, 4: 5e-4, 16: 4e-4, 64: 4.32e-4, 256: 4e-4})
    assert proposed[:5] == [1, 4, 16, 64, 256]


def test_tuner_grows_while_batches_get_no_slower_then_keeps_the_last():
    tuner = _auto_steps.StepsTuner()
    # Seconds per batch at 1, 4, 16, 64 batches per execution: 64 is slower.
    per_batch = {1: 1e-3, 4: 5e-4, 16: 4e-4, 64: 4.6e-4}
    proposed = []
    while not tuner.settled:
        steps = tuner.steps
        proposed.append(steps)
        tuner.observe(steps, per_batch[steps] * steps)
    # The first execution of each size is not counted (it may compile); then
    # SAMPLES samples, each of executions lasting SAMPLE_SECONDS or more.
    assert list(dict.fromkeys(proposed)) == [1, 4, 16, 64]
    for steps in (1, 4, 16, 64):
        execution = per_batch[steps] * steps
        timed = (proposed.count(steps) - 1) * execution
        sample = _auto_steps.SAMPLE_SECONDS
        assert _auto_steps.SAMPLES * sample * (1 - 1e-9) <= timed
        assert timed < _auto_steps.SAMPLES * (sample + execution)
    assert tuner.steps == 16
    # An execution cut short (end of epoch) is not counted.
    tuner.observe(5, 1.0)
    assert tuner.settled and tuner.steps == 16
    # Much slower batches (bigger ones): executions get shorter.
    for _ in range(_auto_steps.SAMPLES):
        tuner.observe(16, 16 * 2e-2)
    assert tuner.settled and tuner.steps == 4


def test_tuner_stops_at_the_last_number_an_epoch_can_hold():
    tuner = _auto_steps.StepsTuner()
    while tuner.steps < 64:
        tuner.observe(tuner.steps, tuner.steps * 1e-3 / tuner.steps)  # always faster
    tuner.fit_within(200)
    assert not tuner.settled and tuner.steps == 64
    while tuner.steps == 64:
        tuner.observe(64, 64 * 1e-5)
    assert tuner.steps == 256 and not tuner.settled
    tuner.fit_within(200)  # 256 never runs in full in an epoch of 200
    assert tuner.settled and tuner.steps == 64


def test_tuner_keeps_executions_short_enough_for_callbacks_to_update():
    tuner = _auto_steps.StepsTuner()
    while not tuner.settled:
        tuner.observe(tuner.steps, tuner.steps * 0.02)  # 20 ms per batch, no gain
    assert tuner.steps == 4  # 16 batches of 20 ms: over 0.2 s
    tuner = _auto_steps.StepsTuner()
    while not tuner.settled:  # always faster per batch, but 4 * 16 * 5 ms > 0.2 s
        tuner.observe(tuner.steps, tuner.steps * 0.005 / tuner.steps ** 0.1)
    assert tuner.steps * 0.005 <= _auto_steps.MAX_SECONDS
    assert tuner.steps == 16


def test_auto_is_kept_in_the_compile_config(digits, tmp_path):
    model = models.mlp(customfit.CustomModel)
    model.compile("adam", "sparse_categorical_crossentropy", steps_per_execution="auto")
    assert model.get_compile_config()["steps_per_execution"] == "auto"
    model.fit(digits[0][:64], digits[1][:64], batch_size=16, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded._auto_steps is not None and loaded.steps_per_execution == 1
    recompiled = json.loads(json.dumps(loaded.get_compile_config()))
    assert recompiled["steps_per_execution"] == "auto"
