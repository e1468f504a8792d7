"""customfit on Keras' TensorFlow backend: the loop contract
(`customfit._contract`) with `tf.function` steps and `tf.distribute`.

- `loop`: `Loop`, the steps compiled by `_keras._tensorflow.step_function`;
- `replicas`: `Replicas`, a step's replicas under `tf.distribute`;
- `cluster`: `Cluster`, the workers of a `MultiWorkerMirroredStrategy`;
- `guards`: the first training step's check for a loss not scaled for the
  replicas, added to `customfit._guards`' (loss scaling forgotten).
"""
