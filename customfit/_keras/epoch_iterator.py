"""Keras' `EpochIterator._enumerate_iterator`, copied, with the number of
batches of each execution chosen as the epoch runs.

Taken from Keras 3.15.1 (`keras/src/trainers/epoch_iterator.py`; 3.11 to
3.15 have the same source; 3.10 yields `(step, iterator)` where later
releases yield `(begin_step, end_step, iterator)`). `versions.COPIES` holds
the hash of that source for each tested release.

What the copy changes: Keras steps through an epoch `steps_per_execution`
batches at a time (`range(0, steps, steps_per_execution)`); here each
execution's number of batches comes from `next_steps(batch, remaining)`,
called just before the execution, and never runs past the epoch's known
number of batches (Keras' last execution of an epoch with `steps_per_epoch`
set and endless data runs a whole `steps_per_execution`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import keras

from customfit._keras import versions

_YIELDS_END_STEP = versions.release(keras.version()) >= (3, 11)


def size_executions(epoch_iterator: Any, next_steps: Callable[[int, int | None], int]) -> None:
    """Makes this `epoch_iterator` (one object, not its class) size each
    execution with `next_steps(batch, remaining)`: `batch` is the index of
    the execution's first batch in the epoch, `remaining` the number of
    batches left in the epoch (None when unknown)."""

    def sized(batch: int, remaining: int | None) -> int:
        steps = next_steps(batch, remaining)
        # What Keras' base `EpochIterator.__next__` (on PyTorch) draws for the
        # execution; TensorFlow's and JAX's hand the iterator on instead.
        epoch_iterator.steps_per_execution = steps
        return steps

    epoch_iterator._enumerate_iterator = lambda: _enumerate(epoch_iterator, sized)


def _item(step: int, steps: int, iterator: Any) -> tuple:
    if _YIELDS_END_STEP:
        return step, step + steps - 1, iterator
    return step, iterator


def _enumerate(self: Any, next_steps: Callable[[int, int | None], int]) -> Iterator[tuple]:
    self.data_adapter.on_epoch_begin()
    steps_per_epoch = self.steps_per_epoch or self._num_batches or -1

    if steps_per_epoch > 0:
        if self._current_iterator is None or self.steps_per_epoch is None:
            self._current_iterator = iter(self._get_iterator())
            self._steps_seen = 0
        step = 0
        while step < steps_per_epoch:
            if self._num_batches and self._steps_seen >= self._num_batches:
                if self.steps_per_epoch:
                    self._interrupted_warning()
                break
            steps = next_steps(step, steps_per_epoch - step)
            self._steps_seen += steps
            yield _item(step, steps, self._current_iterator)
            step += steps
        if self._num_batches and self._steps_seen >= self._num_batches:
            self._current_iterator = iter(self._get_iterator())
            self._steps_seen = 0
    else:
        iterator = iter(self._get_iterator())
        step = 0
        while True:
            steps = next_steps(step, None)
            self._steps_seen = step + steps
            yield _item(step, steps, iterator)
            step += steps
    self.data_adapter.on_epoch_end()
