"""REINFORCE with a learned baseline on cart-pole, trained with `fit`.

    python3 examples/reinforce_cartpole.py --out runs/reinforce
    python3 examples/reinforce_cartpole.py --quick --seed 1
    KERAS_BACKEND=jax python3 examples/reinforce_cartpole.py   # or torch

The cart-pole is the classic one (Barto, Sutton and Anderson 1983, with the
constants and Euler steps of gym's CartPole-v1: gravity 9.8, cart 1.0 kg,
pole 0.1 kg, half-length 0.5, force 10, tau 0.02), written in NumPy and run
as 16 episodes side by side; an episode ends when |x| > 2.4 or |theta| > 12
degrees, or after 200 steps, with a reward of 1 per step (at most 200).

Each epoch of `fit` is one policy-gradient update: a callback plays 16
episodes with the current policy at the start of the epoch, and the epoch's
one batch (a `keras.utils.PyDataset`) is their states, actions, discounted
returns (gamma 0.99; an episode cut off at 200 steps goes on with the
baseline's estimate for its last state) and the log-probabilities of the
actions taken. The model, a `customfit.CustomModel`, has a policy (4-32-2,
tanh, starting at 1/2 left, 1/2 right everywhere) and a value baseline
(4-32-1, tanh); its `train_step` minimizes

    -mean_t[log pi(a_t|s_t) * normalized advantage_t]
    + 0.5 * mean_t[(G_t - V(s_t))^2] - 0.01 * entropy

(Adam, learning rate 1e-2 decaying to 1e-3 over 150 updates by a cosine)
with the advantage G_t - V(s_t) (returns scaled by 1 - gamma) and logs, per
epoch, the mean `episode_return` of the batch, the losses, the entropy and
`policy_lag`: the largest difference between the log-probability of an
action under the weights being trained and under the weights that played
it. About 1e-6 (float32 rounding) means the episodes were played with the
current weights; with weights one update old it was 0.01 or more.

Prints the mean return per epoch, the first epoch from which the mean over
the last 10 epochs (160 episodes) reached 195, the final values, whether
every epoch's episodes were played with the weights that the previous
epoch's update left, and the wall time; with `--out`, writes
`reinforce_curve.png` (mean return per epoch). The full run takes 150
epochs; `--quick` 25.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

import customfit

# Cart-pole constants, as in gym's CartPole-v1.
GRAVITY = 9.8
MASS_CART = 1.0
MASS_POLE = 0.1
TOTAL_MASS = MASS_CART + MASS_POLE
HALF_LENGTH = 0.5
POLE_MASS_LENGTH = MASS_POLE * HALF_LENGTH
FORCE = 10.0
TAU = 0.02
X_LIMIT = 2.4
THETA_LIMIT = 12 * 2 * np.pi / 360

MAX_STEPS = 200
EPISODES_PER_BATCH = 16
GAMMA = 0.99
EPOCHS = 150
QUICK_EPOCHS = 25
SOLVED_RETURN = 195.0
SOLVED_WINDOW = 10  # epochs, of 16 episodes each


def cartpole_step(states: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Euler step of every cart-pole: `states` (n, 4) of (x, x_dot,
    theta, theta_dot), `actions` (n,) of 0 (push left) or 1 (push right).
    Returns the next states and whether each pole fell or left the track."""
    x, x_dot, theta, theta_dot = states.T
    force = np.where(actions == 1, FORCE, -FORCE)
    cos_theta, sin_theta = np.cos(theta), np.sin(theta)
    temp = (force + POLE_MASS_LENGTH * theta_dot**2 * sin_theta) / TOTAL_MASS
    theta_acc = (GRAVITY * sin_theta - cos_theta * temp) / (
        HALF_LENGTH * (4.0 / 3.0 - MASS_POLE * cos_theta**2 / TOTAL_MASS)
    )
    x_acc = temp - POLE_MASS_LENGTH * theta_acc * cos_theta / TOTAL_MASS
    next_states = np.stack(
        [
            x + TAU * x_dot,
            x_dot + TAU * x_acc,
            theta + TAU * theta_dot,
            theta_dot + TAU * theta_acc,
        ],
        axis=1,
    )
    failed = (np.abs(next_states[:, 0]) > X_LIMIT) | (np.abs(next_states[:, 2]) > THETA_LIMIT)
    return next_states, failed


