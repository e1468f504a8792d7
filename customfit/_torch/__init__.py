"""customfit on Keras' PyTorch backend: the `Loop`, `Replicas` and `Cluster`
of `customfit._contract`."""
