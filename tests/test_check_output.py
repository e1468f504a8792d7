"""What `python -m customfit check` says about the installed stack before its
table: the releases and the copied Keras code it compared, in words."""

import keras
import tensorflow as tf

from customfit import _check
from customfit._keras import versions


def test_a_tested_stack_is_said_in_words():
    releases, code = _check.stack_lines([])
    assert releases == (
        f"Releases: Keras {keras.version()} and TensorFlow {tf.__version__}, within the "
        f"tested Keras {versions.TESTED_KERAS[0][0]}.{versions.TESTED_KERAS[0][1]} to "
        f"{versions.TESTED_KERAS[1][0]}.{versions.TESTED_KERAS[1][1]} and TensorFlow "
        f"{versions.TESTED_TENSORFLOW[0][0]}.{versions.TESTED_TENSORFLOW[0][1]} to "
        f"{versions.TESTED_TENSORFLOW[1][0]}.{versions.TESTED_TENSORFLOW[1][1]}.")
    assert code == (f"Copied Keras code: the {len(versions.COPIES)} Keras functions customfit "
                    "copies or reproduces have their source in a tested release.")


def test_differences_are_listed_under_what_was_compared():
    found = ["Keras 3.99.0 is installed; customfit is tested with Keras 3.10 to 3.15."]
    lines = _check.stack_lines(found)
    assert lines[0].startswith(f"Releases: Keras {keras.version()} and TensorFlow")
    assert "installed; tested with Keras" in lines[0]
    assert lines[1].startswith("Copied Keras code: the source of the")
    assert lines[2:] == ["Differences from the tested stack (1):", f"  - {found[0]}"]
