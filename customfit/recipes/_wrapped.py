"""Serializing the models a recipe wraps, as parts of the recipe's config."""

from __future__ import annotations

import keras


def serialize_wrapped(model: keras.Model) -> dict:
    """`model`'s config without its own compile settings.

    A wrapped model that was compiled before (a teacher trained with its own
    `fit`) would otherwise be compiled again on load with a fresh, unbuilt
    optimizer, and Keras would warn that it cannot load that optimizer's saved
    state. The recipe's own optimizers are the state that matters.
    """
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    return config


def deserialize_wrapped(config: dict) -> keras.Model:
    return keras.saving.deserialize_keras_object(config)
