"""customfit: your own training step, with everything `model.fit` gives you."""

from customfit import recipes
from customfit._backend import BACKEND
from customfit._keras.versions import CompatibilityWarning
from customfit._model import CustomModel

__version__ = "0.5.0"

__all__ = ["CompatibilityWarning", "CustomModel", "recipes", "__version__"]

if BACKEND == "tensorflow":
    from customfit import callbacks  # noqa: F401 (in __all__ on TensorFlow)

    __all__.insert(2, "callbacks")


def __getattr__(name: str) -> object:
    # On JAX, `customfit.callbacks` is not imported: importing it says what it needs.
    if name == "callbacks":
        import importlib

        return importlib.import_module("customfit.callbacks")
    raise AttributeError(f"module 'customfit' has no attribute {name!r}")
