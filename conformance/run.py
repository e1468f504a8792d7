"""Keras' own tests, run against `customfit.CustomModel`.

    python3 conformance/run.py                  # CustomModel, against differences.toml
    python3 conformance/run.py --control run    # then the same rewrite on keras.Model
    python3 conformance/run.py --control auto   # the control only when not yet passed
                                                # for this Keras and this harness
    python3 conformance/run.py --backend jax    # on Keras' JAX backend, in an
                                                # environment without TensorFlow
    python3 conformance/run.py --backend torch  # on Keras' PyTorch backend, likewise

Takes the test files of the installed Keras from its source distribution on
the package index (`pip download --no-binary :all: --no-deps keras==<version>`,
cached), rewrites their model bases (`rewrite.py`) to `customfit.CustomModel`
(or, for the control run, back to `keras.Model`), and runs them with pytest
under Keras' own warning filters, on the backend `--backend` names. Every
test that fails on CustomModel must be listed in `differences.toml` (its
top-level entries for TensorFlow, its `[jax]` and `[torch]` tables' for
JAX and PyTorch) with its reason
and the documentation section that documents it; an unlisted failure, a
listed test that passes, or a section that does not exist fails the run. The
control run must pass everything that is not excluded.

The JAX and PyTorch runs are for an environment without TensorFlow, as
such a user's is (`nox -s jax` and `nox -s torch` make one): a test that
needs TensorFlow is skipped there, with that reason (see
harness/conftest.py), on both bases alike. (The PyTorch run's environment
has JAX too: Keras' trainer_test.py imports it at module level, as Keras'
own CI has every backend installed.)
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent
HARNESS = HERE / "harness"
DIFFERENCES = HERE / "differences.toml"

sys.path.insert(0, str(HERE))
from rewrite import (  # noqa: E402
    lazy_tensorflow_imports,
    leftovers,
    rewrite,
    tensorflow_leftovers,
    unskip_torch_steps_per_execution,
)

BACKENDS = ("tensorflow", "jax", "torch")
# The skip reason harness/conftest.py gives a test that needs TensorFlow.
NEEDS_TENSORFLOW = "needs TensorFlow, which is not installed"

# Test files taken from the sdist, relative to keras/src/.
SELECTED = (
    "trainers/trainer_test.py",
    "models/model_test.py",
    "saving/saving_lib_test.py",
    "callbacks/*_test.py",
)


def keras_distribution() -> tuple[str, str]:
    """The installed distribution that provides `keras`, and its version."""
    for name in ("keras", "keras-nightly"):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise SystemExit("Keras is not installed.")


def sdist_path(name: str, version: str, cache: Path) -> Path:
    """The source distribution of `name==version`, downloaded once."""
    cache.mkdir(parents=True, exist_ok=True)

    def found() -> list[Path]:
        stem = f"{name}-{version}.tar.gz".lower().replace("-", "_")
        return [p for p in cache.glob("*.tar.gz")
                if p.name.lower().replace("-", "_") == stem]

    if not found():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary",
             ":all:", "--no-deps", "--dest", str(cache), f"{name}=={version}"],
            check=True)
    found = found()
    if len(found) != 1:
        raise SystemExit(f"Expected one sdist of {name}=={version} in {cache}, found {found}.")
    return found[0]


def load_config(backend: str) -> dict:
    """The `[[difference]]` and `[[excluded]]` entries for `backend`: the
    top-level ones for TensorFlow, the `[jax]` or `[torch]` table's for
    JAX or PyTorch."""
    with open(DIFFERENCES, "rb") as f:
        config = tomllib.load(f)
    kinds = {"difference", "excluded"}
    unknown = set(config) - kinds - (set(BACKENDS) - {"tensorflow"})
    unknown |= {f"{other}.{key}" for other in BACKENDS[1:]
                for key in set(config.get(other, {})) - kinds}
    if unknown:
        raise SystemExit(f"differences.toml: unknown tables {sorted(unknown)}")
    if backend != "tensorflow":
        config = config.get(backend, {})
    prefix = "" if backend == "tensorflow" else f"{backend}."
    for section in ("difference", "excluded"):
        for entry in config.get(section, []):
            missing = {"tests", "reason"} - set(entry)
            if section == "difference":
                missing |= {"documented_in"} - set(entry)
            if missing:
                raise SystemExit(f"differences.toml: a [[{prefix}{section}]] entry lacks "
                                 f"{missing}: {entry}")
    return {section: config.get(section, []) for section in kinds}


def matches(nodeid: str, patterns: list[str]) -> bool:
    """Exact node ids, or a trailing `*` for a prefix (`[` is literal)."""
    return any(nodeid == p or (p.endswith("*") and nodeid.startswith(p[:-1]))
               for p in patterns)


def build(sdist: Path, target: Path, backend: str, base: str) -> list[str]:
    """Extracts and rewrites the selected test files into `target` (for a
    backend other than TensorFlow, their module-level TensorFlow imports
    too; for `CustomModel` on PyTorch, Keras' skips of its
    `steps_per_execution` tests there); returns their paths relative to
    it."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    written = []
    problems = []
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers()
                   if m.isfile() and "/" in m.name}
        pyproject = tomllib.loads(archive.extractfile(members["pyproject.toml"]).read().decode())
        for pattern in SELECTED:
            names = sorted(n for n in members if fnmatch.fnmatch(n, f"keras/src/{pattern}"))
            if not names:
                problems.append(f"no file in the sdist matches keras/src/{pattern}")
            for name in names:
                source = archive.extractfile(members[name]).read().decode()
                rewritten, counts = rewrite(source)
                remaining = leftovers(rewritten)
                if remaining:
                    problems.append(f"{name}: model bases left unrewritten: {remaining}")
                if backend != "tensorflow":
                    rewritten, _ = lazy_tensorflow_imports(rewritten)
                    remaining = tensorflow_leftovers(rewritten)
                    if remaining:
                        problems.append(f"{name}: module-level TensorFlow imports left "
                                        f"unrewritten: {remaining}")
                if backend == "torch" and base == "customfit":
                    rewritten, _ = unskip_torch_steps_per_execution(rewritten)
                relative = name.removeprefix("keras/src/")
                path = target / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(rewritten)
                written.append(relative)
    if problems:
        raise SystemExit("The rewrite is incomplete:\n  " + "\n  ".join(problems))
    for name in ("conftest.py", "conformance_base.py"):
        shutil.copy(HARNESS / name, target / name)
    options = pyproject.get("tool", {}).get("pytest", {}).get("ini_options", {})
    filters = "\n".join(f"    {f}" for f in options.get("filterwarnings", []))
    (target / "pytest.ini").write_text(
        "[pytest]\n# Keras' own warning filters, from its pyproject.toml.\n"
        f"filterwarnings =\n{filters}\n")
    return written


