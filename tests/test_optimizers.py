"""Several optimizers on one model: `CustomModel.optimizers`, each one's own
step count and schedule, their learning rates in the logs and TensorBoard,
the learning-rate callbacks, and resuming all of them from a backup."""

import csv
import json

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import customfit
from customfit.callbacks import BackupAndRestore, LearningRateScheduler, ReduceLROnPlateau
from customfit.recipes import GAN
from tests.subproc import run_python

BATCH, BATCHES = 32, 4
SECOND = "second_optimizer"  # sorts after "optimizers", see the layout test


def split(base, second_optimizer=None, build_second=True):
    """The body is trained by `optimizer` once per batch, the head by
    `second_optimizer` twice per batch (a critic stepped twice, say)."""

    class Split(base):
        def __init__(self):
            super().__init__()
            self.body = keras.layers.Dense(16, activation="relu")
            self.head = keras.layers.Dense(10)
            self.second_optimizer = second_optimizer or keras.optimizers.Adam(1e-2)

        def build(self, input_shape):
            self.body.build(input_shape)
            self.head.build((None, 16))
            if build_second:
                self.second_optimizer.build(self.head.trainable_variables)

        def call(self, x):
            return self.head(self.body(x))

        def train_step(self, data):
            x, y = data
            for _ in range(2):
                self._step(self.second_optimizer, self.head, x, y)
            loss = self._step(self.optimizer, self.body, x, y)
            return {"loss": loss, "flat": tf.constant(1.0)}

        def _step(self, optimizer, part, x, y):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(keras.losses.sparse_categorical_crossentropy(
                    y, self(x), from_logits=True))
            optimizer.apply(tape.gradient(loss, part.trainable_variables),
                            part.trainable_variables)
            return loss

    model = Split()
    model.build((None, 64))
    model.compile(keras.optimizers.SGD(0.1))
    return model


def fit(model, digits, epochs=2, callbacks=(), **kwargs):
    x, y = digits[0][: BATCH * BATCHES], digits[1][: BATCH * BATCHES]
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=list(callbacks), **kwargs).history


def value(learning_rate):
    return float(keras.ops.convert_to_numpy(learning_rate))


def tensorboard_scalars(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def test_registry_lists_every_optimizer_by_attribute_name(tmp_path):
    model = split(customfit.CustomModel)
    assert list(model.optimizers) == ["optimizer", SECOND]
    assert model.optimizers["optimizer"] is model.optimizer
    assert model.optimizers[SECOND] is model.second_optimizer
    model.alias = model.second_optimizer  # the same object: listed once
    assert list(model.optimizers) == ["optimizer", SECOND]
    del model.alias
    with pytest.raises(AttributeError, match="cannot be assigned.*attribute of its own"):
        model.optimizers = [model.optimizer]
    with pytest.raises(TypeError):
        model.optimizers["third"] = keras.optimizers.SGD()

    gan = tiny_gan()
    assert list(gan.optimizers) == ["generator_optimizer", "discriminator_optimizer"]
    assert list(customfit.CustomModel(*_dense()).optimizers) == []

    # Keras' saving walks every attribute, properties too: the registry must
    # not store the optimizers a second time or under "optimizers/".
    model.save_weights(tmp_path / "m.weights.h5")
    with h5py.File(tmp_path / "m.weights.h5") as f:
        assert {"optimizer", SECOND} <= set(f) and "optimizers" not in f


def _dense():
    inputs = keras.Input((4,))
    return inputs, keras.layers.Dense(1)(inputs)


def test_each_optimizer_counts_its_updates_and_its_schedule_follows_them(digits):
    schedules = {name: keras.optimizers.schedules.ExponentialDecay(0.1, 3, 0.5)
                 for name in ("optimizer", SECOND)}
    model = split(customfit.CustomModel, keras.optimizers.Adam(schedules[SECOND]))
    model.compile(keras.optimizers.SGD(schedules["optimizer"]))
    batches = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: batches.append(batch))
    history = fit(model, digits, epochs=2, callbacks=[record])

    assert batches == list(range(BATCHES)) * 2  # callbacks count batches
    assert int(model.optimizer.iterations) == 2 * BATCHES
    assert int(model.second_optimizer.iterations) == 2 * 2 * BATCHES  # two per batch
    for name, updates_per_batch in (("optimizer", 1), (SECOND, 2)):
        column = "learning_rate" if name == "optimizer" else f"learning_rate_{name}"
        expected = [value(schedules[name](tf.constant(updates_per_batch * BATCHES * e, "int64")))
                    for e in (1, 2)]
        assert history[column] == expected, name
    assert history["learning_rate"] != history[f"learning_rate_{SECOND}"]


