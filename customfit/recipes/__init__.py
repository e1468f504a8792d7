"""Recipes: custom training steps people write again and again, done once.

Each recipe is a `customfit.CustomModel` (or a piece of one) that works with
`fit`, `evaluate`, callbacks, saving and loading, `tf.distribute` and mixed
precision. They are written with `keras.ops` and the backend's `loop`, and
run on Keras' JAX and PyTorch backends too. `Lookahead` and `WeightEMA` use
public names only (`customfit.CustomModel`'s seams, `customfit.steptools`),
as any user's recipe can.
"""

from customfit.recipes._accumulation import GradientAccumulation
from customfit.recipes._adversarial import AdversarialTraining, adversarial_examples
from customfit.recipes._clipping import AdaptiveGradientClipping, GlobalNormClipping
from customfit.recipes._distillation import Distiller
from customfit.recipes._gan import GAN
from customfit.recipes._lookahead import Lookahead
from customfit.recipes._sam import SAM
from customfit.recipes._skipping import SkipNonFinite
from customfit.recipes._weight_average import WeightEMA

__all__ = [
    "AdaptiveGradientClipping",
    "AdversarialTraining",
    "Distiller",
    "GAN",
    "GlobalNormClipping",
    "GradientAccumulation",
    "Lookahead",
    "SAM",
    "SkipNonFinite",
    "WeightEMA",
    "adversarial_examples",
]
