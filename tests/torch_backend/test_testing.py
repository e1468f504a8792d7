"""`customfit.testing` on PyTorch: `diagnose` names each mistake with its
fix, as on TensorFlow (a variable the loss does not reach has no gradient
here, as there), and `check_step` compares the eager and grouped settings
and says that it could not compare two replicas."""

import keras
import numpy as np
import pytest

import customfit
from customfit.testing import check_step, diagnose
from tests.jax_backend import models
from tests.jax_backend.step_mistakes import MISTAKES, Net, with_mistake
from tests.jax_backend.test_keras2_helpers import Keras2Hooks


def compiled(model):
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def state(model):
    return [keras.ops.convert_to_numpy(v.value).copy()
            for v in [*model.variables, *model.optimizer.variables]]


def test_diagnose_finds_nothing_in_a_correct_step_and_changes_nothing(digits):
    x, y = digits[0][:32], digits[1][:32]
    model = compiled(Net())
    model(x)
    model.optimizer.build(model.trainable_variables)
    before = state(model)
    assert diagnose(model, x, y) == []
    for a, b in zip(before, state(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mistake", MISTAKES)
def test_diagnose_names_each_mistake_and_its_fix(mistake, digits):
    findings = diagnose(compiled(with_mistake(mistake)()), digits[0][:32], digits[1][:32])
    assert [f.mistake for f in findings] == [mistake]
    assert "Fix:" in findings[0].message


def test_diagnose_names_a_variable_the_loss_does_not_reach(digits):
    class Unused(Net):
        def __init__(self):
            super().__init__()
            self.unused = keras.layers.Dense(3)
            self.unused.build((None, 4))

    findings = diagnose(compiled(Unused()), digits[0][:32], digits[1][:32])
    assert [f.mistake for f in findings] == ["none_gradients"]
    assert "/kernel" in findings[0].message


def test_diagnose_on_the_default_step_and_the_keras2_helpers(digits):
    for base in (customfit.CustomModel, Keras2Hooks):
        model = models.mlp(base, regularize=True, batchnorm=True)
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        assert diagnose(model, digits[0][:32], digits[1][:32]) == [], base


def build_plain():
    return models.mlp(customfit.CustomModel, dropout=0)


def test_check_step_compares_eager_and_grouped_and_notes_no_replicas(digits):
    report = check_step(build_plain, digits[0][:96], digits[1][:96],
                        compile_kwargs={"loss": "sparse_categorical_crossentropy"})
    assert report.ok, report
    assert [c.setting for c in report.comparisons] == [
        "eager (run_eagerly=True)", "steps_per_execution=3"]
    assert all(c.max_abs_diff == 0 for c in report.comparisons)
    assert report.notes == [
        "Two replicas were not compared: Keras' PyTorch backend has no keras.distribution, "
        "and fit runs on one device of one process there."]
