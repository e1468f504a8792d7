"""Reference results of customfit.recipes at small scale, on scikit-learn's
bundled digits (nothing downloads). Prints one number per recipe:

- SAM vs plain SGD with 30% of the training labels replaced at random;
- gradient accumulation (4 x 25) vs one batch of 100;
- global-norm and adaptive clipping at a learning rate where plain SGD
  diverges (SGD 2.0);
- FGSM robustness of adversarial training vs plain training.

    python3 examples/recipes_reference.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import customfit  # noqa: E402
from customfit import recipes  # noqa: E402

SEEDS = (0, 1, 2)


def digits():
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1000], order[1000:]
    return x[train], y[train], x[test], y[test]


def mlp(base, seed, hidden=(128,), **options):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((64,))
    h = inputs
    for units in hidden:
        h = keras.layers.Dense(units, activation="relu")(h)
    outputs = keras.layers.Dense(10, activation="softmax")(h)
    return base(inputs, outputs, **options)


def fit(model, optimizer, x, y, epochs, batch_size=32, shuffle=True):
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0,
                     shuffle=shuffle).history


def accuracy(model, x, y):
    return float(model.evaluate(x, y, verbose=0, batch_size=256)[1])


def sam_on_noisy_labels(x, y, x_test, y_test):
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flip = rng.random(len(y)) < 0.3
    noisy[flip] = rng.integers(0, 10, flip.sum())
    results = {}
    for name, base, options in [("SGD", customfit.CustomModel, {}),
                                ("SAM rho=0.1", recipes.SAM, {"rho": 0.1})]:
        scores = []
        for seed in SEEDS:
            model = mlp(base, seed, **options)
            fit(model, keras.optimizers.SGD(0.05, momentum=0.9), x, noisy, epochs=30)
            scores.append(accuracy(model, x_test, y_test))
        results[name] = scores
    return results


def accumulation_vs_large_batch(x, y, x_test, y_test):
    large = mlp(customfit.CustomModel, 0)
    # 1000 = 10 x 100 = 40 x 25: no short last batch, which would weigh its
    # examples differently in the two runs.
    fit(large, keras.optimizers.SGD(0.1), x, y, epochs=5, batch_size=100,
        shuffle=False)
    accumulated = mlp(recipes.GradientAccumulation, 0, accumulation_steps=4)
    fit(accumulated, keras.optimizers.SGD(0.1), x, y, epochs=5, batch_size=25,
        shuffle=False)
    difference = max(float(np.abs(a - b).max()) for a, b in
                     zip(large.get_weights(), accumulated.get_weights()))
    return {"max |weight difference|": difference,
            "test accuracy (100)": accuracy(large, x_test, y_test),
            "test accuracy (4 x 25)": accuracy(accumulated, x_test, y_test),
            "updates": (int(large.optimizer.iterations),
                        int(accumulated.optimizer.iterations))}


def clipping_at_a_diverging_learning_rate(x, y, x_test, y_test):
    results = {}
    for name, base, options in [
        ("SGD", customfit.CustomModel, {}),
        ("global norm 1.0", recipes.GlobalNormClipping, {"clip_norm": 1.0}),
        ("AGC 0.02", recipes.AdaptiveGradientClipping, {"clip_factor": 0.02}),
    ]:
        scores = []
        for seed in SEEDS[:2]:
            model = mlp(base, seed, hidden=(128, 128, 128), **options)
            history = fit(model, keras.optimizers.SGD(2.0), x, y, epochs=8)
            finite = np.isfinite(history["loss"][-1])
            scores.append(accuracy(model, x_test, y_test) if finite else float("nan"))
        results[name] = scores
    return results


def adversarial_robustness(x, y, x_test, y_test):
    results = {}
    for name, base, options in [
        ("plain", customfit.CustomModel, {}),
        ("FGSM training", recipes.AdversarialTraining,
         dict(epsilon=0.1, attack="fgsm", input_range=(0.0, 1.0), train_on="both")),
        ("PGD-3 training", recipes.AdversarialTraining,
         dict(epsilon=0.1, attack="pgd", pgd_steps=3, input_range=(0.0, 1.0))),
    ]:
        model = mlp(base, 0, hidden=(64,), **options)
        fit(model, keras.optimizers.Adam(1e-2), x, y, epochs=5)
        x_adv = recipes.adversarial_examples(model, x_test, y_test, epsilon=0.1,
                                             input_range=(0.0, 1.0))
        results[name] = {"clean": accuracy(model, x_test, y_test),
                         "FGSM eps=0.1": accuracy(model, x_adv, y_test)}
    return results


def main() -> None:
    tf.config.experimental.enable_op_determinism()
    data = digits()
    start = time.time()
    print("Digits: 1000 training, 797 held-out test examples.\n")
    print("SAM vs SGD (momentum 0.9), 30% noisy training labels, 30 epochs, "
          "test accuracy per seed:")
    for name, scores in sam_on_noisy_labels(*data).items():
        print(f"  {name:12s} mean {np.mean(scores):.3f}  "
              + " ".join(f"{s:.3f}" for s in scores))
    print("\nGradient accumulation 4 x 25 vs batch 100 (SGD 0.1, 5 epochs):")
    for name, value in accumulation_vs_large_batch(*data).items():
        print(f"  {name}: {value}")
    print("\nSGD lr=2.0, 3 hidden layers of 128, 8 epochs, test accuracy per "
          "seed (nan: the loss diverged):")
    for name, scores in clipping_at_a_diverging_learning_rate(*data).items():
        print(f"  {name:16s} " + " ".join(f"{s:.3f}" for s in scores))
    print("\nFGSM (eps=0.1, pixels in [0, 1]) on the test set, Adam, 5 epochs:")
    for name, scores in adversarial_robustness(*data).items():
        print(f"  {name:15s} clean {scores['clean']:.3f}  "
              f"FGSM {scores['FGSM eps=0.1']:.3f}")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
