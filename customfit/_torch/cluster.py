"""The processes of a PyTorch run (the `Cluster` contract): one. Keras'
PyTorch backend has no `keras.distribution` and no multi-worker `fit`."""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from customfit import _saving

LOST_CONTACT: tuple[type[BaseException], ...] = ()


def multi_worker(model: keras.Model) -> bool:
    return False


def is_chief(model: keras.Model) -> bool:
    return True


def written_to(path: str, model: keras.Model) -> contextlib.AbstractContextManager[str]:
    return _saving.written_by_chief(path, True, "process-0")


def agreed(values: list[int], model: keras.Model) -> bool:
    return True


def every_replica(model: keras.Model, variables: list) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v.value)[None] for v in variables]


def assign_every_replica(model: keras.Model, variables: list, values: list[np.ndarray]) -> None:
    for variable, saved in zip(variables, values):
        if len(saved) != 1:
            raise ValueError(
                f"The backup holds metric variable '{variable.path}' for {len(saved)} "
                "replicas (written under tf.distribute); on PyTorch a step sees the "
                "whole batch. Resume under the backend that wrote it, or delete "
                "the backup directory."
            )
        variable.assign(saved[0])


def lost_contact_message(model: keras.Model, error: BaseException) -> str:
    raise AssertionError("unreachable: one process on PyTorch")
