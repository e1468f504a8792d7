"""customfit: your own training step, with everything `model.fit` gives you."""

from customfit._errors import (
    CompatibilityWarning,
    Preempted,
    ResumeWarning,
    SavingWarning,
    TrainingGuardError,
    UnreadableCheckpointError,
)
from customfit._model import CustomModel

# isort: split
# The recipes subclass customfit.CustomModel, defined above.
from customfit import callbacks, recipes, steptools

__version__ = "0.6.0"

__all__ = [
    "CompatibilityWarning",
    "CustomModel",
    "callbacks",
    "Preempted",
    "ResumeWarning",
    "SavingWarning",
    "TrainingGuardError",
    "UnreadableCheckpointError",
    "recipes",
    "steptools",
    "testing",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Imported when first used: `customfit.testing` serves a user's tests,
    # not training.
    if name == "testing":
        import importlib

        return importlib.import_module(f"customfit.{name}")
    raise AttributeError(f"module 'customfit' has no attribute {name!r}")
