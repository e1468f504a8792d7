"""Every optimizer of a model: found by attribute, built before training,
their learning rates in the epoch logs."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from typing import Any

import keras

from customfit._keras import internals

MAIN = "optimizer"


def registered(model: keras.Model) -> Mapping[str, keras.optimizers.Optimizer]:
    """The model's optimizers by attribute name: `model.optimizer` first (as
    "optimizer", when set), then every other attribute holding an optimizer,
    in the order the attributes were first assigned. An optimizer held under
    two names is listed once, under the first. A read-only view: Keras'
    saving walks every attribute and would save a `dict` a second time."""
    found: dict[str, keras.optimizers.Optimizer] = {}
    seen: set[int] = set()
    attributes = vars(model)
    for name, value in [(MAIN, attributes.get(MAIN)), *attributes.items()]:
        if isinstance(value, keras.optimizers.Optimizer) and id(value) not in seen:
            seen.add(id(value))
            found[name] = value
    return types.MappingProxyType(found)


def build_over_all(model: keras.Model, optimizers: list) -> None:
    """Builds `optimizers` over all the model's trainable variables, in the
    model's distribution strategy, as Keras builds `model.optimizer` under a
    strategy and when loading."""
    if not optimizers:
        return
    # TensorFlow's models have a strategy; on JAX a `keras.distribution` set
    # globally lays the variables out.
    strategy = getattr(model, "distribute_strategy", None)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        for optimizer in optimizers:
            optimizer.build(model.trainable_variables)


def build_unbuilt(model: keras.Model) -> None:
    """Before training: builds every registered optimizer that is not built
    yet, when the model is built, so that its state exists before the first
    step is traced (a loaded file restores it; under `MirroredStrategy` an
    optimizer cannot be built inside the replicated step)."""
    unbuilt = [o for o in registered(model).values() if not o.built]
    if model.built:
        build_over_all(model, unbuilt)


@contextlib.contextmanager
def built_over_all_when_first_applied(model: keras.Model) -> Iterator[None]:
    """While a training step is traced: an optimizer still unbuilt (the model
    was not built when `fit` started, so `build_unbuilt` could not build it)
    is built over all the model's trainable variables when first applied,
    instead of over the variables of that first `apply`, so that `fit` and
    `load_weights` give it the same variables."""
    unbuilt = [o for o in registered(model).values() if not o.built]
    with contextlib.ExitStack() as stack:
        for optimizer in unbuilt:

            def build(variables: Any, optimizer: Any = optimizer) -> None:
                type(optimizer).build(optimizer, model.trainable_variables)

            stack.enter_context(internals.intercepted(optimizer, "build", build))
        yield


def saved_as_built(found: dict, name: str, optimizer: Any) -> bool:
    """Whether a weights file (`found`: entry -> shape) holds the state of a
    built optimizer where this unbuilt one, stored under `name`, would have
    fewer variables (its iteration count and learning rate only)."""
    prefix = f"{name}/vars/"
    return sum(1 for entry in found if entry.startswith(prefix)) > len(optimizer.variables)


def log_name(name: str) -> str:
    """The column of an optimizer's learning rate in the epoch logs:
    `learning_rate` for `model.optimizer` (as Keras' callbacks and TensorBoard
    name it), `learning_rate_<name>` for the others."""
    return "learning_rate" if name == MAIN else f"learning_rate_{name}"


def follows_a_schedule(optimizer: Any) -> bool:
    """Whether the optimizer's learning rate changes by itself with every
    update (a `LearningRateSchedule` or a function), rather than being a
    variable that only a callback or the user changes."""
    return not isinstance(optimizer.learning_rate, keras.Variable)


def rate(optimizer: Any) -> float:
    """The optimizer's current learning rate (a schedule evaluated at its own
    `iterations`), read with `.numpy()` (NumPy 2 warns when it converts a
    Keras 3 TensorFlow variable itself)."""
    value = optimizer.learning_rate
    return float(value.numpy() if hasattr(value, "numpy") else value)


def learning_rates(optimizers: Mapping[str, Any]) -> dict[str, float]:
    """Each optimizer's current learning rate, under its `log_name`."""
    return {log_name(name): rate(optimizer) for name, optimizer in optimizers.items()}


def selected(model: keras.Model, names: Any, caller: str) -> dict[str, keras.optimizers.Optimizer]:
    """The registered optimizers named in `names` (all of them for None);
    an unknown name is an error that lists the known ones."""
    optimizers = dict(registered(model))
    if names is None:
        if not optimizers:
            raise ValueError(
                f"{caller} found no optimizer on the model: compile() it with "
                "an optimizer, or assign one as an attribute "
                "(self.head_optimizer = keras.optimizers.Adam())."
            )
        return optimizers
    unknown = [name for name in names if name not in optimizers]
    if unknown:
        raise ValueError(
            f"{caller} names optimizer(s) {unknown} that the model does not "
            f"have; its optimizers are {sorted(optimizers)} (the attribute "
            "names, 'optimizer' for model.optimizer; see model.optimizers)."
        )
    return {name: optimizers[name] for name in names}


def settable(optimizers: Mapping[str, Any], caller: str) -> None:
    """Raises, naming them, if some optimizers' learning rate is a schedule
    (which Keras does not let a callback set)."""
    fixed = [name for name, optimizer in optimizers.items() if follows_a_schedule(optimizer)]
    if fixed:
        raise ValueError(
            f"{caller} cannot change the learning rate of {fixed}: it is a "
            "LearningRateSchedule (or a function), which sets it at every step. "
            "Name only the other optimizers in the callback, or give these a "
            "float learning rate."
        )


class LearningRateLogs(keras.callbacks.Callback):
    """Adds to the epoch logs the learning rate of every registered optimizer
    whose rate follows a schedule (`follows_a_schedule`): a constant rate
    adds no information, and leaving it out keeps `History` as stock `fit`
    has it.

    `CustomModel.fit` puts it first in the callback list when the model has
    an optimizer besides `model.optimizer` and one of them follows a
    schedule, so `History`, `CSVLogger` and `TensorBoard` all see the
    values. It runs at each epoch's end, before any other callback changes a
    learning rate for the next epoch.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs.update(learning_rates(scheduled(self.model)))


def scheduled(model: keras.Model) -> dict[str, Any]:
    """The registered optimizers whose learning rate follows a schedule."""
    return {
        name: optimizer
        for name, optimizer in registered(model).items()
        if follows_a_schedule(optimizer)
    }


def needs_learning_rate_logs(model: keras.Model) -> bool:
    """Whether the model has optimizers Keras does not log by itself, and
    one of its rates follows a schedule."""
    return any(name != MAIN for name in registered(model)) and bool(scheduled(model))


def with_learning_rate_logs(model: keras.Model, arguments: dict) -> dict:
    """`fit`'s arguments (Keras', by name) with `LearningRateLogs` first among
    the callbacks, when the model needs it."""
    if not needs_learning_rate_logs(model):
        return arguments
    callbacks = arguments.get("callbacks")
    if isinstance(callbacks, keras.callbacks.CallbackList):
        if not any(isinstance(c, LearningRateLogs) for c in callbacks.callbacks):
            logger = LearningRateLogs()
            logger.set_model(model)
            callbacks.callbacks.insert(0, logger)
        return arguments
    if callbacks is None:
        callbacks = []
    elif not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    return {**arguments, "callbacks": [LearningRateLogs(), *callbacks]}
