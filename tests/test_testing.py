"""customfit.testing: each helper catches what it promises to catch, and
stays quiet for a correct step."""

import configparser
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit.testing import assert_trains_like_keras, check_step, diagnose
from tests import models, step_mistakes
from tests.step_mistakes import MISTAKES, Net, with_mistake
from tests.subproc import ROOT
from tests.test_keras2_helpers import keras2_model

COMPILE = {"optimizer": "sgd", "loss": "sparse_categorical_crossentropy"}


class Nudged(customfit.CustomModel):
    """Scales every gradient by 1 + 1e-4: close to stock fit, not equal."""

    def transform_gradients(self, gradients, variables):
        return [g * (1.0 + 1e-4) for g in gradients]


def test_assert_trains_like_keras_shows_where_and_by_how_much(digits):
    x, y = digits[0][:128], digits[1][:128]
    kwargs = dict(compile_kwargs=COMPILE, fit_kwargs={"batch_size": 64})
    with pytest.raises(AssertionError) as raised:
        assert_trains_like_keras(models.mlp, x, y, model_class=Nudged, **kwargs)
    message = str(raised.value)
    assert message.startswith("Nudged does not train like Functional (bit for bit)")
    assert "History['loss'] epoch 1:" in message
    assert "weight 'digit/kernel': " in message  # by variable.path
    assert "of 320 element(s) differ; max abs diff" in message
    assert "evaluate()" in message and "predict()" in message
    # Within a tolerance that covers a 1e-4 relative change over two epochs.
    reference, actual = assert_trains_like_keras(
        models.mlp, x, y, model_class=Nudged, rtol=1e-3, atol=1e-6, **kwargs)
    assert actual.model_name == "Nudged" and reference.model_name == "Functional"


@pytest.mark.slow
def test_assert_trains_like_keras_compares_vector_metrics(digits):
    """A metric with one value per class (F1Score) is compared element by
    element, in History and evaluate()."""
    x, y = digits[0][:128], keras.utils.to_categorical(digits[1][:128], 10)
    kwargs = dict(compile_kwargs={"optimizer": "sgd", "loss": "categorical_crossentropy",
                                  "metrics": [keras.metrics.F1Score()]},
                  fit_kwargs={"batch_size": 64})
    _, actual = assert_trains_like_keras(models.mlp, x, y, **kwargs)
    assert actual.history["f1_score"][0].shape == (10,)
    with pytest.raises(AssertionError, match=r"evaluate\(\): \d+ of 11 element"):  # loss, 10 F1
        assert_trains_like_keras(models.mlp, x, y, model_class=Nudged, **kwargs)


