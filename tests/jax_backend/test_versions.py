"""Drift detection on JAX: customfit compares the source of Keras' JAX trainer
(the stateless step it reproduces, the `fit` and state handling it relies on)
and of the backend-neutral code it shares with the hashes of the tested
releases, and says, once, when one differs."""

import dataclasses
import inspect
import warnings

import keras
import pytest

import customfit
from customfit import _check
from customfit._keras import versions
from tests.jax_backend import models

# Each of these `keras.Model` methods is Keras' JAX trainer's on JAX.
JAX_TRAINER = (
    "_make_function", "make_train_function", "make_test_function", "make_predict_function",
    "train_step", "test_step", "predict_step", "compute_loss_and_updates",
    "_update_metrics_variables", "fit", "evaluate", "predict", "train_on_batch",
    "test_on_batch", "predict_on_batch", "jax_state_sync", "_get_jax_state",
    "_purge_model_variables", "_get_state_sharding_spec",
)


@pytest.fixture
def fresh_check(monkeypatch):
    """`check_once` as if nothing had been checked in this process."""
    monkeypatch.setattr(versions, "_checked", False)


def releases_in(releases):
    """The releases a `Copy.known` value names ("3.10", "3.10, 3.11",
    "3.12 to 3.15"), as a set of (major, minor)."""
    found = set()
    for part in releases.split(", "):
        first, _, last = part.partition(" to ")
        first, last = versions.release(first), versions.release(last or first)
        found.update((first[0], minor) for minor in range(first[1], last[1] + 1))
    return found


def copy_named(keras_name):
    (copy,) = [c for c in versions.COPIES if c.keras_name == keras_name]
    return copy


def test_the_jax_entries_are_compared_on_jax():
    assert keras.backend.backend() == "jax"
    assert versions.COPIES == versions.copies_on("jax")
    assert all("jax" in copy.backends for copy in versions.COPIES)
    names = {copy.keras_name for copy in versions.COPIES}
    assert {f"keras.Model.{name}" for name in JAX_TRAINER} <= names
    # Backend-neutral code customfit depends on here too.
    assert {"keras.Model.compute_loss", "CompileMetrics.result",
            "EpochIterator._enumerate_iterator", "keras.Model._symbolic_build"} <= names
    # The TensorFlow trainer's copies are not compared here.
    assert "keras.Model._maybe_symbolic_build" not in names


def test_the_jax_trainer_entries_hash_the_jax_trainer():
    """`keras.Model.<name>` resolves to Keras' JAX trainer on JAX: what is
    hashed is the code that runs."""
    for name in JAX_TRAINER:
        function = inspect.unwrap(copy_named(f"keras.Model.{name}").find())
        path = inspect.getsourcefile(function).replace("\\", "/")
        assert path.endswith("keras/src/backend/jax/trainer.py"), (name, path)


def test_the_installed_keras_has_known_jax_sources():
    """Keras 3.15.1 (the JAX environment's): no problems, and each function's
    source is the one recorded for 3.15."""
    assert versions.problems() == []
    installed = versions.release(keras.version())
    for copy in versions.COPIES:
        releases = copy.known[versions.source_hash(copy.find())]
        assert installed in releases_in(releases), copy.keras_name


def test_the_recorded_releases_cover_every_tested_release_once():
    tested = releases_in(versions.release_range(versions.TESTED_KERAS))
    for copy in versions.copies_on("jax"):
        covered = [releases_in(releases) for releases in copy.known.values()]
        assert set().union(*covered) == tested, copy.keras_name
        assert sum(map(len, covered)) == len(tested), copy.keras_name


def test_a_changed_jax_function_is_named_once_with_a_warning(digits, fresh_check, monkeypatch):
    train_step = copy_named("keras.Model.train_step")
    # What Keras' JAX `train_step` would hash to if its source changed.
    changed = dataclasses.replace(train_step, find=lambda: keras.Model.test_step)
    others = [copy for copy in versions.COPIES if copy is not train_step]
    monkeypatch.setattr(versions, "COPIES", (changed, *others))
    assert versions.problems() == [
        f"keras.Model.train_step in Keras {keras.version()} differs from the releases "
        "CustomModel.train_step and its hooks (on JAX) was checked against "
        "(3.10, 3.11; 3.12 to 3.15)."
    ]
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.warns(customfit.CompatibilityWarning, match="keras.Model.train_step") as caught:
        model.fit(digits[0][:32], digits[1][:32], verbose=0)
    assert "python -m customfit check" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        model.evaluate(digits[0][:32], digits[1][:32], verbose=0)


def test_a_missing_jax_function_is_named(fresh_check, monkeypatch):
    def gone():
        raise AttributeError("no such function")

    missing = dataclasses.replace(copy_named("keras.Model.jax_state_sync"), find=gone)
    monkeypatch.setattr(versions, "COPIES", (missing,))
    assert versions.problems() == [
        f"Keras {keras.version()} has no keras.Model.jax_state_sync, which "
        "internals.jax_state_put_back reproduces."
    ]
    with pytest.warns(customfit.CompatibilityWarning, match="jax_state_sync"):
        versions.check_once()


def test_a_function_absent_from_a_tested_release_may_be_absent(monkeypatch):
    """Keras 3.10 and 3.11 have no `_get_state_sharding_spec`: without it,
    the installed Keras is one of those; with another source, the message
    lists only the releases that have one."""
    spec = copy_named("keras.Model._get_state_sharding_spec")
    assert spec.known[versions.ABSENT] == "3.10, 3.11"

    def gone():
        raise AttributeError("no such function")

    monkeypatch.setattr(versions, "COPIES", (dataclasses.replace(spec, find=gone),))
    assert versions.problems() == []
    changed = dataclasses.replace(spec, find=lambda: keras.Model.jax_state_sync)
    monkeypatch.setattr(versions, "COPIES", (changed,))
    assert versions.problems() == [
        f"keras.Model._get_state_sharding_spec in Keras {keras.version()} differs from the "
        "releases _jax.loop.StatelessStep (out_shardings) was checked against "
        "(3.12, 3.13; 3.14, 3.15)."
    ]


def test_the_check_command_says_what_it_compared_on_jax():
    copies = (f"the {len(versions.COPIES)} Keras functions customfit reproduces or relies "
              "on with Keras' JAX trainer")
    assert _check.stack_lines([]) == [
        f"Releases: Keras {keras.version()}, within the tested Keras 3.10 to 3.15.",
        f"Copied Keras code: {copies} have their source in a tested release.",
    ]
    found = ["keras.Model.fit in Keras 3.99.0 differs from the releases ..."]
    assert _check.stack_lines(found)[1:] == [
        f"Copied Keras code: the source of {copies}, compared with the tested releases'.",
        "Differences from the tested stack (1):",
        f"  - {found[0]}",
    ]
