"""customfit: your own training step, with everything `model.fit` gives you."""

from customfit._keras2 import CompiledLoss, CompiledMetrics
from customfit._model import CustomModel

__version__ = "0.1.0"

__all__ = ["CompiledLoss", "CompiledMetrics", "CustomModel", "__version__"]
