"""What customfit promises on every Keras backend, one file for all: it runs
in the TensorFlow suite and, with KERAS_BACKEND=jax, in `nox -s jax`.

Each test is written with `keras.ops` and runs on the backend of the
process (`customfit._backend.BACKEND` names it in the test ids' reports);
stock `keras.Model` on that same backend is the reference.
"""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import customfit
from customfit.pytest_plugin import deterministic
from tests.subproc import ROOT

BACKEND = keras.backend.backend()


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return (data.data[:512] / 16.0).astype("float32"), data.target[:512].astype("int32")


def mlp(base):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dropout(0.2)(keras.layers.Dense(32, activation="relu")(inputs))
    return base(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


def trained(base, x, y, steps_per_execution=1, callbacks=(), batch_size=32, **fit):
    deterministic(3)
    model = mlp(base)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    history = model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0,
                        callbacks=list(callbacks), **fit)
    return model, history.history


def test_the_default_step_equals_stock_fit_bit_for_bit(digits):
    x, y = digits
    stock, stock_history = trained(keras.Model, x, y, validation_split=0.25)
    custom, custom_history = trained(customfit.CustomModel, x, y, validation_split=0.25)
    assert custom_history == stock_history
    for a, b in zip(custom.get_weights(), stock.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(custom.optimizer.variables, stock.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    assert custom.evaluate(x, y, verbose=0) == stock.evaluate(x, y, verbose=0)
    np.testing.assert_array_equal(custom.predict(x, verbose=0), stock.predict(x, verbose=0))


class BatchLogs(keras.callbacks.Callback):
    reads_only_logs = True  # lets "auto" run several batches per execution

    def __init__(self):
        super().__init__()
        self.train, self.test = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.train.append((batch, dict(logs)))

    def on_test_batch_end(self, batch, logs=None):
        self.test.append((batch, dict(logs)))


@pytest.mark.parametrize("steps_per_execution, batch_size", [(4, 32), ("auto", 32), (20, 8)])
def test_every_batch_reaches_the_callbacks_as_with_one_step_per_execution(
        digits, steps_per_execution, batch_size):
    """With 20 batches of 8 per execution, executions of 20, 20 and 8 (on
    JAX: scans of 20, 20, 4 and 4 batches)."""
    x, y = digits
    one, many = BatchLogs(), BatchLogs()
    _, one_history = trained(customfit.CustomModel, x, y, 1, [one], batch_size,
                             validation_split=0.25)
    _, many_history = trained(customfit.CustomModel, x, y, steps_per_execution, [many],
                              batch_size, validation_split=0.25)
    per_epoch = 384 // batch_size
    assert len(one.train) == 2 * per_epoch and len(one.test) == 2 * per_epoch // 3
    assert many.train == one.train
    assert many.test == one.test
    assert many_history == one_history


class EpochLogs(keras.callbacks.Callback):
    """No per-batch method: an execution's batches are not replayed to it."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(dict(logs))


@pytest.mark.parametrize("steps_per_execution", [4, "auto"])
def test_callbacks_without_batch_methods_see_the_epochs_of_one_step_per_execution(
        digits, steps_per_execution):
    x, y = digits[0][:480], digits[1][:480]  # 15 batches: the last execution of 4 is short
    one, many = EpochLogs(), EpochLogs()
    one_model, one_history = trained(customfit.CustomModel, x, y, 1, [one])
    many_model, many_history = trained(customfit.CustomModel, x, y, steps_per_execution, [many])
    assert len(one.epochs) == 2
    assert many.epochs == one.epochs
    assert many_history == one_history
    for a, b in zip(many_model.get_weights(), one_model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_run_modes(digits):
    x, y = digits
    model = mlp(customfit.CustomModel)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    seen = BatchLogs()
    history = model.fit(x, y, batch_size=32, epochs=5, validation_split=0.25, quick_run=2,
                        callbacks=[seen], verbose=0).history
    assert [b for b, _ in seen.train] == [0, 1] and [b for b, _ in seen.test] == [0, 1]
    assert list(history) == ["loss", "val_loss"] and len(history["loss"]) == 1

    losses = model.fit(x, y, batch_size=32, epochs=50, overfit_batches=1,
                       verbose=0).history["loss"]
    assert losses[-1] < 0.1 * losses[0]  # one batch, learned by heart

    seen = BatchLogs()
    model.fit(x, y, batch_size=32, epochs=1, validation_split=0.25, validate_every_n_batches=4,
              callbacks=[seen], verbose=0)
    validated = [b for b, logs in seen.train if "val_loss" in logs]
    assert validated == [3, 7, 11]


KILL_AT = (1, 7)  # epoch, batch: two batches after the backup at batch 5


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_run_killed_mid_epoch_and_restarted_ends_as_one_never_killed(tmp_path):
    script = ROOT / "tests" / "scripts" / "backend_neutral_training.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": BACKEND}

    def start(out, *extra):
        with open(tmp_path / f"{out.name}.log", "a") as log:
            return subprocess.Popen([sys.executable, str(script), str(out), *extra], cwd=ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    processes = [start(reference), start(killed, "--pause-once-at", "{}:{}".format(*KILL_AT))]
    try:
        deadline = time.monotonic() + 300
        while not (killed / "paused").exists():
            assert processes[1].poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGKILL)
        assert processes[1].wait(timeout=60) == -signal.SIGKILL
        backup = json.loads((killed / "backup" / "backup.json").read_text())
        assert (backup["epoch"], backup["batch"]) == (1, 5)  # mid-epoch
        processes.append(start(killed))
        for process in (processes[0], processes[2]):
            assert process.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()

    ((reference_run,),) = [[json.loads(f.read_text()) for f in reference.glob("run-*.json")]]
    ((resumed_run,),) = [[json.loads(f.read_text()) for f in killed.glob("run-*.json")]]
    # The restart trains the batches after the backup, and nothing before.
    assert [tuple(b) for b in resumed_run["batches"]] == [
        tuple(b) for b in reference_run["batches"] if tuple(b) >= (1, 5)]
    for epoch, logs in resumed_run["epochs"].items():
        assert logs == reference_run["epochs"][epoch], epoch
    final, expected = np.load(killed / "final.npz"), np.load(reference / "final.npz")
    assert sorted(final.files) == sorted(expected.files)
    for key in expected.files:
        np.testing.assert_array_equal(final[key], expected[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_check_command_matches_stock_bit_for_bit():
    result = subprocess.run([sys.executable, "-m", "customfit", "check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "KERAS_BACKEND": BACKEND,
                                 "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "6 of 6 checks match bit for bit" in result.stdout


def test_keras_backup_and_restore_is_flagged_at_the_callers_line(digits, tmp_path):
    x, y = digits
    model = mlp(customfit.CustomModel)
    model.compile("adam", "sparse_categorical_crossentropy")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path))
    with pytest.warns(customfit.ResumeWarning) as caught:
        model.fit(x[:64], y[:64], callbacks=[backup], verbose=0)
    assert caught[0].filename == __file__


class TwoOptimizers(customfit.CustomModel):
    """The head trained by its own optimizer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_optimizer = keras.optimizers.SGD(0.1)

    def apply_gradients(self, gradients, variables):
        head = {id(v) for v in self.layers[-1].trainable_variables}
        pairs = list(zip(gradients, variables))
        super().apply_gradients([g for g, v in pairs if id(v) not in head],
                                [v for g, v in pairs if id(v) not in head])
        self.head_optimizer.apply([g for g, v in pairs if id(v) in head],
                                  [v for g, v in pairs if id(v) in head])


def test_learning_rate_callbacks_set_every_optimizer(digits):
    x, y = digits
    model = mlp(TwoOptimizers)
    model.compile(keras.optimizers.SGD(0.2), "sparse_categorical_crossentropy")
    halve = customfit.callbacks.LearningRateScheduler(lambda epoch, lr: lr / 2 if epoch else lr)
    plateau = customfit.callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=0,
                                                    min_delta=10.0)  # never improves enough
    history = model.fit(x, y, batch_size=64, epochs=3, callbacks=[halve, plateau],
                        verbose=0).history
    # Halved when epochs 1 and 2 start, and by the plateau after epoch 1 (the
    # first epoch sets its best), after its rate was logged.
    np.testing.assert_allclose(history["learning_rate"], [0.2, 0.1, 0.025], rtol=1e-6)
    np.testing.assert_allclose(history["learning_rate_head_optimizer"], [0.1, 0.05, 0.0125],
                               rtol=1e-6)


def test_a_backup_from_another_backend_is_refused_before_anything_loads(digits, tmp_path):
    x, y = digits
    model = mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    backup = customfit.callbacks.BackupAndRestore(tmp_path, save_freq=4)

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 5:
                raise RuntimeError("crash")

    crash = Crash()
    with pytest.raises(RuntimeError, match="crash"):
        model.fit(x[:256], y[:256], batch_size=32, epochs=2, verbose=0, callbacks=[backup, crash])
    state_path = tmp_path / "backup.json"
    state = json.loads(state_path.read_text())
    assert state["backend"] == BACKEND
    other = "jax" if BACKEND == "tensorflow" else "tensorflow"
    state_path.write_text(json.dumps({**state, "backend": other}))
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=f"written under Keras' {other} backend.*"
                                         f"KERAS_BACKEND={other}.*Nothing was loaded"):
        model.fit(x[:256], y[:256], batch_size=32, epochs=2, verbose=0, callbacks=[backup])
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
