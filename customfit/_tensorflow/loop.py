"""`CustomModel` on Keras' TensorFlow backend (the `Loop` of
`customfit._contract`): how a step is differentiated, compiled and run.

Each batch's step runs inside a `tf.function` made by
`_keras._tensorflow.step_function`, replaying every batch to the callbacks
(`_per_batch`), through the `Channel` of the call running
(`_call.channel_of`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from customfit import _call, _optimizers, _step
from customfit._keras import internals
from customfit._keras._tensorflow import step_function, trainer
from customfit._tensorflow import guards, resume

END_OF_DATA: tuple[type[BaseException], ...] = (tf.errors.OutOfRangeError,)


def loss_gradients(
    model: keras.Model, x: Any, y: Any, sample_weight: Any
) -> tuple[Any, tf.Tensor, list, list]:
    """The forward pass and the tracked loss under a `tf.GradientTape`; the
    loss scaled for mixed precision, differentiated, the gradients unscaled."""
    with tf.GradientTape() as tape:
        y_pred = _step.forward(model, x, training=True)
        loss = _step.tracked_loss(model, x, y, y_pred, sample_weight, training=True)
        scaled = loss if model.optimizer is None else model.optimizer.scale_loss(loss)
    variables = model.trainable_weights
    if not variables:
        return y_pred, loss, [], variables
    return y_pred, loss, _step.unscaled(model, tape.gradient(scaled, variables)), variables


def gradients(function: Callable[[], tuple[Any, Any]], variables: list) -> tuple[Any, list]:
    """Runs `function() -> (objective, aux)` once under a `tf.GradientTape`
    and returns `aux` and the gradients of `objective` w.r.t. `variables`."""
    with tf.GradientTape() as tape:
        objective, aux = function()
    return aux, tape.gradient(objective, variables)


def metric_creation_scope() -> Any:
    """Where `log` creates a metric while Keras traces the step: outside the
    traced graph, in the model's distribution strategy."""
    return tf.init_scope()


def replica_results(metrics: dict[str, keras.metrics.Mean]) -> dict[str, tf.Tensor] | None:
    """The `Mean` metrics' results over all replicas, inside a step under
    `tf.distribute` with several replicas (None elsewhere).

    There a metric variable reads as this replica's part only, and Keras
    then averages the replicas' logs: a mean of per-replica means, which is
    not the weighted mean when replicas see different numbers of examples
    (the last, short batch). So the states are summed across replicas first
    (one all-reduce per step), and every replica logs the result the metrics
    give when read outside the step, which Keras reports for the epoch."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    summed = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        {name: (tf.identity(m.total), tf.identity(m.count)) for name, m in metrics.items()},
    )
    return {name: tf.math.divide_no_nan(total, count) for name, (total, count) in summed.items()}


def apply(optimizer: keras.optimizers.Optimizer, gradients: list, variables: list) -> None:
    optimizer.apply(gradients, variables)


def make_train_function(model: keras.Model) -> Callable:
    # Every optimizer over all trainable weights, now, as Keras builds
    # `self.optimizer` under a distribution strategy, in
    # `compile_from_config` and in `BackupAndRestore`; built lazily, one
    # applied to some variables only would save a state that no loaded
    # model can take back.
    _optimizers.build_unbuilt(model)
    return step_function.make_function(
        model, _checked(model, model.train_step, "train"), lambda: _call.channel_of(model)
    )


def make_test_function(model: keras.Model) -> Callable:
    return step_function.make_function(
        model, _checked(model, model.test_step, "test"), lambda: _call.channel_of(model)
    )


def predict_steps_per_execution(steps: int) -> int:
    return steps


def make_predict_function(model: keras.Model, keras_make: Callable) -> Callable:
    """Keras' own: `predict_step` is stateful on TensorFlow."""
    keras_make()
    return model.predict_function


