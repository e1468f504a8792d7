"""pytest fixtures for tests of training steps; loaded through the package's
`pytest11` entry point, so installing customfit makes them available.

Nothing here runs unless a test asks for a fixture: tests that don't use
them behave exactly as without the plugin.

- `customfit_deterministic`: seeds Python, NumPy, the backend and Keras
  (`keras.utils.set_random_seed`) and, on TensorFlow, turns on
  `tf.config.experimental.enable_op_determinism()`. Its value is the seed.
  The seed is 0 unless the test is marked `@pytest.mark.customfit_seed(n)`.

Op determinism is process-wide and TensorFlow has no public call to turn it
off again, so once a test used the fixture it stays on for the rest of the
pytest run. It makes some ops slower or unavailable (Keras disables XLA
under it). Run tests that need it off in a separate process.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers",
        "customfit_seed(seed): the seed the customfit_deterministic fixture uses",
    )


def deterministic(seed: int = 0) -> int:
    """Seeds everything and turns op determinism on (TensorFlow's, or
    `torch.use_deterministic_algorithms(True)` on PyTorch); returns the
    seed. (JAX on CPU is deterministic: seeding is enough.)"""
    import keras

    from customfit import _backend

    _backend.loop.enable_op_determinism()
    keras.utils.set_random_seed(seed)
    return seed


@pytest.fixture
def customfit_deterministic(request: Any) -> int:
    """Seeds the test (0, or `@pytest.mark.customfit_seed(n)`) and turns on
    op determinism (TensorFlow's, or PyTorch's deterministic algorithms),
    which stays on for the rest of the run."""
    marker = request.node.get_closest_marker("customfit_seed")
    seed = marker.args[0] if marker is not None and marker.args else 0
    return deterministic(int(seed))
