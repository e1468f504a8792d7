"""customfit says, once, when the installed Keras or TensorFlow is not one it
is tested with, or when a Keras function it copies has changed."""

import dataclasses
import inspect
import warnings

import keras
import pytest

import customfit
from customfit._keras import versions
from tests import models
from tests.subproc import run_python


@pytest.fixture
def fresh_check(monkeypatch):
    """`check_once` as if nothing had been checked in this process."""
    monkeypatch.setattr(versions, "_checked", False)


def test_the_installed_stack_is_a_tested_one():
    assert versions.problems() == []


def test_the_tensorflow_entries_are_compared_on_tensorflow():
    """`COPIES` is the installed backend's; each `keras.Model.<name>` the
    TensorFlow loop copies is hashed from Keras' TensorFlow trainer."""
    assert versions.COPIES == versions.copies_on("tensorflow")
    assert versions.COPIES[0].keras_name == "keras.Model._make_function"
    assert all("tensorflow" in copy.backends for copy in versions.COPIES)
    assert len(versions.ALL_COPIES) > len(versions.COPIES)  # and JAX's
    for name in ("_make_function", "train_step", "test_step", "fit", "evaluate",
                 "_maybe_symbolic_build"):
        (copy,) = [c for c in versions.COPIES if c.keras_name == f"keras.Model.{name}"]
        path = inspect.getsourcefile(inspect.unwrap(copy.find())).replace("\\", "/")
        assert path.endswith("keras/src/backend/tensorflow/trainer.py"), (name, path)


def test_release_reads_dev_and_rc_versions():
    assert versions.release("3.16.0.dev2026102704") == (3, 16)
    assert versions.release("2.21.0") == (2, 21)
    assert versions.release("2.22.0rc1") == (2, 22)


def fit_once(digits):
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(digits[0][:32], digits[1][:32], verbose=0)
    return model


def test_an_untested_keras_is_named_once_with_what_to_do(digits, fresh_check, monkeypatch):
    monkeypatch.setattr(keras, "version", lambda: "3.16.0.dev2026102704")
    with pytest.warns(customfit.CompatibilityWarning) as caught:
        model = fit_once(digits)
    message = str(caught[0].message)
    assert "Keras 3.16.0.dev2026102704 is installed; customfit is tested with " \
           "Keras 3.10 to 3.15." in message
    assert "python -m customfit check" in message and "keras>=3.10,<3.16" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        model.evaluate(digits[0][:32], digits[1][:32], verbose=0)


def test_a_changed_keras_function_is_named(fresh_check, monkeypatch):
    copy = versions.COPIES[0]
    changed = dataclasses.replace(copy, known={"0" * 16: "3.15"})
    monkeypatch.setattr(versions, "COPIES", (changed, *versions.COPIES[1:]))
    assert (f"keras.Model._make_function in Keras {keras.version()} differs from the "
            "releases _keras._tensorflow.step_function.make_function was checked against (3.15)."
            in versions.problems())
    with pytest.warns(customfit.CompatibilityWarning, match="_make_function"):
        versions.check_once()


def test_a_missing_keras_function_is_named(fresh_check, monkeypatch):
    def gone():
        raise AttributeError("no such function")

    missing = dataclasses.replace(versions.COPIES[0], find=gone)
    monkeypatch.setattr(versions, "COPIES", (missing,))
    assert (f"Keras {keras.version()} has no keras.Model._make_function, which "
            "_keras._tensorflow.step_function.make_function reproduces." in versions.problems())


def test_a_function_absent_from_a_tested_release_may_be_absent(monkeypatch):
    def gone():
        raise AttributeError("no such function")

    copy = dataclasses.replace(versions.COPIES[0], find=gone,
                               known={versions.ABSENT: "3.10", "0" * 16: "3.11 to 3.15"})
    monkeypatch.setattr(versions, "COPIES", (copy,))
    # Only the copy: on an untested Keras (keras-nightly) the release is named too.
    assert [p for p in versions.problems() if copy.keras_name in p] == []


@pytest.mark.slow
@pytest.mark.multiprocess
def test_check_command_prints_its_table():
    """`python -m customfit check` on this install: every row bit for bit."""
    out = run_python("""
        import sys
        from customfit.__main__ import main
        sys.exit(main(["check"]))
    """)
    assert f"Releases: Keras {keras.version()} and TensorFlow" in out
    assert "Keras functions customfit copies or reproduces have their source in a tested" in out
    for row in ("default step", "Keras-2 train_step", "self.log in a hook",
                "steps_per_execution=4", "every batch's logs"):
        assert row in out
    assert "6 of 6 checks match bit for bit" in out
