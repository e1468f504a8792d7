"""A model built elsewhere (functional, Sequential, keras.applications,
subclassed) trained as a CustomModel: rewrapped with its inputs and outputs,
or nested; its variables are shared, its compile state is its own."""

import keras
import numpy as np
import pytest

import customfit
from tests import models

COMPILE = {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}


def functional():
    return models.mlp(keras.Model, dropout=0.2, batchnorm=True)


def sequential():
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ])


def subclassed():
    net = models.subclassed(keras.Model)
    net(np.zeros((1, 64), "float32"))  # builds it
    return net


def rewrapped(model):
    return customfit.CustomModel(model.inputs, model.outputs)


def nested(model):
    inputs = keras.Input((64,))
    return customfit.CustomModel(inputs, model(inputs))


def fit(model, x, y, optimizer="adam", **kwargs):
    model.compile(optimizer, **COMPILE)
    keras.utils.set_random_seed(1)
    kwargs = {"batch_size": 32, "epochs": 2, "validation_split": 0.25, "verbose": 0, **kwargs}
    return model.fit(x, y, **kwargs).history


@pytest.mark.parametrize("build, wrap", [
    (functional, rewrapped),
    (sequential, rewrapped),
    (functional, nested),
    (subclassed, nested),
], ids=["functional", "sequential", "nested-functional", "nested-subclassed"])
@pytest.mark.slow
def test_wrapped_model_trains_like_the_original_under_stock_fit(digits, build, wrap):
    x, y = digits[0][:512], digits[1][:512]
    keras.utils.set_random_seed(0)
    reference = build()
    keras.utils.set_random_seed(0)
    original = build()
    original.set_weights(reference.get_weights())
    model = wrap(original)
    assert isinstance(model, customfit.CustomModel)
    assert len(model.weights) == len(original.weights) > 0
    assert all(a is b for a, b in zip(model.weights, original.weights))

    expected = fit(reference, x, y)
    got = fit(model, x, y)

    assert got.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key
    for a, b in zip(model.weights, reference.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
    # Training the wrapper trained the original model: the same variables.
    assert all(a is b for a, b in zip(model.weights, original.weights))


def test_layers_are_shared_not_copied():
    base = functional()
    model = rewrapped(base)
    assert [a is b for a, b in zip(model.layers, base.layers, strict=True)] == [True] * 5
    wrapper = nested(base)
    assert wrapper.layers[1] is base
    # A copy keeps the original out of the wrapper's training.
    copy = keras.models.clone_model(base)
    copy.set_weights(base.get_weights())
    separate = rewrapped(copy)
    assert not any(a is b for a, b in zip(separate.weights, base.weights))
    assert all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(separate.weights, base.weights, strict=True))


@pytest.mark.slow
def test_keras_applications_model_is_rewrapped_and_trains_its_variables():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNet(input_shape=(32, 32, 3), alpha=0.25,
                                        weights=None, classes=10)
    model = customfit.CustomModel(base.inputs, base.outputs)
    assert model.count_params() == base.count_params() == 221_114
    assert all(a is b for a, b in zip(model.weights, base.weights, strict=True))
    before = {w.path: w.numpy().copy() for w in base.weights}

    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, 32)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    changed = {w.path for w in base.weights if not np.array_equal(w.numpy(), before[w.path])}
    assert {w.path for w in base.trainable_weights} <= changed
    moving = {w.path for w in base.non_trainable_weights if "moving" in w.path}
    assert moving and moving <= changed  # BatchNormalization's statistics too
    assert np.array_equal(base.predict(x, verbose=0), model.predict(x, verbose=0))


