"""One `fit`, `evaluate` or `predict` call of a `CustomModel`, and
everything it owns, on every backend.

`CustomModel.fit`, `evaluate` and `predict` each make a `Call` and run
Keras' own method through it. The call binds Keras' arguments once; for
`fit` it applies the run modes (`_dev_modes`), the learning-rate logs
(`_optimizers`) and, with customfit's `BackupAndRestore`, prepares the
mid-epoch resume (`_resume`); for `fit` and `evaluate` it makes the one
callback list Keras gets (`_per_batch.PerBatchCallbacks`, built when Keras
learns the number of batches: `batches_known`) and the `Channel` its step
functions and that list share; with `steps_per_execution="auto"` it owns
the execution plan.

Nothing of a call is stored on the model. While a call runs it is on a
context-local stack (`contextvars`), innermost last (`fit` runs `evaluate`
for validation; a callback may run `evaluate` inside `fit`); the step
functions and callbacks find it with `innermost(model)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable
from typing import Any

import keras

from customfit import _auto_steps, _backend, _dev_modes, _optimizers, _per_batch, _resume
from customfit._keras import internals

_SIGNATURES = {
    "fit": inspect.signature(keras.Model.fit),
    "evaluate": inspect.signature(keras.Model.evaluate),
    "predict": inspect.signature(keras.Model.predict),
}

_RUNNING: contextvars.ContextVar[tuple[Call, ...]] = contextvars.ContextVar(
    "customfit_running_calls", default=()
)


class Call:
    """One `fit`, `evaluate` or `predict` call.

    Attributes:
        model: The model.
        method: "fit", "evaluate" or "predict".
        arguments: Keras' arguments, by name, as Keras' method gets them.
        callbacks: The callback list Keras gets: a `PerBatchCallbacks`, or
            a `keras.callbacks.CallbackList` the caller passed (used as it
            is; `fit` passes its own to its validation `evaluate`). None for
            `predict` (Keras makes its own).
        channel: What the step functions and `callbacks` pass each other
            around an execution (that of the caller's `PerBatchCallbacks`
            when one was passed).
        resume: The `FitResume` of a `fit` with a resuming callback, or None.
        plan: How executions are sized, for a model compiled with
            `steps_per_execution="auto"` (once the callbacks are known);
            None otherwise.
    """

    def __init__(
        self,
        model: keras.Model,
        method: str,
        args: tuple,
        kwargs: dict,
        modes: _dev_modes.DevModes | None = None,
    ) -> None:
        bound = _SIGNATURES[method].bind(model, *args, **kwargs)
        arguments = dict(bound.arguments)
        del arguments["self"]
        arguments.update(arguments.pop("kwargs", {}))
        self.model = model
        self.method = method
        self.resume: _resume.FitResume | None = None
        self.plan: _auto_steps.ExecutionPlan | None = None
        self.channel = _per_batch.Channel()
        self.callbacks: keras.callbacks.CallbackList | None = None
        if method == "fit":
            arguments = _dev_modes.applied(model, arguments, modes or _dev_modes.DevModes())
            arguments = _optimizers.with_learning_rate_logs(model, arguments)
            self.resume = _resume.for_fit(model, arguments)
        if method != "predict":
            given = arguments.get("callbacks")
            if isinstance(given, _per_batch.PerBatchCallbacks):
                self.callbacks, self.channel = given, given.channel
            elif isinstance(given, keras.callbacks.CallbackList):
                self.callbacks = given
            else:
                list_class = (
                    _resume.ResumeCallbackList
                    if self.resume is not None
                    else keras.callbacks.CallbackList
                )
                self.callbacks = _per_batch.callback_list(
                    model, method, arguments, self.channel, list_class
                )
            arguments["callbacks"] = self.callbacks
        self.arguments = arguments

    @property
    def phase(self) -> str:
        return {"fit": "train", "evaluate": "test", "predict": "predict"}[self.method]

    def run(self, keras_method: Callable[..., Any]) -> Any:
        """`keras_method(**arguments)` (Keras' `fit`, `evaluate` or
        `predict` of the model), with this call running, inside the
        backend's `call_scope`. Across processes, a collective that fails
        because a peer is gone becomes an error that says to restart them
        all."""
        running = _RUNNING.set((*_RUNNING.get(), self))
        try:
            phase = contextlib.nullcontext() if self.method == "predict" else None
            with (
                phase or self.model._step_logs.in_phase(self.phase),
                _backend.loop.call_scope(self.model),
                self.resume or contextlib.nullcontext(),
            ):
                return keras_method(**self.arguments)
        except _backend.cluster.LOST_CONTACT as error:
            if not _backend.cluster.multi_worker(self.model):
                raise
            message = _backend.cluster.lost_contact_message(self.model, error)
            raise RuntimeError(message) from error
        finally:
            if self.plan is not None:
                self.plan.finish()
            _RUNNING.reset(running)

    def saw_epoch_iterator(self, epoch_iterator: Any) -> None:
        """Keras made the epoch iterator (`_maybe_symbolic_build` starts):
        the resume wraps its data before anything draws from it."""
        if self.resume is not None and epoch_iterator is not None:
            self.resume.saw_epoch_iterator(epoch_iterator)

    def batches_known(self, epoch_iterator: Any) -> None:
        """Keras knows the batches per epoch and would make its
        `CallbackList` now (`_maybe_symbolic_build` ends): the callback list
        is built."""
        if epoch_iterator is None or self.callbacks is None:
            return
        if isinstance(self.callbacks, _per_batch.PerBatchCallbacks):
            self.callbacks.build(internals.epoch_batches(epoch_iterator))
            if self.resume is not None:
                self.resume.callbacks = self.callbacks.inner
        if self.model._auto_steps is not None and self.plan is None:
            limits = [self.resume.execution_limit] if self.resume is not None else []
            self.plan = _auto_steps.ExecutionPlan(
                self.model, self.phase, self.callbacks.callbacks, self.channel, limits
            )
            self.plan.install(epoch_iterator)


def innermost(model: keras.Model) -> Call | None:
    """The innermost call of `model` running now, if any."""
    for call in reversed(_RUNNING.get()):
        if call.model is model:
            return call
    return None


def channel_of(model: keras.Model) -> _per_batch.Channel | None:
    """The `Channel` of the innermost call of `model` running now (None
    outside `fit` and `evaluate`: `train_on_batch`, a step run by hand)."""
    call = innermost(model)
    return None if call is None or call.method == "predict" else call.channel


def symbolic_build(
    model: keras.Model, build: Callable[..., None], iterator: Any, data_batch: Any
) -> None:
    """Keras' symbolic build (`build`, the backend's), before and after
    which the call learns its epoch iterator and its number of batches."""
    call = innermost(model)
    if call is not None:
        call.saw_epoch_iterator(iterator)
    build(model, iterator=iterator, data_batch=data_batch)
    if call is not None:
        call.batches_known(iterator)  # Keras makes its CallbackList right after


def replayed_begin(model: keras.Model) -> bool:
    """Whether the `on_train_batch_begin`/`on_test_batch_begin` now running
    for `model` is one replayed after its execution ran (see
    `PerBatchCallbacks.replaying`)."""
    return any(
        call.model is model
        and isinstance(call.callbacks, _per_batch.PerBatchCallbacks)
        and call.callbacks.replaying
        for call in _RUNNING.get()
    )


def resume_of(model: keras.Model) -> _resume.FitResume | None:
    """The `FitResume` of the `fit` call of `model` running now, if any."""
    for call in reversed(_RUNNING.get()):
        if call.model is model and call.method == "fit":
            return call.resume
    return None
