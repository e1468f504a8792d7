"""The Keras and TensorFlow releases customfit is tested with, the Keras code
it copies or re-implements, and the warning users get when theirs differ.

`ALL_COPIES` lists each Keras function whose behaviour customfit reproduces
or whose workings it relies on, the backends where it does, and the hash of
its source in every tested Keras release; `COPIES` holds the installed
backend's. On TensorFlow they are Keras' TensorFlow trainer and the code
customfit copies from it; on JAX, Keras' JAX trainer, whose stateless step
`customfit._jax.loop.StatelessStep` reproduces and whose `fit`, `evaluate`
and `predict` call it with their `state`; on PyTorch, Keras' PyTorch
trainer, whose step functions `customfit._torch.loop` replaces. Keras'
backend-neutral code (`compute_loss`, the epoch iterator, ...) is on all
three. When the installed Keras has another source (or none), customfit no
longer knows that it behaves like it: `check_once()` says so, once per
process, with a `CompatibilityWarning` naming the versions and what to do. To support a new
Keras release: run the compatibility sessions of `noxfile.py` on it, adapt
`internals` where it changed, then add its hashes here (`source_hash` prints
them; the JAX and PyTorch entries' with `KERAS_BACKEND` set to theirs).
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

# Minor releases, both ends included: the installed backend's Keras range.
TESTED_KERAS_ON = {
    "tensorflow": ((3, 10), (3, 15)),
    "jax": ((3, 10), (3, 15)),
    "torch": ((3, 15), (3, 15)),
}
TESTED_KERAS = TESTED_KERAS_ON.get(keras.backend.backend(), TESTED_KERAS_ON["tensorflow"])
TESTED_TENSORFLOW = ((2, 19), (2, 21))


@dataclasses.dataclass(frozen=True)
class Copy:
    """A Keras function customfit copies, or whose behaviour it reproduces.

    Attributes:
        keras_name: Where the function is, for messages.
        customfit_name: What in customfit depends on it.
        find: Returns the function in the installed Keras.
        known: Hash of its source (`source_hash`) -> the tested Keras
            releases that have that source; `ABSENT` -> the tested releases
            that do not have the function.
        backends: The Keras backends on which customfit depends on it.
    """

    keras_name: str
    customfit_name: str
    find: Callable[[], Any]
    known: Mapping[str, str]
    backends: tuple[str, ...]


# A key of `Copy.known`: the function is not in those releases.
ABSENT = "absent"
TENSORFLOW = ("tensorflow",)
JAX = ("jax",)
TORCH = ("torch",)
EVERY_BACKEND = ("tensorflow", "jax", "torch")


def _attribute(module: str, *path: str) -> Callable[[], Any]:
    def find() -> Any:
        found = importlib.import_module(module)
        for name in path:
            found = getattr(found, name)
        return found

    return find


ALL_COPIES = (
    # On TensorFlow, where `keras.Model.<name>` is Keras' TensorFlow
    # trainer's (`COPIES` there, in this order), and on every backend.
    Copy(
        "keras.Model._make_function",
        "_keras._tensorflow.step_function.make_function",
        _attribute("keras", "Model", "_make_function"),
        {"55eb952812cac1fb": "3.10, 3.11", "bb33b7a0da3d2740": "3.12 to 3.15"},
        TENSORFLOW,
    ),
    Copy(
        "EpochIterator._enumerate_iterator",
        "_keras.epoch_iterator (steps_per_execution='auto')",
        _attribute("keras.src.trainers.epoch_iterator", "EpochIterator", "_enumerate_iterator"),
        {"5b12fbb1202bfd36": "3.10", "376e3e16a928107a": "3.11 to 3.15"},
        EVERY_BACKEND,
    ),
    Copy(
        "keras.Model.train_step",
        "CustomModel.train_step and its hooks",
        _attribute("keras", "Model", "train_step"),
        {"38eff65a3e8e6447": "3.10, 3.11", "debf0efab9d5794b": "3.12 to 3.15"},
        TENSORFLOW,
    ),
    Copy(
        "keras.Model.test_step",
        "CustomModel.test_step",
        _attribute("keras", "Model", "test_step"),
        {"4af0440af44a0942": "3.10, 3.11", "a8f04a25512e74e2": "3.12 to 3.15"},
        TENSORFLOW,
    ),
    Copy(
        "keras.Model.fit",
        "_per_batch.callback_list (fit's callback list)",
        _attribute("keras", "Model", "fit"),
        {
            "12c8c097be1a542e": "3.10",
            "946e5ec0372b2063": "3.11",
            "6bf8bc1004adaba6": "3.12 to 3.14",
            "a9a6dc02a7ddafa8": "3.15",
        },
        TENSORFLOW,
    ),
    Copy(
        "keras.Model.evaluate",
        "_per_batch.callback_list (evaluate's callback list)",
        _attribute("keras", "Model", "evaluate"),
        {
            "4dae71b7d80d5fe6": "3.10",
            "a66ed09447a60ba9": "3.11 to 3.13",
            "c65ec35aaa20e84e": "3.14",
            "a1facf6528168e8d": "3.15",
        },
        TENSORFLOW,
    ),
    Copy(
        "keras.Model._maybe_symbolic_build",
        "_keras._tensorflow.trainer.symbolic_build",
        _attribute("keras", "Model", "_maybe_symbolic_build"),
        {"181752273e37d689": "3.10", "92a504f5eba9b29f": "3.11 to 3.15"},
        TENSORFLOW,
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
        TENSORFLOW,
    ),
    Copy(
        "keras.Model.compute_loss",
        "_keras2.CompiledLoss",
        _attribute("keras", "Model", "compute_loss"),
        {"450e48288d4857f0": "3.10 to 3.15"},
        EVERY_BACKEND,
    ),
    Copy(
        "CompileMetrics.result",
        "internals.compiled_metric_log_names",
        _attribute("keras.src.trainers.compile_utils", "CompileMetrics", "result"),
        {"b59a450dfa96fc55": "3.10 to 3.15"},
        EVERY_BACKEND,
    ),
    Copy(
        "keras.src.utils.python_utils.pythonify_logs",
        "_step.checked_logs (log flattening)",
        _attribute("keras.src.utils.python_utils", "pythonify_logs"),
        {"e604d7807d5593e7": "3.10, 3.11", "ecbf66de4514267d": "3.12 to 3.15"},
        EVERY_BACKEND,
    ),
    Copy(
        "array_slicing.train_validation_split",
        "_dev_modes (validation_split)",
        _attribute("keras.src.trainers.data_adapters.array_slicing", "train_validation_split"),
        {"97e71878bad61504": "3.10 to 3.15"},
        EVERY_BACKEND,
    ),
    # On JAX, where `keras.Model.<name>` is Keras' JAX trainer's
    # (`JAXTrainer`, keras/src/backend/jax/trainer.py): the stateless step
    # `_jax.loop.StatelessStep` reproduces, the `fit`, `evaluate`, `predict`
    # and `*_on_batch` that call it with their `state` and take the new one
    # back, and the stateless functions the step is made of.
    Copy(
        "keras.Model._make_function",
        "_jax.loop.StatelessStep (batches per execution, internals.make_jax_function)",
        _attribute("keras", "Model", "_make_function"),
        {"9a715b94a7d23e95": "3.10", "95d093f6f8230e7e": "3.11 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model.make_train_function",
        "_jax.loop.StatelessStep (jit, donated state, out_shardings)",
        _attribute("keras", "Model", "make_train_function"),
        {
            "b99f175d2891b6be": "3.10",
            "2d5775eb14a0b58d": "3.11",
            "4bd32fa05e0cf518": "3.12",
            "80cf7f170ef64a78": "3.13 to 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.make_test_function",
        "_jax.loop.StatelessStep (jit, donated state, out_shardings)",
        _attribute("keras", "Model", "make_test_function"),
        {
            "ee4bf9f19cf62750": "3.10",
            "2dcb9d759c25d1c3": "3.11",
            "fb4e4d98a7faec04": "3.12",
            "f496ed6c97678234": "3.13 to 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.make_predict_function",
        "_jax.loop.StatelessStep (jit, donated state, out_shardings)",
        _attribute("keras", "Model", "make_predict_function"),
        {
            "d1240afd404c4be4": "3.10",
            "216156f8b96c551d": "3.11",
            "3ba05ee5f581b775": "3.12 to 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.train_step",
        "CustomModel.train_step and its hooks (on JAX)",
        _attribute("keras", "Model", "train_step"),
        {"40a7789a479a8061": "3.10, 3.11", "67c7e33798cd7fac": "3.12 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model.test_step",
        "CustomModel.test_step (on JAX)",
        _attribute("keras", "Model", "test_step"),
        {"9148350ad0769176": "3.10, 3.11", "458e71cd8964a7cf": "3.12 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model.predict_step",
        "CustomModel.predict_step (on JAX)",
        _attribute("keras", "Model", "predict_step"),
        {"be25bb8a287c3a6b": "3.10, 3.11", "49b90c739e295494": "3.12 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model.compute_loss_and_updates",
        "_jax.loop.loss_gradients",
        _attribute("keras", "Model", "compute_loss_and_updates"),
        {"d45d167ccc051133": "3.10 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model._update_metrics_variables",
        "the default step's loss tracking and metrics (on JAX)",
        _attribute("keras", "Model", "_update_metrics_variables"),
        {"a264e71e543120d0": "3.10, 3.11", "cb4a63a4dbad51a8": "3.12 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model.fit",
        "CustomModel.fit on JAX (the state and callback list fit makes)",
        _attribute("keras", "Model", "fit"),
        {
            "6ba21c1e218a6218": "3.10",
            "4456d082fdf9adb5": "3.11",
            "8bceb98eea114537": "3.12 to 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.evaluate",
        "CustomModel.evaluate on JAX (the state and callback list evaluate makes)",
        _attribute("keras", "Model", "evaluate"),
        {
            "722d8edc054049b4": "3.10",
            "8c3fb0ea4d21d658": "3.11",
            "e8ee5391706b1a80": "3.12, 3.13",
            "ba88e15ab09f3636": "3.14, 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.predict",
        "_jax.loop.StatelessStep (the state predict passes)",
        _attribute("keras", "Model", "predict"),
        {
            "b70ddc8d3cb45f24": "3.10",
            "9e43ef1a14483659": "3.11",
            "c2da79674908fa61": "3.12 to 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.train_on_batch",
        "CustomModel.train_on_batch on JAX (optimizer stand-in, state)",
        _attribute("keras", "Model", "train_on_batch"),
        {
            "065c20f4bdaea11a": "3.10, 3.11",
            "55a63f6f9874f7a9": "3.12, 3.13",
            "3e0d9ecd913f5b26": "3.14",
            "3676ad2f36c672ce": "3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.test_on_batch",
        "CustomModel.test_on_batch on JAX (state)",
        _attribute("keras", "Model", "test_on_batch"),
        {
            "69d1573a316c5eec": "3.10, 3.11",
            "dec754af9934a93f": "3.12, 3.13",
            "5e3ecd5f0aa42efa": "3.14",
            "5130c4e45d522735": "3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.predict_on_batch",
        "_jax.loop.StatelessStep (the state predict_on_batch passes)",
        _attribute("keras", "Model", "predict_on_batch"),
        {"bb5393aefb9a6179": "3.10, 3.11", "d16f347002511a30": "3.12 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model.jax_state_sync",
        "internals.jax_state_put_back",
        _attribute("keras", "Model", "jax_state_sync"),
        {"3b2acd9b9a0568c6": "3.10 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model._get_jax_state",
        "internals.NoOptimizer and StatelessStep.state_variables",
        _attribute("keras", "Model", "_get_jax_state"),
        {"b0cc6073c3986b08": "3.10 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model._purge_model_variables",
        "internals.NoOptimizer and StatelessStep._put_back",
        _attribute("keras", "Model", "_purge_model_variables"),
        {"a6eb22a8b537ff36": "3.10 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model._get_state_sharding_spec",
        "_jax.loop.StatelessStep (out_shardings)",
        _attribute("keras", "Model", "_get_state_sharding_spec"),
        # 3.10 and 3.11 constrain the new state's sharding inside the step
        # (`_enforce_jax_state_sharding`) instead.
        {
            ABSENT: "3.10, 3.11",
            "5e8def3f4d02cb97": "3.12, 3.13",
            "e3187c2317f13bc8": "3.14, 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model._symbolic_build",
        "_call.symbolic_build (where a call learns its data; the JAX trainer calls it directly)",
        _attribute("keras", "Model", "_symbolic_build"),
        {
            "330210b83242a6af": "3.10",
            "9e2c2441c8d68292": "3.11 to 3.13",
            "96220cc3b88fe768": "3.14, 3.15",
        },
        JAX,
    ),
    Copy(
        "keras.Model.stateless_compute_loss",
        "_jax.loop.loss_gradients (the loss in the step's scope)",
        _attribute("keras", "Model", "stateless_compute_loss"),
        {"b1bc0fd3c626aef7": "3.10 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.Model.stateless_call",
        "the default step's forward pass in StatelessStep's scope",
        _attribute("keras", "Model", "stateless_call"),
        {"011b9eb412fc91da": "3.10 to 3.15"},
        JAX,
    ),
    Copy(
        "keras.optimizers.Optimizer.stateless_apply",
        "_jax.loop.apply (optimizer.apply in the step's scope)",
        _attribute("keras", "optimizers", "Optimizer", "stateless_apply"),
        {
            "69efe0c1e4ee0616": "3.10, 3.11",
            "b626e2d7841c230a": "3.12, 3.13",
            "ecfc08323f2b93f7": "3.14, 3.15",
        },
        JAX,
    ),
    # On PyTorch, where `keras.Model.<name>` is Keras' PyTorch trainer's
    # (`TorchTrainer`, keras/src/backend/torch/trainer.py), tested with
    # Keras 3.15 only: the step `CustomModel`'s reproduces, the step
    # functions `_torch.loop` makes in place of its own (a list of batches
    # per call, `torch.compile` with `jit_compile=True`, predict outside
    # autograd), and the `fit`, `evaluate` and `predict` that call them.
    Copy(
        "keras.Model.train_step",
        "CustomModel.train_step and its hooks (on PyTorch)",
        _attribute("keras", "Model", "train_step"),
        {"a638d4455d8fced6": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.test_step",
        "CustomModel.test_step (on PyTorch)",
        _attribute("keras", "Model", "test_step"),
        {"9a913bde1b69d004": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.predict_step",
        "CustomModel.predict_step (on PyTorch)",
        _attribute("keras", "Model", "predict_step"),
        {"ce25c1301a87781d": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.make_train_function",
        "_torch.loop.make_train_function",
        _attribute("keras", "Model", "make_train_function"),
        {"280aed779362a2df": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.make_test_function",
        "_torch.loop.make_test_function",
        _attribute("keras", "Model", "make_test_function"),
        {"7ace52914285674c": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.make_predict_function",
        "_torch.loop.make_predict_function",
        _attribute("keras", "Model", "make_predict_function"),
        {"afdc6cdfc7e5ee40": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.fit",
        "CustomModel.fit on PyTorch (the batches per call, the callback list)",
        _attribute("keras", "Model", "fit"),
        {"c88f3a56fe97a6a7": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.evaluate",
        "CustomModel.evaluate on PyTorch (the batches per call, the callback list)",
        _attribute("keras", "Model", "evaluate"),
        {"7366ec19422f797c": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.predict",
        "_torch.loop.make_predict_function (the outputs predict gathers)",
        _attribute("keras", "Model", "predict"),
        {"2b4605488866dc1f": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.train_on_batch",
        "CustomModel.train_on_batch on PyTorch",
        _attribute("keras", "Model", "train_on_batch"),
        {"001bdda5f9287d9b": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.test_on_batch",
        "CustomModel.test_on_batch on PyTorch",
        _attribute("keras", "Model", "test_on_batch"),
        {"b98c166e3f3f5391": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model.predict_on_batch",
        "CustomModel.predict_on_batch on PyTorch",
        _attribute("keras", "Model", "predict_on_batch"),
        {"772eb85f72a48a46": "3.15"},
        TORCH,
    ),
    Copy(
        "keras.Model._symbolic_build",
        "_torch.loop.symbolic_build (the PyTorch trainer calls it directly)",
        _attribute("keras", "Model", "_symbolic_build"),
        {"96220cc3b88fe768": "3.15"},
        TORCH,
    ),
    Copy(
        "TorchEpochIterator._get_iterator",
        "_torch.resume.TorchRandomReplay (internals.wrap_torch_dataloaders)",
        _attribute("keras.src.backend.torch.trainer", "TorchEpochIterator", "_get_iterator"),
        {"eaf05f914f6fc4c3": "3.15"},
        TORCH,
    ),
    Copy(
        "EpochIterator.__next__",
        "_keras.epoch_iterator.size_executions (the batches each PyTorch execution draws)",
        _attribute("keras.src.trainers.epoch_iterator", "EpochIterator", "__next__"),
        {"8b12aa117bb200a4": "3.15"},
        TORCH,
    ),
)


def copies_on(backend: str) -> tuple[Copy, ...]:
    """The entries of `ALL_COPIES` for one Keras backend, in order."""
    return tuple(copy for copy in ALL_COPIES if backend in copy.backends)


# The installed backend's, which `problems()` compares.
COPIES = copies_on(keras.backend.backend())


def source_hash(function: Any) -> str:
    """The first 16 hex digits of the SHA-256 of a function's source."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.16.0.dev2026102704"."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def release_range(tested: tuple[tuple[int, int], tuple[int, int]]) -> str:
    """ "3.10 to 3.15", or "3.15" for one release."""
    (a, b), (c, d) = tested
    return f"{a}.{b}" if (a, b) == (c, d) else f"{a}.{b} to {c}.{d}"


