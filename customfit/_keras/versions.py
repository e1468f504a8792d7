"""The Keras and TensorFlow releases customfit is tested with, the Keras code
it copies or re-implements, and the warning users get when theirs differ.

`COPIES` lists each Keras function whose behaviour customfit reproduces, with
the hash of its source in every tested Keras release. When the installed
Keras has another source (or none), customfit no longer knows that it
behaves like it: `check_once()` says so, once per process, with a
`CompatibilityWarning` naming the versions and what to do. To support a new
Keras release: run the compatibility sessions of `noxfile.py` on it, adapt
`internals` where it changed, then add its hashes here (`source_hash` prints
them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import keras

from customfit._errors import CompatibilityWarning

# Minor releases, both ends included.
TESTED_KERAS = ((3, 10), (3, 15))
TESTED_TENSORFLOW = ((2, 19), (2, 21))


@dataclasses.dataclass(frozen=True)
class Copy:
    """A Keras function customfit copies, or whose behaviour it reproduces.

    Attributes:
        keras_name: Where the function is, for messages.
        customfit_name: What in customfit depends on it.
        find: Returns the function in the installed Keras.
        known: Hash of its source (`source_hash`) -> the tested Keras
            releases that have that source.
    """

    keras_name: str
    customfit_name: str
    find: Callable[[], Any]
    known: Mapping[str, str]


def _attribute(module: str, *path: str) -> Callable[[], Any]:
    def find() -> Any:
        found = importlib.import_module(module)
        for name in path:
            found = getattr(found, name)
        return found

    return find


COPIES = (
    Copy(
        "keras.Model._make_function",
        "_keras._tensorflow.step_function.make_function",
        _attribute("keras", "Model", "_make_function"),
        {"55eb952812cac1fb": "3.10, 3.11", "bb33b7a0da3d2740": "3.12 to 3.15"},
    ),
    Copy(
        "EpochIterator._enumerate_iterator",
        "_keras.epoch_iterator (steps_per_execution='auto')",
        _attribute("keras.src.trainers.epoch_iterator", "EpochIterator", "_enumerate_iterator"),
        {"5b12fbb1202bfd36": "3.10", "376e3e16a928107a": "3.11 to 3.15"},
    ),
    Copy(
        "keras.Model.train_step",
        "CustomModel.train_step and its hooks",
        _attribute("keras", "Model", "train_step"),
        {"38eff65a3e8e6447": "3.10, 3.11", "debf0efab9d5794b": "3.12 to 3.15"},
    ),
    Copy(
        "keras.Model.test_step",
        "CustomModel.test_step",
        _attribute("keras", "Model", "test_step"),
        {"4af0440af44a0942": "3.10, 3.11", "a8f04a25512e74e2": "3.12 to 3.15"},
    ),
    Copy(
        "keras.Model.fit",
        "_per_batch.per_batch_callbacks (fit's callback list)",
        _attribute("keras", "Model", "fit"),
        {
            "12c8c097be1a542e": "3.10",
            "946e5ec0372b2063": "3.11",
            "6bf8bc1004adaba6": "3.12 to 3.14",
            "a9a6dc02a7ddafa8": "3.15",
        },
    ),
    Copy(
        "keras.Model.evaluate",
        "_per_batch.per_batch_callbacks (evaluate's callback list)",
        _attribute("keras", "Model", "evaluate"),
        {
            "4dae71b7d80d5fe6": "3.10",
            "a66ed09447a60ba9": "3.11 to 3.13",
            "c65ec35aaa20e84e": "3.14",
            "a1facf6528168e8d": "3.15",
        },
    ),
    Copy(
        "keras.Model._maybe_symbolic_build",
        "_keras._tensorflow.trainer.symbolic_build",
        _attribute("keras", "Model", "_maybe_symbolic_build"),
        {"181752273e37d689": "3.10", "92a504f5eba9b29f": "3.11 to 3.15"},
    ),
    Copy(
        "keras.Model._symbolic_build",
        "_keras._tensorflow.trainer.symbolic_build",
        _attribute("keras", "Model", "_symbolic_build"),
        {
            "330210b83242a6af": "3.10",
            "9e2c2441c8d68292": "3.11 to 3.13",
            "96220cc3b88fe768": "3.14, 3.15",
        },
    ),
    Copy(
        "keras.Model.compute_loss",
        "_keras2.CompiledLoss",
        _attribute("keras", "Model", "compute_loss"),
        {"450e48288d4857f0": "3.10 to 3.15"},
    ),
    Copy(
        "CompileMetrics.result",
        "internals.compiled_metric_log_names",
        _attribute("keras.src.trainers.compile_utils", "CompileMetrics", "result"),
        {"b59a450dfa96fc55": "3.10 to 3.15"},
    ),
    Copy(
        "keras.src.utils.python_utils.pythonify_logs",
        "_model._flattened (log flattening)",
        _attribute("keras.src.utils.python_utils", "pythonify_logs"),
        {"e604d7807d5593e7": "3.10, 3.11", "ecbf66de4514267d": "3.12 to 3.15"},
    ),
    Copy(
        "array_slicing.train_validation_split",
        "_dev_modes (validation_split)",
        _attribute("keras.src.trainers.data_adapters.array_slicing", "train_validation_split"),
        {"97e71878bad61504": "3.10 to 3.15"},
    ),
)


def source_hash(function: Any) -> str:
    """The first 16 hex digits of the SHA-256 of a function's source."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.16.0.dev2026102704"."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _range(tested: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (a, b), (c, d) = tested
    return f"{a}.{b} to {c}.{d}"


def problems() -> list[str]:
    """What customfit does not know about the installed Keras (and
    TensorFlow, on its backend), one sentence each; empty on a tested
    stack."""
    found = []
    stack = [("Keras", keras.version(), TESTED_KERAS)]
    tensorflow = keras.backend.backend() == "tensorflow"
    if tensorflow:  # imported by Keras already
        stack.append(("TensorFlow", sys.modules["tensorflow"].__version__, TESTED_TENSORFLOW))
    for name, version, tested in stack:
        if not tested[0] <= release(version) <= tested[1]:
            found.append(
                f"{name} {version} is installed; customfit is tested with {name} {_range(tested)}."
            )
    # The copies are of Keras' TensorFlow loop; on JAX customfit calls
    # Keras' own.
    for copy in COPIES if tensorflow else ():
        try:
            digest = source_hash(copy.find())
        except (AttributeError, ImportError, OSError, TypeError):
            found.append(
                f"Keras {keras.version()} has no {copy.keras_name}, which "
                f"{copy.customfit_name} reproduces."
            )
            continue
        if digest not in copy.known:
            found.append(
                f"{copy.keras_name} in Keras {keras.version()} differs from "
                f"the releases {copy.customfit_name} was checked against "
                f"({'; '.join(copy.known.values())})."
            )
    return found


_checked = False


def check_once() -> None:
    """Warns, once per process, when `problems()` finds any."""
    global _checked
    if _checked:
        return
    _checked = True
    found = problems()
    if found:
        warnings.warn(
            CompatibilityWarning(
                "customfit may not train like stock Keras on this install: "
                + " ".join(found)
                + " Run `python -m customfit check` to compare CustomModel with "
                "stock fit here, or install tested versions (pip install "
                f"'keras>={_range(TESTED_KERAS).split(' to ')[0]},"
                f"<{TESTED_KERAS[1][0]}.{TESTED_KERAS[1][1] + 1}')."
            ),
            stacklevel=3,
        )
