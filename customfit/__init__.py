"""customfit: your own training step, with everything `model.fit` gives you."""

from customfit import recipes
from customfit._backend import BACKEND
from customfit._errors import (
    CompatibilityWarning,
    Preempted,
    ResumeWarning,
    SavingWarning,
    TrainingGuardError,
    UnreadableCheckpointError,
)
from customfit._model import CustomModel

__version__ = "0.6.0"

__all__ = [
    "CompatibilityWarning",
    "CustomModel",
    "Preempted",
    "ResumeWarning",
    "SavingWarning",
    "TrainingGuardError",
    "UnreadableCheckpointError",
    "recipes",
    "testing",
    "__version__",
]

if BACKEND == "tensorflow":
    from customfit import callbacks  # noqa: F401 (in __all__ on TensorFlow)

    __all__.insert(2, "callbacks")


def __getattr__(name: str) -> object:
    # Imported when first used: `customfit.testing` serves a user's tests,
    # not training; on JAX, `customfit.callbacks` is not imported up front,
    # and importing it says what it needs.
    if name in ("callbacks", "testing"):
        import importlib

        return importlib.import_module(f"customfit.{name}")
    raise AttributeError(f"module 'customfit' has no attribute {name!r}")
