"""customfit: your own training step, with everything `model.fit` gives you."""

from customfit import callbacks, recipes  # recipes extend CustomModel: import it first
from customfit._keras.versions import CompatibilityWarning
from customfit._model import CustomModel

__version__ = "0.3.0"

__all__ = ["CompatibilityWarning", "CustomModel", "callbacks", "recipes", "__version__"]