def mlp(weights: list[np.ndarray], states: np.ndarray) -> np.ndarray:
    """The policy or the value network of `Reinforce` in NumPy, from its
    weights (hidden kernel, hidden bias, output kernel, output bias)."""
    hidden_kernel, hidden_bias, output_kernel, output_bias = weights
    return np.tanh(states @ hidden_kernel + hidden_bias) @ output_kernel + output_bias


def policy_log_probabilities(weights: list[np.ndarray], states: np.ndarray) -> np.ndarray:
    """log pi(.|s), from the policy's weights."""
    logits = mlp(weights, states)
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


@dataclass
class Episodes:
    """`count` episodes padded to MAX_STEPS steps; `mask` is 1 on steps played."""

    states: np.ndarray  # (count, MAX_STEPS, 4) float32
    actions: np.ndarray  # (count, MAX_STEPS) int32
    log_probabilities: np.ndarray  # (count, MAX_STEPS) float32, of the actions taken
    returns: np.ndarray  # (count, MAX_STEPS) float32, discounted returns to go
    mask: np.ndarray  # (count, MAX_STEPS) float32

    @property
    def episode_returns(self) -> np.ndarray:
        return self.mask.sum(axis=1)  # a reward of 1 per step played

    def batch(self) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
        """`(x, y, sample_weight)` for `fit`: one row per step."""
        rows = self.mask.size
        return (
            self.states.reshape(rows, 4),
            (
                self.actions.reshape(rows),
                self.returns.reshape(rows),
                self.log_probabilities.reshape(rows),
            ),
            self.mask.reshape(rows),
        )


def play(
    policy_weights: list[np.ndarray],
    value_weights: list[np.ndarray],
    count: int,
    rng: np.random.Generator,
) -> Episodes:
    """Plays `count` episodes side by side with the policy of `policy_weights`."""
    states = np.zeros((count, MAX_STEPS, 4), "float32")
    actions = np.zeros((count, MAX_STEPS), "int32")
    log_probabilities = np.zeros((count, MAX_STEPS), "float32")
    mask = np.zeros((count, MAX_STEPS), "float32")
    state = rng.uniform(-0.05, 0.05, size=(count, 4))
    running = np.ones(count, bool)
    for t in range(MAX_STEPS):
        observed = state.astype("float32")
        log_pi = policy_log_probabilities(policy_weights, observed)
        action = (rng.random(count) < np.exp(log_pi[:, 1])).astype("int32")
        states[:, t], actions[:, t], mask[:, t] = observed, action, running
        log_probabilities[:, t] = np.take_along_axis(log_pi, action[:, None], axis=1)[:, 0]
        state, failed = cartpole_step(state, action)
        running &= ~failed
        if not running.any():
            break
    returns = np.zeros_like(mask)
    # An episode cut off at MAX_STEPS did not fail: its return goes on, as
    # the value baseline estimates it from the last state (a return of 0
    # there would punish the last steps of the best episodes).
    value = mlp(value_weights, state.astype("float32"))[:, 0] / (1.0 - GAMMA)
    to_go = np.where(running, value, 0.0).astype("float32")
    for t in reversed(range(MAX_STEPS)):
        to_go = mask[:, t] * (1.0 + GAMMA * to_go)
        returns[:, t] = to_go
    return Episodes(states * mask[..., None], actions, log_probabilities * mask, returns, mask)


