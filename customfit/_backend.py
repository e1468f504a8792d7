"""The Keras backend customfit runs on, and the loop adapter for it.

`CustomModel`'s hooks, `log`, the Keras-2 helpers and saving are written
once, with `keras.ops`; what depends on how the backend runs a step (taking
gradients, compiling the step, `fit`'s extras) is in one module per backend,
with the same functions:

- `customfit._tf_loop` (TensorFlow): `tf.function` steps, every batch
  replayed to callbacks, `steps_per_execution="auto"`, resuming mid-epoch,
  `tf.distribute`;
- `customfit._jax_loop` (JAX): the stateful step run as Keras' stateless
  JAX step, jitted, under `keras.distribution`.

`loop` is the module for the backend Keras was imported with.
"""

from __future__ import annotations

import keras

BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    from customfit import _tf_loop as loop
elif BACKEND == "jax":
    from customfit import _jax_loop as loop  # type: ignore[no-redef]
else:
    raise ImportError(
        f"customfit runs on Keras' TensorFlow and JAX backends; Keras uses "
        f'"{BACKEND}". Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax '
        "before importing keras."
    )


def require_tensorflow(feature: str) -> None:
    """Raises a clear `ImportError` for `feature` on a backend other than
    TensorFlow."""
    if BACKEND != "tensorflow":
        raise ImportError(
            f"{feature} needs Keras' TensorFlow backend (KERAS_BACKEND="
            f"tensorflow); Keras runs on {BACKEND}. On JAX, CustomModel, its "
            "hooks, log() and the Keras-2 helpers work, with Keras' own "
            "callbacks (keras.callbacks)."
        )


__all__ = ["BACKEND", "loop", "require_tensorflow"]
