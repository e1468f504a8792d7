"""Recipes: custom training steps people write again and again, done once.

Each recipe is a `customfit.CustomModel` (or a piece of one) that works with
`fit`, `evaluate`, callbacks, saving and loading, `tf.distribute` and mixed
precision. They are written with `keras.ops` and the backend's `loop`, and
run on Keras' JAX backend too.
"""

from customfit.recipes._accumulation import GradientAccumulation
from customfit.recipes._adversarial import AdversarialTraining, adversarial_examples
from customfit.recipes._clipping import AdaptiveGradientClipping, GlobalNormClipping
from customfit.recipes._distillation import Distiller
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
