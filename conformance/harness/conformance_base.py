"""The model bases Keras' rewritten tests build on, chosen by the
`CUSTOMFIT_CONFORMANCE_BASE` environment variable: "customfit" (the default)
or "keras", the control run that checks the rewrite changes nothing else.

- `Model`: what the tests call `keras.Model`/`models.Model`.
- `Sequential`: `keras.Sequential`; on customfit, a `Sequential` whose
  training machinery is `CustomModel`'s (its layers, `call` and `build` stay
  `keras.Sequential`'s).
- `Trainer`: mixed into a layer (`class M(layers.Dense, Trainer)`) where
  Keras' tests mix in the backend's bare trainer class: `Model` made to
  behave as that mixin (see `_as_trainer_mixin`).

`tensorflow(...)` stands for a module-level TensorFlow import in a test file
built for another backend (`rewrite.lazy_tensorflow_imports`).
"""

import importlib
import os

import keras

BASE = os.environ.get("CUSTOMFIT_CONFORMANCE_BASE", "customfit")


class tensorflow:  # noqa: N801 (it stands for an import statement)
    """`import <module>` (`attribute` None) or `from <module> import
    <attribute>`, done when the name is first used: without TensorFlow
    installed, that use raises the ImportError the import would have, in the
    test that needs it (which conftest.py then skips, saying so), instead of
    failing the collection of the whole file."""

    def __init__(self, module, attribute=None):
        self._module, self._attribute = module, attribute

    def _imported(self):
        module = importlib.import_module(self._module)
        if self._attribute is None:
            return module
        try:
            return getattr(module, self._attribute)
        except AttributeError:  # a submodule not imported yet
            return importlib.import_module(f"{self._module}.{self._attribute}")

    def __getattr__(self, name):
        if name.startswith("_"):  # pytest's and copy's probes; no import
            raise AttributeError(name)
        return getattr(self._imported(), name)

    def __call__(self, *args, **kwargs):
        return self._imported()(*args, **kwargs)



def _as_trainer_mixin(model_class):
    """`model_class` as Keras' tests use the bare trainer.

    They initialise the layer (`SomeLayer.__init__(self, ...)`), then call
    `Trainer.__init__(self)`. With a concrete layer first in the bases, the
    layer's `super().__init__(...)` reaches this class, which initialises the
    model, and the test's own call is then a no-op. With `layers.Layer` after
    it, `Layer.__init__` ran alone; `keras.Model.__init__` would run it
    again and undo what it set (dtype policy, name), so that is kept. Some of
    those models keep their sublayers in `self.layers`, which `keras.Model`
    reserves; here such a list is a plain (tracked) attribute.
    """

    class Trainer(model_class):
        def __init__(self, **layer_kwargs):
            state = vars(self)
            if "compiled" in state:  # the model is initialised already
                return
            set_by_the_layer = dict(state) if "_dtype_policy" in state else {}
            super().__init__(**layer_kwargs)
            state.update(set_by_the_layer)

        @property
        def layers(self):
            own = self.__dict__.get("_own_layers")
            return own if own is not None else model_class.layers.fget(self)

        @layers.setter
        def layers(self, value):
            self._own_layers = value

    return Trainer


if BASE == "keras":
    Model = keras.Model
    Sequential = keras.Sequential
    Trainer = _as_trainer_mixin(keras.Model)
elif BASE == "customfit":
    import customfit

    Model = customfit.CustomModel
    Trainer = _as_trainer_mixin(customfit.CustomModel)

    @keras.saving.register_keras_serializable(package="customfit_conformance")
    class Sequential(customfit.CustomModel, keras.Sequential):
        """`keras.Sequential` trained by `customfit.CustomModel`'s step."""

else:
    raise ValueError(
        f"CUSTOMFIT_CONFORMANCE_BASE={BASE!r}: use 'customfit' or 'keras'.")
