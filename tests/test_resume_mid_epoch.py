"""`BackupAndRestore(save_freq=N)`: a fit killed at any batch and started
again continues with the next untrained batch, and ends exactly like a fit
that was never interrupted."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit import ResumeWarning
from customfit.callbacks import BackupAndRestore
from tests import models
from tests.subproc import ROOT
from tests.test_crash_resume import kill_and_restart

SCRIPT = ROOT / "tests" / "scripts" / "resumable_mid_epoch.py"
CASES = ["arrays", "dataset", "dataset-2-replicas"]
KILL_AFTER = (1, 4)  # epoch, batch (of 8): the last backup is after batch 2
BACKED_UP = 3  # batches of epoch 1 in that backup (save_freq=3)


def case_runs(directory):
    """Each process's run of one case, in start order."""
    files = sorted(directory.glob("run-*.json"), key=lambda f: f.stat().st_mtime)
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkilled_mid_epoch_resumes_at_the_next_batch_bit_for_bit(tmp_path):
    def check_killed(crashed_out):
        for case in CASES:  # every case was killed mid-epoch, backed up mid-epoch
            backup = json.loads((crashed_out / case / "backup" / "backup.json").read_text())
            assert (backup["epoch"], backup["batch"]) == (KILL_AFTER[0], BACKED_UP), case
            assert not (crashed_out / case / "final.npz").exists()

    reference_out, crashed_out = kill_and_restart(SCRIPT, tmp_path, KILL_AFTER, check_killed)
    for case in CASES:
        (expected,) = case_runs(reference_out / case)
        (resumed,) = case_runs(crashed_out / case)  # the killed process wrote none
        # The resumed epoch's callbacks start at the first batch not backed up,
        # with its real number; every batch's running means are the reference's.
        first = resumed["batches"][0][:2]
        assert first == [KILL_AFTER[0], BACKED_UP], case
        reference_batches = {(e, b): logs for e, b, logs in expected["batches"]}
        assert len(resumed["batches"]) == len(reference_batches) - 8 - BACKED_UP, case
        for epoch, batch, logs in resumed["batches"]:
            assert logs == reference_batches[epoch, batch], (case, epoch, batch)
        assert sorted(resumed["epochs"]) == ["1", "2"], case
        for epoch, logs in resumed["epochs"].items():
            assert logs == expected["epochs"][epoch], (case, epoch)
        final = np.load(crashed_out / case / "final.npz")
        reference_final = np.load(reference_out / case / "final.npz")
        assert sorted(final.files) == sorted(reference_final.files)
        for key in reference_final.files:
            np.testing.assert_array_equal(final[key], reference_final[key],
                                          err_msg=f"{case}: {key}")
        assert not (crashed_out / case / "backup").exists()


class Interrupt(keras.callbacks.Callback):
    """Stands for a crash: raises at the end of one batch."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise KeyboardInterrupt


class Batches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen, self.epoch = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append((self.epoch, batch, {k: float(v) for k, v in logs.items()}))


class Logged(customfit.CustomModel):
    """Logs with each reduction, weighted and not, scalars and a vector: the
    resumed epoch's columns continue from the backed-up running values."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        self.log("confidence", tf.reduce_max(y_pred, axis=-1))
        self.log("weighted_loss", loss, weight=tf.shape(x)[0] - y[0])
        return loss

    def transform_gradients(self, gradients, variables):
        self.log("grad_norm", tf.linalg.global_norm(gradients))
        self.log("last_grad_norm", tf.linalg.global_norm(gradients), reduction="last")
        return gradients


def train(base, backup, digits, interrupt=None, **fit_kwargs):
    """3 epochs of 8 batches; returns (state, history, batches) or None when
    interrupted. Each call starts from the same seed, like a new process."""
    keras.utils.set_random_seed(2)
    model = models.mlp(base, dropout=0.3)
    model.compile(keras.optimizers.SGD(0.3, momentum=0.9),
                  "sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=fit_kwargs.pop("steps_per_execution", 1))
    batches = Batches()
    callbacks = [backup, batches] + ([Interrupt(*interrupt)] if interrupt else [])
    x, y = digits[0][:256], digits[1][:256]
    try:
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=True, verbose=0,
                             callbacks=callbacks, **fit_kwargs)
    except KeyboardInterrupt:
        return None
    state = [v.numpy() for v in model.variables + model.optimizer.variables]
    return state, history.history, batches.seen


def assert_same_state(state, expected):
    assert len(state) == len(expected)
    for value, reference in zip(state, expected):
        np.testing.assert_array_equal(value, reference)


@pytest.mark.slow
def test_interrupted_fit_resumes_at_the_next_execution_exactly(tmp_path, digits):
    """In one process (an exception stands for the crash; the SIGKILL test
    above covers real kills), with 2 batches per execution and validation:
    backups at execution boundaries; weights, optimizer state, History and
    every per-batch log equal the uninterrupted run's."""
    steps_per_execution = 2
    kwargs = dict(steps_per_execution=steps_per_execution,
                  validation_data=(digits[0][256:320], digits[1][256:320]))
    expected, expected_history, expected_batches = train(
        Logged, BackupAndRestore(tmp_path / "a", save_freq=3), digits, **kwargs)
    assert train(Logged, BackupAndRestore(tmp_path / "b", save_freq=3), digits,
                 interrupt=(1, 5), **kwargs) is None
    saved = json.loads((tmp_path / "b" / "backup.json").read_text())
    # Backups at execution boundaries: after 3 batches, or 4 with 2 per call.
    assert (saved["epoch"], saved["batch"]) == (1, 3 if steps_per_execution == 1 else 4)
    state, history, batches = train(
        Logged, BackupAndRestore(tmp_path / "b", save_freq=3), digits, **kwargs)
    assert_same_state(state, expected)
    assert history == {k: v[1:] for k, v in expected_history.items()}
    # The real batch numbers, one call per batch (customfit/_per_batch.py).
    assert batches[0][:2] == (1, saved["batch"])
    reference = {(e, b): logs for e, b, logs in expected_batches}
    assert len(batches) == len(expected_batches) - len(
        [1 for e, b, _ in expected_batches if (e, b) < (1, saved["batch"])])
    for epoch, batch, logs in batches:
        assert logs == reference[epoch, batch], (epoch, batch)


@pytest.mark.slow
def test_stock_keras_backup_retrains_the_first_batches_of_the_resumed_epoch(
        tmp_path, digits):
    """Keras' own callback with save_freq records the batch but starts the
    epoch again: batches trained twice, metrics restarted, other weights."""
    assert train(keras.Model, keras.callbacks.BackupAndRestore(tmp_path / "b", save_freq=3),
                 digits, interrupt=(1, 5)) is None
    state, _, batches = train(
        keras.Model, keras.callbacks.BackupAndRestore(tmp_path / "b", save_freq=3), digits)
    assert batches[0][:2] == (1, 0)  # the resumed epoch starts from its first batch
    # An uninterrupted run ends after 3 epochs x 8 batches = 24 optimizer
    # steps. Keras counts save_freq across epochs (its last backup came after
    # 8 + 4 batches) and trains those 4 batches of epoch 1 again.
    (iterations,) = [v for v in state if v.shape == () and v.dtype.kind == "i"]
    assert int(iterations) == 24 + 4


def test_generator_input_warns_that_it_cannot_be_resumed_exactly(tmp_path, digits):
    def batches():
        while True:
            for start in range(0, 64, 32):
                yield digits[0][start:start + 32], digits[1][start:start + 32]

    model = models.mlp(customfit.CustomModel, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.warns(ResumeWarning, match="generator.*steps_per_epoch"):
        model.fit(batches(), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False,
                  callbacks=[BackupAndRestore(tmp_path / "b", save_freq=1)])
    with pytest.warns(ResumeWarning, match="PyDataset"):
        model.fit(Sequence(digits), epochs=1, verbose=0, shuffle=False,
                  callbacks=[BackupAndRestore(tmp_path / "c", save_freq=1)])


class Sequence(keras.utils.PyDataset):
    def __init__(self, digits):
        super().__init__()
        self.x, self.y = digits[0][:64], digits[1][:64]

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return self.x[32 * index:32 * index + 32], self.y[32 * index:32 * index + 32]


def test_batch_backups_need_a_custom_model_and_a_valid_frequency(tmp_path, digits):
    model = models.mlp(keras.Model, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="customfit.CustomModel"):
        model.fit(digits[0][:32], digits[1][:32], epochs=1, verbose=0,
                  callbacks=[BackupAndRestore(tmp_path / "b", save_freq=2)])
    for bad in (0, -1, 1.5, True, "batch"):
        with pytest.raises(ValueError, match="save_freq"):
            BackupAndRestore(tmp_path / "b", save_freq=bad)


@pytest.mark.slow
@pytest.mark.parametrize("base, backup", [
    (customfit.CustomModel, BackupAndRestore),
    (keras.Model, keras.callbacks.BackupAndRestore),
])
def test_epoch_backup_resumes_a_reshuffling_dataset_in_its_epochs_order(
        tmp_path, digits, base, backup):
    """Each epoch of `shuffle(..., reshuffle_each_iteration=True)` has its own
    order; a resumed fit must give the resumed epoch the same one. customfit
    makes (and drops) the iterators the interrupted process had made; Keras'
    callback starts the resumed epoch with the first epoch's order."""

    def run(directory, interrupt=None):
        keras.utils.set_random_seed(2)
        model = models.mlp(base, dropout=0)
        model.compile(keras.optimizers.SGD(0.3), "sparse_categorical_crossentropy")
        data = tf.data.Dataset.from_tensor_slices((digits[0][:256], digits[1][:256]))
        data = data.shuffle(256, seed=4, reshuffle_each_iteration=True).batch(32)
        callbacks = [backup(tmp_path / directory)] + (
            [Interrupt(*interrupt)] if interrupt else [])
        try:
            model.fit(data, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        except KeyboardInterrupt:
            return None
        return [v.numpy() for v in model.variables + model.optimizer.variables]

    expected = run("a")
    assert run("b", interrupt=(2, 3)) is None
    resumed = run("b")
    if base is keras.Model:
        assert any(not np.array_equal(a, b) for a, b in zip(resumed, expected))
    else:
        assert_same_state(resumed, expected)


def test_step_function_traced_ahead_creates_lazy_variables_and_is_reused(digits):
    """BackupAndRestore traces the step before the resumed epoch's first batch,
    so that metrics created while tracing exist when their values are restored."""
    traces = []

    class Logged(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            traces.append(1)
            self.log("norm", tf.linalg.global_norm(gradients))
            return gradients

    model = models.mlp(Logged, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    function = model.make_train_function()
    dataset = tf.data.Dataset.from_tensor_slices(digits).batch(16)
    iterator = iter(dataset)
    before = [w.numpy() for w in model.weights]
    assert function.trace_ahead(iterator)
    assert [m.name for m in model._step_logs.metrics] == ["norm"]
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    assert int(model.optimizer.iterations) == 0
    traced = len(traces)
    function(iterator)
    assert len(traces) == traced  # the call ran the traced step: no new trace
    assert int(model.optimizer.iterations) == 1
    eager = models.mlp(customfit.CustomModel, dropout=0)
    eager.compile("sgd", "sparse_categorical_crossentropy", run_eagerly=True)
    assert not eager.make_train_function().trace_ahead(iter(dataset))
