"""customfit: your own training step, with everything `model.fit` gives you."""

from customfit import callbacks  # noqa: F401  (customfit.callbacks.*)
from customfit._model import CustomModel
from customfit import recipes  # after CustomModel, which the recipes extend

__version__ = "0.1.0"

__all__ = ["CustomModel", "recipes", "__version__"]
