"""A step's replicas on PyTorch (the `Replicas` contract): one. Keras'
PyTorch backend runs `fit` on one device of one process."""

from __future__ import annotations

from typing import Any

import torch
from keras import ops

from customfit._single_replica import (  # noqa: F401 (the contract's members)
    count,
    in_replica_context,
    skip_on_every_replica_if,
    summed,
    update_on_every_replica_if,
)


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
