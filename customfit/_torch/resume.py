"""Resuming a `fit` mid-epoch on PyTorch (see `customfit._resume`).

Keras' PyTorch data loader draws its shuffle from torch's global random
state when an epoch's iterator starts, and an unseeded `Dropout` draws from
it at every batch. Each epoch's loader is wrapped to note that state just
before the epoch draws; a backup records it and the state at the backup. A
resumed `fit` sets the first before the resumed epoch draws (the same
permutation), skips the batches the interrupted run had trained, then sets
the second (the same dropout masks from there on). `shuffle="batch"` draws
a permutation per batch, between the dropout draws: refused.

`log` creates a metric the first time a name is logged, in the step; the
backup's values of such metrics are put back after the step has run once
in a discovery scope (its assignments and random draws discarded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import keras
import numpy as np
import torch

from customfit._keras import internals

KEY = "torch_random_state"


class TorchRandomReplay:
    """The `DataReplay` of a PyTorch `fit`."""

    def __init__(self, epoch_iterator: Any, steps_per_epoch: int | None) -> None:
        if internals.shuffles_per_batch(epoch_iterator):
            raise ValueError(
                'customfit.callbacks.BackupAndRestore cannot resume a shuffle="batch" '
                "epoch exactly on Keras' PyTorch backend (its permutations and the "
                "dropout masks draw from one random state, interleaved). Use "
                "shuffle=True, or save_freq='epoch'."
            )
        self._epoch_start: torch.Tensor | None = None
        self._after_skip: np.ndarray | None = None
        internals.wrap_torch_dataloaders(epoch_iterator, self._noting_start)

    def _noting_start(self, loader: Any) -> Any:
        replay = self

        class Noted:
            def __iter__(self) -> Iterator:
                replay._epoch_start = torch.get_rng_state()
                return iter(loader)

            def __len__(self) -> int:
                return len(loader)

        return Noted()

    def position(self, batch: int) -> dict[str, np.ndarray]:
        now = torch.get_rng_state()
        start = self._epoch_start if batch and self._epoch_start is not None else now
        return {
            f"{KEY}/epoch_start": start.numpy().copy(),
            f"{KEY}/now": now.numpy().copy(),
        }

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        if f"{KEY}/epoch_start" not in saved:
            return
        torch.set_rng_state(torch.from_numpy(np.asarray(saved[f"{KEY}/epoch_start"], np.uint8)))
        self._after_skip = np.asarray(saved[f"{KEY}/now"], np.uint8)

    def skipped(self) -> None:
        """The resumed epoch's trained batches are skipped: the random state
        the interrupted run had there."""
        if self._after_skip is not None:
            torch.set_rng_state(torch.from_numpy(self._after_skip.copy()))
            self._after_skip = None


def resuming_train_function(resume: Any, train_function: Callable) -> Callable:
    def function(batches: list) -> Any:
        if resume.skipping():
            # Keras' PyTorch epoch iterator drew this execution's batches.
            if not resume.last_skip():
                return {}
            resume.data.skipped()
            _restore_metrics(resume, train_function, batches[0])
            return resume.model.get_metrics_result()
        if resume.metrics_pending:
            resume.data.skipped()
            _restore_metrics(resume, train_function, batches[0])
        return train_function(batches)

    return function


def _restore_metrics(resume: Any, train_function: Callable, batch: Any) -> None:
    discover = getattr(train_function, "discover", None)
    if discover is not None:  # a customfit step function
        discover(batch)
    resume.restore_metrics()


def discovery(model: keras.Model, run: Callable[[], Any]) -> None:
    """Runs `run()` (the step on one batch) to note the names it logs, with
    every assignment to the model's and its optimizers' variables and every
    draw from torch's random state discarded."""
    variables = list(model.variables) + [
        v for optimizer in _optimizers(model) for v in optimizer.variables
    ]
    mapping = [(v, v.value.detach().clone().requires_grad_(v.trainable)) for v in variables]
    with torch.random.fork_rng(), model._step_logs.discovering():
        with keras.StatelessScope(state_mapping=mapping, initialize_variables=False):
            run()
    model._step_logs.create_discovered()


def _optimizers(model: keras.Model) -> list:
    from customfit import _optimizers

    return list(_optimizers.registered(model).values())
