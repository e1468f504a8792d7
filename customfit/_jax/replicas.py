"""A step's replicas on JAX (the `Replicas` contract): none to handle.

Under `keras.distribution` the step is one program over the whole (sharded)
batch: it sees global values, and its gradients are the whole batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def count() -> int:
    return 1


def in_replica_context() -> bool:
    return False


def summed(gradients: list) -> list:
    return list(gradients)


def update_on_every_replica_if(predicate: Callable[[], Any], update: Callable[[], None]) -> None:
    raise AssertionError("unreachable: no replica context on JAX")


def skip_on_every_replica_if(
    model: Any, skip: Any, gradients: list, update: Callable[[list], None]
) -> None:
    raise AssertionError("unreachable: no replica context on JAX")


def global_batch_noise(seed: int, counter: Any, batch: Any, shape: list, kind: str) -> Any:
    key = jax.random.fold_in(jax.random.key(seed), 0 if kind == "latent" else 1)
    key = jax.random.fold_in(key, counter)
    draw = jax.random.normal if kind == "latent" else jax.random.uniform
    return draw(key, (batch, *shape), "float32")
