"""Which worker of a multi-worker cluster this process is, and where it
writes (the `Cluster` contract on TensorFlow).

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
import weakref
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from customfit import _saving
from customfit._keras._tensorflow import trainer


def multi_worker(model: keras.Model) -> bool:
    """Whether the model's strategy spans several worker processes."""
    return trainer.logs_reduced_along_first_axis(model.distribute_strategy)


def is_chief(model: keras.Model) -> bool:
    """Whether this process writes the files (always, with one process)."""
    return bool(model.distribute_strategy.extended.should_checkpoint)


def task_id(model: keras.Model) -> int:
    resolver = getattr(model.distribute_strategy, "cluster_resolver", None)
    return int(getattr(resolver, "task_id", 0) or 0)


def written_to(path: str, model: keras.Model) -> contextlib.AbstractContextManager[str]:
    """Where this worker writes what belongs at `path` (the chief: `path`)."""
    return _saving.written_by_chief(path, is_chief(model), f"worker-{task_id(model)}")


def agreed(values: list[int], model: keras.Model) -> bool:
    """Whether every worker passed the same `values` (a collective: every
    worker must call it, at the same point)."""
    if not multi_worker(model):
        return True
    strategy = model.distribute_strategy
    local = tf.constant([values], tf.int64)
    every = strategy.gather(strategy.run(lambda: tf.identity(local)), axis=0).numpy()
    return bool((every == every[0]).all())


# owner -> (variables, compiled gather): one traced function per set of
# variables (the strategy's gather traces a new function at every call).
_GATHERS: weakref.WeakKeyDictionary[Any, tuple[list, Callable]] = weakref.WeakKeyDictionary()


def every_replica(model: keras.Model, variables: list) -> list[np.ndarray]:
    """Each variable's value on every replica of the cluster, one row per
    replica in replica order (under `tf.distribute` each replica holds its
    own part of a metric); across workers, a collective: every worker must
    call it. The model keeps the compiled gather for these variables."""
    strategy = model.distribute_strategy
    if not multi_worker(model):
        local = strategy.experimental_local_results
        return [np.stack([np.asarray(part.numpy()) for part in local(v.value)]) for v in variables]
    if not variables:
        return []
    cached = _GATHERS.get(model)
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
        _GATHERS[model] = cached
    return [np.asarray(g.numpy()) for g in cached[1]()]


def assign_every_replica(model: keras.Model, variables: list, values: list[np.ndarray]) -> None:
    """Puts back what `every_replica` returned, each replica its own row."""
    strategy = model.distribute_strategy
    for variable, saved in zip(variables, values):
        if len(saved) != strategy.num_replicas_in_sync:
            raise ValueError(
                f"The backup holds metric variable '{variable.path}' for {len(saved)} replicas; "
                f"this run has {strategy.num_replicas_in_sync}. Resume with the "
                "same number of replicas, or delete the backup directory."
            )
    if not multi_worker(model):
        for variable, saved in zip(variables, values):
            for part, value in zip(strategy.experimental_local_results(variable.value), saved):
                part.assign(value)
        return
    constants = [tf.constant(v) for v in values]

    def assign() -> None:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        for variable, rows in zip(variables, constants):
            variable.value.assign(tf.gather(rows, replica))

    strategy.run(assign)


def lost_contact_message(model: keras.Model, error: BaseException) -> str:
    first_line = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return (
        f"Worker {task_id(model)} lost contact with the rest of the cluster "
        f"({type(error).__name__}: {first_line[:300]}): a worker stopped, or the "
        "network between them failed. The surviving workers cannot go on "
        "alone. Restart every worker with the same command; with "
        "customfit.callbacks.BackupAndRestore among the callbacks, training "
        "resumes from its last backup on all of them."
    )


# What a collective reports when a peer of the cluster is gone.
LOST_CONTACT: tuple[type[BaseException], ...] = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
)
