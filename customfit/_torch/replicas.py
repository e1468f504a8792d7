"""A step's replicas on PyTorch (the `Replicas` contract): one. Keras'
PyTorch backend runs `fit` on one device of one process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from keras import ops


def count() -> int:
    return 1


def in_replica_context() -> bool:
    return False


def summed(gradients: list) -> list:
    return list(gradients)


def update_on_every_replica_if(predicate: Callable[[], Any], update: Callable[[], None]) -> None:
    raise AssertionError("unreachable: no replica context on PyTorch")


def skip_on_every_replica_if(
    model: Any, skip: Any, gradients: list, update: Callable[[list], None]
) -> None:
    raise AssertionError("unreachable: no replica context on PyTorch")


def global_batch_noise(seed: int, counter: Any, batch: Any, shape: list, kind: str) -> Any:
    """Drawn from a generator seeded with `(seed, kind, counter)`: the same
    numbers for the same three, whatever the global random state."""
    generator = torch.Generator().manual_seed(
        hash((seed, kind, int(ops.convert_to_numpy(counter)))) % 2**63
    )
    size = (int(batch), *shape)
    if kind == "latent":
        noise = torch.randn(size, generator=generator)
    else:
        noise = torch.rand(size, generator=generator)
    return ops.convert_to_tensor(noise)
