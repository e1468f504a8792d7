"""Each private Keras API customfit uses still behaves as assumed.

When one of these fails after a Keras upgrade, update
customfit/_keras/ before anything else.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

import customfit
from customfit._keras import internals, versions
from customfit._keras._tensorflow import trainer as tf_trainer
from tests import models


def test_functional_arguments_detection():
    i = keras.Input((2,))
    assert internals.is_functional_call((i, i), {})
    assert internals.is_functional_call((), {"inputs": i, "outputs": i})
    assert not internals.is_functional_call((), {"name": "x"})


def test_keras_still_rewrites_bases_for_functional_subclasses():
    """The reason CustomModel switches the instance's class instead."""

    class Plain(keras.Model):
        pass

    i = keras.Input((2,))
    Plain(i, keras.layers.Dense(1)(i))
    assert internals.Functional in Plain.__bases__


def test_compile_objects_and_loss_tracker(digits):
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.evaluate(digits[0][:32], digits[1][:32], verbose=0)
    compile_metrics = internals.compiled_metrics_object(model)
    assert isinstance(compile_metrics, internals.CompileMetrics)
    assert internals.compiled_loss_object(model) is not None
    assert internals.loss_tracker(model).name == "loss"
    assert internals.CompileMetrics in [type(m) for m in keras.Model.metrics.fget(model)]
    assert issubclass(internals.MetricsList, keras.metrics.Metric)
    assert internals.call_has_training_arg(model) is True


def test_stock_keras2_shims_still_warn():
    """If Keras ever fixes its own shims, customfit's overrides can go."""
    source = inspect.getsource(keras.Model.compiled_loss)
    assert "deprecated" in source


def test_all_layers_reaches_nested_layers():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="deep")])
    inputs = keras.Input((4,))
    model = customfit.CustomModel(inputs, inner(inputs))
    layers = internals.all_layers(model)
    assert layers[0] is model and inner in layers
    assert inner.get_layer("deep") in layers


def test_unbuilt_optimizer_apply_dispatches_to_build():
    """customfit builds a lazily built optimizer over all the model's
    variables by shadowing `build` while the first step is traced."""
    variables = [keras.Variable(np.ones((2,), "float32")), keras.Variable(np.ones((3,), "float32"))]
    optimizer = keras.optimizers.Adam()
    built_over = []

    def build(given):
        built_over.append(len(given))
        type(optimizer).build(optimizer, variables)

    with internals.intercepted(optimizer, "build", build):
        optimizer.apply([tf.ones((2,))], variables[:1])
    assert built_over == [1] and len(optimizer.variables) == 2 + 2 * 2
    assert "build" not in vars(optimizer)


def test_make_function_and_flatten_hooks_exist():
    assert "step_function" in inspect.signature(keras.Model._make_function).parameters
    assert "sample_weight" in inspect.signature(keras.Model._compute_loss).parameters


def test_loss_scale_matches_scale_loss():
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    assert float(optimizer.scale_loss(tf.constant(1.0))) == float(
        internals.loss_scale_in_use(optimizer))
    variable = keras.Variable(np.ones(2, "float32"))
    optimizer.build([variable])
    assert float(optimizer.scale_loss(tf.constant(1.0))) == float(
        internals.loss_scale_in_use(optimizer))
    assert internals.loss_scale_in_use(keras.optimizers.SGD()) is None


def test_registered_name_is_shared_with_the_functional_twin():
    @keras.saving.register_keras_serializable(package="internals_test")
    class Named(customfit.CustomModel):
        pass

    i = keras.Input((2,))
    model = Named(i, keras.layers.Dense(1)(i))
    assert type(model) is not Named
    assert keras.saving.get_registered_name(type(model)) == "internals_test>Named"


def test_compiled_metric_log_names_replay_compile_metrics_result(digits):
    x, y = models.multi_io_data(digits[0][:32], digits[1][:32])
    model = models.multi_io(customfit.CustomModel)
    model.compile("sgd", loss=models.MULTI_IO_COMPILE["loss"],
                  metrics={"digit": ["accuracy", "accuracy"], "big": ["mse"]},
                  weighted_metrics={"digit": ["accuracy"], "big": ["mse", "mse"]})
    model.evaluate(x, y, verbose=0)
    compile_metrics = internals.compiled_metrics_object(model)
    named = internals.compiled_metric_log_names(compile_metrics)
    results = compile_metrics.result()
    assert list(named) == list(results)
    for name, metric in named.items():
        assert float(metric.result()) == float(results[name]), name


def test_fit_and_evaluate_build_through_maybe_symbolic_build():
    """CustomModel overrides `_maybe_symbolic_build` (see
    `_keras._tensorflow.trainer.symbolic_build`); Keras must still call it with these names."""
    assert "self._maybe_symbolic_build(iterator=epoch_iterator)" in inspect.getsource(
        keras.Model.fit)
    assert "self._maybe_symbolic_build(iterator=epoch_iterator)" in inspect.getsource(
        keras.Model.evaluate)
    parameters = inspect.signature(keras.Model._maybe_symbolic_build).parameters
    assert list(parameters) == ["self", "iterator", "data_batch"]


