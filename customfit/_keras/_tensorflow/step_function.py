"""Keras' `_make_function`, copied, with the logs of every step of an
execution and the real batch number for `tf.summary`.

Taken from Keras 3.15.1 (`keras/src/backend/tensorflow/trainer.py`,
`TensorFlowTrainer._make_function`; Keras 3.12 to 3.15 have the same source,
3.10 and 3.11 differ only in not converting `tf.experimental.Optional`
inputs, which `trainer.autoconvert_optionals` adapts). `versions.COPIES`
holds the hash of that source for each tested release, and customfit warns
when the installed Keras has another.

What the copy changes:

- the multi-step loop runs the step in the `tf.while_loop` body itself,
  where Keras runs it inside a `tf.cond`: under `MirroredStrategy` that
  `tf.cond` makes stock `fit` with `steps_per_execution > 1` fail on
  TensorFlow 2.21 ("You must feed a value for placeholder tensor");
- each step's logs are flattened into one float64 row (`flat_row`), the rows
  of an execution stacked into `[steps, values]` and handed to the caller
  with the names, shapes and dtypes needed to read them back (`row_logs`);
  when no callback reads them (`channel.every_batch` False), a variant
  without rows hands back `[steps, 0]`, the number of batches run;
- with `summary=(first_step, update_freq)`, each step runs with the real
  batch number as `tf.summary`'s default step and an in-graph
  `step % update_freq == 0` as the `record_if` condition.
- with `steps` (a tensor), an execution runs that many batches: the number
  can change between executions without retracing
  (`steps_per_execution="auto"`);
- the usual call passes the iterator alone, as Keras' does: each optional
  argument adds binding and hashing work to every call of the `tf.function`.

`unrolled_steps_per_execution` is not used (it only changes how the loop is
laid out, not what it computes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from customfit._keras._tensorflow import trainer


def make_function(
    model: keras.Model, step_function: Callable, channel_of: Callable[[], Any]
) -> StepFunction:
    """Keras' `_make_function(step_function)`, with per-step logs and the
    real batch step for summaries (see the module docstring).

    `channel_of()` is the `_per_batch.Channel` of the call running (None
    outside `fit` and `evaluate`), which carries the summary configuration
    in (`channel.summary`), the batches to run (`channel.steps`) and an
    execution's rows out (`channel.rows`). The
    single step (`strategy.run`, Keras' reduction of the logs,
    `tf.function`/XLA) is Keras' as it is. The multi-step loop fetches and
    runs the same batches in the same order.
    """

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data: Any) -> Any:
        """Runs a single training step on a batch of data."""
        outputs = model.distribute_strategy.run(step_function, args=(data,))
        return trainer.reduce_per_replica(outputs, model.distribute_strategy, reduction="auto")

    if not model.run_eagerly:
        one_step_on_data = tf.function(
            one_step_on_data, reduce_retracing=True, jit_compile=model.jit_compile
        )
    one_step_on_data = trainer.autoconvert_optionals(model, one_step_on_data)

    def step_at(data: Any, summary: Any, offset: Any) -> Any:
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

    def multi_step_on_iterator(iterator: Any, summary: Any, steps: Any, collect: bool) -> Any:
        """Runs `steps` batches (a tensor; None: `model.steps_per_execution`)
        and returns the last one's logs as an optional and every step's rows
        as a tensor (with no columns unless `collect`): `(optional, rows)`;
        the optional alone when the model runs one step per execution."""
        if steps is None:
            steps = model.steps_per_execution
            if steps == 1:
                outputs = step_at(iterator.get_next(), summary, 0)
                return tf.experimental.Optional.from_value(outputs)

        # The spec is set lazily during the tracing of `tf.while_loop`.
        empty_outputs = tf.experimental.Optional.empty(None)
        width: list[int] = []  # logs per step, known once a step is traced

        def cond(
            execution_step: Any, optional_outputs: Any, next_optional_inputs: Any, rows: Any
        ) -> Any:
            return tf.logical_and(
                tf.less(execution_step, steps),
                next_optional_inputs.has_value(),
            )

        def body(
            execution_step: Any, optional_outputs: Any, next_optional_inputs: Any, rows: Any
        ) -> tuple[Any, Any, Any, Any]:
            # Keras wraps this step in a `tf.cond` on the loop condition,
            # which `cond` already guarantees; see the docstring.
            outputs = step_at(next_optional_inputs.get_value(), summary, execution_step)
            next_optional_outputs = tf.experimental.Optional.from_value(outputs)
            empty_outputs._element_spec = next_optional_outputs.element_spec
            row = flat_row(outputs) if collect else tf.zeros([0], tf.float64)
            width[:] = [row.shape[0]]
            return (
                execution_step + 1,
                next_optional_outputs,
                tf.cond(
                    tf.less(execution_step + 1, steps),
                    lambda: iterator.get_next_as_optional(),
                    lambda: next_optional_inputs,
                ),
                rows.write(execution_step, row) if collect else rows,
            )

        rows = tf.TensorArray(
            tf.float64,
            size=0,
            dynamic_size=True,
            infer_shape=False,
            element_shape=tf.TensorShape([None]),
        )
        ran, final_optional_outputs, _, rows = tf.while_loop(
            cond,
            body,
            loop_vars=[tf.constant(0), empty_outputs, iterator.get_next_as_optional(), rows],
        )
        final_optional_outputs._element_spec = empty_outputs.element_spec
        if not width:  # eagerly, with no batch left: nothing ran
            return final_optional_outputs, None
        if not collect:
            return final_optional_outputs, tf.zeros(tf.stack([ran, 0]), tf.float64)
        stacked = tf.cond(
            rows.size() > 0,
            lambda: tf.reshape(rows.stack(), [-1, width[0]]),
            lambda: tf.zeros([0, width[0]], tf.float64),
        )
        return final_optional_outputs, stacked

    # One function per combination of optional arguments, so that the usual
    # call (`iterator` alone) binds and hashes one argument, as Keras' does.
    def uncompiled(summary: bool, steps: bool, collect: bool) -> Callable:
        if summary and steps:
            return lambda iterator, summary, steps: multi_step_on_iterator(
                iterator, summary, steps, collect
            )
        if summary:
            return lambda iterator, summary: multi_step_on_iterator(
                iterator, summary, None, collect
            )
        if steps:
            return lambda iterator, steps: multi_step_on_iterator(iterator, None, steps, collect)
        return lambda iterator: multi_step_on_iterator(iterator, None, None, collect)

    variants: dict[tuple[bool, bool, bool], Any] = {}

    def multi_step(summary: bool, steps: bool, collect: bool = True) -> Any:
        key = (summary, steps, collect)
        if key not in variants:
            run = tf.autograph.experimental.do_not_convert(uncompiled(*key))
            if not model.run_eagerly:
                run = tf.function(run, reduce_retracing=True)
            variants[key] = run
        return variants[key]

    tf_iterator_types: dict[type, bool] = {}

    def is_tf_iterator(iterator: Any) -> bool:
        # `tf.distribute.DistributedIterator` is a runtime protocol, slow
        # to check once per batch; an epoch's iterators share one type.
        kind = type(iterator)
        if kind not in tf_iterator_types:
            tf_iterator_types[kind] = isinstance(
                iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)
            )
        return tf_iterator_types[kind]

    def function(iterator: Any) -> Any:
        channel = channel_of()
        summary = steps = None
        collect = True
        if channel is not None:
            channel.rows = None
            summary, steps, collect = channel.summary, channel.steps, channel.every_batch
        if is_tf_iterator(iterator):
            arguments = [iterator]
            if summary is not None:
                first_step, every = summary
                arguments.append((tf.constant(first_step, tf.int64), tf.constant(every, tf.int64)))
            if steps is not None:
                arguments.append(tf.constant(steps, tf.int32))
            run = multi_step(summary is not None, steps is not None, collect)
            opt_outputs, stacked = run(*arguments), None
            if isinstance(opt_outputs, tuple):
                opt_outputs, stacked = opt_outputs
            if not opt_outputs.has_value():
                raise StopIteration
            outputs = opt_outputs.get_value()
            if stacked is not None and channel is not None:
                channel.rows = (layout(outputs), stacked)
            return outputs
        for _, data in zip(range(steps or model.steps_per_execution), iterator):
            outputs = one_step_on_data(data)
        return outputs

    def trace_ahead(iterator: Any) -> bool:
        if model.run_eagerly:
            return False
        channel = channel_of()
        steps = None if channel is None else channel.steps
        run = multi_step(False, steps is not None)
        if steps is None:
            run.get_concrete_function(iterator)
        else:
            run.get_concrete_function(iterator, tf.TensorSpec([], tf.int32))
        return True

    return StepFunction(function, trace_ahead)


class StepFunction:
    """A train or test function as Keras calls it, `function(iterator)`
    returning the logs of the execution's last step, with what customfit
    needs besides.

    Attributes:
        after_each_execution: Callables run on the host after every
            execution, in order (`recipes.SkipNonFinite` checks its limits
            there).
    """

    def __init__(self, run: Callable[[Any], Any], trace_ahead: Callable[[Any], bool]) -> None:
        self._run = run
        self._trace_ahead = trace_ahead
        self.after_each_execution: list[Callable[[], None]] = []

    def __call__(self, iterator: Any) -> Any:
        logs = self._run(iterator)
        for check in self.after_each_execution:
            check()
        return logs

    def trace_ahead(self, iterator: Any) -> bool:
        """Traces the step for `iterator` without running it, so that the
        variables it creates while tracing (metrics built on first use,
        `CustomModel.log` columns) exist before the first call. False when
        there is nothing to trace (`run_eagerly=True`)."""
        return self._trace_ahead(iterator)


def flat_row(outputs: Any) -> tf.Tensor:
    """The step's logs as one float64 vector, in `tree.flatten` order, each
    value flattened (scalars, vectors such as `F1Score(average=None)`)."""
    values = tree.flatten(outputs)
    unknown = [v.shape for v in values if not v.shape.is_fully_defined()]
    if unknown:
        raise ValueError(
            "With steps_per_execution > 1, every value a step returns needs a "
            f"static shape; got shapes {unknown}. Give the metric a fixed "
            "shape, or use steps_per_execution=1."
        )
    return tf.concat([tf.reshape(tf.cast(v, tf.float64), [-1]) for v in values], 0)


def layout(outputs: Any) -> list[tuple[str, tuple, Any]]:
    """`(name, shape, dtype)` of each log, in the order `flat_row` stacks
    their values."""
    return [
        (name, tuple(outputs[name].shape), outputs[name].dtype.as_numpy_dtype)
        for name in tree.flatten({name: name for name in outputs})
    ]
