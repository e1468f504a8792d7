"""XLA (`jit_compile=True`): the hooks compile and train like stock fit.

Keras turns XLA off when op determinism is on, so this runs in a fresh process
without it; XLA on CPU is still run-to-run reproducible, so equality is exact.
"""

import pytest

from tests.subproc import run_python


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_hook_under_xla_equals_stock_fit():
    out = run_python("""
        import keras
        import numpy as np
        from sklearn.datasets import load_digits
        import customfit
        from tests import models
        from tests.parity import assert_identical, train

        d = load_digits()
        x, y = (d.data / 16).astype("float32")[:300], d.target.astype("int32")[:300]
        hooked = models.every_hook(customfit.CustomModel)
        for policy in ["float32", "mixed_float16"]:
            keras.mixed_precision.set_global_policy(policy)
            expected = train(keras.Model, models.mlp, x, y, mode="xla")
            actual = train(hooked, models.mlp, x, y, mode="xla")
            for name in models.HOOK_LOGS:
                assert np.all(np.isfinite(actual.history.pop(name))), name
                actual.history.pop(f"val_{name}", None)
            actual.evaluation = actual.evaluation[:len(expected.evaluation)]
            assert_identical(expected, actual)
            print(policy, "ok")
    """)
    assert out.split() == ["float32", "ok", "mixed_float16", "ok"]