def test_sequential_without_input_is_rewrapped_once_built():
    seq = keras.Sequential([keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    with pytest.raises(AttributeError, match="has no defined inputs yet"):
        rewrapped(seq)
    seq.build((None, 64))
    model = rewrapped(seq)
    assert all(a is b for a, b in zip(model.weights, seq.weights, strict=True))
    called = keras.Sequential([keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    called(np.zeros((2, 64), "float32"))
    model = rewrapped(called)
    assert all(a is b for a, b in zip(model.weights, called.weights, strict=True))


def test_subclassed_model_has_no_inputs_to_rewrap_but_nests(digits):
    net = subclassed()  # built, and called on data
    with pytest.raises(AttributeError, match="object has no attribute 'inputs'"):
        rewrapped(net)
    model = nested(net)
    assert all(a is b for a, b in zip(model.weights, net.weights, strict=True))
    before = [w.numpy().copy() for w in net.trainable_weights]
    fit(model, *digits, epochs=1)
    assert not any(np.array_equal(w.numpy(), b) for w, b in zip(net.trainable_weights, before))


class FlattenByHand(keras.Model):
    """Its call needs the batch size as a number: it cannot run on a
    `keras.Input`, whose batch size is unknown."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(10, activation="softmax")

    def call(self, x):
        return self.dense(keras.ops.reshape(x, (x.shape[0], 64)))


class Holder(customfit.CustomModel):
    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x, training=False):
        return self.inner(x, training=training)


def test_model_that_cannot_be_called_symbolically_is_held_instead(digits):
    net = FlattenByHand()
    with pytest.raises(TypeError, match="Could not automatically infer the output shape"):
        with pytest.warns(UserWarning, match="unbuilt state"):
            net(keras.Input((64,)))

    x, y = digits[0][:512], digits[1][:512]
    keras.utils.set_random_seed(0)
    reference = FlattenByHand()
    reference(x[:32])
    net = FlattenByHand()
    net(x[:32])
    net.set_weights(reference.get_weights())
    model = Holder(net)
    expected = fit(reference, x, y, validation_split=0.0)
    got = fit(model, x, y, validation_split=0.0)
    assert got == expected
    assert all(a is b for a, b in zip(model.weights, net.weights, strict=True))
    assert all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(net.weights, reference.weights, strict=True))


def test_wrapper_has_its_own_compile_and_leaves_the_originals_alone(digits):
    x, y = digits[0][:256], digits[1][:256]
    base = functional()
    base.compile(keras.optimizers.Adam(1e-3), **COMPILE)
    base_optimizer = base.optimizer
    model = rewrapped(base)

    assert base.compiled and not model.compiled
    with pytest.raises(RuntimeError, match=r"needs compile\(\) first"):
        model.fit(x, y, verbose=0)

    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert int(model.optimizer.iterations) == 4
    # The original's compile is untouched: its own optimizer, never stepped.
    assert base.optimizer is base_optimizer and int(base_optimizer.iterations) == 0
    assert base.loss == "sparse_categorical_crossentropy"
    assert base.evaluate(x, y, verbose=0) != []  # and it still evaluates and trains
    base.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert int(base_optimizer.iterations) == 4 and int(model.optimizer.iterations) == 4


@pytest.mark.slow
def test_compiled_with_the_originals_optimizer_it_continues_its_training(digits):
    x, y = digits[0][:256], digits[1][:256]

    def trained(epochs):
        keras.utils.set_random_seed(0)
        model = functional()
        history = fit(model, x, y, optimizer=keras.optimizers.Adam(1e-2), epochs=epochs,
                      shuffle=False)
        return model, history

    reference, expected = trained(2)
    base, _ = trained(1)
    model = rewrapped(base)
    model.compile(base.optimizer, base.loss, metrics=["accuracy"])
    keras.utils.set_random_seed(1)
    got = model.fit(x, y, batch_size=32, epochs=2, initial_epoch=1, validation_split=0.25,
                    shuffle=False, verbose=0).history

    assert int(base.optimizer.iterations) == int(reference.optimizer.iterations) == 12
    assert got == {key: values[1:] for key, values in expected.items()}
    assert all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(model.weights, reference.weights, strict=True))