def problems() -> list[str]:
    """What customfit does not know about the installed Keras (and
    TensorFlow, on its backend), and each of the installed backend's
    `COPIES` whose source no tested release has, one sentence each; empty
    on a tested stack."""
    found = []
    stack = [("Keras", keras.version(), TESTED_KERAS)]
    if keras.backend.backend() == "tensorflow":  # imported by Keras already
        stack.append(("TensorFlow", sys.modules["tensorflow"].__version__, TESTED_TENSORFLOW))
    for name, version, tested in stack:
        if not tested[0] <= release(version) <= tested[1]:
            found.append(
                f"{name} {version} is installed; customfit is tested with {name} "
                f"{release_range(tested)}."
            )
    for copy in COPIES:
        try:
            digest = source_hash(copy.find())
        except (AttributeError, ImportError, OSError, TypeError):
            digest = ABSENT
        if digest in copy.known:
            continue
        if digest == ABSENT:
            found.append(
                f"Keras {keras.version()} has no {copy.keras_name}, which "
                f"{copy.customfit_name} reproduces."
            )
            continue
        checked = "; ".join(r for key, r in copy.known.items() if key != ABSENT)
        found.append(
            f"{copy.keras_name} in Keras {keras.version()} differs from "
            f"the releases {copy.customfit_name} was checked against "
            f"({checked})."
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
                f"'keras>={release_range(TESTED_KERAS).split(' to ')[0]},"
                f"<{TESTED_KERAS[1][0]}.{TESTED_KERAS[1][1] + 1}')."
            ),
            stacklevel=3,
        )
