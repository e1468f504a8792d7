"""A variational autoencoder on scikit-learn's 8x8 digits, trained with `fit`.

    python3 examples/vae_digits.py --out runs/vae
    python3 examples/vae_digits.py --quick --seed 1
    KERAS_BACKEND=jax python3 examples/vae_digits.py   # or torch

The model is a `customfit.CustomModel` whose `train_step` and `test_step`
compute the evidence lower bound (ELBO) of each image: a 64-128-(8+8) MLP
encoder gives a diagonal Gaussian q(z|x) over 8 latent dimensions, a
8-128-64 MLP decoder gives one Bernoulli logit per pixel (pixels are the gray
levels in [0, 1], as in Keras' VAE example), and the prior is N(0, I). Each
step logs the two terms with `self.log(..., weight=batch_size)`, so `History`
holds, per epoch, the mean over images of

    reconstruction = -E_q[log p(x|z)]  (binary cross-entropy summed over 64 pixels)
    kl             = KL(q(z|x) || p(z))
    elbo           = -(reconstruction + kl)       (nats per image, higher is better)

on the 1500 training digits and, as `val_*`, on 297 held-out ones
(`validation_data`), each with one sample of z per image.

Prints the ELBO per epoch (training and held-out), the first and last
epoch's values and the wall time, and, with `--out`, writes
`vae_samples.png`: 64 digits decoded from z ~ N(0, I) (the decoder's pixel
means), next to held-out digits and their reconstructions. The full run
takes 60 epochs; `--quick` 8.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops
from sklearn.datasets import load_digits

import customfit

LATENT_DIM = 8
PIXELS = 64
VALIDATION_SIZE = 297
BATCH_SIZE = 64
EPOCHS = 60
QUICK_EPOCHS = 8


class VAE(customfit.CustomModel):
    """Encoder q(z|x), decoder p(x|z) with Bernoulli pixels, prior N(0, I)."""

    def __init__(
        self, encoder: keras.Model, decoder: keras.Model, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.noise = keras.random.SeedGenerator(seed)

    def call(self, x: Any, training: bool = False) -> Any:
        """The reconstruction of `x` through the posterior mean."""
        z_mean, _ = ops.split(self.encoder(x, training=training), 2, axis=-1)
        return ops.sigmoid(self.decoder(z_mean, training=training))

    def elbo_terms(self, x: Any, training: bool) -> tuple[Any, Any]:
        """Per image: -log p(x|z) for one z ~ q(z|x), and KL(q(z|x) || N(0, I))."""
        z_mean, z_log_var = ops.split(self.encoder(x, training=training), 2, axis=-1)
        epsilon = keras.random.normal(ops.shape(z_mean), seed=self.noise)
        z = z_mean + ops.exp(0.5 * z_log_var) * epsilon  # reparameterized: differentiable
        logits = self.decoder(z, training=training)
        reconstruction = ops.sum(ops.binary_crossentropy(x, logits, from_logits=True), axis=-1)
        kl = -0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=-1)
        return reconstruction, kl

    def train_step(self, data: Any) -> dict[str, Any]:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)

        def negative_elbo() -> tuple[Any, tuple[Any, Any]]:
            reconstruction, kl = self.elbo_terms(x, training=True)
            return ops.mean(reconstruction + kl), (reconstruction, kl)

        variables = self.trainable_variables
        (_, (reconstruction, kl)), gradients = self.value_and_gradients(
            negative_elbo, variables, has_aux=True
        )
        self.apply_gradients(gradients, variables)
        return self.report(reconstruction, kl)

    def test_step(self, data: Any) -> dict[str, Any]:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.report(*self.elbo_terms(x, training=False))

    def report(self, reconstruction: Any, kl: Any) -> dict[str, Any]:
        # Weighted by batch size, the epoch's column is the mean over images,
        # also with a short last batch.
        batch_size = ops.shape(reconstruction)[0]
        self.log("reconstruction", ops.mean(reconstruction), weight=batch_size)
        self.log("kl", ops.mean(kl), weight=batch_size)
        self.log("elbo", -ops.mean(reconstruction + kl), weight=batch_size)
        return {}


def build_vae(seed: int = 0) -> VAE:
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential(
        [
            keras.Input((PIXELS,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(2 * LATENT_DIM),  # z_mean and z_log_var
        ],
        name="encoder",
    )
    decoder = keras.Sequential(
        [
            keras.Input((LATENT_DIM,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(PIXELS),  # one Bernoulli logit per pixel
        ],
        name="decoder",
    )
    vae = VAE(encoder, decoder, seed=seed)
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    return vae


def digits_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits as gray levels in [0, 1], shuffled: (training, held out)."""
    images = (load_digits().data / 16.0).astype("float32")
    images = images[np.random.default_rng(seed).permutation(len(images))]
    return images[VALIDATION_SIZE:], images[:VALIDATION_SIZE]


