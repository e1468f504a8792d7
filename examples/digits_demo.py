"""customfit on scikit-learn's bundled handwritten digits, beside stock fit.

1. Trains the same MLP with `keras.Model` and with `customfit.CustomModel`
   under the same seeds and checks that the default step matches bit for bit.
2. Trains a `CustomModel` whose `transform_gradients` hook clips gradients and
   logs their norm, with TensorBoard logs, a `.keras` checkpoint and a PNG
   plot of the run (`customfit.callbacks.TrainingPlot`).

Run: python examples/digits_demo.py --out runs/demo
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import customfit
from customfit.callbacks import TrainingPlot


@keras.saving.register_keras_serializable(package="digits_demo")
class ClippedMLP(customfit.CustomModel):
    """Clips the global gradient norm to 1 and logs the norm before clipping."""

    def transform_gradients(self, gradients, variables):
        clipped, norm = tf.clip_by_global_norm(gradients, 1.0)
        self.log("grad_norm", norm)
        return clipped


def mlp(base):
    inputs = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(64, activation="relu")(inputs)
    h = keras.layers.Dropout(0.2)(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    return base(inputs, outputs)


def train(base, x, y, epochs, callbacks=(), seed=0):
    keras.utils.set_random_seed(seed)
    model = mlp(base)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=epochs, validation_split=0.2,
                        verbose=0, callbacks=list(callbacks))
    return model, history.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    tf.config.experimental.enable_op_determinism()

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)

    stock, stock_history = train(keras.Model, x_train, y_train, args.epochs)
    custom, custom_history = train(customfit.CustomModel, x_train, y_train, args.epochs)
    same_weights = all(np.array_equal(a, b)
                       for a, b in zip(stock.get_weights(), custom.get_weights()))
    same_history = stock_history == custom_history
    print(f"default CustomModel step equals stock fit: weights {same_weights}, "
          f"history {same_history}")

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "digits.keras"
    tensorboard_dir = args.out / "tensorboard"
    plot = TrainingPlot(args.out / "training", formats=("png",))
    model, history = train(ClippedMLP, x_train, y_train, args.epochs, callbacks=[
        keras.callbacks.TensorBoard(tensorboard_dir, update_freq="epoch"),
        keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_accuracy",
                                        save_best_only=True),
        plot,
    ])
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"ClippedMLP: test accuracy {accuracy:.3f}, mean grad_norm per epoch "
          + ", ".join(f"{v:.2f}" for v in history["grad_norm"]))
    restored = keras.saving.load_model(checkpoint)
    _, restored_accuracy = restored.evaluate(x_test, y_test, verbose=0)
    print(f"best checkpoint: {checkpoint} (test accuracy {restored_accuracy:.3f})")
    print(f"TensorBoard logs: {tensorboard_dir}  (tensorboard --logdir {tensorboard_dir})")
    print(f"training plot: {plot.files[0]}  (loss within each epoch, and every History curve)")
    if not (same_weights and same_history):
        raise SystemExit("the default step diverged from stock fit")


if __name__ == "__main__":
    main()
