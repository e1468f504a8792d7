"""One `fit` or `evaluate` call of a `CustomModel`, and everything it owns.

`CustomModel.fit` and `evaluate` make a `FitCall` and run Keras' own method
through it. The call binds Keras' arguments once; for `fit` it applies the
run modes (`_dev_modes`), the learning-rate logs (`_optimizers`) and, with
customfit's `BackupAndRestore`, prepares the mid-epoch resume (`_resume`);
it makes the one callback list Keras gets (`_per_batch.PerBatchCallbacks`,
built when Keras learns the number of batches: `batches_known`); and it
is where the rest of the library finds the call's state while it runs:
`FitCall.current(model)`. Nothing of a call is stored on the model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import keras

from customfit import _auto_steps, _backend, _dev_modes, _optimizers, _per_batch, _resume
from customfit._keras import internals

_SIGNATURES = {
    "fit": inspect.signature(keras.Model.fit),
    "evaluate": inspect.signature(keras.Model.evaluate),
}

# id(model) -> its calls in progress, innermost last (`fit` runs `evaluate`
# for validation; a callback may run `evaluate` inside `fit`).
_RUNNING: dict[int, list[FitCall]] = {}


class FitCall:
    """One `fit` or `evaluate` call.

    Attributes:
        model: The model.
        method: "fit" or "evaluate".
        arguments: Keras' arguments, by name, as Keras' method gets them.
        callbacks: The callback list Keras gets: a `PerBatchCallbacks`, or
            a `keras.callbacks.CallbackList` the caller passed (used as it
            is; `fit` passes its own to its validation `evaluate`).
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
        if method == "fit":
            arguments = _dev_modes.applied(model, arguments, modes or _dev_modes.DevModes())
            arguments = _optimizers.with_learning_rate_logs(model, arguments)
            self.resume = _resume.for_fit(model, arguments)
        given = arguments.get("callbacks")
        if isinstance(given, keras.callbacks.CallbackList):
            self.callbacks = given
        else:
            list_class = (
                _resume.ResumeCallbackList
                if self.resume is not None
                else keras.callbacks.CallbackList
            )
            self.callbacks = _per_batch.callback_list(
                model, method, arguments, model._per_batch_channel, list_class
            )
        arguments["callbacks"] = self.callbacks
        self.arguments = arguments

    @staticmethod
    def current(model: keras.Model) -> FitCall | None:
        """The innermost call of `model` in progress, if any."""
        running = _RUNNING.get(id(model))
        return running[-1] if running else None

    def run(self, keras_method: Callable[..., Any]) -> Any:
        """`keras_method(**arguments)` (Keras' `fit` or `evaluate` of the
        model), with this call current and the values the step logs going
        to the right phase. Across workers, a collective that fails because
        a peer is gone becomes an error that says to restart the cluster."""
        phase = "train" if self.method == "fit" else "test"
        _RUNNING.setdefault(id(self.model), []).append(self)
        try:
            with self.model._step_logs.in_phase(phase), self.resume or contextlib.nullcontext():
                return keras_method(**self.arguments)
        except _backend.cluster.LOST_CONTACT as error:
            if not _backend.cluster.multi_worker(self.model):
                raise
            raise RuntimeError(_backend.cluster.lost_contact_message(self.model, error)) from error
        finally:
            if self.plan is not None:
                self.plan.finish()
            running = _RUNNING[id(self.model)]
            running.remove(self)
            if not running:
                del _RUNNING[id(self.model)]

    def saw_epoch_iterator(self, epoch_iterator: Any) -> None:
        """Keras made the epoch iterator (`_maybe_symbolic_build` starts):
        the resume wraps its data before anything draws from it."""
        if self.resume is not None and epoch_iterator is not None:
            self.resume.saw_epoch_iterator(epoch_iterator)

    def batches_known(self, epoch_iterator: Any) -> None:
        """Keras knows the batches per epoch and would make its
        `CallbackList` now (`_maybe_symbolic_build` ends): the callback list
        is built."""
        if epoch_iterator is None:
            return
        if isinstance(self.callbacks, _per_batch.PerBatchCallbacks):
            self.callbacks.build(internals.epoch_batches(epoch_iterator))
            if self.resume is not None:
                self.resume.callbacks = self.callbacks.inner
        if self.model._auto_steps is not None and self.plan is None:
            phase = "train" if self.method == "fit" else "test"
            limits = [self.resume.execution_limit] if self.resume is not None else []
            self.plan = _auto_steps.ExecutionPlan(
                self.model, phase, self.callbacks.callbacks, limits
            )
            self.plan.install(epoch_iterator)


def replayed_begin(model: keras.Model) -> bool:
    """Whether the `on_train_batch_begin`/`on_test_batch_begin` now running
    for `model` is one replayed after its execution ran (see
    `PerBatchCallbacks.replaying`)."""
    return any(
        isinstance(call.callbacks, _per_batch.PerBatchCallbacks) and call.callbacks.replaying
        for call in _RUNNING.get(id(model), [])
    )


def resume_of(model: keras.Model) -> _resume.FitResume | None:
    """The `FitResume` of the `fit` call of `model` in progress, if any."""
    for call in reversed(_RUNNING.get(id(model), [])):
        if call.method == "fit":
            return call.resume
    return None
