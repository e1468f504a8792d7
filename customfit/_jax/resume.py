"""Resuming a `fit` mid-epoch on JAX (see `customfit._resume`).

Keras' JAX data adapters shuffle with NumPy's global random state: each
epoch's iterator draws its permutation (or, with `shuffle="batch"`, one per
batch) when its first batch is read. Each iterator is wrapped to note that
state just before it draws; a backup mid-epoch records the state the
current epoch's iterator started from, one at an epoch's start the state
now (what the next epoch's will start from), and a resumed `fit` sets it
before the resumed epoch's iterator draws.

While `fit` runs, Keras' JAX trainer holds the values of the model's
variables in a `state` it passes from step to step, not in the variables
(they are written back at the end of each epoch, or when a callback reads
`self.model`). So the backup's metric values go into that `state` as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import jax
import numpy as np
from jax.experimental import multihost_utils

from customfit._keras import internals

KEY = "numpy_random_state"


class NumpyRandomReplay:
    """The `DataReplay` of a JAX `fit`."""

    def __init__(self, epoch_iterator: Any, steps_per_epoch: int | None) -> None:
        self._epoch_start: tuple | None = None
        internals.wrap_jax_iterators(epoch_iterator, self._noting_start)

    def _noting_start(self, iterator: Iterator) -> Iterator:
        def noted() -> Iterator:
            self._epoch_start = cast(tuple, np.random.get_state())
            yield from iterator

        return noted()

    def position(self, batch: int) -> dict[str, np.ndarray]:
        state = self._epoch_start if batch and self._epoch_start is not None else None
        kind, keys, position, has_gauss, cached = state or cast(tuple, np.random.get_state())
        saved = {
            f"{KEY}/keys": np.asarray(keys, np.uint32),
            f"{KEY}/position": np.asarray([position, has_gauss]),
            f"{KEY}/cached_gaussian": np.asarray(cached),
        }
        if jax.process_count() == 1:
            return saved
        # Each process shuffles its own part with its own state: one row per
        # process, gathered bit for bit (as uint32: without jax_enable_x64 a
        # float64 would be gathered as float32).
        packed = np.concatenate(
            [
                saved[f"{KEY}/keys"],
                np.asarray([position, has_gauss], np.uint32),
                np.asarray([cached], np.float64).view(np.uint32),
            ]
        )
        every = np.asarray(multihost_utils.process_allgather(packed))
        return {
            f"{KEY}/keys": every[:, :-4],
            f"{KEY}/position": every[:, -4:-2].astype(np.int64),
            f"{KEY}/cached_gaussian": np.ascontiguousarray(every[:, -2:]).view(np.float64)[:, 0],
        }

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        if f"{KEY}/keys" not in saved:
            return
        keys = np.asarray(saved[f"{KEY}/keys"], np.uint32)
        position_gauss = np.asarray(saved[f"{KEY}/position"])
        cached = np.asarray(saved[f"{KEY}/cached_gaussian"])
        if keys.ndim == 2:  # one row per process
            if len(keys) != jax.process_count():
                raise ValueError(
                    f"The backup holds NumPy's random state of {len(keys)} processes; "
                    f"this run has {jax.process_count()}. Resume with as many "
                    "processes, or delete the backup directory."
                )
            row = jax.process_index()
            keys, position_gauss, cached = keys[row], position_gauss[row], cached[row]
        position, has_gauss = (int(v) for v in position_gauss)
        np.random.set_state(("MT19937", keys, position, has_gauss, float(cached)))


def resuming_train_function(resume: Any, train_function: Callable) -> Callable:
    def function(state: Any, iterator: Any) -> tuple[Any, Any]:
        if resume.skipping():
            batches = resume.skip(iterator)
            if not resume.last_skip():
                return {}, state
            # The last call that skips returns the epoch's logs as the
            # interrupted run left them (see the TensorFlow loop's).
            state = _restore_metrics(resume, train_function, state, batches[0])
            return resume.model.get_metrics_result(), state
        if resume.metrics_pending:
            state = _restore_metrics(resume, train_function, state, None)
        return train_function(state, iterator)

    return function


def _restore_metrics(resume: Any, train_function: Callable, state: Any, batch: Any | None) -> Any:
    """The backup's metric values in the variables and in `state`, after the
    step was traced on `batch`, so that metrics created while tracing exist."""
    trace_ahead = getattr(train_function, "trace_ahead", None)
    if trace_ahead is not None and batch is not None:  # a customfit StatelessStep
        trace_ahead(state, batch)
    resume.restore_metrics()
    trainable, non_trainable, optimizer, _ = state
    return (trainable, non_trainable, optimizer, [v.value for v in resume.model.metrics_variables])
