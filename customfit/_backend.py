"""The Keras backend customfit runs on, and its implementation of the loop
contract (`customfit._contract`).

`loop`, `replicas` and `cluster` are the modules of the backend Keras was
imported with: `customfit/_tensorflow/`, `customfit/_jax/` or
`customfit/_torch/`. The rest of
customfit reaches the backend through these three names only.
"""

from __future__ import annotations

import keras

from customfit._contract import Cluster, Loop, Replicas

BACKEND = keras.backend.backend()

loop: Loop
replicas: Replicas
cluster: Cluster

if BACKEND == "tensorflow":
    from customfit._tensorflow import cluster as _tf_cluster
    from customfit._tensorflow import loop as _tf_loop
    from customfit._tensorflow import replicas as _tf_replicas

    loop, replicas, cluster = _tf_loop, _tf_replicas, _tf_cluster
elif BACKEND == "jax":
    from customfit._jax import cluster as _jax_cluster
    from customfit._jax import loop as _jax_loop
    from customfit._jax import replicas as _jax_replicas

    loop, replicas, cluster = _jax_loop, _jax_replicas, _jax_cluster
elif BACKEND == "torch":
    from customfit._torch import cluster as _torch_cluster
    from customfit._torch import loop as _torch_loop
    from customfit._torch import replicas as _torch_replicas

    loop, replicas, cluster = _torch_loop, _torch_replicas, _torch_cluster
else:
    raise ImportError(
        f"customfit runs on Keras' TensorFlow, JAX and PyTorch backends; Keras "
        f'uses "{BACKEND}". Set KERAS_BACKEND to tensorflow, jax or torch '
        "before importing keras."
    )


__all__ = ["BACKEND", "cluster", "loop", "replicas"]
