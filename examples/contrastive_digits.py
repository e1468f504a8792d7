"""Self-supervised pre-training (SimCLR) on scikit-learn's 8x8 digits, then a linear probe.

    python3 examples/contrastive_digits.py                 # 300 epochs, under 1 min
    python3 examples/contrastive_digits.py --quick         # 10 epochs (CI)
    KERAS_BACKEND=jax python3 examples/contrastive_digits.py --seed 1

Splits the 1797 digits into a training set and a held-out test set (30%,
fixed). Pre-trains an MLP encoder (64-256-32) on the 1257 training images
without their labels with SimCLR (Chen et al., 2020): a
`customfit.CustomModel` whose `train_step` makes two random views of each
image (shift, cutout, contrast, noise) and minimizes the NT-Xent loss, which
pulls the projections of two views of one image together and pushes those of
different images apart. Then fits a linear probe, the frozen encoder and a
`Dense` softmax, with stock `fit` on the training labels, once on the
pre-trained encoder and once on the same encoder untrained (its random
initial weights, the ones pre-training started from).

Prints the pre-training's last-epoch logs, both probes' test accuracies and
the wall time. `run(quick=False, seed=0)` returns them as a dict
(`pretrained_probe_accuracy`, `random_encoder_probe_accuracy`, `history`:
the pre-training's per-epoch `nt_xent_loss`, `positive_similarity` and
`pair_accuracy`, `seconds`, and the settings).
"""

from __future__ import annotations

import argparse
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

IMAGE_SIDE = 8
REPRESENTATION_UNITS = 32


def split_digits() -> dict[str, np.ndarray]:
    """Digits in [0, 1], split into training and test sets (fixed)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def encoder(seed: int) -> keras.Sequential:
    """64 pixels to a 32-unit representation."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((IMAGE_SIDE * IMAGE_SIDE,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(REPRESENTATION_UNITS, activation="relu"),
        ],
        name="encoder",
    )


