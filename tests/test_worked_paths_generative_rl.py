"""The worked paths beyond supervised learning: `examples/vae_digits.py` and
`examples/reinforce_cartpole.py`, in their quick mode (what CI runs, on
every backend); tests/test_worked_paths_learning.py checks the code their
pages quote."""


import numpy as np
import pytest

from examples import reinforce_cartpole, vae_digits

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes, f"{path}: {len(data)} bytes"


@pytest.mark.slow
def test_vae_quick_run_raises_the_elbo_on_both_splits_and_draws_samples(tmp_path):
    results = vae_digits.run(quick=True, out=tmp_path)

    epochs = vae_digits.QUICK_EPOCHS
    for name in ("elbo", "val_elbo", "reconstruction", "kl", "val_reconstruction", "val_kl"):
        assert len(results[name]) == epochs, name
        assert np.all(np.isfinite(results[name])), name
    # The logged terms, each weighted by batch size, add up to the ELBO.
    for prefix in ("", "val_"):
        np.testing.assert_allclose(
            -(np.array(results[f"{prefix}reconstruction"]) + results[f"{prefix}kl"]),
            results[f"{prefix}elbo"],
            rtol=1e-5,
        )
    assert min(results["kl"]) > 0
    # Observed, seed 0, epoch 1 to 8 (training; held out): TensorFlow -41.2
    # to -27.0 (-37.1 to -26.8), JAX -42.6 to -27.4 (-38.7 to -27.1),
    # PyTorch -41.8 to -27.2 (-37.8 to -26.8).
    assert results["elbo"][-1] > results["elbo"][0] + 5
    assert results["val_elbo"][-1] > results["val_elbo"][0] + 5
    assert -35 < results["val_elbo"][-1] < -20
    assert_png(results["samples_png"])


@pytest.mark.slow
def test_reinforce_quick_run_plays_every_batch_with_the_updated_policy(tmp_path):
    results = reinforce_cartpole.run(quick=True, out=tmp_path)

    epochs = reinforce_cartpole.QUICK_EPOCHS
    returns = np.array(results["mean_return"])
    assert returns.shape == (epochs,)
    assert np.all((returns >= 1) & (returns <= reinforce_cartpole.MAX_STEPS))
    # Each epoch trained on the episodes played at its start, played with the
    # weights the previous update left (and every update changed them).
    assert results["trained_on_collected"]
    assert results["played_with_updated_weights"]
    # In the compiled step: the log-probabilities of the actions taken, under
    # the weights being trained, equal those the episodes were played with
    # (observed at most 1e-6; a collector one update behind gave 0.011-0.23).
    assert max(results["policy_lag"]) < 1e-4
    # Learning: over seeds 0-7 on each backend the last 5 epochs' mean return
    # was 1.71-6.57 times the first 5 epochs'.
    assert returns[-5:].mean() > 1.25 * returns[:5].mean()
    assert_png(results["curve_png"])
