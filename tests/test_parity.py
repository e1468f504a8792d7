"""With nothing overridden, CustomModel trains, evaluates and predicts exactly
like keras.Model (tolerance: none, bit-for-bit on CPU with op determinism)."""

import keras
import pytest

import customfit
from customfit.testing import assert_trains_like_keras
from tests import models
from tests.parity import SEED, compile_kwargs, fit_kwargs, train
from tests.subproc import run_python

N = 320  # 5 batches of 64 per epoch; N_RAGGED gives a short last batch.
N_RAGGED = 300


def _case(build, n=N, compile_kwargs=None, fit_kwargs=None, data=None):
    return dict(build=build, n=n, compile_kwargs=compile_kwargs or {},
                fit_kwargs=fit_kwargs or {}, data=data)


CASES = {
    "functional_dropout": _case(models.mlp),
    "ragged_last_batch": _case(models.mlp, n=N_RAGGED),
    "subclassed_batchnorm": _case(models.subclassed),
    "batchnorm": _case(lambda b: models.mlp(b, batchnorm=True)),
    "multi_io_dicts": _case(models.multi_io, compile_kwargs=models.MULTI_IO_COMPILE,
                            data=models.multi_io_data),
    "sample_weight": _case(models.mlp, n=N_RAGGED,
                           compile_kwargs=dict(weighted_metrics=["accuracy"]),
                           fit_kwargs=dict(sample_weight=models.sample_weights(N_RAGGED))),
    "class_weight": _case(models.mlp, fit_kwargs=dict(class_weight=models.class_weights())),
    "validation_split": _case(models.mlp, fit_kwargs=dict(validation_split=0.25)),
    "regularizer_and_add_loss": _case(models.add_loss_model),
    "steps_per_execution_3": _case(models.mlp, n=N_RAGGED,
                                   compile_kwargs=dict(steps_per_execution=3)),
}


def _data(case, x, y):
    x, y = x[: case["n"]], y[: case["n"]]
    return case["data"](x, y) if case["data"] is not None else (x, y)


def _run(base, case, x, y, mode="graph", extra_fit=None):
    """One case trained on `base`; for the XLA subprocess below."""
    return train(base, case["build"], *_data(case, x, y), case["compile_kwargs"],
                 {**case["fit_kwargs"], **(extra_fit or {})}, mode=mode)


def _assert_case_trains_like_keras(case, x, y, mode="graph", extra_fit=None):
    return assert_trains_like_keras(
        case["build"], *_data(case, x, y),
        compile_kwargs=compile_kwargs(mode, case["compile_kwargs"]),
        fit_kwargs=fit_kwargs({**case["fit_kwargs"], **(extra_fit or {})}),
        seed=SEED)


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_step_equals_stock_fit(case, digits):
    _assert_case_trains_like_keras(CASES[case], *digits)


@pytest.mark.parametrize("mode", ["eager"])
@pytest.mark.parametrize("case", ["functional_dropout", "multi_io_dicts",
                                  "sample_weight", "steps_per_execution_3"])
def test_default_step_equals_stock_fit_per_execution_mode(case, mode, digits):
    _assert_case_trains_like_keras(CASES[case], *digits, mode=mode)


def test_validation_data_equals_stock_fit(digits):
    x, y = digits
    validation = dict(validation_data=(x[N:N + 200], y[N:N + 200]))
    _, actual = _assert_case_trains_like_keras(
        CASES["functional_dropout"], x, y, extra_fit=validation)
    assert "val_loss" in actual.history and "val_accuracy" in actual.history


def test_parity_check_detects_a_one_ulp_difference(digits):
    """The comparison itself must fail on the smallest change, and say where."""
    import numpy as np

    from tests.parity import assert_identical

    reference, actual = _assert_case_trains_like_keras(CASES["functional_dropout"], *digits)
    path, kernel = actual.weights[0]
    actual.weights[0] = (path, np.nextafter(kernel, np.inf))
    with pytest.raises(AssertionError, match=f"weight '{path}': {kernel.size} of "
                                             f"{kernel.size} element"):
        assert_identical(reference, actual)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_default_step_equals_stock_fit_under_xla():
    """Keras turns XLA off when op determinism is on, so this runs in a fresh
    process without it; XLA on CPU is still run-to-run reproducible here."""
    out = run_python("""
        import keras
        from sklearn.datasets import load_digits
        import customfit
        from tests import models
        from tests.parity import assert_identical, train
        from tests.test_parity import CASES, _run

        d = load_digits()
        x, y = (d.data / 16).astype("float32")[:600], d.target.astype("int32")[:600]
        # XLA compiles each case's steps anew: the cases that change the step's
        # structure (dict inputs and outputs, several steps per call); the
        # functional model with dropout is tests/test_xla.py's.
        for name in ["multi_io_dicts", "steps_per_execution_3"]:
            expected = _run(keras.Model, CASES[name], x, y, mode="xla")
            actual = _run(customfit.CustomModel, CASES[name], x, y, mode="xla")
            assert_identical(expected, actual)
        keras.utils.set_random_seed(0)
        m = models.mlp(customfit.CustomModel)
        m.compile("adam", "sparse_categorical_crossentropy", jit_compile=True)
        print("jit_compile", m.jit_compile)
    """)
    assert "jit_compile True" in out