def test_symbolic_build_under_a_strategy_builds_from_one_replica(digits):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = models.mlp(customfit.CustomModel)
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(digits).batch(8))
    tf_trainer.symbolic_build(model, iterator=[(0, 0, iter(dataset))])
    assert model.built and model.optimizer.built
    assert internals.compiled_metrics_object(model).built


def test_logs_reduced_along_first_axis_only_across_workers():
    assert not tf_trainer.logs_reduced_along_first_axis(tf.distribute.get_strategy())
    assert not tf_trainer.logs_reduced_along_first_axis(
        tf.distribute.MirroredStrategy(["/cpu:0"]))
    # True across workers: tests/test_multiworker.py (a strategy that joins a
    # cluster changes the process's TensorFlow context, so not created here).
def test_model_checkpoint_decides_and_writes_in_save_model(tmp_path):
    """customfit.callbacks.ModelCheckpoint replaces `_save_model`; Keras must
    still route every save through it, and decide with the two helpers."""
    source = inspect.getsource(keras.callbacks.ModelCheckpoint)
    assert source.count("self._save_model(") == 2  # per batch and per epoch
    callback = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "{epoch:02d}.weights.h5"), monitor="loss",
        save_best_only=True, save_weights_only=True)
    if hasattr(callback, "_set_monitor_op"):  # Keras 3.11 on; 3.10 sets it in __init__
        callback._set_monitor_op()
    path = internals.checkpoint_file_path(callback, 2, None, {"loss": 1.0})
    assert path == str(tmp_path / "03.weights.h5")
    assert internals.checkpoint_should_save(callback, 2, None, {"loss": 1.0}, path)
    assert callback.best == 1.0
    assert not internals.checkpoint_should_save(callback, 3, None, {"loss": 2.0}, path)


