"""The supported TensorFlow/Keras stacks, one nox session per TensorFlow.

    python3 -m nox -s compat            # the compatibility subset on every older stack
    python3 -m nox -s "compat(tensorflow='2.20')"   # Keras 3.11, 3.12 and 3.13
    python3 -m nox -s nightly           # canary: keras-nightly on the newest TensorFlow
    python3 -m nox -s jax               # Keras' JAX backend, without TensorFlow, and
                                        # Keras' own tests on it (conformance/run.py)
    python3 -m nox -s torch             # the same on Keras' PyTorch backend
    python3 -m nox -s lint              # ruff (lint, format) and mypy over customfit/
    python3 -m nox -s docs              # the documentation site, warnings as errors
    python3 -m nox -s readme            # the README's examples, each as its install line says

The primary stack (the newest of each) runs the whole suite and Keras' own
tests from the README's command; `.ci/run` runs `compat`, `jax`, `torch`,
`readme`, `lint` and `docs` after them. Each session installs its TensorFlow
(or its other backend) into a fresh virtual environment, and customfit from
this checkout without dependencies; a `compat` session then installs each
Keras release tested with that TensorFlow in turn (one environment per
TensorFlow: installing TensorFlow takes longer than the tests), so the stack
under test is exactly the one named. A session that passes removes its
environment unless nox runs with `-r`.
"""

import dataclasses
import hashlib
import re
import shlex
import shutil
import textwrap
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
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
# emits and composite checkpoints; the tests that start subprocesses
# (`multiprocess`) are left to the primary. Two pytest-xdist processes.
COMPAT_SELECTION = ("-m", "not multiprocess", "-n", "2", "--dist", "worksteal")
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


def _discard_environment(session: nox.Session) -> None:
    """Removes a passed session's environment unless nox reuses environments
    (`-r`): a later run would recreate it anyway, and each TensorFlow stack
    takes over 2 GB, so `.ci/run` never holds more than one at a time."""
    if not session.virtualenv.reuse_existing:
        shutil.rmtree(session.virtualenv.location)


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
        session.run("python", "-m", "pytest", *COMPAT_SELECTION, "-p", "no:cacheprovider",
                    *tests, *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
        if keras in EDGES:
            session.run("python", "-m", "customfit", "check", env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    _discard_environment(session)


@nox.session
def nightly(session: nox.Session) -> None:
    """The compatibility subset on keras-nightly: warns that Keras is newer
    than tested (ignored here, so the tests run) and lists what breaks."""
    session.install(PRIMARY[0], *TEST_DEPENDENCIES)
    # TensorFlow brings keras, which shares its files with keras-nightly.
    session.run("python", "-m", "pip", "uninstall", "--yes", "keras")
    session.install("--pre", "--upgrade", "--force-reinstall", "--no-deps", "keras-nightly")
    session.install("--no-deps", "-e", ".")
    session.run("python", "-m", "pytest", *COMPAT_SELECTION, "-p", "no:cacheprovider",
                "-W", "ignore::customfit.CompatibilityWarning", *COMPAT_TESTS,
                *session.posargs, env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    _discard_environment(session)


# Keras' JAX backend, without TensorFlow: `tests/jax_backend`, and the
# suite's tests of the recipes written with keras.ops.
JAX_STACK = ("keras==3.15.1", "jax==0.10.2")
RECIPE_TESTS = (
    *(f"tests/test_recipes_{name}.py" for name in (
        "accumulation", "adversarial", "clipping", "distillation", "gan", "lookahead_ema",
        "sam", "skipping")),
    "tests/test_recipe_composition.py",
    "tests/test_value_and_gradients.py",
)
# The worked paths beyond supervised learning (examples/), in quick mode.
WORKED_PATH_TESTS = ("tests/test_worked_paths_learning.py",
                     "tests/test_worked_paths_generative_rl.py")
JAX_TESTS = (
    "tests/jax_backend",
    *RECIPE_TESTS,
    *WORKED_PATH_TESTS,
    "tests/test_every_backend.py",
    "tests/test_callback_preconditions.py",
    "tests/test_composite_checkpoints.py",
    "tests/test_parity.py",
)


@nox.session
def jax(session: nox.Session) -> None:
    """CustomModel on Keras' JAX backend: parity with stock fit, the hooks,
    the Keras-2 helpers, saving, DataParallel over two CPU devices and
    across two processes, ModelParallel over four CPU devices and the
    recipes written with keras.ops, then Keras' own trainer, model, saving
    and callback tests against CustomModel (`conformance/run.py --backend
    jax`, differences.toml's `[jax]` entries), in an
    environment without TensorFlow (customfit installed without its
    dependencies, as the README says for JAX users)."""
    session.install(*JAX_STACK, "pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.3",
                    "matplotlib>=3.7")
    session.install("--no-deps", "-e", ".")
    session.run("python", "-c", "import importlib.util, sys; "
                "sys.exit(importlib.util.find_spec('tensorflow') is not None)")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist",
                "worksteal", *JAX_TESTS,
                *session.posargs, env={"KERAS_BACKEND": "jax"})
    session.run("python", "conformance/run.py", "--backend", "jax", "--control", "auto")
    _discard_environment(session)


# Keras' PyTorch backend, without TensorFlow: torch's CPU build (the
# package index's plain `torch` brings CUDA libraries of several GB).
TORCH_STACK = ("keras==3.15.1", "torch==2.13.0")
# The parity, hook, Keras-2 helper and guard tests of tests/jax_backend are
# written with keras.ops and run on PyTorch too.
TORCH_TESTS = ("tests/torch_backend", *RECIPE_TESTS, *WORKED_PATH_TESTS,
               "tests/test_every_backend.py",
               "tests/test_callback_preconditions.py", "tests/test_composite_checkpoints.py",
               *(f"tests/jax_backend/test_{name}.py"
                 for name in ("parity", "hooks", "keras2_helpers", "guards")))


@nox.session
def torch(session: nox.Session) -> None:
    """CustomModel on Keras' PyTorch backend: parity with stock fit, every
    batch's logs with several batches per execution and "auto", exact
    resume, the run modes, the recipes, and steps written the PyTorch way,
    in an environment without TensorFlow; then Keras' own trainer, model,
    saving and callback tests against CustomModel (`conformance/run.py
    --backend torch`, differences.toml's `[torch]` entries), with JAX
    installed for them (Keras' trainer_test.py imports it)."""
    session.install(*TORCH_STACK, "pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.3",
                    "matplotlib>=3.7")
    session.install("--no-deps", "-e", ".")
    session.run("python", "-c", "import importlib.util, sys; "
                "sys.exit(importlib.util.find_spec('tensorflow') is not None)")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
                "--dist", "worksteal", *TORCH_TESTS, *session.posargs,
                env={"KERAS_BACKEND": "torch"})
    session.install(JAX_STACK[1])
    session.run("python", "conformance/run.py", "--backend", "torch", "--control", "auto")
    _discard_environment(session)


LINT = ("ruff==0.17.6", "mypy==2.4.1")
DOCS = ("mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings[python]==1.0.8")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff's lint rules and format, and mypy, over customfit/ (configured in
    pyproject.toml), and `tools/check_imports.py` (each backend library
    imported in its own package only). TensorFlow and Keras are untyped, so
    neither is needed."""
    session.install(*LINT)
    session.run("ruff", "check", "customfit")
    session.run("ruff", "format", "--check", "customfit")
    session.run("mypy")
    session.run("python", "tools/check_imports.py")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site from docs/ and the docstrings, warnings as
    errors (broken links and anchors included). The API reference reads the
    source without importing it."""
    session.install(*DOCS)
    session.run("mkdocs", "build", "--strict", "--site-dir", f"{session.create_tmp()}/site",
                env={"NO_MKDOCS_2_WARNING": "1"})



# The README's and Getting started's commands and examples, each in a fresh
# environment made by the install line the page gives for it, read from the
# page: a ```bash block of `python3 -m pip install ...` lines (and `export
# NAME=value` lines) is an environment of the ```python block that follows
# it (several such blocks in a row: one example, run in each of them, such
# as one per Keras backend); a one-line ```bash block `python3 -m pip install ... && python3
# examples/...` runs its example in the environment its install part makes.
# `customfit` in an install line is this checkout, as a source distribution
# built from a copy of it, and `-e .` this checkout, editable. Pages with
# code blocks of their own run in the main environment (tests/test_docs.py);
# the test command is `.ci/run` itself.
EXAMPLE_PAGES = ("README.md", "docs/getting-started.md")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_PIP_INSTALL = "python3 -m pip install "


@dataclasses.dataclass
class Example:
    """One block to run: where, the environment's install lines, its
    environment variables, and the Python code or the example command."""

    where: str
    installs: tuple[str, ...]
    env: dict[str, str]
    code: str = ""
    command: str = ""


