"""Every batch reported to callbacks and TensorBoard, also when
`steps_per_execution > 1`.

Keras runs `steps_per_execution` batches per call of the compiled function and
calls the callbacks once per call, with the last batch's logs, at the index of
the call's last batch. TensorBoard counts those calls as batches, and summaries
written inside the step get the step number and the `update_freq` decision of
the moment the step was traced.

Two pieces fix that:

- the step function (on TensorFlow `_keras._tensorflow.step_function`, Keras'
  own, copied)
  hands back the logs of each step of an execution, and runs each step with
  the real batch number as `tf.summary`'s default step when a
  `keras.callbacks.TensorBoard` with an integer `update_freq` is among the
  callbacks; the two meet through a `Channel`;
- `PerBatchCallbacks`, the `CallbackList` `CustomModel.fit`/`evaluate` give
  Keras, turns one call per execution into one `on_*_batch_begin` and one
  `on_*_batch_end` per batch, in order, with the batch's own index and logs.
  The first batch's `on_*_batch_begin` runs before the execution (as in
  Keras); the others run after it, just before their `on_*_batch_end`.

The values are those `steps_per_execution=1` gives, bit for bit: the float64
copy of a float32 value is exact and callbacks get Python floats either way.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np

from customfit import _backend
from customfit._keras import internals


def has_batch_hooks(callback: Any, phase: str) -> bool:
    """Whether `callback` overrides a per-batch method of `phase` ("train",
    "test" or "predict"): on train batches, `on_batch_begin`/`on_batch_end`
    too, which Keras' `Callback` calls from its train-batch methods."""
    hooks = [f"on_{phase}_batch_begin", f"on_{phase}_batch_end"]
    if phase == "train":
        hooks += ["on_batch_begin", "on_batch_end"]
    for hook in hooks:
        method = getattr(callback, hook)  # a `LambdaCallback` sets them on the instance
        if getattr(method, "__func__", method) is not getattr(keras.callbacks.Callback, hook):
            return True
    return False


class Channel:
    """What the step functions and the `PerBatchCallbacks` of one call (see
    `_call.Call`) pass each other around an execution.

    Attributes:
        summary: Set before an execution: None (leave `tf.summary` state as
            it is) or `(first_step, update_freq)`, the TensorBoard step of the
            execution's first batch and how often to record.
        rows: Set by the step function after an execution with more than one
            step: `(layout, stacked)`, `stacked[i]` the flattened logs after
            the execution's `i`-th batch, `layout` their names, shapes and
            dtypes (see `row_logs`); or a list, each batch's logs as the
            step returned them. None otherwise. With `every_batch` False,
            only its length counts (`take_batch_count`).
        steps: Set before an execution when the number of batches varies
            from one execution to the next (`steps_per_execution="auto"`):
            how many the next one runs (fewer when the data end). None: the
            model's `steps_per_execution`.
        every_batch: Set before an execution: whether a callback reads each
            batch's logs; without one, the step function need not keep them
            (`rows` then only tells how many batches ran).
        wait: Set before an execution whose time is measured (while
            `steps_per_execution="auto"` searches): the step function
            returns only once its batches have run (JAX dispatches them
            asynchronously; on TensorFlow they have run when it returns).
    """

    def __init__(self) -> None:
        self.summary: tuple[int, int] | None = None
        self.rows: tuple[list, Any] | list[dict] | None = None
        self.steps: int | None = None
        self.every_batch = True
        self.wait = False

    def take_batch_count(self) -> int | None:
        """How many batches the execution that ran last ran, once; None
        after an execution of one step."""
        rows, self.rows = self.rows, None
        if rows is None or isinstance(rows, list):
            return None if rows is None else len(rows)
        return len(rows[1])

    def take_batch_logs(self) -> list[dict] | None:
        """Each batch's logs of the execution that ran last, once."""
        rows, self.rows = self.rows, None
        if rows is None or isinstance(rows, list):
            return rows
        layout, stacked = rows
        return [row_logs(layout, row) for row in np.asarray(stacked).tolist()]


# -------------------------------------------------------------- callbacks