class Reinforce(customfit.CustomModel):
    """A policy pi(a|s) and a value baseline V(s), trained by REINFORCE."""

    def __init__(self, hidden_units: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy_hidden = keras.layers.Dense(hidden_units, activation="tanh")
        # Zero logits at first: 1/2 left, 1/2 right in every state. A random
        # start can push the pole over, and REINFORCE then learns slowly
        # (mean returns of 12-26 over the first 25 updates, seen twice).
        self.policy_logits = keras.layers.Dense(2, kernel_initializer="zeros")
        self.value_hidden = keras.layers.Dense(hidden_units, activation="tanh")
        self.value_output = keras.layers.Dense(1)

    def call(self, states: Any) -> tuple[Any, Any]:
        logits = self.policy_logits(self.policy_hidden(states))
        value = self.value_output(self.value_hidden(states))[:, 0]
        return logits, value

    def policy_weights(self) -> list[np.ndarray]:
        """The policy's weights as NumPy arrays, for `play`."""
        return self.policy_hidden.get_weights() + self.policy_logits.get_weights()

    def value_weights(self) -> list[np.ndarray]:
        """The baseline's weights as NumPy arrays, for `play`."""
        return self.value_hidden.get_weights() + self.value_output.get_weights()

    def train_step(self, data: Any) -> dict[str, Any]:
        states, (actions, returns, played_log_probabilities), mask = data
        scaled_returns = returns * (1.0 - GAMMA)  # about [0, 1): the value head's range
        steps = ops.sum(mask)

        def mean_over_steps(values: Any) -> Any:
            return ops.sum(values * mask) / steps

        def loss_fn() -> tuple[Any, tuple[Any, ...]]:
            logits, value = self(states, training=True)
            log_pi = ops.log_softmax(logits, axis=-1)
            log_pi_taken = ops.sum(log_pi * ops.one_hot(actions, 2), axis=-1)
            advantage = scaled_returns - ops.stop_gradient(value)
            centered = advantage - mean_over_steps(advantage)
            advantage = centered / ops.sqrt(mean_over_steps(ops.square(centered)) + 1e-8)
            policy_loss = -mean_over_steps(log_pi_taken * advantage)
            value_loss = mean_over_steps(ops.square(scaled_returns - value))
            entropy = mean_over_steps(-ops.sum(ops.exp(log_pi) * log_pi, axis=-1))
            loss = policy_loss + 0.5 * value_loss - 0.01 * entropy
            return loss, (policy_loss, value_loss, entropy, log_pi_taken)

        variables = self.trainable_variables
        (_, aux), gradients = self.value_and_gradients(loss_fn, variables, has_aux=True)
        policy_loss, value_loss, entropy, log_pi_taken = aux
        self.apply_gradients(gradients, variables)

        episode_lengths = ops.sum(ops.reshape(mask, (EPISODES_PER_BATCH, MAX_STEPS)), axis=1)
        self.log("episode_return", episode_lengths)  # a vector: the mean over episodes
        self.log("policy_loss", policy_loss)
        self.log("value_loss", value_loss)
        self.log("entropy", entropy)
        # Computed before this step's update: the weights that played the
        # episodes must be the ones being trained (on-policy).
        self.log("policy_lag", ops.max(ops.abs(log_pi_taken - played_log_probabilities) * mask))
        return {}


class EpisodeCollector(keras.callbacks.Callback):
    """Plays a batch of episodes with the current policy at each epoch's start.

    `self.model` syncs the weights from the compiled step before it returns
    the model on JAX (Keras' callbacks do), so `policy_weights()` here reads
    the weights left by the last update on every backend. It records the
    weights it played with and those each epoch ended with, to check that.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = np.random.default_rng(seed)
        self.episodes: Episodes | None = None
        self.played_with: list[list[np.ndarray]] = []
        self.ended_with: list[list[np.ndarray]] = []
        self.episode_returns: list[np.ndarray] = []

    def collect(self, model: Reinforce) -> None:
        weights = model.policy_weights()
        self.episodes = play(weights, model.value_weights(), EPISODES_PER_BATCH, self.rng)
        self.played_with.append(weights)
        self.episode_returns.append(self.episodes.episode_returns)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.collect(self.model)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.ended_with.append(self.model.policy_weights())


class LatestEpisodes(keras.utils.PyDataset):
    """One batch per epoch: the episodes the collector played last.

    `fit` makes a new iterator over it at each epoch's start, after
    `on_epoch_begin`, so each epoch trains on that epoch's episodes (the
    History column `episode_return` equals the collector's mean return, and
    `policy_lag` is zero, on every backend). On TensorFlow, Keras reads a
    first batch before training to learn its shapes (for `tf.data`): that
    one is played with the initial weights and not trained on."""

    def __init__(self, collector: EpisodeCollector, model: Reinforce) -> None:
        super().__init__()
        self.collector = collector
        self.model = model

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if self.collector.episodes is None:
            self.collector.collect(self.model)
        return self.collector.episodes.batch()


def build_agent(seed: int = 0) -> Reinforce:
    keras.utils.set_random_seed(seed)
    agent = Reinforce()
    agent(np.zeros((1, 4), "float32"))  # builds the weights before fit
    # The step size decays to a tenth over the full run: a steadier policy
    # at the end, where one bad update costs many episodes of 200 steps.
    learning_rate = keras.optimizers.schedules.CosineDecay(1e-2, EPOCHS, alpha=0.1)
    agent.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return agent


def save_curve(mean_returns: list[float], path: Path, title: str) -> None:
    # A Figure of its own, not pyplot: drawing it leaves the caller's
    # matplotlib backend (a notebook's inline plots) as it was.
    from matplotlib.figure import Figure

    epochs = np.arange(1, len(mean_returns) + 1)
    window = np.array(
        [
            np.mean(mean_returns[max(0, i - SOLVED_WINDOW + 1) : i + 1])
            for i in range(len(mean_returns))
        ]
    )
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(
        epochs,
        mean_returns,
        ".",
        color="C0",
        alpha=0.6,
        label=f"mean of the epoch's {EPISODES_PER_BATCH} episodes",
    )
    ax.plot(epochs, window, color="C1", label=f"mean over the last {SOLVED_WINDOW} epochs")
    ax.axhline(
        SOLVED_RETURN, color="gray", linestyle="--", linewidth=1, label=f"target: {SOLVED_RETURN:g}"
    )
    ax.set(
        xlabel="epoch (one policy update)",
        ylabel="return (steps balanced)",
        ylim=(0, MAX_STEPS + 5),
        title=title,
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(quick: bool = False, seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Trains the agent; returns the mean return per epoch, the checks that
    the episodes were on-policy, and the final values, and writes
    `reinforce_curve.png` to `out` if given."""
    agent = build_agent(seed)
    collector = EpisodeCollector(seed)
    epochs = QUICK_EPOCHS if quick else EPOCHS
    start = time.perf_counter()
    history = agent.fit(
        LatestEpisodes(collector, agent), epochs=epochs, callbacks=[collector], verbose=0
    ).history
    seconds = time.perf_counter() - start

    # The collector's last `epochs` batches are the ones trained on (an
    # earlier one fed Keras' first look at the data).
    played_with = collector.played_with[-epochs:]
    trained_returns = [float(r.mean()) for r in collector.episode_returns[-epochs:]]
    mean_returns = history["episode_return"]
    windowed = [
        float(np.mean(mean_returns[max(0, i - SOLVED_WINDOW + 1) : i + 1])) for i in range(epochs)
    ]
    solved_at = next(
        (
            i + 1
            for i, value in enumerate(windowed)
            if i + 1 >= SOLVED_WINDOW and value >= SOLVED_RETURN
        ),
        None,
    )
    results: dict[str, Any] = {
        "backend": keras.backend.backend(),
        "seed": seed,
        "epochs": epochs,
        "episodes_per_epoch": EPISODES_PER_BATCH,
        "seconds": seconds,
        "mean_return": mean_returns,
        "policy_lag": history["policy_lag"],
        "entropy": history["entropy"],
        "final_mean_return": windowed[-1],
        "solved_at_epoch": solved_at,
        # Each epoch trained on the episodes played at its start...
        "trained_on_collected": bool(np.allclose(mean_returns, trained_returns)),
        # ...and those were played with the weights the previous epoch left,
        # which changed at every update.
        "played_with_updated_weights": all(
            all(np.array_equal(a, b) for a, b in zip(played, ended))
            and not all(np.array_equal(a, b) for a, b in zip(played, previous))
            for played, ended, previous in zip(
                played_with[1:], collector.ended_with[:-1], played_with[:-1]
            )
        ),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        results["curve_png"] = out / "reinforce_curve.png"
        save_curve(
            mean_returns,
            results["curve_png"],
            f"REINFORCE on cart-pole ({results['backend']}, seed {seed})",
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--out", default=None, type=Path, help="folder for reinforce_curve.png")
    args = parser.parse_args()
    results = run(quick=args.quick, seed=args.seed, out=args.out)

    print(
        f"backend {results['backend']}, seed {args.seed}: {results['epochs']} epochs of "
        f"{EPISODES_PER_BATCH} episodes in {results['seconds']:.1f} s"
    )
    print("mean return per epoch:")
    returns = results["mean_return"]
    for first in range(0, len(returns), 10):
        values = " ".join(f"{value:5.1f}" for value in returns[first : first + 10])
        print(f"  epochs {first + 1:3d}-{min(first + 10, len(returns)):3d}: {values}")
    solved = results["solved_at_epoch"]
    print(
        f"mean return over the last {SOLVED_WINDOW} epochs: "
        f"{results['final_mean_return']:.1f} of {MAX_STEPS}; "
        + (
            f"reached {SOLVED_RETURN:g} at epoch {solved}"
            if solved
            else f"did not reach {SOLVED_RETURN:g}"
        )
    )
    print(
        f"on-policy: every epoch played with the previous update's weights: "
        f"{results['played_with_updated_weights']}; trained on those episodes: "
        f"{results['trained_on_collected']}; largest policy_lag "
        f"{max(results['policy_lag']):.1e}"
    )
    if "curve_png" in results:
        print(f"wrote {results['curve_png']}")


if __name__ == "__main__":
    main()
