"""Recipes: custom training steps people write again and again, done once.

Each recipe is a `customfit.CustomModel` (or a piece of one) that works with
`fit`, `evaluate`, callbacks, saving and loading, `tf.distribute` and mixed
precision.
"""

from customfit.recipes._distillation import Distiller
from customfit.recipes._gan import GAN

__all__ = ["Distiller", "GAN"]
