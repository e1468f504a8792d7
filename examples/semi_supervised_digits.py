"""Semi-supervised learning (FixMatch) on scikit-learn's 8x8 digits with 10% of the labels.

    python3 examples/semi_supervised_digits.py                 # 300 epochs, about 1 min
    python3 examples/semi_supervised_digits.py --quick         # 10 epochs (CI)
    KERAS_BACKEND=jax python3 examples/semi_supervised_digits.py --seed 1

Splits the 1797 digits into a training set and a held-out test set (30%,
fixed), keeps the labels of 10% of the training images (126, stratified,
chosen by `--seed`) and drops the labels of the other 1131. Then trains the
same MLP (64-256-256-10), from the same initial weights, with the same
optimizer and labelled batches, three ways:

1. FixMatch (Sohn et al., 2020): a `customfit.CustomModel` whose
   `train_step` gets a labelled and an unlabelled batch per step, from one
   `fit` over a `keras.utils.PyDataset` of `((x_labelled, y_labelled),
   x_unlabelled)` batches. It learns the labelled batch (weakly augmented)
   and, on the unlabelled images, learns its own confident prediction on a
   weakly augmented view as the target for a strongly augmented one;
2. stock `fit` on the labelled batches alone;
3. FixMatch's step with the unlabelled term weighted 0: the labelled
   batches with FixMatch's augmentation, no unlabelled images.

Prints FixMatch's last-epoch logs, the three test accuracies and the wall
time. `run(quick=False, seed=0)` returns them as a dict
(`semi_supervised_accuracy`, `labelled_only_accuracy`,
`augmented_labelled_only_accuracy`, `history`: FixMatch's per-epoch
`labelled_loss`, `unlabelled_loss`, `confident_fraction` and
`labelled_accuracy`, `seconds`, and the settings).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import customfit

LABELLED_FRACTION = 0.1
IMAGE_SIDE = 8


def split_digits(seed: int) -> dict[str, np.ndarray]:
    """Digits in [0, 1]: a fixed test split, and the training split divided
    into a labelled 10% (chosen by `seed`) and the unlabelled rest."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    x_unlabelled, x_labelled, _, y_labelled = train_test_split(
        x_train, y_train, test_size=LABELLED_FRACTION, random_state=seed, stratify=y_train
    )
    return {
        "x_labelled": x_labelled,
        "y_labelled": y_labelled,
        "x_unlabelled": x_unlabelled,
        "x_test": x_test,
        "y_test": y_test,
    }