def projection_head() -> keras.Sequential:
    """What the loss sees; dropped after pre-training, as in SimCLR."""
    return keras.Sequential(
        [
            keras.Input((REPRESENTATION_UNITS,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(32),
        ],
        name="projection_head",
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


def augment(images: Any, seed: keras.random.SeedGenerator) -> Any:
    """One random view: a shift, a cutout, a contrast change and noise."""
    batch = ops.shape(images)[:1]
    views = random_cutout(random_shift(images, 1, seed), 1, seed)
    contrast = keras.random.uniform((*batch, 1), 0.6, 1.4, seed=seed)
    noisy = views * contrast + 0.1 * keras.random.normal(ops.shape(views), seed=seed)
    return ops.clip(noisy, 0.0, 1.0)


# ------------------------------------------------------------------- the step


def nt_xent(projections_a: Any, projections_b: Any, temperature: float) -> tuple[Any, Any]:
    """SimCLR's loss for a batch of pairs (row i of `a` and of `b` are two
    views of image i), and `(similarities, logits, positives)`: the cosine
    similarities of all 2N views, the logits of the 2N-way classification
    each view makes, and the index of each view's pair."""
    batch = ops.shape(projections_a)[0]
    z = ops.concatenate([projections_a, projections_b], axis=0)
    z = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
    similarities = ops.matmul(z, ops.transpose(z))
    # A view is not its own candidate: a large negative logit on the diagonal.
    logits = similarities / temperature - 1e9 * ops.eye(2 * batch)
    positives = ops.concatenate([ops.arange(batch) + batch, ops.arange(batch)], axis=0)
    loss = keras.losses.sparse_categorical_crossentropy(positives, logits, from_logits=True)
    return ops.mean(loss), (similarities, logits, positives)


class SimCLR(customfit.CustomModel):
    """Pre-trains `encoder` (with `head` on top) on batches of unlabelled images."""

    def __init__(
        self,
        encoder: keras.Model,
        head: keras.Model,
        temperature: float = 0.1,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.encoder = encoder
        self.head = head
        self.temperature = temperature
        self.augmentation_seed = keras.random.SeedGenerator(seed)
        # Built now, so that `fit` has nothing to build from the data.
        self.build(encoder.input_shape)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.encoder.build(input_shape)
        self.head.build(self.encoder.output_shape)

    def call(self, x: Any, training: bool = False) -> Any:
        return self.encoder(x, training=training)

    def train_step(self, data: Any) -> dict[str, Any]:
        images, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        views_a = augment(images, self.augmentation_seed)
        views_b = augment(images, self.augmentation_seed)

        def loss_fn() -> tuple[Any, Any]:
            projections_a = self.head(self.encoder(views_a, training=True), training=True)
            projections_b = self.head(self.encoder(views_b, training=True), training=True)
            return nt_xent(projections_a, projections_b, self.temperature)

        variables = self.trainable_variables
        (loss, (similarities, logits, positives)), gradients = self.value_and_gradients(
            loss_fn, variables, has_aux=True
        )
        self.apply_gradients(gradients, variables)

        self.log("nt_xent_loss", loss)
        pair_similarities = ops.take_along_axis(similarities, positives[:, None], axis=1)
        self.log("positive_similarity", ops.mean(pair_similarities))
        # How often a view's most similar other view is its own pair.
        found = ops.argmax(logits, axis=1) == ops.cast(positives, "int32")
        self.log("pair_accuracy", ops.mean(ops.cast(found, "float32")))
        return {}


# --------------------------------------------------------------------- the run

LEARNING_RATE = 1e-3
BATCH_SIZE = 256


def enable_determinism() -> None:
    """Same numbers on every run: TensorFlow needs op determinism for that;
    JAX and PyTorch on CPU gave the same numbers run after run without it."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def linear_probe_accuracy(
    trained_encoder: keras.Model, data: dict[str, np.ndarray], epochs: int, seed: int
) -> float:
    """Test accuracy of a `Dense` softmax fitted on the frozen encoder's
    representation of the training images."""
    trained_encoder.trainable = False
    keras.utils.set_random_seed(seed)
    probe = keras.Sequential(
        [trained_encoder, keras.layers.Dense(10, activation="softmax")], name="linear_probe"
    )
    probe.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    probe.fit(data["x_train"], data["y_train"], batch_size=64, epochs=epochs, verbose=0)
    probabilities = ops.convert_to_numpy(probe(data["x_test"], training=False))
    return float((np.argmax(probabilities, axis=-1) == data["y_test"]).mean())


def run(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Pre-trains the encoder and probes it and an untrained one; returns both
    test accuracies, the pre-training's per-epoch history, the settings and
    the wall time."""
    enable_determinism()
    start = time.time()
    epochs = 10 if quick else 300
    probe_epochs = 20 if quick else 100
    data = split_digits()

    model = SimCLR(encoder(seed), projection_head(), seed=seed)
    model.compile(keras.optimizers.Adam(LEARNING_RATE))
    history = model.fit(data["x_train"], batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return {
        "pretrained_probe_accuracy": linear_probe_accuracy(model.encoder, data, probe_epochs, seed),
        "random_encoder_probe_accuracy": linear_probe_accuracy(
            encoder(seed), data, probe_epochs, seed
        ),
        "history": history.history,
        "backend": keras.backend.backend(),
        "seed": seed,
        "epochs": epochs,
        "probe_epochs": probe_epochs,
        "train": len(data["x_train"]),
        "test": len(data["x_test"]),
        "seconds": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 epochs instead of 300 (CI)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and augmentations")
    args = parser.parse_args()
    results = run(quick=args.quick, seed=args.seed)
    last = ", ".join(f"{name} {values[-1]:.3f}" for name, values in results["history"].items())
    print(
        f"backend {results['backend']}, seed {results['seed']}: {results['train']} training "
        f"images (labels unused until the probe), {results['test']} test images"
    )
    print(f"SimCLR pre-training: {results['epochs']} epochs; last epoch: {last}")
    print(f"linear probe ({results['probe_epochs']} epochs), test accuracy:")
    print(f"  untrained encoder (random weights): {results['random_encoder_probe_accuracy']:.4f}")
    print(f"  SimCLR pre-trained encoder:         {results['pretrained_probe_accuracy']:.4f}")
    print(f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