def test_constant_learning_rates_leave_history_as_stock_fit(digits, tmp_path):
    """A constant rate adds nothing: History has stock fit's columns and
    values; Keras' TensorBoard writes model.optimizer's rate by itself."""
    runs = []
    for base in (keras.Model, customfit.CustomModel):
        keras.utils.set_random_seed(0)
        model = split(base, keras.optimizers.Adam(2e-2))
        history = fit(model, digits, callbacks=[keras.callbacks.TensorBoard(tmp_path / base.__name__)])
        runs.append((history, tensorboard_scalars(tmp_path / base.__name__ / "train")))
    (stock_history, stock_written), (history, written) = runs
    assert history == stock_history and set(history) == {"loss", "flat"}
    assert written["epoch_learning_rate"] == stock_written["epoch_learning_rate"]
    assert not any("second_optimizer" in tag for tag in written)


def test_scheduled_learning_rates_reach_history_csv_and_tensorboard(digits, tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(2e-2, BATCHES, 0.5)
    model = split(customfit.CustomModel, keras.optimizers.Adam(schedule))
    csv_file = tmp_path / "log.csv"
    history = fit(model, digits, callbacks=[
        keras.callbacks.TensorBoard(tmp_path / "tb"), keras.callbacks.CSVLogger(csv_file)])
    written = tensorboard_scalars(tmp_path / "tb" / "train")
    with open(csv_file) as f:
        rows = list(csv.DictReader(f))

    # Two updates per batch: the rate after epoch e is 2e-2 * 0.5 ** (2 * e).
    expected = [value(schedule(2 * BATCHES * e)) for e in (1, 2)]
    assert history["learning_rate_second_optimizer"] == expected
    assert written["epoch_learning_rate_second_optimizer"] == expected
    assert [float(r["learning_rate_second_optimizer"]) for r in rows] == expected
    assert "learning_rate" not in history  # model.optimizer's rate is constant


def halve_each_epoch(epoch, learning_rate):
    return learning_rate * 0.5


def test_scheduler_sets_every_optimizer_where_stock_sets_one(digits):
    stock = split(customfit.CustomModel, keras.optimizers.Adam(2e-2))
    fit(stock, digits, callbacks=[keras.callbacks.LearningRateScheduler(halve_each_epoch)])
    assert value(stock.optimizer.learning_rate) == pytest.approx(0.1 / 4)
    assert value(stock.second_optimizer.learning_rate) == pytest.approx(2e-2)  # untouched

    model = split(customfit.CustomModel, keras.optimizers.Adam(2e-2))
    history = fit(model, digits, callbacks=[LearningRateScheduler(halve_each_epoch)])
    assert value(model.optimizer.learning_rate) == pytest.approx(0.1 / 4)
    assert value(model.second_optimizer.learning_rate) == pytest.approx(2e-2 / 4)
    assert history["learning_rate_second_optimizer"] == pytest.approx([1e-2, 5e-3])

    by_name = split(customfit.CustomModel, keras.optimizers.Adam(2e-2))
    fit(by_name, digits, callbacks=[LearningRateScheduler({SECOND: lambda epoch: 1e-3 * (epoch + 1)})])
    assert value(by_name.optimizer.learning_rate) == pytest.approx(0.1)
    assert value(by_name.second_optimizer.learning_rate) == pytest.approx(2e-3)


def test_scheduler_reaches_both_players_of_a_gan_where_stock_fails(digits):
    images = digits[0][: BATCH * BATCHES] * 2 - 1
    gan = tiny_gan()
    with pytest.raises(ValueError, match='must have a "learning_rate"'):  # model.optimizer is None
        gan.fit(images, batch_size=BATCH, verbose=0,
                callbacks=[keras.callbacks.LearningRateScheduler(halve_each_epoch)])
    gan = tiny_gan()
    history = gan.fit(images, batch_size=BATCH, epochs=2, verbose=0, callbacks=[
        LearningRateScheduler({"generator_optimizer": lambda e, lr: 1e-3 / (e + 1),
                               "discriminator_optimizer": halve_each_epoch})]).history
    assert history["learning_rate_generator_optimizer"] == pytest.approx([1e-3, 5e-4])
    assert history["learning_rate_discriminator_optimizer"] == pytest.approx([5e-4, 2.5e-4])
    assert int(gan.generator_optimizer.iterations) == 2 * BATCHES


def test_reduce_on_plateau_reduces_all_or_the_named_optimizers(digits):
    # "flat" never improves: from the second epoch on, every epoch reduces.
    plateau = dict(monitor="flat", factor=0.5, patience=1, mode="min")
    stock = split(customfit.CustomModel, keras.optimizers.Adam(2e-2))
    fit(stock, digits, epochs=3, callbacks=[keras.callbacks.ReduceLROnPlateau(**plateau)])
    assert value(stock.optimizer.learning_rate) == pytest.approx(0.1 / 4)
    assert value(stock.second_optimizer.learning_rate) == pytest.approx(2e-2)  # untouched

    model = split(customfit.CustomModel, keras.optimizers.Adam(2e-2))
    history = fit(model, digits, epochs=3, callbacks=[ReduceLROnPlateau(**plateau)])
    assert value(model.optimizer.learning_rate) == pytest.approx(0.1 / 4)
    assert value(model.second_optimizer.learning_rate) == pytest.approx(2e-2 / 4)
    # The rate each epoch ran with, logged before that epoch's reduction.
    assert history["learning_rate_second_optimizer"] == pytest.approx([2e-2, 2e-2, 1e-2])

    named = split(customfit.CustomModel, keras.optimizers.Adam(2e-2))
    fit(named, digits, epochs=3, callbacks=[ReduceLROnPlateau(**plateau, optimizers=[SECOND])])
    assert value(named.optimizer.learning_rate) == pytest.approx(0.1)
    assert value(named.second_optimizer.learning_rate) == pytest.approx(2e-2 / 4)


def test_unknown_names_and_scheduled_rates_are_errors_before_training(digits):
    model = split(customfit.CustomModel)
    before = [w.copy() for w in model.get_weights()]
    for callback in (LearningRateScheduler({"head_optimizer": halve_each_epoch}),
                     ReduceLROnPlateau(optimizers=["head_optimizer"])):
        with pytest.raises(ValueError, match=r"\['head_optimizer'\].*\['optimizer', "
                                             r"'second_optimizer'\]"):
            fit(model, digits, callbacks=[callback])
    scheduled = split(customfit.CustomModel, keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.1, 3, 0.5)))
    before += [w.copy() for w in scheduled.get_weights()]
    for callback in (LearningRateScheduler(halve_each_epoch), ReduceLROnPlateau()):
        with pytest.raises(ValueError, match=r"of \['second_optimizer'\]: it is a "
                                             "LearningRateSchedule.*Name only the other"):
            fit(scheduled, digits, callbacks=[callback])
    for a, b in zip(before, model.get_weights() + scheduled.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="must be a function"):
        LearningRateScheduler(0.1)