def save_grid(
    samples: np.ndarray, originals: np.ndarray, reconstructions: np.ndarray, path: Path
) -> None:
    # A Figure of its own, not pyplot: drawing it leaves the caller's
    # matplotlib backend (a notebook's inline plots) as it was.
    from matplotlib.figure import Figure

    panels = [
        ("from the prior", samples),
        ("held-out digits", originals),
        ("their reconstructions", reconstructions),
    ]
    fig = Figure(figsize=(13, 4.4))
    axes = fig.subplots(8, 26)
    for row in range(8):
        for col in range(26):
            ax = axes[row, col]
            ax.axis("off")
            panel, index = divmod(col, 9)
            if index == 8:
                continue  # a blank column between panels
            image = panels[panel][1][row * 8 + index]
            ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    for panel, (title, _) in enumerate(panels):
        left = axes[0, panel * 9].get_position().x0
        right = axes[0, panel * 9 + 7].get_position().x1
        fig.text((left + right) / 2, 0.93, title, ha="center", fontsize=11)
    fig.savefig(path, dpi=100)


def run(quick: bool = False, seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Trains the VAE; returns the ELBO per epoch and the final values, and
    writes `vae_samples.png` to `out` if given."""
    train, held_out = digits_split(seed)
    vae = build_vae(seed)
    epochs = QUICK_EPOCHS if quick else EPOCHS
    start = time.perf_counter()
    history = vae.fit(
        train, batch_size=BATCH_SIZE, epochs=epochs, validation_data=(held_out,), verbose=0
    ).history
    seconds = time.perf_counter() - start

    results: dict[str, Any] = {
        "backend": keras.backend.backend(),
        "seed": seed,
        "epochs": epochs,
        "seconds": seconds,
        "elbo": history["elbo"],
        "val_elbo": history["val_elbo"],
        "reconstruction": history["reconstruction"],
        "kl": history["kl"],
        "val_reconstruction": history["val_reconstruction"],
        "val_kl": history["val_kl"],
        "final_elbo": history["elbo"][-1],
        "final_val_elbo": history["val_elbo"][-1],
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        z = np.random.default_rng(seed + 1).normal(size=(64, LATENT_DIM)).astype("float32")
        samples = ops.convert_to_numpy(ops.sigmoid(vae.decoder(z)))
        reconstructions = vae.predict(held_out[:64], verbose=0)
        results["samples_png"] = out / "vae_samples.png"
        save_grid(samples, held_out[:64], reconstructions, results["samples_png"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--out", default=None, type=Path, help="folder for vae_samples.png")
    args = parser.parse_args()
    results = run(quick=args.quick, seed=args.seed, out=args.out)

    print(
        f"backend {results['backend']}, seed {args.seed}: {results['epochs']} epochs "
        f"in {results['seconds']:.1f} s"
    )
    print("epoch   ELBO (train)   ELBO (held out)   nats per image")
    for epoch, (elbo, val_elbo) in enumerate(zip(results["elbo"], results["val_elbo"]), 1):
        print(f"{epoch:5d}   {elbo:12.2f}   {val_elbo:15.2f}")
    print(
        f"first epoch: ELBO {results['elbo'][0]:.2f} (held out {results['val_elbo'][0]:.2f}); "
        f"last: {results['final_elbo']:.2f} (held out {results['final_val_elbo']:.2f}) = "
        f"-({results['val_reconstruction'][-1]:.2f} reconstruction + "
        f"{results['val_kl'][-1]:.2f} KL)"
    )
    if "samples_png" in results:
        print(f"wrote {results['samples_png']}")


if __name__ == "__main__":
    main()
