"""The processes of a JAX run (the `Cluster` contract on JAX).

`keras.distribution.initialize` joins several processes into one JAX
runtime; each runs the same `fit`. Process 0 writes the files; every other
process runs the same saving code into a private temporary directory that
is deleted afterwards, as on TensorFlow. A step sees the whole batch, so a
variable holds one global value: "every replica" is one row.
"""

from __future__ import annotations

import contextlib

import jax
import keras
import numpy as np
from jax.experimental import multihost_utils

from customfit import _saving

# What a collective raises when a peer process is gone.
LOST_CONTACT: tuple[type[BaseException], ...] = (jax.errors.JaxRuntimeError,)


def multi_worker(model: keras.Model) -> bool:
    return jax.process_count() > 1


def is_chief(model: keras.Model) -> bool:
    return jax.process_index() == 0


def written_to(path: str, model: keras.Model) -> contextlib.AbstractContextManager[str]:
    """Where this process writes what belongs at `path` (process 0: `path`)."""
    return _saving.written_by_chief(path, is_chief(model), f"process-{jax.process_index()}")


def agreed(values: list[int], model: keras.Model) -> bool:
    if not multi_worker(model):
        return True
    every = np.asarray(multihost_utils.process_allgather(np.asarray([values], np.int64)))
    every = every.reshape(jax.process_count(), -1)
    return bool((every == every[0]).all())


def _global_value(value: jax.Array) -> np.ndarray:
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def every_replica(model: keras.Model, variables: list) -> list[np.ndarray]:
    return [_global_value(v.value)[None] for v in variables]


def assign_every_replica(model: keras.Model, variables: list, values: list[np.ndarray]) -> None:
    for variable, saved in zip(variables, values):
        if len(saved) != 1:
            raise ValueError(
                f"The backup holds metric variable '{variable.path}' for {len(saved)} "
                "replicas (written under tf.distribute); on JAX a step sees the "
                "whole batch. Resume under the backend that wrote it, or delete "
                "the backup directory."
            )
        variable.assign(saved[0])


def lost_contact_message(model: keras.Model, error: BaseException) -> str:
    text = str(error).strip()
    last_line = text.splitlines()[-1] if text else type(error).__name__
    return (
        f"Process {jax.process_index()} lost contact with the other processes "
        f"({type(error).__name__}: {last_line[:300]}): a process stopped, or "
        "the network between them failed. Restart every process with the same "
        "command; with customfit.callbacks.BackupAndRestore among the "
        "callbacks, training resumes from its last backup on all of them. "
        "(On exit, JAX may hold this process until its coordinator gives the "
        "lost one up: heartbeat_timeout_seconds of jax.distributed.initialize, "
        "100 s by default. Nothing is left to save: it can be killed.)"
    )