def test_assert_trains_like_keras_reports_a_missing_history_column(digits):
    class Logged(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            self.log("grad_norm", tf.linalg.global_norm(gradients))
            return gradients

    x, y = digits[0][:64], digits[1][:64]
    with pytest.raises(AssertionError, match=r"unexpected \['grad_norm'\]"):
        assert_trains_like_keras(models.mlp, x, y, model_class=Logged,
                                 compile_kwargs=COMPILE, epochs=1)


def _compiled(model):
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def test_diagnose_finds_nothing_in_a_correct_step(digits):
    x, y = digits[0][:32], digits[1][:32]
    model = _compiled(Net())
    model(x)
    before = [w.numpy().copy() for w in model.weights]
    assert diagnose(model, x, y) == []
    for a, b in zip(before, model.weights):  # the model ends as it started
        np.testing.assert_array_equal(a, b.numpy())


@pytest.mark.parametrize("mistake", MISTAKES)
def test_diagnose_names_each_mistake_and_its_fix(mistake, digits):
    x, y = digits[0][:32], digits[1][:32]
    findings = diagnose(_compiled(with_mistake(mistake)()), x, y)
    assert [f.mistake for f in findings] == [mistake]
    assert "Fix:" in findings[0].message or "Use them in call()" in findings[0].message


@pytest.mark.parametrize("base", [keras.Model, customfit.CustomModel])
def test_diagnose_on_default_and_keras2_steps(base, digits):
    """The stock step and CustomModel's default make none of the mistakes;
    the tutorial's Keras-2 step makes one on keras.Model only."""
    x, y = digits[0][:32], digits[1][:32]
    default = models.mlp(base, regularize=True, batchnorm=True)
    default.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    assert diagnose(default, x, y) == []
    keras2 = models.mlp(keras2_model(base))
    keras2.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    found = [f.mistake for f in diagnose(keras2, x, y)]
    assert found == (["loss_tracks_predictions"] if base is keras.Model else [])


def test_diagnose_needs_a_compiled_model(digits):
    with pytest.raises(RuntimeError, match="needs compile"):
        diagnose(Net(), digits[0][:8], digits[1][:8])


def test_check_step_reports_a_step_that_only_works_eagerly(digits):
    report = check_step(step_mistakes.build_python_state, *digits,
                        compile_kwargs={"loss": "sparse_categorical_crossentropy"},
                        replicas=False)
    assert not report.ok
    rows = {c.setting: c for c in report.comparisons}
    assert not rows["eager (run_eagerly=True)"].ok
    assert rows["eager (run_eagerly=True)"].max_abs_diff > 1e-4
    assert rows["steps_per_execution=3"].ok  # compiled both times: traced once
    assert "eager (run_eagerly=True) | bit for bit |" in str(report)
    assert "DIFFERENT" in str(report)


def test_check_step_needs_an_importable_build(digits):
    with pytest.raises(ValueError, match="module level in an importable module"):
        check_step(lambda: Net(), *digits)
    with pytest.raises(ValueError, match="Cannot import 'no_such_module:build'"):
        check_step("no_such_module:build", *digits)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_check_step_on_two_replicas(digits):
    """One two-replica process for three steps: a correct one, and one with
    each distribution mistake."""
    from customfit._step_check import check_steps

    correct, unscaled, per_replica = check_steps(
        [step_mistakes.build_correct, "tests.step_mistakes:build_unscaled_loss",
         step_mistakes.build_loss_tracked_per_replica], *digits,
        compile_kwargs={"loss": "sparse_categorical_crossentropy"})
    assert correct.ok, correct
    replicas = correct.comparisons[-1]
    assert replicas.setting.startswith("2 replicas") and replicas.rtol == 1e-5
    assert 0 <= replicas.max_abs_diff < 1e-6
    assert [f.mistake for f in unscaled.findings] == ["loss_not_scaled_for_replicas"]
    assert not unscaled.comparisons[-1].ok and unscaled.comparisons[0].ok
    assert [f.mistake for f in per_replica.findings] == ["loss_tracked_per_replica"]
    assert "num_replicas_in_sync" in per_replica.findings[0].message


def test_pytest_plugin_is_declared_as_entry_point():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options.entry_points"]["pytest11"].strip() == (
        "customfit = customfit.pytest_plugin")


def _readme_user_test() -> str:
    """The first code block of the guide "Testing your own step"."""
    guide = (ROOT / "docs" / "guides" / "testing.md").read_text()
    return guide.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_pytest_plugin_and_the_readme_user_test(tmp_path):
    """In a fresh pytest: the fixture seeds only the tests that ask for it,
    and the guide's complete user test passes as written."""
    (tmp_path / "test_readme.py").write_text(_readme_user_test())
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import numpy as np
        import pytest
        from tensorflow.python.framework import config

        def test_without_fixture_nothing_changes():
            assert not config.is_op_determinism_enabled()

        def test_fixture(customfit_deterministic):
            assert customfit_deterministic == 0
            assert config.is_op_determinism_enabled()
            first = np.random.rand()
            np.random.seed(0)
            assert first == np.random.rand()

        @pytest.mark.customfit_seed(42)
        def test_marker(customfit_deterministic):
            import keras
            assert customfit_deterministic == 42
            first = keras.random.uniform((3,)).numpy()
            keras.utils.set_random_seed(42)
            assert (first == keras.random.uniform((3,)).numpy()).all()
    """))
    # -p no:customfit: the installed entry point (if any) steps aside for
    # this checkout's plugin.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "no:customfit", "-p", "customfit.pytest_plugin", "test_user.py", "test_readme.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT),
             "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout
