"""The supported TensorFlow/Keras stacks, one nox session per TensorFlow.

    python3 -m nox -s compat            # the compatibility subset on every older stack
    python3 -m nox -s "compat(tensorflow='2.20')"   # Keras 3.11, 3.12 and 3.13
    python3 -m nox -s nightly           # canary: keras-nightly on the newest TensorFlow
    python3 -m nox -s jax               # Keras' JAX backend, without TensorFlow
    python3 -m nox -s lint              # ruff (lint, format) and mypy over customfit/
    python3 -m nox -s docs              # the documentation site, warnings as errors

The primary stack (the newest of each) runs the whole suite and Keras' own
tests from the README's command; `.ci/run` runs `compat`, `jax`, `lint`
and `docs` after them. Each session installs its TensorFlow into a fresh
virtual environment, and customfit from this checkout without dependencies;
a `compat` session then installs each Keras release tested with that
TensorFlow in turn (one environment per TensorFlow: installing TensorFlow
takes longer than the tests), so the stack under test is exactly the one
named.
"""

import nox

nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True

PRIMARY = ("tensorflow==2.21.0", "keras==3.15.1")
# The latest patch of every older Keras minor release supported, grouped by
# the TensorFlow each is used with.
OLDER = {
    "2.19": ("tensorflow==2.19.1", ("keras==3.10.0",)),
    "2.20": ("tensorflow==2.20.0", ("keras==3.11.3", "keras==3.12.4", "keras==3.13.2")),
    "2.21": ("tensorflow==2.21.0", ("keras==3.14.1",)),
}
TEST_DEPENDENCIES = ("pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.3", "tensorboard>=2.19")
# What depends on Keras' loop: parity with stock fit, the hooks, the Keras-2
# helpers, every private Keras API, the per-batch logs, resuming, saving, the
# published steps, `log` against Keras' Mean, the warnings Keras' saving
# emits and composite checkpoints; the subprocess tests (slow) are left to
# the primary.
COMPAT_TESTS = (
    "tests/test_parity.py", "tests/test_hooks.py", "tests/test_keras2_helpers.py",
    "tests/test_keras_internals.py", "tests/test_versions.py",
    "tests/test_full_resolution_logs.py", "tests/test_resume_mid_epoch.py",
    "tests/test_saving.py", "tests/test_published_steps.py", "tests/test_errors.py",
    "tests/test_auto_steps.py",
)


def _install(session: nox.Session, *stack: str) -> None:
    session.install(*stack, *TEST_DEPENDENCIES)
    session.install("--no-deps", "-e", ".")
    _print_stack(session)


def _print_stack(session: nox.Session) -> None:
    session.run("python", "-c", "import keras, tensorflow as tf; "
                "print('Keras', keras.version(), 'TensorFlow', tf.__version__)")


# The oldest and the newest older release run the whole subset, then
# `python -m customfit check` (which compares what the parity tests compare).
# The releases between them, to keep `.ci/run` within 30 min, run it without
# `steps_per_execution="auto"` and the published steps: the Keras code
# "auto" copies has one source from 3.11 to 3.15 (`versions.COPIES`), and the
# published steps run on the loop the parity tests cover.
EDGES = ("keras==3.10.0", "keras==3.14.1")
BETWEEN_EDGES_SKIPPED = ("tests/test_auto_steps.py", "tests/test_published_steps.py")


@nox.session
@nox.parametrize("tensorflow", list(OLDER))
def compat(session: nox.Session, tensorflow: str) -> None:
    """The compatibility subset on each older Keras tested with this
    TensorFlow, then (on the `EDGES`) `python -m customfit check`."""
    tensorflow_requirement, keras_releases = OLDER[tensorflow]
    _install(session, tensorflow_requirement, keras_releases[0])
    for keras in keras_releases:
        if keras != keras_releases[0]:
            session.install(keras)
            _print_stack(session)
        tests = [t for t in COMPAT_TESTS if keras in EDGES or t not in BETWEEN_EDGES_SKIPPED]
        session.run("python", "-m", "pytest", "-m", "not slow", "-p", "no:cacheprovider",
                    *tests, *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
        if keras in EDGES:
            session.run("python", "-m", "customfit", "check", env={"TF_CPP_MIN_LOG_LEVEL": "3"})


@nox.session
def nightly(session: nox.Session) -> None:
    """The compatibility subset on keras-nightly: warns that Keras is newer
    than tested (ignored here, so the tests run) and lists what breaks."""
    session.install(PRIMARY[0], *TEST_DEPENDENCIES)
    # TensorFlow brings keras, which shares its files with keras-nightly.
    session.run("python", "-m", "pip", "uninstall", "--yes", "keras")
    session.install("--pre", "--upgrade", "--force-reinstall", "--no-deps", "keras-nightly")
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "pytest", "-m", "not slow", "-p", "no:cacheprovider",
                "-W", "ignore::customfit.CompatibilityWarning", *COMPAT_TESTS,
                *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "3"})


# Keras' JAX backend, without TensorFlow: `tests/jax_backend`, and the
# suite's tests of the recipes written with keras.ops.
JAX_STACK = ("keras==3.15.1", "jax==0.10.2")
JAX_TESTS = (
    "tests/jax_backend",
    *(f"tests/test_recipes_{name}.py" for name in (
        "accumulation", "adversarial", "clipping", "distillation", "gan", "sam", "skipping")),
    "tests/test_value_and_gradients.py",
)


@nox.session
def jax(session: nox.Session) -> None:
    """CustomModel on Keras' JAX backend: parity with stock fit, the hooks,
    the Keras-2 helpers, saving, DataParallel over two CPU devices and the
    recipes written with keras.ops, in an
    environment without TensorFlow (customfit installed without its
    dependencies, as the README says for JAX users)."""
    session.install(*JAX_STACK, "pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.3")
    session.install("--no-deps", "-e", ".")
    session.run("python", "-c", "import importlib.util, sys; "
                "sys.exit(importlib.util.find_spec('tensorflow') is not None)")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *JAX_TESTS,
                *session.posargs, env={"KERAS_BACKEND": "jax"})


LINT = ("ruff==0.17.6", "mypy==2.4.1")
DOCS = ("mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings[python]==1.0.8")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's lint rules and format, and mypy, over customfit/ (configured in
    pyproject.toml). TensorFlow and Keras are untyped, so neither is needed."""
    session.install(*LINT)
    session.run("ruff", "check", "customfit")
    session.run("ruff", "format", "--check", "customfit")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site from docs/ and the docstrings, warnings as
    errors (broken links and anchors included). The API reference reads the
    source without importing it."""
    session.install(*DOCS)
    session.run("mkdocs", "build", "--strict", "--site-dir", f"{session.create_tmp()}/site",
                env={"NO_MKDOCS_2_WARNING": "1"})

