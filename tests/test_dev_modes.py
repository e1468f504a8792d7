"""`fit(quick_run=, overfit_batches=, validate_every_n_batches=)`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models


class BatchRecorder(keras.callbacks.Callback):
    """Every train/test batch's logs, as callbacks see them."""

    def __init__(self):
        super().__init__()
        self.train, self.test = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.train.append((batch, dict(logs)))

    def on_test_batch_end(self, batch, logs=None):
        self.test.append((batch, dict(logs)))


class BatchSums(customfit.CustomModel):
    """Logs the sum of each batch's pixels, so the logs show which batches ran."""

    def train_step(self, data):
        self.log("batch_sum", tf.reduce_sum(data[0]))
        return super().train_step(data)


def compiled(build, base=customfit.CustomModel, seed=1, **compile_kwargs):
    keras.utils.set_random_seed(seed)
    model = build(base)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        **compile_kwargs,
    )
    return model


def weights(model):
    return [w.numpy() for w in model.weights]


def first_batch_sums(recorder):
    """The logged batch sum at each epoch's batch 0 (the batch's own sum)."""
    return [logs["batch_sum"] for batch, logs in recorder.train if batch == 0]


# ---------------------------------------------------------------- quick_run


def test_quick_run_trains_a_few_batches_of_one_epoch_and_validates_a_few(digits):
    x, y = digits[0][:640], digits[1][:640]
    model = compiled(models.mlp)
    recorder = BatchRecorder()
    history = model.fit(x, y, batch_size=32, epochs=5, validation_split=0.5,
                        callbacks=[recorder], verbose=0, quick_run=3)
    assert [b for b, _ in recorder.train] == [0, 1, 2]
    assert [b for b, _ in recorder.test] == [0, 1, 2]
    assert len(history.history["loss"]) == 1 and "val_loss" in history.history


def test_quick_run_trains_exactly_the_first_batches_of_stock_fit(digits):
    x, y = digits[0][:256], digits[1][:256]
    quick = compiled(models.mlp)
    quick.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0, quick_run=2)
    stock = compiled(models.mlp, base=keras.Model)
    stock.fit(x, y, batch_size=32, epochs=1, steps_per_epoch=2, shuffle=False, verbose=0)
    for got, want in zip(weights(quick), weights(stock)):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------- overfit_batches


def test_overfit_batches_trains_on_the_same_batches_every_epoch(digits):
    x, y = digits[0][:640], digits[1][:640]
    model = compiled(models.mlp, base=BatchSums)
    recorder = BatchRecorder()
    model.fit(x, y, batch_size=32, epochs=3, shuffle=True, callbacks=[recorder],
              verbose=0, overfit_batches=2)
    assert [b for b, _ in recorder.train] == [0, 1] * 3
    sums = [logs["batch_sum"] for _, logs in recorder.train]
    assert sums[:2] == sums[2:4] == sums[4:6]
    assert sums[0] == pytest.approx(float(np.sum(x[:32])), rel=1e-6)


def test_stock_steps_per_epoch_moves_on_to_other_batches(digits):
    """What overfit_batches fixes: a limited epoch continues where the last
    one stopped, so no batch is seen twice."""
    x, y = digits[0][:640], digits[1][:640]
    model = compiled(models.mlp, base=BatchSums)
    recorder = BatchRecorder()
    model.fit(x, y, batch_size=32, epochs=3, steps_per_epoch=2, shuffle=False,
              callbacks=[recorder], verbose=0)
    assert len(set(first_batch_sums(recorder))) == 3


def test_overfit_batches_freezes_a_shuffling_pipeline(digits):
    x, y = digits[0][:640], digits[1][:640]
    dataset = (tf.data.Dataset.from_tensor_slices((x, y))
               .shuffle(640, seed=5, reshuffle_each_iteration=True).batch(32))
    recorder = BatchRecorder()
    compiled(models.mlp, base=BatchSums).fit(
        dataset, epochs=3, callbacks=[recorder], verbose=0, overfit_batches=1)
    assert len(set(first_batch_sums(recorder))) == 1
    stock_recorder = BatchRecorder()
    compiled(models.mlp, base=BatchSums).fit(
        dataset, epochs=3, steps_per_epoch=1, shuffle=False, callbacks=[stock_recorder],
        verbose=0)
    assert len(set(first_batch_sums(stock_recorder))) == 3


