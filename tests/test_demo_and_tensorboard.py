"""The README's demo runs, and logged values reach TensorBoard's event files."""

import keras
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import customfit
from tests import models
from tests.subproc import ROOT, run_python


def test_logged_value_is_written_to_tensorboard(digits, tmp_path):
    class Logged(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            self.log("constant", 3.0)
            return gradients

    model = models.mlp(Logged)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(digits[0][:128], digits[1][:128], epochs=2, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(tmp_path)])
    events = EventAccumulator(str(tmp_path / "train"), size_guidance={"tensors": 0})
    events.Reload()
    values = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("epoch_constant")]
    assert values == [3.0, 3.0]


@pytest.mark.slow
def test_demo_trains_matches_stock_and_writes_its_artifacts(tmp_path):
    out = run_python(f"""
        import runpy, sys
        sys.argv = ["digits_demo.py", "--out", {str(tmp_path)!r}, "--epochs", "2"]
        runpy.run_path({str(ROOT / "examples" / "digits_demo.py")!r}, run_name="__main__")
    """)
    assert "default CustomModel step equals stock fit: weights True, history True" in out
    assert (tmp_path / "digits.keras").is_file()
    assert list((tmp_path / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert f"training plot: {tmp_path / 'training.png'}  (" in out
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "training.pdf").exists()
