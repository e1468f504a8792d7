"""Every private Keras API customfit relies on, in one place.

Keras 3 keeps several pieces of `fit` machinery private. customfit reuses them
instead of copying them, so that its default step stays bit-for-bit equal to
stock `fit`. Where the tested Keras releases (3.10 to 3.15) differ, the
function here adapts, saying which release does what.
`tests/test_keras_internals.py` checks each assumption made here and fails
loudly when a Keras release changes one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
from keras.src.backend.common import global_state as _global_state
from keras.src.backend.common import stateless_scope as _stateless_scope
from keras.src.losses import loss as _loss_module
from keras.src.models import functional as _functional
from keras.src.models import model as _model
from keras.src.random import seed_generator as _seed_generator
from keras.src.saving import object_registration as _object_registration
from keras.src.trainers import compile_utils as _compile_utils
from keras.src.trainers import data_adapters as _data_adapters

Functional = _functional.Functional
CompileMetrics = _compile_utils.CompileMetrics
MetricsList = _compile_utils.MetricsList


def is_tf_dataset(x: Any) -> bool:
    """Whether `x` is a `tf.data.Dataset` or a distributed one (checked by
    class name, without importing TensorFlow)."""
    return bool(_data_adapters.is_tf_dataset(x))


def is_functional_call(args: tuple, kwargs: dict) -> bool:
    """Whether `Model(*args, **kwargs)` asks for a functional model."""
    return _model.functional_init_arguments(args, kwargs)


def all_layers(model: keras.Model) -> list:
    """The model and every layer inside it, at any depth."""
    return list(model._flatten_layers(include_self=True))


def share_registered_name(twin: type, original: type) -> None:
    """Saves `twin` under the name `original` was registered with, if any."""
    names = _object_registration.GLOBAL_CUSTOM_NAMES
    if original in names:
        names[twin] = names[original]


def unscale_loss_for_distribution(loss: Any) -> Any:
    """The per-replica loss multiplied back by the number of replicas."""
    return _loss_module.unscale_loss_for_distribution(loss)


def compiled_loss_object(model: keras.Model) -> Any:
    """The `CompileLoss` built by `compile(loss=...)`, or None."""
    return model._compile_loss


def compiled_metrics_object(model: keras.Model) -> Any:
    """The `CompileMetrics` built by `compile(metrics=...)`, or None."""
    return model._compile_metrics


def loss_tracker(model: keras.Model) -> keras.metrics.Mean:
    """The `Mean` metric behind the `loss` column of the logs."""
    return model._loss_tracker


def call_has_training_arg(model: keras.Model) -> bool:
    return model._call_has_training_arg


def compute_loss(model: keras.Model, **kwargs: Any) -> Any:
    """`model.compute_loss`, also for overrides without a `training` argument."""
    return model._compute_loss(**kwargs)


def aggregate_additional_loss(model: keras.Model, loss: Any) -> Any:
    """One `add_loss`/regularization term, summed and scaled per replica."""
    return model._aggregate_additional_loss(loss)


def epoch_batches(epoch_iterator: Any) -> int | None:
    """The batches per epoch Keras gives `CallbackList(steps=...)` in `fit`
    and `evaluate` (None when unknown)."""
    return epoch_iterator.num_batches


def tensorboard_batch_count(callback: keras.callbacks.TensorBoard, phase: str) -> int:
    """The step `TensorBoard` writes batch summaries at: its count of training
    ("train") or evaluation ("test") batches begun, 1-based, kept in
    `on_train_batch_begin`/`on_test_batch_begin`."""
    if phase == "train":
        return callback._global_train_batch
    return callback._global_test_batch


def keras_symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """Keras' own `_symbolic_build`."""
    keras.Model._symbolic_build(model, iterator=iterator, data_batch=data_batch)


def loss_scale_in_use(optimizer: Any) -> Any | float | None:
    """The factor `optimizer.scale_loss` multiplies the loss by, or None.

    Mirrors `LossScaleOptimizer.scale_loss`: before the optimizer is built it
    uses `initial_scale`, afterwards the `dynamic_scale` variable.
    """
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    return optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale


def compiled_metric_log_names(compile_metrics: Any) -> dict[str, Any]:
    """Each compiled metric under its key in `CompileMetrics.result()`.

    Replays `CompileMetrics.result()`'s naming (output-name prefixes, `_1`
    suffixes, `weighted_` prefixes) on the metric objects, without computing
    any result: it is called while Keras traces a step, also under
    `tf.distribute`, where computing results there is not allowed.
    """
    named: dict[str, Any] = {}
    counters: dict[str, int] = {}

    def prefixed(metric_list: Any, name: str) -> str:
        return f"{metric_list.output_name}_{name}" if metric_list.output_name else name

    def deduplicated(name: str) -> str:
        if name not in counters:
            counters[name] = 1
            return name
        index = counters[name]
        counters[name] += 1
        return f"{name}_{index}"

    for metric_list in compile_metrics._flat_metrics:
        for metric in metric_list.metrics if metric_list else ():
            named[deduplicated(prefixed(metric_list, metric.name))] = metric
    for metric_list in compile_metrics._flat_weighted_metrics:
        for metric in metric_list.metrics if metric_list else ():
            name = prefixed(metric_list, metric.name)
            if name in counters:
                name = deduplicated(prefixed(metric_list, f"weighted_{metric.name}"))
            else:
                counters[name] = 1
            named[name] = metric
    return named


def checkpoint_file_path(
    callback: keras.callbacks.ModelCheckpoint, epoch: int, batch: int | None, logs: dict
) -> str:
    """The file `ModelCheckpoint` would write now (its placeholders filled)."""
    return callback._get_file_path(epoch, batch, logs)