class PerBatchCallbacks(keras.callbacks.CallbackList):
    """The `CallbackList` Keras' `fit`/`evaluate` call, expanding each
    execution of `steps_per_execution` batches into one `on_*_batch_begin`
    and `on_*_batch_end` per batch, with the batch's index and logs.

    Keras makes its `CallbackList` once the data tell the number of batches
    per epoch (the progress bar's target); so does this one, in `build`,
    which the call's `FitCall` calls at that moment. Before that it holds
    only the arguments.

    With a `keras.callbacks.TensorBoard(update_freq=N)` among the callbacks
    (N an integer), it also tells the step functions the TensorBoard step of
    each execution's first batch (see the backend's step function), and writes the
    callbacks' epoch-end summaries unconditionally: Keras' callback leaves its
    per-batch `record_if` condition in place at the end of an epoch, so epoch
    scalars and histograms were written only when the epoch's last batch
    number was a multiple of N.

    Attributes:
        replaying: True while an `on_*_batch_begin` replayed after its
            execution ran is running: the model's weights are already those
            after the execution's last batch, not those before this batch.
    """

    def __init__(
        self,
        channel: Channel,
        callbacks: Any = None,
        list_class: type = keras.callbacks.CallbackList,
        **list_kwargs: Any,
    ) -> None:
        # Deliberately not CallbackList.__init__: see `build`.
        self.channel = channel
        # Not `inner.model`: on JAX, Keras' callback list hands out the model
        # after writing the training state back into its variables.
        self._model: Any = list_kwargs["model"]
        self._raw_callbacks = callbacks
        self._list_class = list_class
        self._list_kwargs = list_kwargs
        self._inner: keras.callbacks.CallbackList | None = None
        self.replaying = False
        self._first_batch: dict[str, int] = {}
        # The batch after a short execution: data of unknown length ended
        # there; Keras still begins one more execution, `steps_per_execution`
        # batches on, that stops at once.
        self._after_short: dict[str, int] = {}
        self._board: Any = False  # `_tensorboard()`, once looked up
        self._replayed: dict[str, bool] = {}  # `_replays(phase)`, once looked up

    def __del__(self) -> None:
        # Keras' `CallbackList.__del__` shuts down the executor its
        # `__init__` made (Keras 3.10 reads it unconditionally); this list
        # has none: the inner list owns its own.
        pass

    def build(self, steps: int | None) -> None:
        """Makes the Keras `CallbackList` (of `list_class`) with `steps`
        batches per epoch."""
        if self._inner is None:
            self._inner = self._list_class(self._raw_callbacks, steps=steps, **self._list_kwargs)

    @property
    def inner(self) -> keras.callbacks.CallbackList:
        if self._inner is None:  # Keras did not report its batch count
            self.build(None)
        return self._inner

    @property
    def callbacks(self) -> list:
        return self.inner.callbacks

    @property
    def params(self) -> dict:
        return self.inner.params

    @property
    def model(self) -> Any:
        return self.inner.model

    def set_model(self, model: Any) -> None:
        self.inner.set_model(model)

    def set_params(self, params: dict) -> None:
        self.inner.set_params(params)

    # ---- per-batch expansion

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._begin("train", batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._end("train", batch, logs)

    def on_test_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._begin("test", batch, logs)

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._end("test", batch, logs)

    def _begin(self, phase: str, batch: int, logs: dict | None) -> None:
        batch = self._after_short.pop(phase, batch)
        getattr(self.inner, f"on_{phase}_batch_begin")(batch, logs)
        self._first_batch[phase] = batch
        self.channel.summary = self._summary_config(phase)
        self.channel.every_batch = self._replays(phase)

    def _end(self, phase: str, batch: int, logs: dict | None) -> None:
        self.channel.summary = None
        end = getattr(self.inner, f"on_{phase}_batch_end")
        if not self._replays(phase):
            executed = self.channel.take_batch_count()
            if executed is not None and executed < self._planned():
                self._after_short[phase] = self._first_batch[phase] + executed
            end(batch, logs)
            return
        every_batch = self.channel.take_batch_logs()
        if every_batch is None:
            end(batch, logs)
            return
        # Read now: a callback may run `evaluate` during the replay below.
        planned = self._planned()
        begin = getattr(self.inner, f"on_{phase}_batch_begin")
        first = self._first_batch[phase]
        for offset, batch_logs in enumerate(every_batch):
            if offset:
                self.replaying = True
                try:
                    begin(first + offset)
                finally:
                    self.replaying = False
            end(first + offset, batch_logs)
        if len(every_batch) < planned:
            self._after_short[phase] = first + len(every_batch)

    def _planned(self) -> int:
        """The batches the execution that ran last was to run."""
        return self.channel.steps or self._model.steps_per_execution

    def _replays(self, phase: str) -> bool:
        """Whether any callback has a per-batch method of `phase`: without
        one, the batches an execution ran before its last one are not
        replayed (nothing would see them)."""
        if phase not in self._replayed:
            self._replayed[phase] = any(
                has_batch_hooks(callback, phase) for callback in self.inner.callbacks
            )
        return self._replayed[phase]

    def _tensorboard(self) -> keras.callbacks.TensorBoard | None:
        """The TensorBoard callback whose writer is the default during a
        batch (the last one pushed), when it records per batch."""
        if self._board is False:
            found = None
            for callback in self.inner.callbacks:
                if isinstance(callback, keras.callbacks.TensorBoard) and isinstance(
                    callback.update_freq, int
                ):
                    found = callback
            self._board = found
        return self._board

    def _summary_config(self, phase: str) -> tuple[int, int] | None:
        board = self._tensorboard()
        if board is None:
            return None
        return internals.tensorboard_batch_count(board, phase), board.update_freq

    # ---- forwarded as they are

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        recording = (
            _backend.loop.recording_summaries() if self._tensorboard() else contextlib.nullcontext()
        )
        with recording:
            self.inner.on_epoch_end(epoch, logs)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._after_short.pop("train", None)
        self.inner.on_epoch_begin(epoch, logs)

    def on_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_batch_begin(batch, logs)

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_batch_end(batch, logs)

    def on_predict_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_predict_batch_begin(batch, logs)

    def on_predict_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.inner.on_predict_batch_end(batch, logs)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.inner.on_train_begin(logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.inner.on_train_end(logs)

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._after_short.pop("test", None)
        self.inner.on_test_begin(logs)

    def on_test_end(self, logs: dict | None = None) -> None:
        self.inner.on_test_end(logs)

    def on_predict_begin(self, logs: dict | None = None) -> None:
        self.inner.on_predict_begin(logs)

    def on_predict_end(self, logs: dict | None = None) -> None:
        self.inner.on_predict_end(logs)


# ---------------------------------------------------- fit/evaluate plumbing


def callback_list(
    model: keras.Model,
    method: str,
    arguments: dict,
    channel: Channel,
    list_class: type = keras.callbacks.CallbackList,
) -> PerBatchCallbacks:
    """The `PerBatchCallbacks` for `fit`'s or `evaluate`'s arguments (Keras',
    by name), holding what Keras would build its `CallbackList` from, with
    the same settings (`fit` caps `epochs` at `keras.config.max_epochs()`)."""
    verbose = arguments.get("verbose", "auto")
    if method == "fit":
        epochs = arguments.get("epochs", 1)
        max_epochs = keras.config.max_epochs()
        if max_epochs and max_epochs < epochs:
            epochs = max_epochs
        list_kwargs = dict(add_history=True, epochs=epochs)
    else:
        list_kwargs = dict(add_history=False, epochs=1)
    return PerBatchCallbacks(
        channel,
        arguments.get("callbacks"),
        list_class=list_class,
        add_progbar=verbose != 0,
        verbose=verbose,
        model=model,
        **list_kwargs,
    )


def row_logs(layout: list[tuple[str, tuple, Any]], row: list[float]) -> dict[str, Any]:
    """One batch's logs back from its row: Python floats for scalars (as
    Keras gives callbacks), arrays of the step's dtype otherwise. Exact: the
    float64 copy of a float32 or int32 value is exact."""
    logs: dict[str, Any] = {}
    start = 0
    for name, shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        if shape:
            logs[name] = np.asarray(row[start : start + size]).astype(dtype).reshape(shape)
        else:
            logs[name] = row[start]
        start += size
    return logs
