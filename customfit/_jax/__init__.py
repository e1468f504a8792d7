"""customfit on Keras' JAX backend: the loop contract
(`customfit._contract`), the stateful step run as Keras' stateless JAX step.

- `loop`: `Loop`, jitted `StatelessStep`s under `keras.distribution`;
- `replicas`: `Replicas`: one step sees the whole (sharded) batch;
- `cluster`: `Cluster`, the processes of `keras.distribution.initialize`.
"""