def run_pytest(target: Path, base: str, backend: str, excluded: list[str], workers: int,
               extra: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Every test's outcome, and every skipped test's reason."""
    outcomes_file = target / f"outcomes-{base}.json"
    env = dict(os.environ, CUSTOMFIT_CONFORMANCE_BASE=base,
               CUSTOMFIT_CONFORMANCE_OUTCOMES=str(outcomes_file),
               CUSTOMFIT_CONFORMANCE_EXCLUDED=json.dumps(excluded),
               KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "pytest", str(target), "-c", str(target / "pytest.ini"),
               "--rootdir", str(target), "-p", "no:cacheprovider", "-q",
               "--no-header", "-rN", *(["-n", str(workers)] if workers > 1 else []),
               *(extra or ["--tb=line"])]
    subprocess.run(command, cwd=target, env=env)
    if not outcomes_file.exists():
        raise SystemExit("pytest did not record any outcome (see its output above).")
    recorded = json.loads(outcomes_file.read_text())
    return recorded["outcomes"], recorded["skip_reasons"]


def documented(reference: str) -> bool:
    """Whether `reference`, "page.md#Heading", names a heading (or a bold
    paragraph title such as **Every batch, ...**) on that page of docs/."""
    page, _, heading = reference.partition("#")
    path = REPOSITORY / "docs" / page
    if not path.is_file() or not heading:
        return False
    text = path.read_text()
    titles = {m.group(1).strip() for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}
    titles |= {m.group(1).strip().rstrip(".") for m in re.finditer(r"^\*\*(.+?)\*\*", text,
                                                                   re.MULTILINE)}
    return heading in titles


def compare(outcomes: dict[str, str], config: dict, base: str) -> list[str]:
    """What is wrong with this run's outcomes, as messages (empty: all good)."""
    problems = []
    bad = {t for t, o in outcomes.items() if o in ("failed", "error")}
    if base == "keras":
        return [f"control run: {t} {outcomes[t]}" for t in sorted(bad)]
    differences = config["difference"]
    listed = [p for entry in differences for p in entry["tests"]]
    for test in sorted(bad):
        if not matches(test, listed):
            problems.append(f"not listed in differences.toml: {test} {outcomes[test]}")
    for entry in differences:
        for pattern in entry["tests"]:
            hits = [t for t in outcomes if matches(t, [pattern])]
            if not hits:
                problems.append(f"differences.toml lists {pattern}, which did not run")
            elif not any(t in bad for t in hits):
                problems.append(f"differences.toml lists {pattern}, which now passes: remove it")
    for entry in differences:
        if not documented(entry["documented_in"]):
            problems.append(f"differences.toml refers to {entry['documented_in']!r}, "
                            "which is no page and heading of docs/")
    return problems


def harness_fingerprint(name: str, version: str, backend: str) -> str:
    """What a control run vouches for: the Keras release, the backend and
    every file that shapes the rewritten tests."""
    digest = hashlib.sha256(f"{name}=={version} {backend}".encode())
    for path in sorted([HERE / "rewrite.py", HERE / "run.py", DIFFERENCES,
                        *HARNESS.glob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def summary(outcomes: dict[str, str]) -> dict[str, dict[str, int]]:
    per_file: dict[str, Counter] = {}
    for test, outcome in outcomes.items():
        per_file.setdefault(test.split("::", 1)[0], Counter())[outcome] += 1
    total = sum(per_file.values(), Counter())
    return {**{k: dict(v) for k, v in sorted(per_file.items())}, "total": dict(total)}


def skipped_by_reason(skip_reasons: dict[str, str]) -> Counter:
    """How many tests were skipped for each reason (the TensorFlow one
    without the line that imported TensorFlow)."""
    return Counter(NEEDS_TENSORFLOW if reason.startswith(NEEDS_TENSORFLOW) else reason
                   for reason in skip_reasons.values())


def needing_tensorflow(skip_reasons: dict[str, str]) -> set[str]:
    return {t for t, reason in skip_reasons.items() if reason.startswith(NEEDS_TENSORFLOW)}


def run_base(base: str, backend: str, name: str, version: str, sdist: Path, config: dict,
             workers: int, pytest_args: list[str]
             ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Builds and runs the tests on one base; returns the problems found, the
    outcomes and the skip reasons."""
    started = time.monotonic()
    excluded = [p for entry in config["excluded"] for p in entry["tests"]]
    target = HERE / ".build" / f"{name}-{version}-{backend}-{base}"
    files = build(sdist, target, backend, base)
    print(f"{len(files)} test files of {name} {version}, backend: {backend}, "
          f"model base: {base}", flush=True)
    outcomes, skip_reasons = run_pytest(target, base, backend, excluded, workers, pytest_args)
    counts = summary(outcomes)
    (target.parent / f"summary-{name}-{version}-{backend}-{base}.json").write_text(
        json.dumps({"keras": version, "backend": backend, "base": base, "outcomes": counts,
                    "skipped": dict(skipped_by_reason(skip_reasons))}, indent=1))
    for file, by_outcome in counts.items():
        print(f"  {file}: " + ", ".join(f"{n} {o}" for o, n in sorted(by_outcome.items())))
    for reason, n in sorted(skipped_by_reason(skip_reasons).items()):
        print(f"  skipped, {reason}: {n}")
    print(f"  {base} on {backend}: {time.monotonic() - started:.0f} s", flush=True)
    return [] if pytest_args else compare(outcomes, config, base), outcomes, skip_reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control", choices=["skip", "run", "auto"], default="skip",
                        help="also run the rewritten tests on plain keras.Model: "
                             "always, or only when no control has passed yet for "
                             "this Keras release and these harness files")
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow",
                        help="Keras' backend to run the tests on (jax, torch: in an environment "
                             "without TensorFlow)")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist processes")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "customfit-conformance",
                        help="where the Keras sdist and passed controls are kept")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    started = time.monotonic()
    if args.backend != "tensorflow" and importlib.util.find_spec("tensorflow") is not None:
        raise SystemExit(f"--backend {args.backend} runs in an environment without TensorFlow, "
                         "which differences.toml's entries for it assume (python3 -m nox "
                         f"-s {args.backend} makes one); TensorFlow is installed here.")
    name, version = keras_distribution()
    sdist = sdist_path(name, version, args.cache)
    config = load_config(args.backend)
    problems, _, skip_reasons = run_base("customfit", args.backend, name, version, sdist,
                                         config, args.workers, args.pytest_args)
    fingerprint = harness_fingerprint(name, version, args.backend)
    passed_control = args.cache / f"control-passed-{fingerprint}"
    if args.control == "run" or (args.control == "auto" and not passed_control.exists()):
        control, _, control_skip_reasons = run_base(
            "keras", args.backend, name, version, sdist, config, args.workers,
            args.pytest_args)
        if not control and not args.pytest_args:
            # The tests the control skipped, for the runs that do not
            # repeat it (see below).
            passed_control.write_text(json.dumps(sorted(control_skip_reasons)))
        problems += control
        control_skipped = set(control_skip_reasons)
    else:
        if args.control == "auto":
            print(f"control: passed before for {name} {version} on {args.backend} and this "
                  f"harness ({passed_control.name})")
        control_skipped = (set(json.loads(passed_control.read_text() or "null") or ())
                           if passed_control.exists() else None)
    if control_skipped is not None and not args.pytest_args:
        # customfit must need TensorFlow nowhere stock fit does not: a
        # test it skips for that reason must be skipped on keras.Model too.
        problems += [f"skipped on CustomModel ({NEEDS_TENSORFLOW}), not on keras.Model: {t}"
                     for t in sorted(needing_tensorflow(skip_reasons) - control_skipped)]
    print(f"took {time.monotonic() - started:.0f} s")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
