"""Resuming a `fit` mid-epoch on TensorFlow (see `customfit._resume`).

`fit` makes iterators of one `tf.data` dataset (Keras makes one when an
epoch starts and one after each full epoch), and each `iter()` draws new
seeds for a `shuffle` with `reshuffle_each_iteration=True`. The dataset is
wrapped to count them, each backup records the count, and a resumed `fit`
makes and drops iterators until the resumed epoch's iterator is the one it
had (NumPy input: Keras' permutation is the same for every iterator, so this
changes nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from customfit._keras._tensorflow import trainer

KEY = "data_iterator"


class DatasetReplay:
    """The `DataReplay` of a TensorFlow `fit`: counts the iterators made of
    its dataset."""

    def __init__(self, epoch_iterator: Any, steps_per_epoch: int | None) -> None:
        self._steps_per_epoch = steps_per_epoch
        self.iterators_made = 0
        self._counted: _CountingDataset | None = None
        trainer.wrap_epoch_iterator_dataset(epoch_iterator, self._counting)

    def _counting(self, dataset: Any) -> _CountingDataset:
        self._counted = _CountingDataset(dataset, self)
        return self._counted

    def position(self, batch: int) -> dict[str, np.ndarray]:
        """The iterators made when the resumed epoch gets its own (that one
        included): the current epoch's after `batch` > 0, the next one's at
        an epoch's start."""
        return {KEY: np.asarray(self.iterators_made + (0 if batch else 1))}

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        if KEY not in saved or self._steps_per_epoch is not None or self._counted is None:
            return  # Keras reuses one iterator across epochs: see the warning.
        while self.iterators_made < int(saved[KEY]) - 1:
            iter(self._counted)


class _CountingDataset:
    """A dataset that counts the iterators made of it."""

    def __init__(self, dataset: Any, replay: DatasetReplay) -> None:
        self.dataset = dataset
        self._replay = replay

    def __iter__(self) -> Any:
        self._replay.iterators_made += 1
        return iter(self.dataset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)


def resuming_train_function(resume: Any, train_function: Callable) -> Callable:
    def function(iterator: Any) -> Any:
        if resume.skipping():
            resume.skip(iterator)
            if not resume.last_skip():
                return {}
            # The last call that skips returns the epoch's logs as the
            # interrupted run left them: with data of unknown length, a
            # backup may follow the epoch's last batch, and Keras ends the
            # epoch with these logs.
            _restore_metrics(resume, train_function, iterator)
            return resume.model.get_metrics_result()
        _restore_metrics(resume, train_function, iterator)
        return train_function(iterator)

    return function


def _restore_metrics(resume: Any, train_function: Callable, iterator: Any) -> None:
    """After tracing the step, so that metrics created while tracing exist."""
    if not resume.metrics_pending:
        return
    trace_ahead = getattr(train_function, "trace_ahead", None)
    if trace_ahead is not None:  # a customfit StepFunction
        trace_ahead(iterator)
    resume.restore_metrics()
