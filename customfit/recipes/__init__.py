"""Recipes: custom training steps people write again and again, done once.

Each recipe is a `customfit.CustomModel` (or a piece of one) that works with
`fit`, `evaluate`, callbacks, saving and loading, `tf.distribute` and mixed
precision.
"""

from customfit._backend import require_tensorflow

require_tensorflow("customfit.recipes")

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
