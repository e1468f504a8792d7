"""customfit: your own training step, with everything `model.fit` gives you."""

from customfit import recipes
from customfit._backend import BACKEND
from customfit._keras.versions import CompatibilityWarning
from customfit._model import CustomModel

if BACKEND == "tensorflow":
    from customfit import callbacks  # noqa: F401 (exported below)

__version__ = "0.4.0"

__all__ = ["CompatibilityWarning", "CustomModel", "callbacks", "recipes", "__version__"]


def __getattr__(name: str) -> object:
    # On JAX, `customfit.callbacks` says what it needs.
    if name == "callbacks":
        import importlib

        return importlib.import_module(f"customfit.{name}")
    raise AttributeError(f"module 'customfit' has no attribute {name!r}")
