"""Models that hold models: a `Distiller` whose teacher was compiled and
trained first (its optimizer state is in the file), a `GAN`, and a
`CustomModel` holding compiled sub-models. Each loads its own weights file
and `.keras` file into a fresh instance and then trains exactly as if never
interrupted; a file of another architecture is still refused."""

import keras
import numpy as np
import pytest

import customfit
from customfit.recipes import GAN, Distiller
from tests.test_recipes_gan import VARIANTS, compiled as compiled_gan, tiny_gan


def cross_entropy():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def logits_mlp(units, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(units, activation="relu"),
                             keras.layers.Dense(10)])


def trained(model, digits):
    """Compiled with an optimizer of its own and trained, as a teacher or an
    ensemble member is before it is wrapped."""
    model.compile(keras.optimizers.Adam(1e-2), cross_entropy())
    model.fit(digits[0][:128], digits[1][:128], batch_size=64, epochs=1, verbose=0)
    return model


@keras.saving.register_keras_serializable(package="tests")
class Ensemble(customfit.CustomModel):
    """The mean of its members' logits, each member trained on its own first."""

    def __init__(self, members, **kwargs):
        super().__init__(**kwargs)
        self.members = members

    def call(self, x):
        return keras.ops.mean(keras.ops.stack([m(x) for m in self.members]), axis=0)

    def get_config(self):
        return {**super().get_config(),
                "members": [keras.saving.serialize_keras_object(m) for m in self.members]}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        members = [keras.saving.deserialize_keras_object(m) for m in config.pop("members")]
        return cls(members, **config)


def distiller(digits, units=16):
    model = Distiller(logits_mlp(units, seed=1), trained(logits_mlp(32, seed=0), digits),
                      temperature=3.0, alpha=0.2)
    model.compile(keras.optimizers.Adam(1e-2), cross_entropy(), metrics=["accuracy"])
    return model


def gan(digits, units=16):
    keras.utils.set_random_seed(0)
    return compiled_gan(tiny_gan(units=units, **VARIANTS["wgan_gp"]))


def ensemble(digits, units=16):
    members = [trained(logits_mlp(units, seed=s), digits) for s in (0, 1)]
    model = Ensemble(members)
    model(digits[0][:1])  # a subclassed model is built by its first call
    model.compile(keras.optimizers.Adam(1e-3), cross_entropy(), metrics=["accuracy"])
    return model


COMPOSITES = {"distiller": (distiller, True), "gan": (gan, False),
              "ensemble": (ensemble, True)}


def fit(model, digits, labelled):
    x, y = digits[0][:256], digits[1][:256]
    if not labelled:
        x, y = x * 2 - 1, None
    return model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False).history


def state(model):
    return [v.numpy() for v in model.variables] + [
        v.numpy() for optimizer in customfit_optimizers(model) for v in optimizer.variables]


def customfit_optimizers(model):
    if isinstance(model, GAN):
        return [model.generator_optimizer, model.discriminator_optimizer]
    return [model.optimizer]


def as_in_a_new_process(build, digits):
    """`build(digits)` with Keras' automatic names starting over, as in the
    script that resumes: TensorFlow's graph optimizer may order a sum by
    node name, so a model whose layers and optimizers are named `dense_4`
    and `adam_2` can train one float rounding away from the same model
    named `dense` and `adam` (seen here: a GAN's loss in its last bit)."""
    keras.backend.clear_session()
    return build(digits)


@pytest.mark.slow
@pytest.mark.parametrize("file", ["weights", "keras"])
@pytest.mark.parametrize("composite", COMPOSITES)
def test_fresh_instance_loads_its_file_and_resumes_exactly(digits, tmp_path, composite, file):
    build, labelled = COMPOSITES[composite]
    uninterrupted = as_in_a_new_process(build, digits)
    fit(uninterrupted, digits, labelled)
    expected = fit(uninterrupted, digits, labelled)

    first = as_in_a_new_process(build, digits)
    fit(first, digits, labelled)
    if file == "weights":
        first.save_weights(tmp_path / "model.weights.h5")
        resumed = as_in_a_new_process(build, digits)
        resumed.load_weights(tmp_path / "model.weights.h5")
    else:
        first.save(tmp_path / "model.keras")
        resumed = keras.models.load_model(tmp_path / "model.keras")
    for a, b in zip(state(resumed), state(first), strict=True):
        np.testing.assert_array_equal(a, b)

    assert fit(resumed, digits, labelled) == expected
    for a, b in zip(state(resumed), state(uninterrupted), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_a_file_of_another_architecture_is_still_refused(digits, tmp_path, composite):
    build, _ = COMPOSITES[composite]
    build(digits, units=24).save_weights(tmp_path / "other.weights.h5")
    model = build(digits)
    before = state(model)
    with pytest.raises(ValueError, match="written by a different architecture"):
        model.load_weights(tmp_path / "other.weights.h5")
    for a, b in zip(state(model), before, strict=True):
        np.testing.assert_array_equal(a, b)
