"""A hand-written NumPy reference for the step recipes, on a linear model.

The model is one `Dense` layer trained with the mean squared error and
plain SGD, so its gradients (w.r.t. the weights and the inputs) are written
out here in float64, and every recipe is the formula from its paper or
docstring. `fit_recipe` trains the same model with `customfit.recipes`.
Keras trains in float32: the two agree within `CLOSE`.
"""

from __future__ import annotations

import keras
import numpy as np

# float32 training against a float64 reference, a few steps of SGD.
CLOSE = dict(rtol=2e-5, atol=1e-6)
LEARNING_RATE = 0.1
BATCH = 4


def data(batches: int = 4, bad_batch: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batches * BATCH, 3)).astype("float32")
    y = rng.normal(size=(batches * BATCH, 2)).astype("float32")
    if bad_batch is not None:
        x[bad_batch * BATCH, 0] = np.nan
    return x, y


def fit_recipe(cls, x, y, epochs: int = 1, **options):
    """`cls(inputs, outputs, **options)` on a Dense(2) layer, trained with
    SGD on (x, y) in order; returns the model."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = cls(inputs, keras.layers.Dense(2)(inputs), **options)
    model.compile(keras.optimizers.SGD(LEARNING_RATE), "mse")
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model


def initial_weights(cls, **options) -> list[np.ndarray]:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = cls(inputs, keras.layers.Dense(2)(inputs), **options)
    return [w.astype("float64") for w in model.get_weights()]


def loss_and_gradients(weights, x, y):
    kernel, bias = weights
    residual = x @ kernel + bias - y
    loss = np.mean(residual**2)
    scale = 2.0 / residual.size
    return loss, [scale * x.T @ residual, scale * residual.sum(0)]


def input_gradient(weights, x, y):
    kernel, bias = weights
    residual = x @ kernel + bias - y
    return 2.0 / residual.size * residual @ kernel.T


def global_norm(gradients) -> float:
    return float(np.sqrt(sum((g**2).sum() for g in gradients)))


def clip_by_global_norm(gradients, weights, clip_norm):
    norm = global_norm(gradients)
    return [g * min(1.0, clip_norm / norm) for g in gradients]


def adaptive_clip(gradients, weights, clip_factor, unit_epsilon=1e-3):
    def unitwise(a):
        if a.ndim <= 1:
            return np.abs(a)
        return np.sqrt((a**2).sum(axis=0, keepdims=True))

    clipped = []
    for g, w in zip(gradients, weights):
        max_norm = clip_factor * np.maximum(unitwise(w), unit_epsilon)
        norm = unitwise(g)
        clipped.append(np.where(norm > max_norm, g * max_norm / np.maximum(norm, 1e-6), g))
    return clipped


def sam_gradients(weights, x, y, rho):
    _, g = loss_and_gradients(weights, x, y)
    scale = rho / (global_norm(g) + 1e-12)
    return loss_and_gradients([w + scale * gi for w, gi in zip(weights, g)], x, y)[1]


def fgsm(weights, x, y, epsilon):
    gradient = input_gradient(weights, x, y)
    return x + epsilon * np.sign(np.where(np.isfinite(gradient), gradient, 0.0))


class Reference:
    """The step, per batch, as the recipes' documented order composes it:
    the batch (adversarial), the gradient (SAM), whether to update (skip),
    when (accumulation), the gradient transforms in class order, SGD, and
    what runs after the update (`after_update(weights, updates)`)."""

    def __init__(self, weights, *, adversarial=None, sam=None, skip=False,
                 accumulate=None, transforms=(), after_update=None):
        self.weights = [w.copy() for w in weights]
        self.adversarial, self.sam, self.skip = adversarial, sam, skip
        self.accumulate, self.transforms = accumulate, transforms
        self.after_update = after_update
        self.sums = [np.zeros_like(w) for w in weights]
        self.micro_batches = 0
        self.updates = 0

    def fit(self, x, y, epochs: int = 1):
        for _ in range(epochs):
            for start in range(0, len(x), BATCH):
                self.step(x[start:start + BATCH].astype("float64"),
                          y[start:start + BATCH].astype("float64"))
        return self.weights

    def step(self, x, y):
        if self.adversarial is not None:
            x = fgsm(self.weights, x, y, self.adversarial)
        loss, gradients = loss_and_gradients(self.weights, x, y)
        if self.sam is not None:
            gradients = sam_gradients(self.weights, x, y, self.sam)
        if self.skip and not (np.isfinite(loss) and all(np.isfinite(g).all() for g in gradients)):
            return
        if not self.passes("before_accumulation"):
            return
        if self.accumulate is not None:
            self.sums = [s + g for s, g in zip(self.sums, gradients)]
            self.micro_batches += 1
            if self.micro_batches % self.accumulate:
                return
            gradients = [s / self.accumulate for s in self.sums]
            self.sums = [np.zeros_like(s) for s in self.sums]
        if not self.passes("after_accumulation"):
            return
        for transform in self.transforms:
            gradients = transform(gradients, self.weights)
        self.weights = [w - LEARNING_RATE * g for w, g in zip(self.weights, gradients)]
        self.updates += 1
        if self.after_update is not None:
            self.weights = self.after_update(self.weights, self.updates)

    def passes(self, stage: str) -> bool:
        """Whether the update goes on at `stage` (a recipe of a test's own
        that decides whether to update overrides it)."""
        return True
