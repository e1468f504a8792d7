"""A step's replicas on JAX (the `Replicas` contract): none to handle.

Under `keras.distribution` the step is one program over the whole (sharded)
batch: it sees global values, and its gradients are the whole batch's.
"""

from __future__ import annotations

from typing import Any

import jax

from customfit._single_replica import (  # noqa: F401 (the contract's members)
    count,
    in_replica_context,
    skip_on_every_replica_if,
    summed,
    update_on_every_replica_if,
)


def global_batch_noise(seed: int, counter: Any, batch: Any, shape: list, kind: str) -> Any:
    key = jax.random.fold_in(jax.random.key(seed), 0 if kind == "latent" else 1)
    key = jax.random.fold_in(key, counter)
    draw = jax.random.normal if kind == "latent" else jax.random.uniform
    return draw(key, (batch, *shape), "float32")