def test_overfitting_one_batch_drives_its_loss_down(digits):
    x, y = digits[0][:32], digits[1][:32]
    model = compiled(lambda base: models.mlp(base, dropout=0))
    history = model.fit(x, y, batch_size=32, epochs=60, verbose=0, overfit_batches=1)
    assert history.history["loss"][-1] < 0.05 * history.history["loss"][0]


# ------------------------------------------------- validate_every_n_batches


def test_validating_mid_epoch_leaves_training_exactly_unchanged(digits):
    x, y = digits[0][:384], digits[1][:384]
    xv, yv = digits[0][1000:1128], digits[1][1000:1128]

    def run(**modes):
        model = compiled(models.mlp)
        recorder = BatchRecorder()
        history = model.fit(x, y, batch_size=32, epochs=2, validation_data=(xv, yv),
                            callbacks=[recorder], verbose=0, **modes)
        return model, history.history, recorder

    plain, plain_history, plain_batches = run()
    checked, checked_history, checked_batches = run(validate_every_n_batches=4)
    assert checked_history == plain_history
    for got, want in zip(weights(checked), weights(plain)):
        np.testing.assert_array_equal(got, want)
    for (batch, got), (_, want) in zip(checked_batches.train, plain_batches.train):
        assert {k: v for k, v in got.items() if not k.startswith("val_")} == want
        assert ("val_loss" in got) == (batch % 4 == 3)
    # 12 batches per epoch: the validation after batch 11 sees the epoch's
    # final weights, as the end-of-epoch validation does.
    last_of_epoch = [logs for batch, logs in checked_batches.train if batch == 11]
    assert [logs["val_loss"] for logs in last_of_epoch] == checked_history["val_loss"]


def test_stock_evaluate_mid_epoch_resets_the_training_metrics(digits):
    """What validate_every_n_batches fixes: calling evaluate from a callback
    resets the training loss and accuracy halfway through the epoch."""
    x, y = digits[0][:384], digits[1][:384]
    xv, yv = digits[0][1000:1128], digits[1][1000:1128]

    def run(callbacks):
        model = compiled(models.mlp, base=keras.Model)
        return model.fit(x, y, batch_size=32, epochs=1, callbacks=callbacks,
                         verbose=0).history

    model_box = []
    naive = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch == 5
        and model_box[0].evaluate(xv, yv, verbose=0))

    class Capture(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            model_box.append(self.model)

    assert run([Capture(), naive])["loss"] != run([])["loss"]


def test_validation_split_is_split_as_keras_splits_it(digits):
    x, y = digits[0][:320], digits[1][:320]

    def history(**modes):
        return compiled(models.mlp).fit(x, y, batch_size=32, epochs=2,
                                        validation_split=0.25, verbose=0,
                                        **modes).history

    assert history(validate_every_n_batches=2) == history()


@pytest.mark.parametrize("modes, message", [
    (dict(quick_run=0), "quick_run=0"),
    (dict(overfit_batches=True), "overfit_batches=True"),
    (dict(validate_every_n_batches=2.5), "whole number"),
    (dict(validate_every_n_batches=2), "validation_data"),
])
def test_bad_run_mode_arguments_say_what_to_pass(digits, modes, message):
    model = compiled(models.mlp)
    before = weights(model)
    with pytest.raises(ValueError, match=message):
        model.fit(digits[0][:64], digits[1][:64], verbose=0, **modes)
    for got, want in zip(weights(model), before):
        np.testing.assert_array_equal(got, want)


def test_validation_interval_must_be_a_multiple_of_steps_per_execution(digits):
    model = compiled(models.mlp, steps_per_execution=3)
    with pytest.raises(ValueError, match="multiple of steps_per_execution"):
        model.fit(digits[0][:64], digits[1][:64], validation_split=0.5,
                  validate_every_n_batches=4, verbose=0)


def test_overfit_batches_refuses_a_generator_with_the_fix(digits):
    def batches():
        yield digits[0][:32], digits[1][:32]

    with pytest.raises(ValueError, match="Collect a few batches into arrays"):
        compiled(models.mlp).fit(batches(), overfit_batches=1, verbose=0)