def classifier(seed: int, hidden_units: int) -> keras.Sequential:
    """The network every run trains: an MLP from 64 pixels to 10 logits."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((IMAGE_SIDE * IMAGE_SIDE,)),
            keras.layers.Dense(hidden_units, activation="relu"),
            keras.layers.Dense(hidden_units, activation="relu"),
            keras.layers.Dense(10),
        ],
        name="classifier",
    )


# ---------------------------------------------------------------- augmentation


def random_shift(images: Any, max_shift: int, seed: keras.random.SeedGenerator) -> Any:
    """Moves each flattened 8x8 image by up to `max_shift` pixels in each
    direction (zeros fill in), a shift drawn per image."""
    side = IMAGE_SIDE
    squares = ops.reshape(images, (-1, side, side))
    padded = ops.pad(squares, [[0, 0], [max_shift, max_shift], [max_shift, max_shift]])
    offsets = range(2 * max_shift + 1)
    # Every shifted copy, then one picked per image by a one-hot weight: no
    # per-example indexing, so the same ops run on every backend.
    shifted = ops.stack(
        [padded[:, dy : dy + side, dx : dx + side] for dy in offsets for dx in offsets], axis=1
    )
    draws = keras.random.uniform(ops.shape(squares)[:1], seed=seed)
    choice = ops.cast(draws * len(offsets) ** 2, "int32")
    picked = ops.einsum("bk,bkhw->bhw", ops.one_hot(choice, len(offsets) ** 2), shifted)
    return ops.reshape(picked, (-1, side * side))


def random_cutout(images: Any, half_size: int, seed: keras.random.SeedGenerator) -> Any:
    """Zeroes a square of side `2 * half_size + 1` at a random centre of each image."""
    side = IMAGE_SIDE
    squares = ops.reshape(images, (-1, side, side))
    centres = keras.random.randint((ops.shape(squares)[0], 2, 1, 1), 0, side, seed=seed)
    rows = ops.reshape(ops.arange(side), (1, side, 1))
    cols = ops.reshape(ops.arange(side), (1, 1, side))
    inside = ops.logical_and(
        ops.abs(rows - centres[:, 0]) <= half_size, ops.abs(cols - centres[:, 1]) <= half_size
    )
    return ops.reshape(ops.where(inside, 0.0, squares), (-1, side * side))


def weak_augment(images: Any, seed: keras.random.SeedGenerator) -> Any:
    return random_shift(images, 1, seed)


def strong_augment(images: Any, seed: keras.random.SeedGenerator) -> Any:
    shifted = random_shift(images, 1, seed)
    noisy = shifted + 0.15 * keras.random.normal(ops.shape(shifted), seed=seed)
    return ops.clip(random_cutout(noisy, 1, seed), 0.0, 1.0)


# ------------------------------------------------------------------- the data


def check_feature_shapes(x_labelled: np.ndarray, x_unlabelled: np.ndarray) -> None:
    """Raises, before `fit`, when the unlabelled images are not shaped like the
    labelled ones: both go through the same network."""
    labelled, unlabelled = x_labelled.shape[1:], x_unlabelled.shape[1:]
    if labelled != unlabelled:
        raise ValueError(
            f"The unlabelled images have feature shape {unlabelled} but the labelled ones "
            f"have {labelled}: both go through the same network. Preprocess the unlabelled "
            "images exactly as the labelled ones (here: flattened 8x8 images scaled to "
            f"[0, 1], shape {(IMAGE_SIDE * IMAGE_SIDE,)}), e.g. with x_unlabelled.reshape("
            "len(x_unlabelled), -1)."
        )


class LabelledAndUnlabelled(keras.utils.PyDataset):
    """Batches of `((x_labelled, y_labelled), x_unlabelled)`: one epoch is one
    pass over the unlabelled images; the labelled ones repeat, reshuffled."""

    def __init__(
        self,
        x_labelled: np.ndarray,
        y_labelled: np.ndarray,
        x_unlabelled: np.ndarray,
        labelled_batch_size: int,
        unlabelled_batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        check_feature_shapes(x_labelled, x_unlabelled)
        self.x_labelled, self.y_labelled = x_labelled, y_labelled
        self.x_unlabelled = x_unlabelled
        self.labelled_batch_size = labelled_batch_size
        self.unlabelled_batch_size = unlabelled_batch_size
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return len(self.x_unlabelled) // self.unlabelled_batch_size

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        labelled = self.labelled_order[
            index * self.labelled_batch_size : (index + 1) * self.labelled_batch_size
        ]
        unlabelled = self.unlabelled_order[
            index * self.unlabelled_batch_size : (index + 1) * self.unlabelled_batch_size
        ]
        return (self.x_labelled[labelled], self.y_labelled[labelled]), self.x_unlabelled[unlabelled]

    def on_epoch_end(self) -> None:
        self.unlabelled_order = self.rng.permutation(len(self.x_unlabelled))
        needed = len(self) * self.labelled_batch_size
        passes = math.ceil(needed / len(self.x_labelled))
        self.labelled_order = np.concatenate(
            [self.rng.permutation(len(self.x_labelled)) for _ in range(passes)]
        )


# ------------------------------------------------------------------- the step


class FixMatch(customfit.CustomModel):
    """Trains `network` on `((x_labelled, y_labelled), x_unlabelled)` batches."""

    def __init__(
        self,
        network: keras.Model,
        threshold: float = 0.8,
        unlabelled_weight: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.network = network
        self.threshold = threshold
        self.unlabelled_weight = unlabelled_weight
        self.augmentation_seed = keras.random.SeedGenerator(seed)
        # Built now: `fit` would otherwise build it by calling it on a whole
        # `((x, y), x_unlabelled)` batch, which is not an input.
        self.build(network.input_shape)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.network.build(input_shape)

    def call(self, x: Any, training: bool = False) -> Any:
        return self.network(x, training=training)

    def train_step(self, data: Any) -> dict[str, Any]:
        (x_labelled, y_labelled), x_unlabelled = data
        seed = self.augmentation_seed
        weak_labelled = weak_augment(x_labelled, seed)
        strong_unlabelled = strong_augment(x_unlabelled, seed)
        # Targets: the model's prediction on a weak view, kept only where it
        # is confident, and not differentiated.
        weak_probabilities = ops.softmax(
            ops.stop_gradient(self(weak_augment(x_unlabelled, seed), training=False))
        )
        pseudo_labels = ops.argmax(weak_probabilities, axis=-1)
        confident = ops.cast(ops.max(weak_probabilities, axis=-1) >= self.threshold, "float32")

        def loss_fn() -> tuple[Any, tuple[Any, Any, Any]]:
            labelled_logits = self(weak_labelled, training=True)
            labelled_loss = ops.mean(
                keras.losses.sparse_categorical_crossentropy(
                    y_labelled, labelled_logits, from_logits=True
                )
            )
            unlabelled_loss = ops.mean(
                confident
                * keras.losses.sparse_categorical_crossentropy(
                    pseudo_labels, self(strong_unlabelled, training=True), from_logits=True
                )
            )
            total = labelled_loss + self.unlabelled_weight * unlabelled_loss
            return total, (labelled_loss, unlabelled_loss, labelled_logits)

        variables = self.trainable_variables
        (_, (labelled_loss, unlabelled_loss, labelled_logits)), gradients = (
            self.value_and_gradients(loss_fn, variables, has_aux=True)
        )
        self.apply_gradients(gradients, variables)

        self.log("labelled_loss", labelled_loss)
        self.log("unlabelled_loss", unlabelled_loss)
        self.log("confident_fraction", ops.mean(confident))
        correct = ops.argmax(labelled_logits, axis=-1) == ops.cast(y_labelled, "int32")
        self.log("labelled_accuracy", ops.mean(ops.cast(correct, "float32")))
        return {}


# --------------------------------------------------------------------- the run

HIDDEN_UNITS = 256
LEARNING_RATE = 2e-3
LABELLED_BATCH_SIZE, UNLABELLED_BATCH_SIZE = 32, 128


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    logits = ops.convert_to_numpy(model(x, training=False))
    return float((np.argmax(logits, axis=-1) == y).mean())


def enable_determinism() -> None:
    """Same numbers on every run: TensorFlow needs op determinism for that;
    JAX and PyTorch on CPU gave the same numbers run after run without it."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def batches_for(data: dict[str, np.ndarray], seed: int) -> LabelledAndUnlabelled:
    return LabelledAndUnlabelled(
        data["x_labelled"],
        data["y_labelled"],
        data["x_unlabelled"],
        LABELLED_BATCH_SIZE,
        UNLABELLED_BATCH_SIZE,
        seed,
    )