def test_fit_starts_at_the_epoch_set_in_on_train_begin(digits):
    class StartAt(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            internals.set_initial_epoch(self.model, 2)

        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    seen = []
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(digits[0][:32], digits[1][:32], epochs=3, verbose=0, callbacks=[StartAt()])
    assert seen == [2]
    # Keras never resets it: customfit's BackupAndRestore does, after fit.
    assert model._initial_epoch == 2


def test_keras_does_not_save_dropout_generator_state(tmp_path):
    """The reason CustomModel.save_own_variables adds it: keras.Model resumed
    from a file draws the first epoch's dropout masks again."""
    model = models.mlp(keras.Model, dropout=0.5)
    (state,) = [v for v in model.variables if id(v) not in {id(w) for w in model.weights}]
    state.assign([7, 9])
    model.save_weights(tmp_path / "m.weights.h5")
    state.assign([0, 0])
    model.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(state.numpy(), [0, 0])
def test_intercepted_methods_are_what_keras_dispatches_to(digits):
    """customfit.testing.diagnose records a step through these two methods."""
    model = models.mlp(customfit.CustomModel, dropout=0)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    calls, applies = [], []
    original_call, original_apply = model.call, model.optimizer.apply

    def call(*args, **kwargs):
        calls.append(kwargs.get("training"))
        return original_call(*args, **kwargs)

    def apply(grads, variables=None):
        applies.append(len(grads))
        return original_apply(grads, variables)

    with internals.intercepted(model, "call", call), \
            internals.intercepted(model.optimizer, "apply", apply):
        keras.Model.train_step(model, (tf.constant(digits[0][:8]),
                                       tf.constant(digits[1][:8])))
    assert calls == [True]
    assert applies == [len(model.trainable_weights)]
    assert "call" not in vars(model) and "apply" not in vars(model.optimizer)


def test_fit_makes_each_epochs_iterator_from_the_wrapped_dataset(digits):
    """BackupAndRestore counts the iterators fit makes of its data (each one
    draws new tf.data shuffle seeds) through this dataset."""
    made = []

    class Counting:
        def __init__(self, dataset):
            self.dataset = dataset

        def __iter__(self):
            made.append(1)
            return iter(self.dataset)

    class Wrap(customfit.CustomModel):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            if iterator is not None and not made:
                original = tf_trainer.wrap_epoch_iterator_dataset(iterator, Counting)
                assert isinstance(original, tf.data.Dataset)
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    model = models.mlp(Wrap, dropout=0)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(digits[0][:64], digits[1][:64], batch_size=32, epochs=2, verbose=0)
    # One at each epoch's start and one after each full epoch (Keras' count).
    assert len(made) == 4


def test_global_seed_generator_is_keras_unseeded_random_source():
    internals.global_seed_generator(create=True)
    generator = internals.global_seed_generator()
    assert generator is keras.src.random.seed_generator.global_seed_generator()
    state = generator.state.numpy()
    keras.random.uniform((1,))
    assert not np.array_equal(state, generator.state.numpy())


def test_monitor_improved_compares_as_keras_monitor_callbacks_do():
    """customfit.callbacks.ReduceLROnPlateau decides with Keras' own
    `_set_monitor_op`/`_is_improvement` (mode, min_delta, direction inferred from the name)."""
    lower = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", min_delta=0.1)
    assert internals.monitor_improved(lower, 5.0, None)  # anything beats nothing
    assert internals.monitor_improved(lower, 0.85, 1.0)
    assert not internals.monitor_improved(lower, 0.95, 1.0)  # within min_delta
    higher = keras.callbacks.ReduceLROnPlateau(monitor="val_accuracy", mode="max", min_delta=0.0)
    assert internals.monitor_improved(higher, 0.9, 0.8)
    assert not internals.monitor_improved(higher, 0.7, 0.8)


def test_loss_scale_optimizer_apply_gradients_dispatches_to_apply():
    """customfit's first-step guard intercepts a LossScaleOptimizer's
    `apply` and `scale_loss` on the instance; `apply_gradients` must reach it."""
    variable = keras.Variable([1.0, 2.0])
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    optimizer.build([variable])
    applies = []
    original_apply = optimizer.apply

    def apply(grads, variables=None):
        applies.append(list(variables))
        return original_apply(grads, variables)

    with internals.intercepted(optimizer, "apply", apply):
        optimizer.apply_gradients([(tf.constant([1.0, 1.0]), variable)])
    assert applies == [[variable]]
    assert "apply" not in vars(optimizer)


def test_copied_keras_functions_match_a_tested_release():
    """Every Keras function customfit copies or re-implements has the source
    of a release it was checked against (`_keras/versions.py`). When this
    fails, Keras changed one: bring customfit in line, then add the hash."""
    assert versions.problems() == []
    source = inspect.getsource(keras.Model._make_function)
    for name in ("reduce_per_replica(", "self.unrolled_steps_per_execution"):
        assert name in source, name


def test_reduce_per_replica_and_autoconvert_optionals():
    logs = {"loss": tf.constant(1.5)}
    assert tf_trainer.reduce_per_replica(logs, tf.distribute.get_strategy(), "auto") is not None
    model = models.mlp(customfit.CustomModel)
    seen = []
    wrapped = tf_trainer.autoconvert_optionals(model, lambda data: seen.append(data))
    empty = tf.experimental.Optional.empty(None)
    wrapped((tf.constant(1.0), empty))
    # Keras 3.12 and later turn an empty Optional into None; 3.10 and 3.11
    # pass batches on as they are.
    assert seen[0][1] is (None if hasattr(model, "_autoconvert_optionals") else empty)


def test_fit_and_evaluate_make_their_callback_list_as_per_batch_callbacks_does():
    """`_per_batch.PerBatchCallbacks` is used as given (a CallbackList), is
    built from the batch count `_maybe_symbolic_build` sees, and is passed on
    to the validation `evaluate`."""
    from keras.src.backend.tensorflow import trainer

    for method in (keras.Model.fit, keras.Model.evaluate):
        source = inspect.getsource(method)
        build = source.index("self._maybe_symbolic_build(iterator=epoch_iterator)")
        check = source.index("if not isinstance(callbacks, callbacks_module.CallbackList)")
        assert build < check
        assert "steps=epoch_iterator.num_batches" in source[check:]
    assert "callbacks=callbacks," in inspect.getsource(keras.Model.fit)
    assert "def num_batches" in inspect.getsource(trainer.TFEpochIterator.__mro__[1])


def test_tensorboard_counts_batches_where_it_steps_its_writer(tmp_path):
    board = keras.callbacks.TensorBoard(str(tmp_path))
    assert internals.tensorboard_batch_count(board, "train") == 0
    assert internals.tensorboard_batch_count(board, "test") == 0
    source = inspect.getsource(keras.callbacks.TensorBoard)
    assert "self._push_writer(self._train_writer, self._global_train_batch)" in source
    assert "self._push_writer(self._val_writer, self._global_test_batch)" in source
    assert "self._global_train_batch += 1" in source
    assert "self._global_test_batch += 1" in source


def test_batches_since_save_counts_to_save_freq(tmp_path):
    """steps_per_execution="auto" ends an execution at the batch where a
    ModelCheckpoint or BackupAndRestore with save_freq=N saves, from this
    count."""
    for callback in (
        keras.callbacks.ModelCheckpoint(str(tmp_path / "w.weights.h5"), save_freq=3,
                                        save_weights_only=True),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), save_freq=3),
    ):
        counts = []
        for batch in range(4):
            counts.append(internals.batches_since_save(callback))
            assert callback._should_save_on_batch(batch) == (batch == 2)
        assert counts == [0, 1, 2, 0]


def test_epoch_iterator_enumerates_through_an_overridable_method():
    """steps_per_execution="auto" sizes executions by replacing one epoch
    iterator's `_enumerate_iterator`."""
    from keras.src.trainers import epoch_iterator

    assert "self._enumerate_iterator()" in inspect.getsource(epoch_iterator.EpochIterator.__iter__)
