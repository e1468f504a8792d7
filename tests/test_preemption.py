"""SIGTERM during `CustomModel.fit` with `customfit.callbacks.BackupAndRestore`:
the batch (or execution) under way finishes, a backup of the state after it is
written, and `fit` raises `customfit.Preempted` before another batch runs; a
second `fit` resumes there exactly. Here the process signals itself from a
callback, in one process; tests/test_crash_resume.py sends a real SIGTERM to a
training process from outside and restarts it."""

import json
import os
import signal
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit.callbacks import BackupAndRestore
from customfit import _preemption
from tests import models
from tests.subproc import run_python

EPOCHS, BATCHES = 3, 8  # 256 samples in batches of 32


class SigtermAt(keras.callbacks.Callback):
    """Sends this process SIGTERM at the end of batch `at = (epoch, batch)`,
    `times` times in a row; records every batch whose step ran."""

    def __init__(self, at, times=1):
        super().__init__()
        self.at, self.times, self.epoch = tuple(at), times, None
        self.trained = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.trained.append((self.epoch, batch))
        if (self.epoch, batch) == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGTERM)


class UserHandler:
    """A program's own SIGTERM handler, installed for one test."""

    def __init__(self, raises=None):
        self.calls, self.raises = 0, raises

    def __call__(self, signum, frame):
        self.calls += 1
        if self.raises is not None:
            raise self.raises


