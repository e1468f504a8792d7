"""Every batch reported to callbacks and TensorBoard, also when
`steps_per_execution > 1`.

Keras runs `steps_per_execution` batches per call of the compiled function and
calls the callbacks once per call, with the last batch's logs, at the index of
the call's last batch. TensorBoard counts those calls as batches, and summaries
written inside the step get the step number and the `update_freq` decision of
the moment the step was traced (step 1, for every later batch too).

Two pieces fix that:

- `make_function` is Keras' `_make_function` (distribution, `tf.function`,
  XLA, the multi-step `tf.while_loop`, laid out so that it also runs under
  `MirroredStrategy`) with the logs of each step of an
  execution stacked into one `[steps, values]` float64 tensor, handed over
  through a `Channel`. When a `keras.callbacks.TensorBoard` with an integer
  `update_freq` is in `fit`'s callbacks, each step also runs with the real
  batch number as `tf.summary`'s default step and with an in-graph
  `step % update_freq == 0` as the `record_if` condition.
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
import inspect
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf
from keras import tree

from customfit import _keras_internals as internals


class Channel:
    """What a model's step functions and its `PerBatchCallbacks` pass each
    other around one execution.

    Attributes:
        summary: Set before an execution: None (leave `tf.summary` state as
            it is) or `(first_step, update_freq)`, the TensorBoard step of the
            execution's first batch and how often to record.
        rows: Set by the step function after an execution with more than one
            step: `(layout, stacked)`, `stacked[i]` the flattened logs after
            the execution's `i`-th batch, `layout` their names, shapes and
            dtypes (see `_row_logs`). None otherwise.
    """

    def __init__(self) -> None:
        self.summary: tuple[int, int] | None = None
        self.rows: tuple[list, tf.Tensor] | None = None
        self.pending: PerBatchCallbacks | None = None
        self.replaying = False

    def take_rows(self) -> tuple[list, tf.Tensor] | None:
        rows, self.rows = self.rows, None
        return rows


# ------------------------------------------------------------ step function


def make_function(model: keras.Model, step_function: Callable, channel: Channel) -> Callable:
    """Keras' `_make_function(step_function)`, with per-step logs and the
    real batch step for summaries (see the module docstring).

    The single step (`strategy.run`, Keras' reduction of the logs,
    `tf.function`/XLA) is Keras 3.15's as it is. The multi-step loop fetches
    and runs the same batches in the same order, but runs the step in the
    `tf.while_loop` body itself, where Keras runs it inside a `tf.cond`: under
    `MirroredStrategy` that `tf.cond` makes stock `fit` with
    `steps_per_execution > 1` fail on TensorFlow 2.21 ("You must feed a value
    for placeholder tensor"). `unrolled_steps_per_execution` is not used (it
    only changes how the loop is laid out, not what it computes).
    """

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        """Runs a single training step on a batch of data."""
        outputs = model.distribute_strategy.run(step_function, args=(data,))
        return internals.reduce_per_replica(
            outputs, model.distribute_strategy, reduction="auto"
        )

    if not model.run_eagerly:
        one_step_on_data = tf.function(
            one_step_on_data, reduce_retracing=True, jit_compile=model.jit_compile
        )
    one_step_on_data = internals.autoconvert_optionals(model, one_step_on_data)

    def step_at(data, summary, offset):
        """`one_step_on_data(data)`; with `summary=(first_step, every)`, as
        batch `first_step + offset` for `tf.summary`."""
        if summary is None:
            return one_step_on_data(data)
        first_step, every = summary
        step = first_step + tf.cast(offset, tf.int64)
        previous = tf.summary.experimental.get_step()
        tf.summary.experimental.set_step(step)
        try:
            with tf.summary.record_if(tf.equal(step % every, 0)):
                return one_step_on_data(data)
        finally:
            tf.summary.experimental.set_step(previous)

    @tf.autograph.experimental.do_not_convert
    def multi_step_on_iterator(iterator, summary=None):
        steps_per_execution = model.steps_per_execution
        if steps_per_execution == 1:
            outputs = step_at(iterator.get_next(), summary, 0)
            return tf.experimental.Optional.from_value(outputs), None

        # The spec is set lazily during the tracing of `tf.while_loop`.
        empty_outputs = tf.experimental.Optional.empty(None)
        width: list[int] = []  # logs per step, known once a step is traced

        def cond(execution_step, optional_outputs, next_optional_inputs, rows):
            return tf.logical_and(
                tf.less(execution_step, steps_per_execution),
                next_optional_inputs.has_value(),
            )

        def body(execution_step, optional_outputs, next_optional_inputs, rows):
            # Keras wraps this step in a `tf.cond` on the loop condition,
            # which `cond` already guarantees; see the docstring.
            outputs = step_at(next_optional_inputs.get_value(), summary, execution_step)
            next_optional_outputs = tf.experimental.Optional.from_value(outputs)
            empty_outputs._element_spec = next_optional_outputs.element_spec
            row = _flat_row(outputs)
            width[:] = [row.shape[0]]
            return (
                execution_step + 1,
                next_optional_outputs,
                tf.cond(
                    tf.less(execution_step + 1, steps_per_execution),
                    lambda: iterator.get_next_as_optional(),
                    lambda: next_optional_inputs,
                ),
                rows.write(execution_step, row),
            )

        rows = tf.TensorArray(
            tf.float64, size=0, dynamic_size=True, infer_shape=False,
            element_shape=tf.TensorShape([None]),
        )
        _, final_optional_outputs, _, rows = tf.while_loop(
            cond, body,
            loop_vars=[tf.constant(0), empty_outputs, iterator.get_next_as_optional(), rows],
        )
        final_optional_outputs._element_spec = empty_outputs.element_spec
        if not width:  # eagerly, with no batch left: nothing ran
            return final_optional_outputs, None
        stacked = tf.cond(
            rows.size() > 0,
            lambda: tf.reshape(rows.stack(), [-1, width[0]]),
            lambda: tf.zeros([0, width[0]], tf.float64),
        )
        return final_optional_outputs, stacked

    if not model.run_eagerly:
        multi_step_on_iterator = tf.function(multi_step_on_iterator, reduce_retracing=True)

    def function(iterator):
        channel.rows = None
        if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            summary = channel.summary
            if summary is not None:
                summary = (tf.constant(summary[0], tf.int64), tf.constant(summary[1], tf.int64))
            opt_outputs, stacked = multi_step_on_iterator(iterator, summary)
            if not opt_outputs.has_value():
                raise StopIteration
            outputs = opt_outputs.get_value()
            if stacked is not None:
                channel.rows = (_layout(outputs), stacked)
            return outputs
        for _, data in zip(range(model.steps_per_execution), iterator):
            outputs = one_step_on_data(data)
        return outputs

    def trace_ahead(iterator: Any) -> bool:
        """Traces the step for `iterator` without running it, so that the
        variables it creates while tracing (metrics built on first use,
        `CustomModel.log` columns) exist before the first call. False when
        there is nothing to trace (`run_eagerly=True`)."""
        if model.run_eagerly:
            return False
        multi_step_on_iterator.get_concrete_function(iterator)
        return True

    function.trace_ahead = trace_ahead
    return function


def replayed_begin(model: keras.Model) -> bool:
    """Whether the `on_train_batch_begin`/`on_test_batch_begin` now running
    is one `PerBatchCallbacks` replays after its execution ran: the model's
    weights are already those after the execution's last batch, not those
    before this batch."""
    channel = model.__dict__.get("_per_batch_channel")
    return channel is not None and channel.replaying


def _flat_row(outputs: Any) -> tf.Tensor:
    """The step's logs as one float64 vector, in `tree.flatten` order, each
    value flattened (scalars, vectors such as `F1Score(average=None)`)."""
    values = tree.flatten(outputs)
    unknown = [v.shape for v in values if not v.shape.is_fully_defined()]
    if unknown:
        raise ValueError(
            "With steps_per_execution > 1, every value a step returns needs a "
            f"static shape; got shapes {unknown}. Give the metric a fixed "
            "shape, or use steps_per_execution=1.")
    return tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for v in values], 0)


def _layout(outputs: Any) -> list[tuple[str, tuple, Any]]:
    """`(name, shape, dtype)` of each log, in the order `_flat_row` stacks
    their values."""
    return [(name, tuple(outputs[name].shape), outputs[name].dtype.as_numpy_dtype)
            for name in tree.flatten({name: name for name in outputs})]


def _row_logs(layout: list[tuple[str, tuple, Any]], row: list[float]) -> dict[str, Any]:
    """One batch's logs back from its row: Python floats for scalars (as
    Keras gives callbacks), arrays of the step's dtype otherwise. Exact: the
    float64 copy of a float32 or int32 value is exact."""
    logs: dict[str, Any] = {}
    start = 0
    for name, shape, dtype in layout:
        size = int(np.prod(shape, dtype=np.int64))
        if shape:
            logs[name] = np.asarray(row[start:start + size]).astype(dtype).reshape(shape)
        else:
            logs[name] = row[start]
        start += size
    return logs


# -------------------------------------------------------------- callbacks


class PerBatchCallbacks(keras.callbacks.CallbackList):
    """The `CallbackList` Keras' `fit`/`evaluate` call, expanding each
    execution of `steps_per_execution` batches into one `on_*_batch_begin`
    and `on_*_batch_end` per batch, with the batch's index and logs.

    Keras makes its `CallbackList` once the data tell the number of batches
    per epoch (the progress bar's target); so does this one, in `build`,
    which `CustomModel._maybe_symbolic_build` calls at that moment. Before
    that it holds only the arguments.

    With a `keras.callbacks.TensorBoard(update_freq=N)` among the callbacks
    (N an integer), it also tells the step functions the TensorBoard step of
    each execution's first batch (see `make_function`), and writes the
    callbacks' epoch-end summaries unconditionally: Keras' callback leaves its
    per-batch `record_if` condition in place at the end of an epoch, so epoch
    scalars and histograms were written only when the epoch's last batch
    number was a multiple of N.
    """

    def __init__(
        self,
        channel: Channel,
        callbacks: Any = None,
        inner: keras.callbacks.CallbackList | None = None,
        **list_kwargs: Any,
    ) -> None:
        # Deliberately not CallbackList.__init__: see `build`. `inner`, a
        # CallbackList made already (customfit's resume list), is used as it is.
        self._channel = channel
        self._raw_callbacks = callbacks
        self._list_kwargs = list_kwargs
        self._inner: keras.callbacks.CallbackList | None = inner
        self._first_batch: dict[str, int] = {}
        # The batch after a short execution: data of unknown length ended
        # there; Keras still begins one more execution, `steps_per_execution`
        # batches on, that stops at once.
        self._after_short: dict[str, int] = {}

    def build(self, steps: int | None) -> None:
        """Makes the Keras `CallbackList` with `steps` batches per epoch."""
        if self._inner is None:
            self._inner = keras.callbacks.CallbackList(
                self._raw_callbacks, steps=steps, **self._list_kwargs
            )

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
        self._channel.summary = self._summary_config(phase)

    def _end(self, phase: str, batch: int, logs: dict | None) -> None:
        self._channel.summary = None
        rows = self._channel.take_rows()
        end = getattr(self.inner, f"on_{phase}_batch_end")
        if rows is None:
            end(batch, logs)
            return
        layout, stacked = rows
        begin = getattr(self.inner, f"on_{phase}_batch_begin")
        first = self._first_batch[phase]
        rows = stacked.numpy().tolist()
        for offset, row in enumerate(rows):
            if offset:
                self._channel.replaying = True
                try:
                    begin(first + offset)
                finally:
                    self._channel.replaying = False
            end(first + offset, _row_logs(layout, row))
        if len(rows) < self.inner.model.steps_per_execution:
            self._after_short[phase] = first + len(rows)

    def _tensorboard(self) -> keras.callbacks.TensorBoard | None:
        """The TensorBoard callback whose writer is the default during a
        batch (the last one pushed), when it records per batch."""
        found = None
        for callback in self.inner.callbacks:
            if isinstance(callback, keras.callbacks.TensorBoard) and isinstance(
                callback.update_freq, int
            ):
                found = callback
        return found

    def _summary_config(self, phase: str) -> tuple[int, int] | None:
        board = self._tensorboard()
        if board is None:
            return None
        return internals.tensorboard_batch_count(board, phase), board.update_freq

    # ---- forwarded as they are

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        recording = tf.summary.record_if(True) if self._tensorboard() else contextlib.nullcontext()
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

_FIT = inspect.signature(keras.Model.fit)
_EVALUATE = inspect.signature(keras.Model.evaluate)


@contextlib.contextmanager
def per_batch_callbacks(
    model: keras.Model, channel: Channel, method: str, args: tuple, kwargs: dict,
    made_here: keras.callbacks.CallbackList | None = None,
) -> Iterator[tuple[tuple, dict]]:
    """`fit`'s or `evaluate`'s arguments with `callbacks` replaced by a
    `PerBatchCallbacks` holding what Keras would build its `CallbackList`
    from. A `CallbackList` passed in (by the user, or by `fit` to its
    validation `evaluate`) is used as it is, except `made_here`, one that
    customfit made for this call, which the `PerBatchCallbacks` wraps."""
    bound = (_FIT if method == "fit" else _EVALUATE).bind(model, *args, **kwargs)
    arguments = bound.arguments
    callbacks = arguments.get("callbacks")
    if isinstance(callbacks, keras.callbacks.CallbackList):
        if callbacks is not made_here:
            yield args, kwargs
            return
        arguments["callbacks"] = PerBatchCallbacks(channel, inner=callbacks)
        yield bound.args[1:], bound.kwargs
        return
    verbose = arguments.get("verbose", "auto")
    if method == "fit":
        epochs = arguments.get("epochs", 1)
        max_epochs = keras.config.max_epochs()
        if max_epochs and max_epochs < epochs:  # as Keras' fit caps them
            epochs = max_epochs
        list_kwargs = dict(add_history=True, epochs=epochs)
    else:
        list_kwargs = dict(add_history=False, epochs=1)
    arguments["callbacks"] = PerBatchCallbacks(
        channel, callbacks, add_progbar=verbose != 0, verbose=verbose, model=model,
        **list_kwargs)
    previous, channel.pending = channel.pending, arguments["callbacks"]
    try:
        yield bound.args[1:], bound.kwargs
    finally:
        channel.pending = previous


def batches_known(channel: Channel, epoch_iterator: Any) -> None:
    """Called where Keras learns the batches per epoch, just before it would
    make its `CallbackList`: builds the pending `PerBatchCallbacks`."""
    pending = channel.pending
    if pending is not None and epoch_iterator is not None:
        channel.pending = None
        pending.build(internals.epoch_batches(epoch_iterator))
