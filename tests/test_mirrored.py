"""Two replicas (logical CPUs, set before TensorFlow starts, so in a subprocess):
the default step, the Keras-2 step and `log` report what stock fit reports."""

import json

import pytest

from tests.subproc import run_python


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_report_and_train_like_stock_fit():
    out = run_python("""
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        tf.config.experimental.enable_op_determinism()
        import keras, numpy as np
        from sklearn.datasets import load_digits
        import customfit
        from tests import models
        from tests.test_keras2_helpers import keras2_model

        class Logged(customfit.CustomModel):
            def transform_gradients(self, gradients, variables):
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                self.log("replica_id", tf.cast(replica, "float32"))
                return gradients

        d = load_digits()
        x, y = (d.data / 16).astype("float32")[:300], d.target.astype("int32")[:300]
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        results = {}
        for name, base in [("stock", keras.Model), ("default", customfit.CustomModel),
                           ("keras2", keras2_model(customfit.CustomModel)),
                           ("logged", Logged)]:
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = models.mlp(base)
                model.compile(keras.optimizers.Adam(1e-2),
                              "sparse_categorical_crossentropy", metrics=["accuracy"])
            history = model.fit(x, y, batch_size=64, epochs=2, verbose=0).history
            results[name] = {"history": history,
                             "weights": [w.tolist() for w in model.get_weights()]}
        print("RESULTS" + json.dumps(results))
    """)
    results = json.loads(out.split("RESULTS", 1)[1])
    stock = results.pop("stock")
    assert stock["history"]["loss"][0] > 1.5  # the full loss, not half of it
    for name, run in results.items():
        history = dict(run["history"])
        if name == "logged":
            assert history.pop("replica_id") == [0.5, 0.5]  # mean over replicas 0, 1
        assert history == stock["history"], name
        assert run["weights"] == stock["weights"], name
