"""Which worker of a multi-worker cluster this process is, and where it writes.

Under `tf.distribute.MultiWorkerMirroredStrategy` every worker runs the same
`fit`, callbacks included. Files are written by the chief only (the worker
TensorFlow names in `strategy.extended.should_checkpoint`); every other
worker runs the same saving code into a private temporary directory that is
deleted afterwards, so that anything saving does across workers happens on
all of them, and a directory shared by the workers holds one writer's files.
Everything reads the shared files. With one process, this process is the
chief.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from customfit._keras import internals


def multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several worker processes."""
    return internals.logs_reduced_along_first_axis(strategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the files (always, with one process)."""
    return bool(strategy.extended.should_checkpoint)


def task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)


@contextlib.contextmanager
def written_to(path: str, strategy: tf.distribute.Strategy) -> Iterator[str]:
    """Where this worker writes what belongs at `path`: `path` itself on the
    chief, a file of the same name in a private temporary directory on the
    others (deleted when the block ends)."""
    if is_chief(strategy):
        yield path
        return
    directory = tempfile.mkdtemp(prefix=f"customfit-worker-{task_id(strategy)}-")
    try:
        yield os.path.join(directory, os.path.basename(path))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def agreed(values: list[int], strategy: tf.distribute.Strategy) -> bool:
    """Whether every worker passed the same `values` (a collective: every
    worker must call it, at the same point)."""
    if not multi_worker(strategy):
        return True
    local = tf.constant([values], tf.int64)
    every = strategy.gather(strategy.run(lambda: tf.identity(local)), axis=0).numpy()
    return bool((every == every[0]).all())


# owner -> (variables, compiled gather): one traced function per set of
# variables (the strategy's gather traces a new function at every call).
_GATHERS: weakref.WeakKeyDictionary[Any, tuple[list, Callable]] = weakref.WeakKeyDictionary()


def every_replica(
    owner: Any, variables: list, strategy: tf.distribute.Strategy
) -> list[np.ndarray]:
    """Each variable's value on every replica of the cluster, one row per
    replica in replica order (a collective: every worker must call it).
    `owner` (the model) keeps the compiled gather for these variables."""
    if not variables:
        return []
    cached = _GATHERS.get(owner)
    if (
        cached is None
        or len(cached[0]) != len(variables)
        or any(a is not b for a, b in zip(cached[0], variables))
    ):

        def rows() -> list[tf.Tensor]:
            return [tf.expand_dims(tf.identity(v.value), 0) for v in variables]

        def gathered() -> list[tf.Tensor]:
            # One gather per value: given a list, `gather` does not concatenate.
            return [strategy.gather(rows_of_one, axis=0) for rows_of_one in strategy.run(rows)]

        cached = (list(variables), tf.function(gathered))
        _GATHERS[owner] = cached
    return [np.asarray(g.numpy()) for g in cached[1]()]


def assign_every_replica(
    variables: list, values: list[np.ndarray], strategy: tf.distribute.Strategy
) -> None:
    """Puts back what `every_replica` returned, each replica its own row."""
    constants = [tf.constant(v) for v in values]

    def assign() -> None:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        for variable, rows in zip(variables, constants):
            variable.value.assign(tf.gather(rows, replica))

    strategy.run(assign)


def lost_contact_message(strategy: tf.distribute.Strategy, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return (
        f"Worker {task_id(strategy)} lost contact with the rest of the cluster "
        f"({type(error).__name__}: {first_line[:300]}): a worker stopped, or the "
        "network between them failed. The surviving workers cannot go on "
        "alone. Restart every worker with the same command; with "
        "customfit.callbacks.BackupAndRestore among the callbacks, training "
        "resumes from its last backup on all of them."
    )


# What a collective reports when a peer of the cluster is gone.
LOST_CONTACT = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)