def examples(page: str) -> list[Example]:
    """The install-line examples of `page` (a path under the checkout), in
    order, a ```python block once per install block before it; a ```python
    block without an install block before it, or an install block without a
    ```python block after it, is an error."""
    found: list[Example] = []
    pending: list[Example] = []
    for number, match in enumerate(_FENCE.finditer((ROOT / page).read_text()), 1):
        language, body = match.group(1), match.group(2)
        lines = [line.strip() for line in body.strip().splitlines()]
        where = f"{page}, code block {number}"
        if language == "python":
            if not pending:
                raise ValueError(f"{where}: no install block ({_PIP_INSTALL}...) before it")
            for example in pending:
                example.code, example.where = textwrap.dedent(body), where
            found += pending
            pending = []
            continue
        if language != "bash":
            if pending:
                raise ValueError(
                    f"{pending[-1].where}: an install block without a Python block after it")
            continue
        installs = tuple(line for line in lines
                         if line.startswith(_PIP_INSTALL) and "&&" not in line)
        exports = [line for line in lines if line.startswith("export ")]
        if installs and len(installs) + len(exports) == len(lines):
            env = dict(line[len("export "):].split("=", 1) for line in exports)
            pending.append(Example(where, installs, env))
            continue
        if pending:
            raise ValueError(
                f"{pending[-1].where}: an install block without a Python block after it")
        if len(lines) == 1 and lines[0].startswith(_PIP_INSTALL):
            install, _, command = lines[0].partition(" && ")
            if command.startswith("python3 examples/") and "&&" not in command:
                found.append(Example(where, (install,), {}, command=command))
    if pending:
        raise ValueError(f"{pending[-1].where}: an install block without a Python block after it")
    return found


def _pip_arguments(line: str, sdist: str) -> list[str]:
    """`python3 -m pip install ...` as pip's arguments, `customfit[...]`
    meaning the source distribution `sdist`, named with its SHA-256: pip
    keys the wheel it builds from a local archive by the URL (and a hash
    given with it), and the archive's path is the same in every run."""
    digest = hashlib.sha256(Path(sdist).read_bytes()).hexdigest()
    arguments = []
    for argument in shlex.split(line[len(_PIP_INSTALL):]):
        name, extras = re.fullmatch(r"([^\[]*)(\[.*\])?", argument).groups()
        arguments.append(f"customfit{extras or ''} @ file://{sdist}#sha256={digest}"
                         if name == "customfit" else argument)
    return arguments


_NOT_SOURCE = (".git", "build", "dist", "site", "runs", ".nox", "*.egg-info", "__pycache__",
               ".pytest_cache", ".mypy_cache", ".ruff_cache", ".whl", ".build")


@nox.session
def readme(session: nox.Session) -> None:
    """The README's and Getting started's examples, each in a fresh
    environment made by exactly the install line the page gives for it (a
    JAX one without TensorFlow), with customfit from a source distribution
    of this checkout."""
    session.install("setuptools>=64", "wheel")
    tmp = Path(session.create_tmp()).resolve()
    source = tmp / "source"
    for stale in (source, tmp / "dist"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    with session.chdir(source):
        session.run("python", "-c", "import setuptools.build_meta as b; "
                    f"print(b.build_sdist({str(tmp / 'dist')!r}))", silent=True)
    (sdist,) = (tmp / "dist").glob("customfit-*.tar.gz")
    environments: dict[tuple[str, ...], Path] = {}
    ran: dict[tuple, str] = {}
    for page in EXAMPLE_PAGES:
        for example in examples(page):
            key = (example.installs, tuple(example.env.items()), example.code, example.command)
            if key in ran:
                session.log(f"{example.where}: the same as {ran[key]}")
                continue
            ran[key] = example.where
            session.log(f"{example.where}: {' && '.join(example.installs)}")
            python = environments.get(example.installs)
            if python is None:
                venv = tmp / f"env{len(environments)}"
                shutil.rmtree(venv, ignore_errors=True)
                session.run("python", "-m", "venv", str(venv))
                python = venv / "bin" / "python"
                for line in example.installs:
                    session.run(str(python), "-m", "pip", "install", "--quiet",
                                *_pip_arguments(line, str(sdist)), external=True)
                environments[example.installs] = python
            # Keras' default backend unless the page sets one; nothing of the
            # caller's Python path.
            env = {"KERAS_BACKEND": "tensorflow", **example.env, "PYTHONPATH": "",
                   "TF_CPP_MIN_LOG_LEVEL": "3"}
            if env["KERAS_BACKEND"] != "tensorflow":
                # customfit needs no TensorFlow there, as the page says.
                session.run(str(python), "-c", "import importlib.util, keras; "
                            "assert importlib.util.find_spec('tensorflow') is None; "
                            f"assert keras.backend.backend() == {env['KERAS_BACKEND']!r}",
                            env=env, external=True)
            run = tmp / "run"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir()
            with session.chdir(run):
                if example.command:
                    script, *arguments = shlex.split(example.command)[1:]
                    session.run(str(python), str(ROOT / script), *arguments,
                                env=env, external=True)
                else:
                    session.run(str(python), "-c", example.code, env=env, external=True)
    # Each environment holds a whole Keras stack: not kept for the next run.
    for path in (*(python.parent.parent for python in environments.values()), source, run):
        shutil.rmtree(path)
