"""Drift detection on PyTorch: customfit compares the source of Keras'
PyTorch trainer (the step it reproduces, the step functions it replaces, the
`fit` that calls them) and of the backend-neutral code it shares with the
hashes of the tested releases, and says, once, when one differs."""

import dataclasses
import inspect
import warnings

import keras
import pytest

import customfit
from customfit import _check
from customfit._keras import versions

# Each of these `keras.Model` methods is Keras' PyTorch trainer's on PyTorch.
TORCH_TRAINER = (
    "train_step", "test_step", "predict_step", "make_train_function", "make_test_function",
    "make_predict_function", "fit", "evaluate", "predict", "train_on_batch", "test_on_batch",
    "predict_on_batch",
)


def copy_named(keras_name):
    (copy,) = [c for c in versions.COPIES if c.keras_name == keras_name]
    return copy


def test_the_torch_entries_are_compared_on_torch():
    assert keras.backend.backend() == "torch"
    assert versions.COPIES == versions.copies_on("torch")
    names = {copy.keras_name for copy in versions.COPIES}
    assert {f"keras.Model.{name}" for name in TORCH_TRAINER} <= names
    assert {"keras.Model.compute_loss", "CompileMetrics.result",
            "EpochIterator._enumerate_iterator", "EpochIterator.__next__",
            "TorchEpochIterator._get_iterator"} <= names
    assert "keras.Model._maybe_symbolic_build" not in names  # TensorFlow's
    assert "keras.Model.jax_state_sync" not in names


def test_the_torch_trainer_entries_hash_the_torch_trainer():
    for name in TORCH_TRAINER:
        function = inspect.unwrap(copy_named(f"keras.Model.{name}").find())
        path = inspect.getsourcefile(function).replace("\\", "/")
        assert path.endswith("keras/src/backend/torch/trainer.py"), (name, path)


def test_the_installed_keras_is_the_tested_one():
    """Keras 3.15.1 (the PyTorch environment's): the one release tested on
    PyTorch, every source the one recorded."""
    assert versions.TESTED_KERAS == ((3, 15), (3, 15))
    assert versions.problems() == []
    for copy in versions.COPIES:
        assert versions.source_hash(copy.find()) in copy.known, copy.keras_name


def test_a_changed_torch_function_is_named_once_with_a_warning(digits, monkeypatch):
    monkeypatch.setattr(versions, "_checked", False)
    train_step = copy_named("keras.Model.train_step")
    changed = dataclasses.replace(train_step, find=lambda: keras.Model.test_step)
    others = [copy for copy in versions.COPIES if copy is not train_step]
    monkeypatch.setattr(versions, "COPIES", (changed, *others))
    assert versions.problems() == [
        f"keras.Model.train_step in Keras {keras.version()} differs from the releases "
        "CustomModel.train_step and its hooks (on PyTorch) was checked against (3.15)."
    ]
    inputs = keras.Input((64,))
    model = customfit.CustomModel(inputs, keras.layers.Dense(10)(inputs))
    model.compile("sgd", "mse")
    with pytest.warns(customfit.CompatibilityWarning, match="keras.Model.train_step") as caught:
        model.fit(digits[0][:32], digits[1][:32, None], verbose=0)
    assert "pip install 'keras>=3.15,<3.16'" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        model.evaluate(digits[0][:32], digits[1][:32, None], verbose=0)


def test_the_check_command_says_what_it_compared_on_torch():
    copies = (f"the {len(versions.COPIES)} Keras functions customfit reproduces or relies "
              "on with Keras' PyTorch trainer")
    assert _check.stack_lines([]) == [
        f"Releases: Keras {keras.version()}, within the tested Keras 3.15.",
        f"Copied Keras code: {copies} have their source in a tested release.",
    ]