def call_scope(model: keras.Model) -> Any:
    """Nothing around Keras' own `fit`, `evaluate` and `predict`."""
    return contextlib.nullcontext()


def optimizer_stand_in(model: keras.Model) -> None:
    """None: Keras' TensorFlow trainer runs models without an optimizer."""
    return None


def maybe_symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """What Keras' TensorFlow `fit` and `evaluate` call with the epoch
    iterator."""
    _call.symbolic_build(model, trainer.symbolic_build, iterator, data_batch)


def symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    internals.keras_symbolic_build(model, iterator, data_batch)


def _checked(model: keras.Model, step: Callable, phase: str) -> Callable:
    """`step` (the model's `train_step` or `test_step`) as Keras' step
    function runs it: logging to `phase`'s columns, the first training step
    guarded, its logs checked and flattened, the logged values added."""
    step_name = f"{phase}_step"
    step_guards = guards.StepGuards(model) if phase == "train" else None
    step_logs = model._step_logs

    def checked_step(data: Any) -> Any:
        with step_logs.in_phase(phase):
            if step_guards is None:
                return checked_logs(step(data))
            with step_guards.watching(), _optimizers.built_over_all_when_first_applied(model):
                return checked_logs(step(data))

    def checked_logs(logs: Any) -> dict[str, Any]:
        logs = _step.checked_logs(model, logs, step_name)
        if trainer.logs_reduced_along_first_axis(model.distribute_strategy):
            # Keras averages these over all workers' replicas along axis 0.
            logs = {name: tf.expand_dims(value, 0) for name, value in logs.items()}
        return logs

    return checked_step


@contextlib.contextmanager
def state_scope(model: keras.Model) -> Any:
    """Where a recipe creates the state its step updates: outside any traced
    graph, in the model's distribution strategy."""
    with tf.init_scope(), model.distribute_strategy.scope():
        yield


def cond(predicate: Any, if_true: Callable[[], None], if_false: Callable[[], None]) -> None:
    """Runs `if_true()` or `if_false()`, stateful functions, as `predicate`
    says (`tf.cond`)."""
    tf.cond(predicate, if_true, if_false)


def pass_state(model: keras.Model) -> list[tuple[Any, Any]]:
    """The values of the model's non-trainable variables, seed generators
    included."""
    return _step.non_trainable_values(model)


def stateless_gradients(
    function: Callable[[list], Any],
    sources: list,
    variables: list | None = None,
    state: list | tuple = (),
) -> tuple[Any, list]:
    """`function(sources)`, a scalar, and its gradients w.r.t. `sources`.

    It runs in a `keras.StatelessScope` in which `variables` (when given)
    read `sources`, the `(variable, value)` pairs of `state` read those
    values, and every other variable reads its current value; what it
    assigns is discarded. Differentiated under a `tf.GradientTape`."""
    sources = list(sources)
    mapping = [*zip(variables or (), sources), *state]
    with tf.GradientTape() as tape:
        tape.watch(sources)
        with keras.StatelessScope(
            state_mapping=mapping, collect_losses=True, initialize_variables=False
        ):
            value = function(sources)
    return value, tape.gradient(value, sources)


def data_replay(epoch_iterator: Any, steps_per_epoch: int | None) -> resume.DatasetReplay:
    return resume.DatasetReplay(epoch_iterator, steps_per_epoch)


resuming_train_function = resume.resuming_train_function


def recording_summaries() -> Any:
    return tf.summary.record_if(True)


def run_once(model: keras.Model, step: Callable[[], Any], variables: list | tuple = ()) -> Any:
    """`step()`: outside a `tf.function` TensorFlow runs it eagerly, as
    written, a `tf.GradientTape` works anywhere, and every assignment is
    kept."""
    return step()


def enable_op_determinism() -> None:
    tf.config.experimental.enable_op_determinism()


def two_replicas() -> tf.distribute.Strategy:
    """A `MirroredStrategy` over two logical CPUs, deterministic."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
