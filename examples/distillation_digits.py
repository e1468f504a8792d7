"""Distil a teacher into a small student on scikit-learn's 8x8 digits.

    python3 examples/distillation_digits.py

Trains a 128-128 MLP teacher on half of the digits, then a 32-unit student
(same seed, same epochs) three ways, and prints test accuracy on the other
half:

1. the student alone vs `customfit.recipes.Distiller` vs
   `keras.distillation.Distiller` (with a `KLDivergence` instance, and with
   its default `loss="kl_divergence"`);
2. Hinton et al.'s (2015) "omitted digit" experiment: no 3 in the student's
   training data, so the student alone never predicts a 3; distilled, it
   learns 3s from the teacher's soft targets on the other digits.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from customfit.recipes import Distiller

TEMPERATURE, ALPHA, EPOCHS = 10.0, 0.1, 30


def mlp(units: list[int], seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(u, activation="relu") for u in units]
    return keras.Sequential([keras.Input((64,)), *layers, keras.layers.Dense(10)])


def label_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def trained(model: keras.Model, x, y, learning_rate: float) -> keras.Model:
    model.compile(keras.optimizers.Adam(learning_rate), label_loss())
    model.fit(x, y, batch_size=64, epochs=EPOCHS, verbose=0)
    return model


def student() -> keras.Model:
    return mlp([32], seed=1)


def accuracy(model: keras.Model, x, y) -> float:
    return float((model.predict(x, verbose=0).argmax(-1) == y).mean())


def main() -> None:
    from keras.distillation import Distiller as KerasDistiller, LogitsDistillation

    tf.config.experimental.enable_op_determinism()
    data = load_digits()
    x, y = (data.data / 16.0).astype("float32"), data.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.5, random_state=0, stratify=y)
    start = time.time()

    teacher = trained(mlp([128, 128], seed=0), x_train, y_train, 1e-3)
    print(f"teacher (128-128 MLP): test accuracy {accuracy(teacher, x_test, y_test):.4f}")

    def distilled(x_fit, y_fit):
        return trained(Distiller(student(), teacher, TEMPERATURE, ALPHA), x_fit, y_fit, 3e-3)

    def keras_distilled(kl_loss):
        loss = LogitsDistillation(TEMPERATURE, kl_loss) if kl_loss else LogitsDistillation(TEMPERATURE)
        model = KerasDistiller(teacher, student(), loss, student_loss_weight=ALPHA)
        model.compile(keras.optimizers.Adam(3e-3), loss=label_loss())
        model.fit(x_train, y_train, batch_size=64, epochs=EPOCHS, verbose=0)
        return model

    print(f"\n32-unit student, T={TEMPERATURE:g}, alpha={ALPHA:g} (weight of the label loss):")
    runs = {
        "alone": trained(student(), x_train, y_train, 3e-3),
        "customfit.recipes.Distiller": distilled(x_train, y_train),
        "keras.distillation, KLDivergence()": keras_distilled(keras.losses.KLDivergence()),
        'keras.distillation, default "kl_divergence"': keras_distilled(None),
    }
    for name, model in runs.items():
        print(f"  {name:45s} test accuracy {accuracy(model, x_test, y_test):.4f}")

    keep, threes = y_train != 3, y_test == 3
    print("\nNo 3 in the student's training data "
          f"({int((~keep).sum())} removed); {int(threes.sum())} test 3s:")
    for name, model in [
        ("alone", trained(student(), x_train[keep], y_train[keep], 3e-3)),
        ("distilled", distilled(x_train[keep], y_train[keep])),
    ]:
        predicted = model.predict(x_test, verbose=0).argmax(-1)
        print(f"  {name:10s} 3s recognized {(predicted[threes] == 3).mean():.4f}, "
              f"all test digits {(predicted == y_test).mean():.4f}")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
