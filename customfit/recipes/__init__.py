"""Recipes: custom training steps people write again and again, done once.

Each recipe is a `customfit.CustomModel` (or a piece of one) that works with
`fit`, `evaluate`, callbacks, saving and loading, `tf.distribute` and mixed
precision. The clipping recipes and `Distiller` are written with `keras.ops`
and run on Keras' JAX backend too; the others need TensorFlow.
"""

from typing import Any

from customfit._backend import BACKEND, require_tensorflow
from customfit.recipes._clipping import AdaptiveGradientClipping, GlobalNormClipping
from customfit.recipes._distillation import Distiller

if BACKEND == "tensorflow":
    from customfit.recipes._accumulation import GradientAccumulation
    from customfit.recipes._adversarial import AdversarialTraining, adversarial_examples
    from customfit.recipes._gan import GAN
    from customfit.recipes._sam import SAM
    from customfit.recipes._skipping import SkipNonFinite

__all__ = [
    "AdaptiveGradientClipping",
    "AdversarialTraining",
    "Distiller",
    "GAN",
    "GlobalNormClipping",
    "GradientAccumulation",
    "SAM",
    "SkipNonFinite",
    "adversarial_examples",
]


def __getattr__(name: str) -> Any:
    if name in __all__:  # a TensorFlow-only recipe, on another backend
        require_tensorflow(f"customfit.recipes.{name}")
    raise AttributeError(f"module 'customfit.recipes' has no attribute {name!r}")
