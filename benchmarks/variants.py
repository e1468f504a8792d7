"""What the benchmark trains: one epoch of the same model and data, written
each way a user might write it. Every variant computes the same loss,
gradients, update and the same two tracked values (loss, accuracy)."""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf
from models import BATCH_SIZE, MODELS, arrays

import customfit


def dataset(
    model_name: str, steps: int, seed: int = 0, batch_size: int = BATCH_SIZE
) -> tf.data.Dataset:
    """`steps` batches of generated data shaped like MNIST (timing does not
    depend on pixel values; nothing is downloaded), cached in memory."""
    x, y = arrays(model_name, steps, seed, batch_size)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()


class ClipAndLog(customfit.CustomModel):
    """The README's hook: clip by global norm and log the norm."""

    def transform_gradients(self, gradients, variables):
        clipped, norm = tf.clip_by_global_norm(gradients, 1.0)
        self.log("grad_norm", norm)
        return clipped


class Keras2Step(customfit.CustomModel):
    """The tf.keras tutorial's `train_step`, verbatim."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compiled_loss(y, y_pred, regularization_losses=self.losses)
        gradients = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        self.compiled_metrics.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def _fit_variant(base, width: int | None = None, **compile_kwargs):
    def prepare(model_name: str, data: tf.data.Dataset) -> Callable[[], None]:
        model = MODELS[model_name](base, **({"width": width} if width else {}))
        model.compile(keras.optimizers.RMSprop(1e-3), "sparse_categorical_crossentropy",
                      metrics=["accuracy"], **{"jit_compile": False, **compile_kwargs})

        def run() -> None:
            model.fit(data, epochs=1, verbose=0, shuffle=False)

        run.model = model  # type: ignore[attr-defined]
        return run
    return prepare


def _loop_variant(
    compile_step: bool, jit_step: bool = False, whole_epoch: bool = False, track: bool = True
):
    def prepare(model_name: str, data: tf.data.Dataset) -> Callable[[], None]:
        model = MODELS[model_name](keras.Model)
        optimizer = keras.optimizers.RMSprop(1e-3)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        loss_mean = keras.metrics.Mean()
        accuracy = keras.metrics.SparseCategoricalAccuracy()
        optimizer.build(model.trainable_weights)

        def step(x, y):
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = loss_fn(y, y_pred)
            gradients = tape.gradient(loss, model.trainable_weights)
            optimizer.apply(gradients, model.trainable_weights)
            if track:
                loss_mean.update_state(loss)
                accuracy.update_state(y, y_pred)

        if compile_step:
            step = tf.function(step, jit_compile=jit_step)

        if whole_epoch:
            @tf.function
            def epoch(batches):
                for x, y in batches:
                    step(x, y)

            def run():
                loss_mean.reset_state()
                accuracy.reset_state()
                epoch(data)
                float(loss_mean.result())  # wait for the results, as fit's logs do
                float(optimizer.iterations)
        else:
            def run():
                loss_mean.reset_state()
                accuracy.reset_state()
                for x, y in data:
                    step(x, y)
                float(loss_mean.result())
        return run
    return prepare


def variants(spe: int) -> dict[str, tuple[str, Callable]]:
    """Name -> (what it is, prepare(model_name, dataset) -> run_one_epoch);
    `spe` is the steps_per_execution of the variants that set it."""
    custom = customfit.CustomModel
    return {
        "stock_fit": ("keras.Model.fit", _fit_variant(keras.Model)),
        "custom_default": ("CustomModel.fit, default step", _fit_variant(custom)),
        "custom_hook": ("CustomModel.fit, clip+log hook", _fit_variant(ClipAndLog)),
        "custom_keras2_step": ("CustomModel.fit, Keras-2 train_step",
                               _fit_variant(Keras2Step)),
        "loop_eager": ("hand-written loop, eager", _loop_variant(compile_step=False)),
        "loop_tf_function": ("hand-written loop, tf.function step",
                             _loop_variant(compile_step=True)),
        "loop_whole_epoch": ("whole epoch in one tf.function",
                             _loop_variant(compile_step=True, whole_epoch=True)),
        "stock_fit_spe": (f"keras.Model.fit, steps_per_execution={spe}",
                          _fit_variant(keras.Model, steps_per_execution=spe)),
        "custom_default_spe": (f"CustomModel.fit, steps_per_execution={spe}",
                               _fit_variant(custom, steps_per_execution=spe)),
        "stock_fit_xla": ("keras.Model.fit, jit_compile=True",
                          _fit_variant(keras.Model, jit_compile=True)),
        "custom_default_xla": ("CustomModel.fit, jit_compile=True",
                               _fit_variant(custom, jit_compile=True)),
        "custom_default_spe_xla": (
            f"CustomModel.fit, steps_per_execution={spe}, jit_compile=True",
            _fit_variant(custom, steps_per_execution=spe, jit_compile=True)),
        "loop_whole_epoch_xla_step": (
            "whole epoch in one tf.function, XLA step",
            _loop_variant(compile_step=True, jit_step=True, whole_epoch=True)),
        "custom_auto": ('CustomModel.fit, steps_per_execution="auto"',
                        _fit_variant(custom, steps_per_execution="auto")),
        "compute_only": ("compute-only limit: whole epoch in one tf.function, "
                         "no metrics, no logs, no callbacks",
                         _loop_variant(compile_step=True, whole_epoch=True, track=False)),
    }


def fixed_k_variant(k: int) -> tuple[str, Callable]:
    """`CustomModel.fit` with `steps_per_execution=k`, for the sweep."""
    return (f"CustomModel.fit, steps_per_execution={k}",
            _fit_variant(customfit.CustomModel, steps_per_execution=k))


def scaling_variants(width: int) -> dict[str, tuple[str, Callable]]:
    """Stock fit, the default CustomModel step and "auto", on the MLP with
    `width` hidden units."""
    return {
        "stock_fit": ("keras.Model.fit", _fit_variant(keras.Model, width=width)),
        "custom_default": ("CustomModel.fit, default step",
                           _fit_variant(customfit.CustomModel, width=width)),
        "custom_auto": ('CustomModel.fit, steps_per_execution="auto"',
                        _fit_variant(customfit.CustomModel, width=width,
                                     steps_per_execution="auto")),
    }