def train_fixmatch(
    data: dict[str, np.ndarray], epochs: int, seed: int, unlabelled_weight: float = 1.0
) -> tuple[FixMatch, dict[str, list[float]]]:
    model = FixMatch(classifier(seed, HIDDEN_UNITS), unlabelled_weight=unlabelled_weight, seed=seed)
    model.compile(keras.optimizers.Adam(LEARNING_RATE))
    history = model.fit(batches_for(data, seed), epochs=epochs, shuffle=False, verbose=0)
    return model, history.history


class LabelledOnly(keras.utils.PyDataset):
    """The labelled half of each batch of `LabelledAndUnlabelled`: the same
    `(x, y)` batches in the same order, for stock `fit`."""

    def __init__(self, batches: LabelledAndUnlabelled) -> None:
        super().__init__()
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batches[index][0]

    def on_epoch_end(self) -> None:
        self.batches.on_epoch_end()


def train_labelled_only(data: dict[str, np.ndarray], epochs: int, seed: int) -> keras.Model:
    """The same network from the same initial weights, with the same
    optimizer, trained by stock `fit` on the same labelled batches alone."""
    model = classifier(seed, HIDDEN_UNITS)
    model.compile(
        keras.optimizers.Adam(LEARNING_RATE),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(LabelledOnly(batches_for(data, seed)), epochs=epochs, shuffle=False, verbose=0)
    return model


def run(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Trains FixMatch, the labelled-only baseline and the augmentation-only
    control; returns their test accuracies, FixMatch's per-epoch history, the
    settings and the wall time."""
    enable_determinism()
    start = time.time()
    epochs = 10 if quick else 300
    data = split_digits(seed)
    x_test, y_test = data["x_test"], data["y_test"]

    model, history = train_fixmatch(data, epochs, seed)
    # The same step with the unlabelled term weighted 0: what the weak
    # augmentation of the labelled images gives without the unlabelled ones.
    control, _ = train_fixmatch(data, epochs, seed, unlabelled_weight=0.0)
    labelled_only = train_labelled_only(data, epochs, seed)
    return {
        "semi_supervised_accuracy": accuracy(model, x_test, y_test),
        "labelled_only_accuracy": accuracy(labelled_only, x_test, y_test),
        "augmented_labelled_only_accuracy": accuracy(control, x_test, y_test),
        "history": history,
        "backend": keras.backend.backend(),
        "seed": seed,
        "epochs": epochs,
        "updates": epochs * len(batches_for(data, seed)),
        "labelled": len(data["x_labelled"]),
        "unlabelled": len(data["x_unlabelled"]),
        "test": len(x_test),
        "seconds": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 epochs instead of 300 (CI)")
    parser.add_argument(
        "--seed", type=int, default=0, help="labelled subset, initial weights, augmentations"
    )
    args = parser.parse_args()
    results = run(quick=args.quick, seed=args.seed)
    last = ", ".join(f"{name} {values[-1]:.3f}" for name, values in results["history"].items())
    print(
        f"backend {results['backend']}, seed {results['seed']}: {results['labelled']} labelled "
        f"and {results['unlabelled']} unlabelled training images, {results['test']} test images"
    )
    print(f"FixMatch: {results['epochs']} epochs, {results['updates']} updates; last epoch: {last}")
    print("test accuracy:")
    print(f"  labelled 10% only, stock fit:           {results['labelled_only_accuracy']:.4f}")
    print(
        f"  labelled 10% only, FixMatch's step (augmentation, unlabelled weight 0): "
        f"{results['augmented_labelled_only_accuracy']:.4f}"
    )
    print(f"  FixMatch, labelled 10% + unlabelled 90%: {results['semi_supervised_accuracy']:.4f}")
    print(f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
