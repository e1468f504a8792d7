"""The first training step's check for forgotten loss scaling, on every
backend.

Under `mixed_float16` Keras wraps the optimizer in a `LossScaleOptimizer`,
which divides the gradients it is given by the loss scale (2**15 at first). A
hand-written step that differentiates the loss without
`optimizer.scale_loss(loss)` therefore updates the weights 32768 times too
little: practically not at all, and Keras raises no error.

`StepGuards.watching()` wraps the first training step and raises
`TrainingGuardError`, which says what is wrong and how to fix it; once a
step has completed under it, later steps run with no check at all. Each
backend's loop says where the first step runs: on TensorFlow the trace of
the compiled step, or the first eager call (`_tensorflow/loop.py`); on JAX
the first run of the step inside a `StatelessStep`, which is the abstract
trace that finds the names it logs (`_jax/loop.py`). Either way the error
comes before any update is applied. A backend adds checks of its own by
subclassing `StepGuards` (`_tensorflow/guards.py`: the loss scaled for
`tf.distribute`'s replicas, a mistake that cannot happen on JAX, where the
step sees the whole batch).

How it works, and what it cannot see: while the step runs, each
`LossScaleOptimizer` among the model's optimizers (`CustomModel.optimizers`:
`model.optimizer` and those held by its attributes, e.g. a GAN's two)
records calls to its `scale_loss`. Its `apply` (which `apply_gradients`
calls), and the JAX loop's `apply` (which applies one through its
`stateless_apply`), raise when `scale_loss` of that same optimizer was not
called earlier in the step (`check_scaled`). Gradients given to
`CustomModel.apply_gradients` are unscaled by contract (the hook applies the
loss scale itself), so they count as scaled (`gradients_rescaled`). Not
seen: an optimizer not in `CustomModel.optimizers` (kept in a list, say),
`scale_loss` called but its result not differentiated.

On JAX a `LossScaleOptimizer`'s own `apply` cannot run inside customfit's
step at all (it chooses between two stateful updates with `ops.cond`, which
cannot assign variables under JAX: `UnexpectedTracerError`, scaled or not);
there the guard turns that error into this one when `scale_loss` was
forgotten, and its fix (`self.apply_gradients`) is the one that works.

The check is off for a model (or class) with `training_guards = False`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import keras

from customfit import _optimizers
from customfit._errors import TrainingGuardError
from customfit._keras import internals

SWITCH = (
    "If this is intended, set `training_guards = False` on the model (or its "
    "class) to turn these checks off."
)


class Record:
    """What one (per-replica) first step did."""

    def __init__(self) -> None:
        self.scaled: set[int] = set()  # ids of optimizers given a scaled loss


# Thread id -> record of the step running in that thread. TensorFlow's
# MirroredStrategy traces each replica's step in its own thread.
_active: dict[int, Record] = {}
_lock = threading.Lock()


def current() -> Record | None:
    """The record of the guarded step running in this thread, if any."""
    return _active.get(threading.get_ident())


def gradients_rescaled(optimizer: Any) -> None:
    """Called by `CustomModel.apply_gradients`, which multiplies unscaled
    gradients by the loss scale itself before applying them."""
    record = current()
    if record is not None:
        record.scaled.add(id(optimizer))


def check_scaled(optimizer: Any) -> None:
    """Raises `TrainingGuardError` when a guarded step applies gradients
    with the `LossScaleOptimizer` `optimizer` without having passed the
    loss to its `scale_loss` (nor gradients through `apply_gradients`)."""
    record = current()
    if record is not None and id(optimizer) not in record.scaled:
        raise TrainingGuardError(_unscaled_message(optimizer))


class StepGuards:
    """The guards of one model's training step: armed until a step
    completes under `watching()`."""

    def __init__(self, model: keras.Model) -> None:
        self._model = model
        self._armed = True
        self._running = 0
        self._stack: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Wraps one (per-replica) training step."""
        if not self._armed or not getattr(self._model, "training_guards", True):
            yield
            return
        key = threading.get_ident()
        with _lock:
            if self._running == 0:
                self._stack = self._install()
            self._running += 1
            record = _active[key] = self._new_record()
        completed = False
        try:
            with self._checking(record):
                yield
            completed = True
        finally:
            with _lock:
                _active.pop(key, None)
                self._running -= 1
                if self._running == 0:
                    # Set by `_install` while any step is running.
                    stack, self._stack = cast(contextlib.ExitStack, self._stack), None
                    stack.close()
                    if completed:
                        self._armed = False

    def _new_record(self) -> Record:
        return Record()

    def _checking(self, record: Record) -> contextlib.AbstractContextManager:
        """A backend's own checks around the step (none here)."""
        return contextlib.nullcontext()

    def _install(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for optimizer in _loss_scale_optimizers(self._model):
            stack.enter_context(
                internals.intercepted(optimizer, "scale_loss", _recording_scale_loss(optimizer))
            )
            stack.enter_context(
                internals.intercepted(optimizer, "apply", _checking_apply(optimizer))
            )
        return stack


def _loss_scale_optimizers(model: keras.Model) -> list:
    """The `LossScaleOptimizer`s among the model's optimizers
    (`CustomModel.optimizers`)."""
    return [
        optimizer
        for optimizer in _optimizers.registered(model).values()
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    ]


def _recording_scale_loss(optimizer: Any) -> Callable[[Any], Any]:
    original = optimizer.scale_loss

    def scale_loss(loss: Any) -> Any:
        record = current()
        if record is not None:
            record.scaled.add(id(optimizer))
        return original(loss)

    return scale_loss


def _checking_apply(optimizer: Any) -> Callable[..., Any]:
    original = optimizer.apply

    def apply(grads: Any, trainable_variables: Any = None) -> Any:
        check_scaled(optimizer)
        return original(grads, trainable_variables)

    return apply


def _unscaled_message(optimizer: Any) -> str:
    scale = internals.loss_scale_in_use(optimizer)
    shown = f"{float(scale):g}" if isinstance(scale, (int, float)) else "2**15 at first"
    return (
        f"The training step applies gradients with the LossScaleOptimizer "
        f"{optimizer.name!r} (mixed precision), but never passed the loss to "
        f"its scale_loss(). The optimizer divides the gradients by the loss "
        f"scale ({shown}), so the weights would barely change. Fix: "
        "differentiate `loss = self.optimizer.scale_loss(loss)` (inside the "
        "GradientTape, or the function given to `self.value_and_gradients`; "
        "the same optimizer that applies the gradients), or hand unscaled "
        "gradients to `self.apply_gradients(gradients, variables)`, which "
        "scales them (on JAX, the only way a LossScaleOptimizer applies "
        f"gradients inside the step). {SWITCH}"
    )
