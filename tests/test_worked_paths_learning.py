"""The worked paths beyond supervised learning: `examples/semi_supervised_digits.py`
(FixMatch) and `examples/contrastive_digits.py` (SimCLR), in their quick mode
(what CI runs, on every backend), the error for unlabelled images of the
wrong shape, the NT-Xent loss against NumPy, and the code their pages in
`docs/beyond/` quote."""

import re

import keras
import numpy as np
import pytest

from examples import contrastive_digits, semi_supervised_digits
from tests.subproc import ROOT


def assert_finite_columns(history, names, epochs):
    assert set(history) == set(names)
    for name in names:
        assert len(history[name]) == epochs, name
        assert np.all(np.isfinite(history[name])), name


@pytest.mark.slow
def test_semi_supervised_quick_run_trains_on_labelled_and_unlabelled_batches():
    results = semi_supervised_digits.run(quick=True)

    history = results["history"]
    assert_finite_columns(
        history,
        ["labelled_loss", "unlabelled_loss", "confident_fraction", "labelled_accuracy"],
        results["epochs"],
    )
    assert (results["labelled"], results["unlabelled"], results["test"]) == (126, 1131, 540)
    assert history["labelled_loss"][-1] < 0.7 * history["labelled_loss"][0]
    # The unlabelled term is in use: some pseudo-labels pass the threshold
    # by the last epoch (observed 0.27-0.30 on each backend, seed 0).
    assert history["confident_fraction"][0] < history["confident_fraction"][-1]
    assert history["confident_fraction"][-1] > 0.05
    # Far above chance (0.1) after 80 updates: observed 0.82-0.93, seed 0.
    for name in (
        "semi_supervised_accuracy",
        "labelled_only_accuracy",
        "augmented_labelled_only_accuracy",
    ):
        assert 0.6 < results[name] <= 1.0, (name, results[name])


def test_semi_supervised_data_names_the_fix_for_unlabelled_images_of_another_shape(digits):
    x, y = digits
    unflattened = x[40:].reshape(-1, 8, 8)

    # The step would train on them without an error (its augmentations
    # reshape every image to 8x8 and back): the dataset refuses them.
    with pytest.raises(
        ValueError,
        match=r"^The unlabelled images have feature shape \(8, 8\) but the labelled ones "
        r"have \(64,\).*Preprocess the unlabelled images exactly as the labelled ones",
    ):
        semi_supervised_digits.LabelledAndUnlabelled(x[:40], y[:40], unflattened, 32, 128, seed=0)
    batches = semi_supervised_digits.LabelledAndUnlabelled(x[:40], y[:40], x[40:], 32, 128, seed=0)
    (x_labelled, y_labelled), x_unlabelled = batches[0]
    assert (x_labelled.shape, y_labelled.shape, x_unlabelled.shape) == ((32, 64), (32,), (128, 64))


@pytest.mark.slow
def test_contrastive_quick_run_lowers_the_nt_xent_loss_and_probes_both_encoders():
    results = contrastive_digits.run(quick=True)

    history = results["history"]
    assert_finite_columns(
        history, ["nt_xent_loss", "positive_similarity", "pair_accuracy"], results["epochs"]
    )
    assert (results["train"], results["test"]) == (1257, 540)
    # Observed over the 10 epochs (seed 0 on each backend, seeds 1-4 on JAX
    # and PyTorch): from 6.20-6.39 (for 256 pairs with every candidate alike,
    # log(511) = 6.24) down by 0.48-0.67. `positive_similarity` falls
    # meanwhile, from projections that start out all alike, and the probes'
    # order is not settled yet (seed 4 on PyTorch: 0.861 pre-trained, 0.863
    # untrained): the full run shows it.
    assert history["nt_xent_loss"][-1] < history["nt_xent_loss"][0] - 0.25
    # Observed 0.75-0.90.
    for name in ("pretrained_probe_accuracy", "random_encoder_probe_accuracy"):
        assert 0.6 < results[name] <= 1.0, (name, results[name])


def test_nt_xent_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 3)).astype("float32")
    temperature = 0.2

    loss, _ = contrastive_digits.nt_xent(
        keras.ops.convert_to_tensor(a), keras.ops.convert_to_tensor(b), temperature
    )

    z = np.concatenate([a, b])
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    expected = []
    for i in range(10):
        positive = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        logits = z[others] @ z[i] / temperature
        expected.append(np.log(np.exp(logits).sum()) - z[positive] @ z[i] / temperature)
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(loss)), np.mean(expected), rtol=1e-5
    )


def python_blocks(page):
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize(
    "page, example",
    [
        ("semi-supervised.md", "semi_supervised_digits.py"),
        ("self-supervised.md", "contrastive_digits.py"),
        ("generative.md", "vae_digits.py"),
        ("reinforcement.md", "reinforce_cartpole.py"),
    ],
)
def test_the_docs_quote_the_examples_as_they_are(page, example):
    """A block of a page of docs/beyond/ that defines a class or a function
    (decorated or not) is a verbatim part of its example (tests/test_docs.py
    runs the page's blocks)."""
    source = (ROOT / "examples" / example).read_text()
    quoted = [
        block
        for block in python_blocks(ROOT / "docs" / "beyond" / page)
        if block.startswith(("class ", "def ", "@"))
    ]
    assert quoted
    for block in quoted:
        assert block in source, (
            f"docs/beyond/{page} quotes code not in examples/{example}:\n{block}"
        )