def checkpoint_should_save(
    callback: keras.callbacks.ModelCheckpoint,
    epoch: int,
    batch: int | None,
    logs: dict,
    filepath: str,
) -> bool:
    """`ModelCheckpoint`'s decision to save now; updates its `best` as Keras does.

    customfit's `ModelCheckpoint` overrides `_save_model`, which Keras'
    `on_epoch_end`/`on_train_batch_end` call to decide and write.
    """
    return callback._should_save_model(epoch, batch, logs, filepath)


def batches_since_save(callback: keras.callbacks.Callback) -> int:
    """Batches a `ModelCheckpoint` or `BackupAndRestore` with an integer
    `save_freq` has counted since it last saved: it saves at the end of the
    batch that brings the count to `save_freq`."""
    return callback._batches_seen_since_last_saving


def set_initial_epoch(model: keras.Model, epoch: int | None) -> None:
    """The epoch `fit` starts at when set from `on_train_begin` (Keras'
    `BackupAndRestore` uses it); None lets `fit`'s own `initial_epoch` apply."""
    model._initial_epoch = epoch


def global_seed_generator(create: bool = False) -> Any:
    """Keras' process-wide `SeedGenerator`, which unseeded `keras.random`
    calls draw from; None if it does not exist yet and `create` is False."""
    if create:
        return _seed_generator.global_seed_generator()
    # The key is a named constant from Keras 3.13 on, the same string before.
    key = getattr(_seed_generator, "GLOBAL_SEED_GENERATOR", "global_seed_generator")
    return _global_state.get_global_attribute(key)


@contextlib.contextmanager
def intercepted(obj: Any, method: str, wrapper: Callable) -> Iterator[None]:
    """Shadows `obj.<method>` with `wrapper` on this instance only, bypassing
    Keras' attribute tracking. Relies on Keras dispatching through the
    instance: `Layer.__call__` calls `self.call`,
    `Optimizer.apply_gradients` calls `self.apply`, and `Optimizer.apply`
    calls `self.build` on an unbuilt optimizer."""
    vars(obj)[method] = wrapper
    try:
        yield
    finally:
        vars(obj).pop(method, None)


def monitor_improved(callback: Any, current: float, best: float | None) -> bool:
    """Whether `current` improves on `best` for a Keras monitor callback
    (`ReduceLROnPlateau`, `EarlyStopping`): its `mode`, `min_delta` and the
    direction inferred from the monitored name, as Keras compares them.

    Keras 3.11 and later decide in `MonitorCallback._is_improvement`; in
    Keras 3.10, `ReduceLROnPlateau` sets a `monitor_op` that already holds
    `min_delta` when training begins (`_reset`)."""
    if not hasattr(callback, "_is_improvement"):  # Keras 3.10
        if callback.monitor_op is None:
            callback._reset()
        return best is None or bool(callback.monitor_op(current, best))
    if callback.monitor_op is None:
        callback._set_monitor_op()
    return bool(callback._is_improvement(current, best))


# ----------------------------------------------------------- the JAX backend


def current_stateless_scope() -> keras.StatelessScope | None:
    """The innermost `keras.StatelessScope` open now, or None."""
    return _stateless_scope.get_stateless_scope()


def optimizer_variables_built_over(optimizer: keras.optimizers.Optimizer) -> list:
    """The trainable variables `optimizer.build` was given, in order."""
    return list(optimizer._trainable_variables)


def wrap_jax_iterators(epoch_iterator: Any, wrapper: Callable[[Any], Any]) -> None:
    """Makes the data adapter of `fit`'s `JAXEpochIterator` hand out
    `wrapper(iterator)` for each iterator it makes (`get_jax_iterator`, one
    per epoch, also under `keras.distribution`)."""
    adapter = epoch_iterator.data_adapter
    make = adapter.get_jax_iterator
    adapter.get_jax_iterator = lambda: wrapper(make())


def wrap_torch_dataloaders(epoch_iterator: Any, wrapper: Callable[[Any], Any]) -> None:
    """Makes the data adapter of `fit`'s `TorchEpochIterator` hand out
    `wrapper(loader)` for each data loader it makes (`get_torch_dataloader`,
    one per epoch)."""
    adapter = epoch_iterator.data_adapter
    make = adapter.get_torch_dataloader
    adapter.get_torch_dataloader = lambda: wrapper(make())


def shuffles_per_batch(epoch_iterator: Any) -> bool:
    """Whether `fit`'s data adapter shuffles each batch on its own
    (`shuffle="batch"`; Keras 3.15's array adapter's `_shuffle`)."""
    return getattr(epoch_iterator.data_adapter, "_shuffle", None) == "batch"


def make_jax_function(
    model: keras.Model, step: Callable, concatenate_outputs: bool = False
) -> Callable:
    """The JAX trainer's `_make_function`: `step(state, batch) -> (outputs,
    state)` made into `function(state, iterator)`, running
    `steps_per_execution` batches per call (predictions concatenated when
    `concatenate_outputs`)."""
    return model._make_function(step, concatenate_outputs=concatenate_outputs)


def jax_state_put_back(model: keras.Model) -> None:
    """Tells Keras' JAX `fit`/`evaluate` that the variables hold the current
    values, after a step that raised had its values put back: their `finally`
    block (`jax_state_sync`, Keras 3.15) would otherwise assign the state of
    the batch before, whose arrays the step consumed (donated). Probed in
    `tests/jax_backend/test_backend.py`."""
    model._jax_state_synced = True


class NoOptimizer:
    """What Keras' JAX `fit`, `evaluate` and `train_on_batch` read of
    `model.optimizer` (3.15: `_get_jax_state`, `_purge_model_variables`):
    no variables, nothing to build. They fail on None, which a model whose
    optimizers are all held elsewhere has (`recipes.GAN`)."""

    variables: list = []
    built = True
