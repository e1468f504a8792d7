"""The `Replicas` members of a backend whose step sees the whole batch as
one replica (JAX under `keras.distribution`, PyTorch): nothing to handle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def count() -> int:
    return 1


def in_replica_context() -> bool:
    return False


def summed(gradients: list) -> list:
    return list(gradients)


def update_on_every_replica_if(predicate: Callable[[], Any], update: Callable[[], None]) -> None:
    raise AssertionError("unreachable: no replica context")


def skip_on_every_replica_if(
    model: Any, skip: Any, gradients: list, update: Callable[[list], None]
) -> None:
    raise AssertionError("unreachable: no replica context")