@pytest.fixture
def user_handler():
    handler = UserHandler()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopAfterEpoch(keras.callbacks.Callback):
    """Ends training after epoch 1, as EarlyStopping would."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            self.model.stop_training = True


def inputs(digits, kind):
    """The same 8 batches of 32 as arrays shuffled by `fit`, as a `tf.data`
    pipeline whose length `fit` cannot know (filtered), or as a generator."""
    x, y = digits[0][:256], digits[1][:256]
    if kind == "arrays":
        return dict(x=x, y=y, batch_size=32, shuffle=True)
    if kind == "unknown_length":
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True)
        return dict(x=dataset.shuffle(256, seed=4).batch(32), shuffle=False)

    def generator():
        while True:
            for start in range(0, 256, 32):
                yield x[start:start + 32], y[start:start + 32]
    return dict(x=generator(), steps_per_epoch=BATCHES, shuffle=False)


def train(digits, backup_dir, sigterm_at=None, times=1, steps_per_execution=1,
          data="arrays", callbacks=(), **backup):
    """3 epochs of 8 batches from one seed, as a new process would; returns
    (final state, History, the batches trained), or the `Preempted` raised
    and the batches trained before it."""
    keras.utils.set_random_seed(3)
    model = models.mlp(customfit.CustomModel, dropout=0.3)
    model.compile(keras.optimizers.SGD(0.3, momentum=0.9), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    recorder = SigtermAt(sigterm_at or (-1, -1), times)
    try:
        with warnings.catch_warnings():
            # Keras' own, after the first epoch of data of unknown length.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            history = model.fit(**inputs(digits, data), epochs=EPOCHS, verbose=0,
                                callbacks=[BackupAndRestore(backup_dir, **backup), recorder,
                                           *callbacks])
    except customfit.Preempted as stopped:
        return stopped, recorder.trained
    state = [v.numpy() for v in model.variables + model.optimizer.variables]
    return (state, history.history), recorder.trained


def backup_position(directory):
    saved = json.loads((directory / "backup.json").read_text())
    return saved["epoch"], saved["batch"]


def assert_same_state(state, expected):
    assert len(state) == len(expected)
    for value, reference in zip(state, expected):
        np.testing.assert_array_equal(value, reference)


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_execution, data, sigterm_at, backed_up_at", [
    pytest.param(1, "arrays", (1, 4), (1, 5), id="mid-epoch"),
    pytest.param(4, "arrays", (1, 1), (1, 4), id="mid-execution"),
    pytest.param(1, "arrays", (1, 7), (2, 0), id="last-batch"),
    # Keras learns that the data ended by asking for batch 8.
    pytest.param(1, "unknown_length", (1, 7), (1, 8), id="last-batch-of-unknown-length"),
])
def test_sigterm_backs_up_the_batch_under_way_and_resumes_exactly(
        tmp_path, digits, user_handler, steps_per_execution, data, sigterm_at, backed_up_at):
    """save_freq="epoch", yet the backup is taken at the batch after the one
    the SIGTERM arrived in (with 4 batches per execution: after the
    execution); the restart trains from there and ends as a run that was
    never interrupted, bit for bit."""
    kwargs = dict(steps_per_execution=steps_per_execution, data=data)
    (expected, expected_history), expected_batches = train(
        digits, tmp_path / "reference", **kwargs)

    stopped, trained = train(digits, tmp_path / "backup", sigterm_at, **kwargs)
    assert isinstance(stopped, customfit.Preempted)
    assert (stopped.epoch, stopped.batch) == backed_up_at
    assert str(tmp_path / "backup") in str(stopped)
    assert backup_position(tmp_path / "backup") == backed_up_at
    # No batch ran after the backup; the program's own handler was called
    # once the backup was written, and is back in place.
    assert trained == [b for b in expected_batches if b < backed_up_at]
    assert user_handler.calls == 1
    assert signal.getsignal(signal.SIGTERM) is user_handler

    (state, history), resumed = train(digits, tmp_path / "backup", **kwargs)
    assert resumed == [b for b in expected_batches if b >= backed_up_at]
    assert_same_state(state, expected)
    assert history == {k: v[backed_up_at[0]:] for k, v in expected_history.items()}
    assert not (tmp_path / "backup").exists()  # removed after the finished run


@pytest.mark.slow
def test_sigterm_in_the_last_batch_of_fit_keeps_the_final_backup(tmp_path, digits, user_handler):
    """Training is over, but the program was asked to end: the final state
    is kept, not deleted, and a restart finds nothing left to train."""
    (expected, _), _ = train(digits, tmp_path / "reference")
    stopped, _ = train(digits, tmp_path / "backup", sigterm_at=(EPOCHS - 1, BATCHES - 1))
    assert (stopped.epoch, stopped.batch) == (EPOCHS, 0)
    assert backup_position(tmp_path / "backup") == (EPOCHS, 0)
    (state, history), resumed = train(digits, tmp_path / "backup")
    assert resumed == [] and history == {}
    assert_same_state(state, expected)


def test_second_sigterm_goes_to_the_previous_handler_at_once(tmp_path, digits):
    """The second SIGTERM does not wait for a backup: the program's handler
    (here one that raises, as one that exits would) ends `fit` where it is,
    and the last complete backup (after epoch 1) is what a restart uses."""
    handler = UserHandler(raises=SystemExit(143))
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(SystemExit):
            train(digits, tmp_path / "backup", sigterm_at=(1, 4), times=2)
        assert handler.calls == 1
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert backup_position(tmp_path / "backup") == (1, 0)


class HandlerDuringFit(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.seen = signal.getsignal(signal.SIGTERM)


def test_sigterm_is_left_alone_without_backup_and_restored_after_fit(tmp_path, digits,
                                                                     user_handler):
    x, y = digits[0][:64], digits[1][:64]
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    during = HandlerDuringFit()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[during])
    assert during.seen is user_handler
    model.fit(x, y, epochs=1, verbose=0, callbacks=[BackupAndRestore(tmp_path / "b"), during])
    assert during.seen is not user_handler  # fit's own, while it runs
    assert signal.getsignal(signal.SIGTERM) is user_handler


def test_sigterm_before_any_batch_stops_with_nothing_to_back_up(tmp_path, digits,
                                                               user_handler):
    class SigtermAtStart(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            os.kill(os.getpid(), signal.SIGTERM)

    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(customfit.Preempted, match="no batch was trained"):
        model.fit(digits[0][:64], digits[1][:64], epochs=1, verbose=0,
                  callbacks=[BackupAndRestore(tmp_path / "b"), SigtermAtStart()])
    assert user_handler.calls == 1
    assert not (tmp_path / "b" / "backup.json").exists()


def test_keras_own_backup_callback_on_custom_model_is_pointed_at_customfits(tmp_path, digits):
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.warns(customfit.ResumeWarning,
                      match="customfit.callbacks.BackupAndRestore takes the same"):
        model.fit(digits[0][:64], digits[1][:64], epochs=1, verbose=0,
                  callbacks=[keras.callbacks.BackupAndRestore(tmp_path / "b")])


@pytest.mark.slow
def test_sigterm_after_early_stopping_leaves_nothing_to_train(tmp_path, digits, user_handler):
    """A callback ended training in the epoch the SIGTERM arrived in: the
    backup records training as done, as the uninterrupted run ended."""
    (expected, expected_history), _ = train(digits, tmp_path / "reference",
                                            callbacks=[StopAfterEpoch()])
    assert len(expected_history["loss"]) == 2
    stopped, _ = train(digits, tmp_path / "backup", sigterm_at=(1, 7),
                       callbacks=[StopAfterEpoch()])
    assert (stopped.epoch, stopped.batch) == (EPOCHS, 0)
    (state, history), resumed = train(digits, tmp_path / "backup", callbacks=[StopAfterEpoch()])
    assert resumed == [] and history == {}
    assert_same_state(state, expected)


def test_input_that_cannot_resume_mid_epoch_keeps_the_epochs_backup(tmp_path, digits,
                                                                    user_handler):
    """A generator's position is not saved: a backup mid-epoch would not
    resume exactly, so the last backup (after epoch 1) stays, and the
    message says why."""
    stopped, trained = train(digits, tmp_path / "backup", sigterm_at=(1, 3), data="generator")
    assert "would not resume exactly: the input is a Python generator" in str(stopped)
    assert (stopped.epoch, stopped.batch) == (1, 0)
    assert trained[-1] == (1, 3)
    assert backup_position(tmp_path / "backup") == (1, 0)


def test_sigterm_is_noted_when_stderr_is_gone():
    """The handler's note on stderr may fail (a pipe whose reader ended);
    that must not reach the training code, nor lose the request."""
    reader, writer = os.pipe()
    os.close(reader)
    saved_stderr = os.dup(2)
    previous = signal.signal(signal.SIGTERM, UserHandler())
    try:
        os.dup2(writer, 2)
        with _preemption.SigtermWatch() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
            requested = watch.requested
            watch.acted()
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(writer)
        signal.signal(signal.SIGTERM, previous)
    assert requested


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_native_sigterm_handler_is_left_in_place():
    """A handler installed in C (as TensorFlow's coordination service does),
    which Python reports as SIG_DFL, is not replaced, and still runs."""
    out = run_python("""
        import ctypes, os, signal, time
        from customfit._preemption import SigtermWatch

        @ctypes.CFUNCTYPE(None, ctypes.c_int)
        def native(signum):
            os.write(1, b"native handler ran\\n")

        ctypes.CDLL(None).signal(signal.SIGTERM, native)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with SigtermWatch() as watch:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("requested:", watch.requested)
    """)
    assert out == "native handler ran\nrequested: False\n"
