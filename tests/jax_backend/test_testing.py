"""`customfit.testing.check_step` on JAX: eager, `steps_per_execution` and
two devices (`DataParallel`) against the jitted step."""

import keras

import customfit
from customfit.testing import check_step
from tests.jax_backend import models


def build_plain():
    return models.mlp(customfit.CustomModel, dropout=0)


class TraceTimeScale(customfit.CustomModel):
    """Scales its gradients by a Python counter: a jitted step reads it when
    traced, an eager one on every batch."""

    calls = 0

    def transform_gradients(self, gradients, variables):
        TraceTimeScale.calls += 1
        return [g * float(TraceTimeScale.calls) for g in gradients]


def build_trace_time():
    return models.mlp(TraceTimeScale, dropout=0)


COMPILE = {"loss": "sparse_categorical_crossentropy"}


def test_a_plain_step_agrees_in_every_setting(digits):
    report = check_step(build_plain, digits[0][:96], digits[1][:96], compile_kwargs=COMPILE)
    assert report.ok, report
    assert [c.setting for c in report.comparisons] == [
        "eager (run_eagerly=True)",
        "steps_per_execution=3",
        "2 devices (keras.distribution.DataParallel, same global batch)",
    ]
    assert report.findings == [] and not report.notes  # diagnose() ran, found nothing


def test_a_python_side_effect_in_the_step_shows_as_an_eager_difference(digits):
    report = check_step(build_trace_time, digits[0][:96], digits[1][:96],
                        compile_kwargs=COMPILE, replicas=False)
    assert not report.ok
    eager = report.comparisons[0]
    assert eager.setting == "eager (run_eagerly=True)" and not eager.ok
    assert eager.max_abs_diff > 1e-3
    assert keras.backend.backend() == "jax"
