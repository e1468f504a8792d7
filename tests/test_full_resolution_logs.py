"""With `steps_per_execution=k`, CustomModel's callbacks and TensorBoard see
every batch, with its own index, logs and summary step, exactly as with k=1;
stock keras.Model's see one batch per execution."""

import inspect
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import customfit
from tests import models
from tests.subproc import run_python

# 300 samples in batches of 32: 10 batches per epoch, run by k=4 as
# executions of 4, 4 and 2 batches; 64 validation samples: 2 batches.
N, N_VAL, BATCH, EPOCHS = 300, 64, 32, 2
BATCHES = -(-N // BATCH)


class Record(keras.callbacks.Callback):
    """Every batch call of `fit`/`evaluate`, in order, with its logs, and
    the params (progress-bar steps) callbacks are given."""

    reads_only_logs = True  # steps_per_execution="auto" may group batches

    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_begin(self, logs=None):
        self.events.append(("train_params", dict(self.params)))

    def on_test_begin(self, logs=None):
        self.events.append(("test_params", dict(self.params)))

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(("train_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("train_end", batch, dict(logs)))

    def on_test_batch_begin(self, batch, logs=None):
        self.events.append(("test_begin", batch))

    def on_test_batch_end(self, batch, logs=None):
        self.events.append(("test_end", batch, dict(logs)))


class Logged(customfit.CustomModel):
    """Logs the gradient norm with `self.log` and as a `tf.summary` scalar
    from inside the compiled step, and the loss from `test_step`."""

    def transform_gradients(self, gradients, variables):
        norm = tf.linalg.global_norm(gradients)
        self.log("grad_norm", norm)
        tf.summary.scalar("step_grad_norm", norm)
        return gradients

    def test_step(self, data):
        logs = super().test_step(data)
        tf.summary.scalar("step_val_loss", logs["loss"])
        return logs


class StockLogged(keras.Model):
    def train_step(self, data):
        logs = super().train_step(data)
        tf.summary.scalar("step_loss", logs["loss"])
        return logs


def train(base, digits, steps_per_execution, callbacks=(), epochs=EPOCHS, evaluate=True,
          **compile_kwargs):
    """fit with validation, then evaluate; the batch calls each one saw."""
    x, y = digits[0][:N], digits[1][:N]
    validation = digits[0][-N_VAL:], digits[1][-N_VAL:]
    keras.utils.set_random_seed(5)
    model = models.mlp(base)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution,
                  **compile_kwargs)
    fitting, evaluating = Record(), Record()
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0,
                        validation_data=validation, callbacks=[fitting, *callbacks])
    if evaluate:
        model.evaluate(x, y, batch_size=BATCH, verbose=0, callbacks=[evaluating])
    return fitting.events, evaluating.events, history.history


_REFERENCE = {}


def reference(digits):
    """Logged with one step per execution (CustomModel's default step equals
    stock fit there: tests/test_parity.py)."""
    if not _REFERENCE:
        _REFERENCE["run"] = train(Logged, digits, 1)
    return _REFERENCE["run"]


def batch_indices(events, kind):
    return [event[1] for event in events if event[0] == kind]


@pytest.mark.parametrize("steps_per_execution, run_eagerly", [(4, False), (3, True)])
def test_every_batch_reaches_callbacks_as_with_one_step_per_execution(
        digits, steps_per_execution, run_eagerly):
    expected = reference(digits)
    fitting, evaluating, history = train(Logged, digits, steps_per_execution,
                                         run_eagerly=run_eagerly)
    # Begin and end of each batch, in order, also in the last, short execution.
    per_epoch = [e for i in range(BATCHES) for e in (("train_begin", i), ("train_end", i))]
    assert [e[:2] for e in fitting if e[0] in ("train_begin", "train_end")] == per_epoch * EPOCHS
    assert batch_indices(evaluating, "test_end") == list(range(BATCHES))
    assert {"loss", "accuracy", "grad_norm"} == set(fitting[2][2])
    # The batches per epoch (progress-bar target), as Keras counts them.
    assert fitting[0] == ("train_params", {"verbose": 0, "epochs": EPOCHS, "steps": BATCHES})
    assert evaluating[0] == ("test_params", {"verbose": 0, "epochs": 1, "steps": BATCHES})
    # Bit for bit: the same floats for every batch, validation and evaluate.
    assert fitting == expected[0]
    assert evaluating == expected[1]
    assert history == expected[2]


def test_stock_keras_reports_one_batch_per_execution(digits):
    """Pins upstream: with k=4 Keras calls the callbacks once per execution,
    with the last batch's logs only; the end gets the index of the
    execution's last batch (11 for the short last one), or, in Keras 3.10,
    of its first."""
    fitting, evaluating, _ = train(keras.Model, digits, 4)
    assert fitting[0] == ("train_params", {"verbose": 0, "epochs": EPOCHS, "steps": BATCHES})
    assert batch_indices(fitting, "train_begin") == [0, 4, 8] * EPOCHS
    ends = [0, 4, 8] if keras.version().startswith("3.10.") else [3, 7, 11]
    assert batch_indices(fitting, "train_end") == ends * EPOCHS
    assert batch_indices(evaluating, "test_end") == ends
    stock_one, _, _ = train(keras.Model, digits, 1, epochs=1, evaluate=False)
    assert len(batch_indices(stock_one, "train_end")) == BATCHES


def test_unknown_number_of_batches(digits):
    """A dataset of unknown length ends inside an execution that runs no
    step; the batches before it are all reported."""
    dataset = tf.data.Dataset.from_tensor_slices((digits[0][:N], digits[1][:N]))
    dataset = dataset.filter(lambda x, y: True).batch(BATCH)
    runs = []
    for steps_per_execution in (1, 4):
        keras.utils.set_random_seed(5)
        model = models.mlp(Logged)
        model.compile("sgd", "sparse_categorical_crossentropy",
                      steps_per_execution=steps_per_execution)
        record = Record()
        with pytest.warns(UserWarning, match="ran out of data"):
            model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[record])
        runs.append(record.events)
    assert batch_indices(runs[1], "train_end") == list(range(BATCHES))
    assert runs[1][0] == ("train_params", {"verbose": 0, "epochs": 1, "steps": None})
    assert runs[1] == runs[0]