class Crash(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt


def optimizer_state(model):
    return {f"{name}/{i}": v.numpy() for name, optimizer in model.optimizers.items()
            for i, v in enumerate(optimizer.variables)}


def test_backup_and_restore_resumes_every_optimizer(digits, tmp_path):
    # The second optimizer is left unbuilt: fit builds it before the first
    # step, and so does loading, so the backup restores its slots. Its rate
    # halves each epoch from the value it had, so a rate not restored shows.
    def build():
        return split(customfit.CustomModel, keras.optimizers.Adam(2e-2), build_second=False)

    def callbacks(backup):
        # Listed after the scheduler on purpose: the backup, taken when the
        # next epoch begins, must still hold the rate before the scheduler's
        # next change, or the rate would be halved again on resume.
        return [LearningRateScheduler({SECOND: halve_each_epoch}), backup]

    keras.utils.set_random_seed(1)
    uninterrupted = build()
    history = fit(uninterrupted, digits, epochs=3,
                  callbacks=callbacks(BackupAndRestore(tmp_path / "unused")))

    keras.utils.set_random_seed(1)
    crashed = build()
    with pytest.raises(KeyboardInterrupt):
        fit(crashed, digits, epochs=3,
            callbacks=[*callbacks(BackupAndRestore(tmp_path / "backup")), Crash()])
    keras.utils.set_random_seed(2)  # other initial weights, all overwritten
    resumed = build()
    assert not resumed.second_optimizer.built
    resumed_history = fit(resumed, digits, epochs=3,
                          callbacks=callbacks(BackupAndRestore(tmp_path / "backup")))

    assert int(resumed.optimizer.iterations) == 3 * BATCHES
    assert int(resumed.second_optimizer.iterations) == 2 * 3 * BATCHES
    assert value(resumed.second_optimizer.learning_rate) == pytest.approx(2e-2 / 8)
    assert len(resumed.second_optimizer.variables) > 2  # slots, restored below
    expected, got = optimizer_state(uninterrupted), optimizer_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    for a, b in zip(uninterrupted.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    for key in history:
        assert resumed_history[key] == history[key][2:], key


def test_stock_load_skips_an_unbuilt_second_optimizer(digits, tmp_path):
    trained = split(keras.Model, build_second=False)
    fit(trained, digits, epochs=1)
    trained.save_weights(tmp_path / "m.weights.h5")
    fresh = split(keras.Model, build_second=False)
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        fresh.load_weights(tmp_path / "m.weights.h5")
    assert int(fresh.second_optimizer.iterations) == 0  # its state is lost

    trained = split(customfit.CustomModel, build_second=False)
    fit(trained, digits, epochs=1)
    trained.save_weights(tmp_path / "c.weights.h5")
    fresh = split(customfit.CustomModel, build_second=False)
    fresh.load_weights(tmp_path / "c.weights.h5")
    assert int(fresh.second_optimizer.iterations) == 2 * BATCHES


def tiny_gan():
    generator = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64, activation="tanh")])
    discriminator = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1)])
    gan = GAN(generator, discriminator, latent_dim=8)
    gan.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
    return gan


@pytest.mark.slow
@pytest.mark.multiprocess
def test_unbuilt_second_optimizer_trains_under_mirrored_strategy():
    # Built lazily inside the replicated step, Keras fails with a graph
    # execution error; fit builds it in the strategy's scope beforehand.
    out = run_python(two_cpus=True, code="""
        import json
        import keras, numpy as np
        from sklearn.datasets import load_digits
        import customfit
        from tests.test_optimizers import split

        keras.utils.set_random_seed(0)
        d = load_digits()
        x, y = (d.data[:128] / 16).astype("float32"), d.target[:128].astype("int32")
        with tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]).scope():
            model = split(customfit.CustomModel, keras.optimizers.Adam(1e-2), build_second=False)
        history = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
        print("RESULTS" + json.dumps({
            "history": history,
            "iterations": [int(o.iterations.numpy()) for o in model.optimizers.values()],
            "slots": len(model.second_optimizer.variables),
        }))
    """)
    results = json.loads(out.split("RESULTS", 1)[1])
    assert results["iterations"] == [4, 8]
    assert results["slots"] == 2 + 2 * 4  # iterations, rate, Adam's m and v of 4 weights
    assert set(results["history"]) == {"loss", "flat"}
