"""Run a training step in several execution settings and compare the results.

The reference is a compiled step (`run_eagerly=False`), one replica,
`steps_per_execution=1`. Against it: the same batches eagerly, with
`steps_per_execution=k`, and on two replicas (on TensorFlow
`MirroredStrategy` over two logical CPUs, on JAX `keras.distribution.
DataParallel` over two CPU devices; the same global batch). The devices must
be configured before the backend starts, so the two-replica run happens in a
fresh Python process (`python -m customfit._step_check SPEC`), which imports
the model's build function by its "module:function" name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from customfit._backend import BACKEND, loop
from customfit._diagnose import Finding, diagnose, replay_refusal
from customfit._training_parity import TrainingRecord, differences, fresh_compile_kwargs

# Two replicas sum their gradients in a different order than one replica
# computing the whole batch, and every float32 addition may round
# differently: a few ulps per step. The tolerance below allows that
# (relative 1e-5 of the value, absolute 1e-6) and nothing of the size of a real
# mistake, which changes values by whole percents (a doubled update, a halved
# loss).
REPLICA_RTOL = 1e-5
REPLICA_ATOL = 1e-6

# On TensorFlow the eager step runs the graph's kernels: bit for bit. On JAX
# it runs op by op while the jitted step is fused by XLA, which rounds
# float32 differently by a few ulps (observed: 1.5e-8 after 3 SGD steps).
# On PyTorch every step runs eagerly: bit for bit.
EAGER_TOLERANCE = {
    "tensorflow": (0.0, 0.0),
    "jax": (REPLICA_RTOL, REPLICA_ATOL),
    "torch": (0.0, 0.0),
}

REPLICAS_SETTING = {
    "tensorflow": "2 replicas (MirroredStrategy, same global batch)",
    "jax": "2 devices (keras.distribution.DataParallel, same global batch)",
}
NO_REPLICAS_ON_TORCH = (
    "Two replicas were not compared: Keras' PyTorch backend has no "
    "keras.distribution, and fit runs on one device of one process there."
)


@dataclasses.dataclass
class Comparison:
    """One setting compared with the reference run.

    Attributes:
        setting: e.g. "eager (run_eagerly=True)".
        rtol, atol: The tolerance used (0, 0: bit for bit).
        max_abs_diff: Largest difference over weights and History values.
        differences: One line per differing History value or weight.
    """

    setting: str
    rtol: float
    atol: float
    max_abs_diff: float
    differences: list[str]

    @property
    def ok(self) -> bool:
        return not self.differences


@dataclasses.dataclass
class StepReport:
    """What `check_step` found. `ok` is True when every setting agreed with
    the reference and no mistake was diagnosed; `str(report)` is a table."""

    comparisons: list[Comparison]
    findings: list[Finding]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons) and not self.findings

    def __str__(self) -> str:
        rows = [
            "setting (vs compiled, 1 replica, steps_per_execution=1) | "
            "tolerance | max abs diff | result"
        ]
        for c in self.comparisons:
            tolerance = (
                "bit for bit"
                if c.rtol == 0 and c.atol == 0
                else (f"rtol={c.rtol:g}, atol={c.atol:g}")
            )
            result = "same" if c.ok else f"DIFFERENT ({len(c.differences)})"
            rows.append(f"{c.setting} | {tolerance} | {c.max_abs_diff:.3g} | {result}")
        for c in self.comparisons:
            for line in c.differences:
                rows.append(f"  {c.setting}: {line}")
        for finding in self.findings:
            rows.append(str(finding))
        rows.extend(self.notes)
        return "\n".join(rows)


def resolve_build(build: str | Callable[[], keras.Model]) -> tuple[str, Callable]:
    """The build function and its "module:function" name, checked to be
    importable by a fresh Python process."""
    how = (
        "check_step() builds the model again in a fresh Python process (two "
        "replicas need logical devices configured before TensorFlow starts), "
        "so it needs a function defined at module level in an importable "
        "module, passed as the function itself or as 'package.module:function'."
    )
    module_name: str | None
    if isinstance(build, str):
        module_name, _, qualname = build.partition(":")
        if not module_name or not qualname:
            raise ValueError(f"build={build!r} is not 'module:function'. {how}")
        reference = build
    else:
        module_name = getattr(build, "__module__", None)
        qualname = getattr(build, "__qualname__", "")
        if module_name in (None, "__main__") or "<" in qualname:
            raise ValueError(
                f"build={build!r} cannot be imported by another process "
                f"(module {module_name!r}, name {qualname!r}). {how}"
            )
        reference = f"{module_name}:{qualname}"
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Cannot import {reference!r}: {error}. {how}") from error
    if not callable(target):
        raise ValueError(f"{reference!r} is not callable. {how}")
    return reference, target


def run_setting(
    build: Callable[[], keras.Model],
    x: Any,
    y: Any,
    *,
    compile_kwargs: Any,
    batch_size: int,
    steps_per_execution: int = 1,
    run_eagerly: bool = False,
    seed: int = 0,
    strategy: Any = None,
) -> tuple[TrainingRecord, dict]:
    """`fit` for one epoch on the given batches, unshuffled; returns what it
    produced and, in a dict, the weights it started from ("start") and the
    weights and `loss` after the first batch ("first", "first_loss")."""
    keras.utils.set_random_seed(seed)
    kwargs = {"optimizer": keras.optimizers.SGD(0.1), **fresh_compile_kwargs(compile_kwargs)}
    kwargs.update(run_eagerly=run_eagerly, steps_per_execution=steps_per_execution)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build()
        # check_step reports what the step does (its findings name the fix);
        # CustomModel's first-step guards would stop the run instead.
        model.training_guards = False
        model.compile(**kwargs)
        if not model.built:
            # Creates the weights now (inference mode: no update, no dropout
            # draw), so that the starting point can be recorded.
            model(_take(x, 1))
    recorder = _FirstBatch()
    history = model.fit(
        x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[recorder]
    )
    first = recorder.first
    record = TrainingRecord(
        model_name=type(model).__name__,
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        weights=[(w.path, np.array(w.numpy(), copy=True)) for w in model.weights],
    )
    if first.get("first_loss") is not None:
        first["first_loss"] = float(first["first_loss"])
    return record, first


class _FirstBatch(keras.callbacks.Callback):
    """Records the weights `fit` starts from ("start") and the weights and
    `loss` after the first batch ("first", "first_loss"). Reads them through
    `self.model`, which on JAX puts the training state back into the
    variables first."""

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, Any] = {}

    def _weights(self) -> list[np.ndarray]:
        return [np.array(w.numpy(), copy=True) for w in self.model.weights]

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.first["start"] = self._weights()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if batch == 0:
            self.first.update(first=self._weights(), first_loss=(logs or {}).get("loss"))


def check_steps(
    builds: list[str | Callable[[], keras.Model]],
    x: Any,
    y: Any = None,
    *,
    compile_kwargs: Any = None,
    batch_size: int = 32,
    steps: int = 3,
    replicas: bool = True,
    seed: int = 0,
    timeout: float = 300,
) -> list[StepReport]:
    """`check_step` for several models, with one two-replica process for all."""
    resolved = [resolve_build(build) for build in builds]
    if steps < 2:
        raise ValueError(f"steps={steps}: steps_per_execution needs at least 2 batches.")
    n = batch_size * steps
    x, y = _take(x, n), _take(y, n)
    common = dict(compile_kwargs=compile_kwargs, batch_size=batch_size, seed=seed)
    two_replicas = None
    notes = []
    if replicas and BACKEND == "torch":
        notes.append(NO_REPLICAS_ON_TORCH)
    elif replicas:
        # Runs while this process works through the other settings.
        two_replicas = _TwoReplicas([name for name, _ in resolved], x, y, **common)
    try:
        return _reports(resolved, x, y, steps, two_replicas, timeout, common, notes)
    finally:
        if two_replicas is not None:
            two_replicas.close()


def _reports(
    resolved: list[tuple[str, Callable]],
    x: Any,
    y: Any,
    steps: int,
    two_replicas: _TwoReplicas | None,
    timeout: float,
    common: dict[str, Any],
    notes_for_all: list[str],
) -> list[StepReport]:
    compile_kwargs, batch_size, seed = (
        common["compile_kwargs"],
        common["batch_size"],
        common["seed"],
    )
    reports = []
    for i, (_, build_fn) in enumerate(resolved):
        reference, first_steps = run_setting(build_fn, x, y, **common)
        eager, _ = run_setting(build_fn, x, y, run_eagerly=True, **common)
        grouped, _ = run_setting(build_fn, x, y, steps_per_execution=steps, **common)
        comparisons = [
            _compare("eager (run_eagerly=True)", reference, eager, *EAGER_TOLERANCE[BACKEND]),
            _compare(f"steps_per_execution={steps}", reference, grouped, 0.0, 0.0),
        ]
        findings: list[Finding] = []
        notes = list(notes_for_all)
        keras.utils.set_random_seed(seed)
        model = build_fn()
        refusal = replay_refusal(model)
        if refusal is None:
            model.compile(
                **{"optimizer": keras.optimizers.SGD(0.1), **fresh_compile_kwargs(compile_kwargs)}
            )
            findings = diagnose(model, _take(x, batch_size), _take(y, batch_size), seed=seed)
        else:
            notes.append(f"diagnose() was not run: {refusal}")
        if two_replicas is not None:
            two, two_first = two_replicas.results(timeout)[i]
            comparisons.append(
                _compare(REPLICAS_SETTING[BACKEND], reference, two, REPLICA_RTOL, REPLICA_ATOL)
            )
            findings += _replica_findings(first_steps, two_first)
        reports.append(StepReport(comparisons, findings, notes))
    return reports


def check_step(
    build: str | Callable[[], keras.Model], x: Any, y: Any = None, **kwargs: Any
) -> StepReport:
    return check_steps([build], x, y, **kwargs)[0]


def _take(data: Any, n: int) -> Any:
    if data is None:
        return None
    if isinstance(data, dict):
        return {k: v[:n] for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(v[:n] for v in data)
    return data[:n]


def _compare(
    setting: str, reference: TrainingRecord, other: TrainingRecord, rtol: float, atol: float
) -> Comparison:
    lines = differences(reference, other, rtol=rtol, atol=atol)
    diffs = [0.0]
    for key, values in reference.history.items():
        for a, b in zip(values, other.history.get(key, [])):
            diffs.append(abs(a - b))
    if len(reference.weights) == len(other.weights):
        for (_, a), (_, b) in zip(reference.weights, other.weights):
            if a.shape == b.shape and a.size:
                diffs.append(float(np.max(np.abs(a.astype("float64") - b))))
    return Comparison(setting, rtol, atol, float(np.nanmax(diffs)), lines)


def _replica_findings(one: dict, two: dict) -> list[Finding]:
    """From the first batch: the same weights and data, so two replicas must
    report the same loss and move the weights as far as one replica."""
    findings = []
    loss_one, loss_two = one.get("first_loss"), two.get("first_loss")
    if loss_one and loss_two is not None and abs(loss_two / loss_one - 0.5) < 0.05:
        findings.append(
            Finding(
                "loss_tracked_per_replica",
                f"With two replicas the first batch's `loss` is {loss_two:.6g}, half "
                f"of the one-replica {loss_one:.6g}: the step reports each "
                "replica's share of the loss (divided by the number of replicas) "
                "instead of the whole. Fix: track the loss with "
                "`self.compute_loss(...)`/`self.compiled_loss(...)` on CustomModel, "
                "or multiply by `tf.distribute.get_strategy().num_replicas_in_sync` "
                "before `tracker.update_state(...)`.",
            )
        )
    if "first" in one and "first" in two and "start" in one:
        step_one = _distance(one["first"], one["start"])
        step_two = _distance(two["first"], one["start"])
        if step_one > 0 and abs(step_two / step_one - 2.0) < 0.2:
            findings.append(
                Finding(
                    "loss_not_scaled_for_replicas",
                    f"With two replicas the first update moves the weights "
                    f"{step_two / step_one:.3g} times as far as with one: each replica "
                    "differentiates the whole loss of its share of the batch, and the "
                    "optimizer sums the replicas' gradients. Fix: compute the loss with "
                    "`self.compute_loss(...)` (it divides by the number of "
                    "replicas), or divide your loss by "
                    "`tf.distribute.get_strategy().num_replicas_in_sync` before "
                    "`tape.gradient`.",
                )
            )
    return findings


def _distance(a: list, b: list) -> float:
    if len(a) != len(b):
        return float("nan")
    return float(np.sqrt(sum(np.sum((np.float64(x) - y) ** 2) for x, y in zip(a, b))))


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    try:
        return {"__keras__": keras.saving.serialize_keras_object(value)}
    except Exception as error:  # noqa: BLE001 - re-raised with the fix named
        raise ValueError(
            f"compile_kwargs value {value!r} cannot be sent to the two-replica "
            "process. Use strings, numbers or Keras objects (registered with "
            "keras.saving.register_keras_serializable if custom)."
        ) from error


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict) and "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if isinstance(value, dict) and "__keras__" in value:
        return keras.saving.deserialize_keras_object(value["__keras__"])
    return value


class _TwoReplicas:
    """The two-replica runs, in a fresh Python started at construction."""

    def __init__(
        self,
        names: list[str],
        x: Any,
        y: Any,
        *,
        compile_kwargs: Any,
        batch_size: int,
        seed: int,
    ) -> None:
        if callable(compile_kwargs):
            compile_kwargs = compile_kwargs()
        self._names = names
        self._results: list[tuple[TrainingRecord, dict]] | None = None
        self._temp = tempfile.TemporaryDirectory()
        self._folder = folder = Path(self._temp.name)
        # Any values: numpy's stubs would match an ndarray to savez's allow_pickle.
        arrays: dict[str, Any] = {}
        for name, data in (("x", x), ("y", y)):
            if isinstance(data, dict):
                arrays.update({f"{name}.{k}": np.asarray(v) for k, v in data.items()})
            elif data is not None:
                arrays[name] = np.asarray(data)
        np.savez(folder / "data.npz", **arrays)
        spec = dict(
            builds=names,
            batch_size=batch_size,
            seed=seed,
            compile_kwargs=_encode(compile_kwargs or {}),
            out=str(folder),
            data=str(folder / "data.npz"),
        )
        (folder / "spec.json").write_text(json.dumps(spec))
        # The parent's import path, so the build function imports the same way.
        path = [p for p in sys.path if p and os.path.isdir(p)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "TF_CPP_MIN_LOG_LEVEL": "3"}
        env["KERAS_BACKEND"] = BACKEND
        if BACKEND == "jax":
            devices = "--xla_force_host_platform_device_count=2"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {devices}".strip()
        # Output goes to a file: a full pipe would stall the process while
        # this one is busy with the other settings.
        self._log = open(folder / "log.txt", "w")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "customfit._step_check", str(folder / "spec.json")],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def results(self, timeout: float) -> list[tuple[TrainingRecord, dict]]:
        if self._results is not None:
            return self._results
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise RuntimeError(
                f"The two-replica run of {', '.join(self._names)} took more than "
                f"{timeout} s; pass a larger timeout= or fewer steps."
            ) from None
        if self._process.returncode != 0:
            self._log.flush()
            stderr = (self._folder / "log.txt").read_text()
            raise RuntimeError(
                f"The two-replica run of {', '.join(self._names)} failed "
                f"({self._process.returncode}):\n{stderr[-4000:]}"
            )
        folder = self._folder
        self._results = []
        for i in range(len(self._names)):
            meta = json.loads((folder / f"out{i}.json").read_text())
            with np.load(folder / f"out{i}.npz") as out:
                weights = [(p, out[f"w{j}"]) for j, p in enumerate(meta["paths"])]
                first = {"first_loss": meta["first_loss"]}
                if meta["has_first"]:
                    first["first"] = [out[f"first{j}"] for j in range(len(weights))]
            self._results.append(
                (TrainingRecord(meta["model_name"], meta["history"], weights), first)
            )
        return self._results

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log.close()
        self._temp.cleanup()


def _two_replicas() -> Any:
    """The two-replica setting of this process: a `MirroredStrategy` over two
    logical CPUs (TensorFlow), or `DataParallel` over the two CPU devices
    `XLA_FLAGS` asked for, set globally (JAX; None returned)."""
    return loop.two_replicas()


def _worker(spec_path: str) -> None:
    strategy = _two_replicas()
    spec = json.loads(Path(spec_path).read_text())
    with np.load(spec["data"]) as data:
        parts: dict[str, Any] = {}
        for key in data.files:
            name, _, sub = key.partition(".")
            if sub:
                parts.setdefault(name, {})[sub] = data[key]
            else:
                parts[name] = data[key]
    out = Path(spec["out"])
    for i, name in enumerate(spec["builds"]):
        _, build = resolve_build(name)
        record, first = run_setting(
            build,
            parts["x"],
            parts.get("y"),
            compile_kwargs=_decode(spec["compile_kwargs"]),
            batch_size=spec["batch_size"],
            seed=spec["seed"],
            strategy=strategy,
        )
        # Any values: numpy's stubs would match an ndarray to savez's allow_pickle.
        weights: dict[str, Any] = {f"w{j}": w for j, (_, w) in enumerate(record.weights)}
        firsts: dict[str, Any] = {f"first{j}": w for j, w in enumerate(first.get("first", []))}
        np.savez(out / f"out{i}.npz", **weights, **firsts)
        (out / f"out{i}.json").write_text(
            json.dumps(
                dict(
                    model_name=record.model_name,
                    history=record.history,
                    paths=[p for p, _ in record.weights],
                    first_loss=first.get("first_loss"),
                    has_first="first" in first,
                )
            )
        )


if __name__ == "__main__":
    _worker(sys.argv[1])
