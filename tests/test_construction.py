"""CustomModel as a functional model and as a base class, in any order."""

import pickle
from copy import deepcopy

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from tests import models
from tests.subproc import run_python


def test_functional_use_does_not_rewrite_class_bases():
    class Base(customfit.CustomModel):
        pass

    inputs = keras.Input((4,))
    Base(inputs, keras.layers.Dense(2)(inputs))
    customfit.CustomModel(inputs, keras.layers.Dense(2)(inputs))
    assert customfit.CustomModel.__bases__ == (keras.Model,)
    assert Base.__bases__ == (customfit.CustomModel,)

    class Net(Base):  # a subclass with its own __init__ after functional use
        def __init__(self, units):
            super().__init__()
            self.dense = keras.layers.Dense(units)

        def call(self, x):
            return self.dense(x)

    assert Net(3)(np.ones((2, 4), "float32")).shape == (2, 3)


def test_subclass_calling_super_init_with_inputs_and_outputs(digits):
    class Built(customfit.CustomModel):
        def __init__(self):
            inputs = keras.Input((64,))
            super().__init__(inputs, keras.layers.Dense(10, activation="softmax")(inputs))

    model = Built()
    assert isinstance(model, Built) and isinstance(model, customfit.CustomModel)
    assert Built.__bases__ == (customfit.CustomModel,)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits[0][:64], digits[1][:64], verbose=0)


@pytest.mark.slow
def test_any_order_in_one_process():
    """The upstream failure needs a fresh process to show: keras.Model is
    rewritten first, then a subclass with its own __init__ breaks."""
    out = run_python("""
        import keras, numpy as np, customfit

        def functional(base):
            class SomeBase(base):
                pass
            i = keras.Input((4,))
            SomeBase(i, keras.layers.Dense(2)(i))
            return SomeBase

        def subclass(base):
            class Net(base):
                def __init__(self):
                    super().__init__()
                    self.d = keras.layers.Dense(2)
                def call(self, x):
                    return self.d(x)
            return Net()

        try:
            subclass(functional(keras.Model))
        except TypeError as e:
            print("stock:", e)
        subclass(functional(customfit.CustomModel))
        subclass(customfit.CustomModel)
        functional(customfit.CustomModel)
        print("customfit: ok")
    """)
    assert "stock: " in out and "missing 2 required positional arguments" in out
    assert "customfit: ok" in out


def test_sequential_stack_inside_a_custom_model(digits):
    stack = keras.Sequential([keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    inputs = keras.Input((64,))
    model = customfit.CustomModel(inputs, stack(inputs))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits[0][:64], digits[1][:64], verbose=0)


@keras.saving.register_keras_serializable(package="customfit_tests")
class Registered(customfit.CustomModel):
    pass


@pytest.mark.parametrize("cls", [customfit.CustomModel, Registered],
                         ids=["CustomModel", "registered_subclass"])
def test_functional_model_saves_and_loads(digits, tmp_path, cls):
    keras.utils.set_random_seed(1)
    model = models.mlp(cls)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits[0][:128], digits[1][:128], verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded).__name__ == cls.__name__ and isinstance(loaded, cls)
    np.testing.assert_array_equal(loaded.predict(digits[0][:32], verbose=0),
                                  model.predict(digits[0][:32], verbose=0))
    loaded.fit(digits[0][:64], digits[1][:64], verbose=0)  # trainable after load


@keras.saving.register_keras_serializable(package="customfit_tests")
class Keras2Step(customfit.CustomModel):
    """A user subclass used functionally, with a whole step of its own
    (registered: pickling goes through Keras' saving format)."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compiled_loss(y, self(x, training=True))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.trainable_weights),
                                           self.trainable_weights))
        return {"loss": self.metrics[0].result()}


@pytest.mark.parametrize("copy", ["pickle", "deepcopy"])
@pytest.mark.parametrize("cls", [customfit.CustomModel, Keras2Step],
                         ids=["CustomModel", "subclass"])
def test_functional_model_pickles_and_deep_copies(digits, cls, copy):
    """As keras.Model does (it pickles through its own saving format)."""
    keras.utils.set_random_seed(1)
    model = models.mlp(cls)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits[0][:64], digits[1][:64], verbose=0)
    clone = pickle.loads(pickle.dumps(model)) if copy == "pickle" else deepcopy(model)
    assert type(clone) is type(model) and isinstance(clone, cls)
    assert type(clone).__name__ == cls.__name__
    np.testing.assert_array_equal(clone.predict(digits[0][:32], verbose=0),
                                  model.predict(digits[0][:32], verbose=0))
    assert clone.fit(digits[0][:64], digits[1][:64], verbose=0).history["loss"]