# ------------------------------------------------------------- TensorBoard


def events(run_dir):
    """{tag: [(step, value), ...]} of every scalar written to `run_dir`."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto)))
                  for e in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]}


def tensorboard_run(base, digits, logdir, steps_per_execution, update_freq, epochs=EPOCHS):
    board = keras.callbacks.TensorBoard(str(logdir), update_freq=update_freq, write_graph=False)
    train(base, digits, steps_per_execution, callbacks=[board], epochs=epochs, evaluate=False)
    return events(logdir / "train"), events(logdir / "validation")


def steps(written):
    return [step for step, _ in written]


# Keras 3.15 makes TensorBoard's writer the default again at every batch, with
# the batch number as the step and `update_freq` deciding what is recorded;
# Keras 3.10 to 3.14 do it once, at step 0, when training begins, so summaries
# inside a stock step all land at step 0 and `update_freq` applies to nothing.
WRITER_PER_BATCH = "_push_writer(self._train_writer" in inspect.getsource(
    keras.callbacks.TensorBoard.on_train_batch_begin)


@pytest.mark.slow
def test_summaries_inside_the_step_get_the_real_batch_and_update_freq(digits, tmp_path):
    train4, validation4 = tensorboard_run(Logged, digits, tmp_path / "k4", 4, update_freq=3)
    train1, validation1 = tensorboard_run(Logged, digits, tmp_path / "k1", 1, update_freq=3)
    every_third = list(range(3, EPOCHS * BATCHES + 1, 3))
    # The step's summary at its 1-based batch, every third one; TensorBoard's
    # own batch scalars at the same steps where Keras applies update_freq.
    assert steps(train4["step_grad_norm"]) == every_third
    assert steps(train4["batch_loss"]) == (
        every_third if WRITER_PER_BATCH else list(range(1, EPOCHS * BATCHES + 1)))
    # Validation batches count on across epochs, as TensorBoard counts them.
    assert steps(validation4["step_val_loss"]) == [3]
    # Epoch 1 ends at batch 10, epoch 2 at 20, neither a multiple of 3.
    assert steps(train4["epoch_loss"]) == steps(validation4["epoch_loss"]) == [0, 1]
    assert train4 == train1 and validation4 == validation1


def test_summaries_inside_the_step_every_batch(digits, tmp_path):
    train4, validation4 = tensorboard_run(Logged, digits, tmp_path, 4, update_freq="batch")
    assert steps(train4["step_grad_norm"]) == list(range(1, EPOCHS * BATCHES + 1))
    assert steps(validation4["step_val_loss"]) == list(range(1, EPOCHS * 2 + 1))
    values = [v for _, v in train4["step_grad_norm"]]
    assert len(set(values)) == len(values)  # one value per batch, not repeated


@pytest.mark.slow
def test_stock_keras_summaries_inside_the_step(digits, tmp_path):
    """Pins upstream: the step's summaries keep the step and the record
    decision of the moment the step was traced: batch 1 in Keras 3.15, where
    with an integer update_freq the epoch scalars are also lost when an
    epoch's last batch is not a multiple of it; step 0 and always recorded
    in Keras 3.10 to 3.14 (see WRITER_PER_BATCH)."""
    train1, _ = tensorboard_run(StockLogged, digits, tmp_path / "f1", 1, update_freq=1, epochs=1)
    train3, _ = tensorboard_run(StockLogged, digits, tmp_path / "f3", 1, update_freq=3, epochs=1)
    if WRITER_PER_BATCH:
        assert steps(train1["step_loss"]) == [1] * BATCHES
        assert "step_loss" not in train3 and "epoch_loss" not in train3
        assert steps(train3["batch_loss"]) == [3, 6, 9]
    else:
        assert steps(train1["step_loss"]) == steps(train3["step_loss"]) == [0] * BATCHES
        assert steps(train3["epoch_loss"]) == [0]
        assert steps(train3["batch_loss"]) == list(range(1, BATCHES + 1))


# ----------------------------------------- distribution and XLA, in subprocesses

RECORD_IN_SUBPROCESS = """
import json
from sklearn.datasets import load_digits
from tests.test_full_resolution_logs import Logged, train

