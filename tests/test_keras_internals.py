"""Each private Keras API customfit uses still behaves as assumed.

When one of these fails after a Keras upgrade, update
customfit/_keras_internals.py before anything else.
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

import customfit
from customfit import _keras_internals as internals
from tests import models


def test_functional_arguments_detection():
    i = keras.Input((2,))
    assert internals.is_functional_call((i, i), {})
    assert internals.is_functional_call((), {"inputs": i, "outputs": i})
    assert not internals.is_functional_call((), {"name": "x"})


def test_keras_still_rewrites_bases_for_functional_subclasses():
    """The reason CustomModel switches the instance's class instead."""

    class Plain(keras.Model):
        pass

    i = keras.Input((2,))
    Plain(i, keras.layers.Dense(1)(i))
    assert internals.Functional in Plain.__bases__


def test_compile_objects_and_loss_tracker(digits):
    model = models.mlp(customfit.CustomModel)
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.evaluate(digits[0][:32], digits[1][:32], verbose=0)
    compile_metrics = internals.compiled_metrics_object(model)
    assert isinstance(compile_metrics, internals.CompileMetrics)
    assert internals.compiled_loss_object(model) is not None
    assert internals.loss_tracker(model).name == "loss"
    assert internals.CompileMetrics in [type(m) for m in keras.Model.metrics.fget(model)]
    assert issubclass(internals.MetricsList, keras.metrics.Metric)
    assert internals.call_has_training_arg(model) is True


def test_stock_keras2_shims_still_warn():
    """If Keras ever fixes its own shims, customfit's overrides can go."""
    source = inspect.getsource(keras.Model.compiled_loss)
    assert "deprecated" in source


def test_make_function_and_flatten_hooks_exist():
    assert "step_function" in inspect.signature(keras.Model._make_function).parameters
    assert "logs" in inspect.signature(keras.Model._flatten_metrics_in_order).parameters
    assert "sample_weight" in inspect.signature(keras.Model._compute_loss).parameters


def test_loss_scale_matches_scale_loss():
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    assert float(optimizer.scale_loss(tf.constant(1.0))) == float(
        internals.loss_scale_in_use(optimizer))
    variable = keras.Variable(np.ones(2, "float32"))
    optimizer.build([variable])
    assert float(optimizer.scale_loss(tf.constant(1.0))) == float(
        internals.loss_scale_in_use(optimizer))
    assert internals.loss_scale_in_use(keras.optimizers.SGD()) is None


def test_registered_name_is_shared_with_the_functional_twin():
    @keras.saving.register_keras_serializable(package="internals_test")
    class Named(customfit.CustomModel):
        pass

    i = keras.Input((2,))
    model = Named(i, keras.layers.Dense(1)(i))
    assert type(model) is not Named
    assert keras.saving.get_registered_name(type(model)) == "internals_test>Named"


def test_compiled_metric_log_names_replay_compile_metrics_result(digits):
    x, y = models.multi_io_data(digits[0][:32], digits[1][:32])
    model = models.multi_io(customfit.CustomModel)
    model.compile("sgd", loss=models.MULTI_IO_COMPILE["loss"],
                  metrics={"digit": ["accuracy", "accuracy"], "big": ["mse"]},
                  weighted_metrics={"digit": ["accuracy"], "big": ["mse", "mse"]})
    model.evaluate(x, y, verbose=0)
    compile_metrics = internals.compiled_metrics_object(model)
    named = internals.compiled_metric_log_names(compile_metrics)
    results = compile_metrics.result()
    assert list(named) == list(results)
    for name, metric in named.items():
        assert float(metric.result()) == float(results[name]), name