data = load_digits()
digits = (data.data / 16).astype("float32"), data.target.astype("int32")
runs = {}
for k in (1, 4, "auto"):
    with STRATEGY.scope():
        runs[k] = train(Logged, digits, k, epochs=1, **COMPILE)
print("RUNS" + json.dumps(runs))
"""


def _runs(out):
    """The runs with steps_per_execution 1 and 4, after checking that the
    one with "auto" (one batch per execution at first, then more) equals
    the one with 1."""
    runs = json.loads(out.split("RUNS", 1)[1])
    assert runs["auto"] == runs["1"]
    return runs["1"], runs["4"]


STOCK_ON_TWO_REPLICAS = """
import keras
from sklearn.datasets import load_digits
from tests.test_full_resolution_logs import train

data = load_digits()
try:
    with STRATEGY.scope():
        train(keras.Model, ((data.data / 16).astype("float32"), data.target.astype("int32")),
              4, epochs=1, evaluate=False)
    print("STOCK trains")
except tf.errors.InvalidArgumentError as error:
    print("STOCK fails:", "You must feed a value for placeholder tensor" in str(error))
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_report_every_batch(digits):
    """Also pins upstream: stock fit with steps_per_execution > 1 fails
    under MirroredStrategy (a tf.cond around the step in Keras' loop)."""
    out = run_python(
        "STRATEGY = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])\nCOMPILE = {}\n"
        + STOCK_ON_TWO_REPLICAS + RECORD_IN_SUBPROCESS, two_cpus=True)
    assert "STOCK fails: True" in out
    one, four = _runs(out)
    assert batch_indices(four[0], "train_end") == list(range(BATCHES))
    assert batch_indices(four[1], "test_end") == list(range(BATCHES))
    assert four == one


@pytest.mark.slow
@pytest.mark.multiprocess
def test_xla_reports_every_batch():
    # Keras turns XLA off under op determinism; XLA on CPU is reproducible.
    one, four = _runs(run_python(
        "import tensorflow as tf\nSTRATEGY = tf.distribute.get_strategy()\n"
        "COMPILE = {'jit_compile': True}\n" + RECORD_IN_SUBPROCESS))
    assert batch_indices(four[0], "train_end") == list(range(BATCHES))
    assert batch_indices(four[1], "test_end") == list(range(BATCHES))
    assert four == one


def _plain(value):
    """`value` with every array as a list, so that runs compare with ==."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # NumPy or TensorFlow
        return np.asarray(value).tolist()
    return value


@pytest.mark.slow
def test_vector_metric_reaches_callbacks_history_and_evaluate(digits):
    """`F1Score(average=None)` logs one value per class. On CustomModel it
    reaches callbacks (with k=4 too), History and evaluate as with stock fit
    and k=1."""
    x, y = digits[0][:N], keras.utils.to_categorical(digits[1][:N], 10)
    runs = []
    for base, steps_per_execution in ((keras.Model, 1), (customfit.CustomModel, 1),
                                      (customfit.CustomModel, 4)):
        model = f1_model(base, steps_per_execution)
        fitting, evaluating = Record(), Record()
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                            validation_data=(x[:N_VAL], y[:N_VAL]), callbacks=[fitting])
        evaluated = model.evaluate(x, y, batch_size=BATCH, verbose=0, callbacks=[evaluating],
                                   return_dict=True)
        runs.append(_plain([fitting.events, evaluating.events, history.history, evaluated]))
    stock, one, four = runs
    assert len(stock[2]["f1_score"][0]) == 10
    assert one == stock
    assert four == one


def f1_model(base, steps_per_execution=1):
    keras.utils.set_random_seed(5)
    model = models.mlp(base)
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy",
                  metrics=[keras.metrics.F1Score()], steps_per_execution=steps_per_execution)
    return model


def test_vector_metric_in_the_progress_bar_as_in_stock_fit(digits, capsys):
    """Keras' progress bar shows the vector (Keras 3.12's raises on it: the
    same error as stock fit, then)."""
    x, y = digits[0][:N], keras.utils.to_categorical(digits[1][:N], 10)
    outcomes = []
    for base, steps_per_execution in ((keras.Model, 1), (customfit.CustomModel, 4)):
        try:
            f1_model(base, steps_per_execution).fit(x, y, batch_size=BATCH, verbose=1)
            outcomes.append("f1_score: [" in capsys.readouterr().out)
        except ValueError as error:
            outcomes.append(str(error))
    assert outcomes[1] == outcomes[0]
