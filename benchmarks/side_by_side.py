"""The same comparison on every Keras backend, side by side:

    python3 benchmarks/run.py --backend tensorflow jax \\
        --python jax=/work/jaxenv/bin/python --out benchmarks/results/backends
    python3 benchmarks/run.py --quick --backend tensorflow jax   # smoke run

Keras picks its backend when it is imported, so each backend runs in a
subprocess of its own (`KERAS_BACKEND` set; the interpreter from `--python
BACKEND=PATH`, else this one); this process imports no backend, collects
what each subprocess measured and writes one report.

In each subprocess, written with Keras APIs only: the MLP of `models.py`
(784-512-10, Dropout, RMSprop, batch 32) on generated NumPy data, trained
four ways, one epoch of the same batches each:

- `stock_fit`: that backend's `keras.Model.fit`;
- `custom_default`: `customfit.CustomModel.fit`, the default step;
- `custom_auto`: the same with `compile(steps_per_execution="auto")`;
- `compute_only`: the limit, the step's maths alone without metrics, logs
  or callbacks, written for that backend (`compute_only_<backend>.py`: on
  TensorFlow the whole epoch in one `tf.function`; on JAX one jitted
  `jax.lax.scan` over the epoch's batches; on PyTorch the step's maths run
  eagerly, batch after batch, as Keras' PyTorch trainer runs its step).

All compile with Keras' defaults (`jit_compile="auto"`: XLA on JAX, not on
TensorFlow on a CPU, eager on PyTorch). After untimed epochs (tracing, compilation, and until
"auto" settles on its number of batches per execution), each block times one
epoch of every variant, in an order that changes from block to block
(`ORDERS`): the two epochs of each compared pair run next to each other or
one apart, each first in half the blocks, so that slow drifts of the machine
cancel in the ratios taken within a block.
The report gives each ratio's median over blocks with its quartiles and a
95% confidence interval of the median (order statistics), the Python
function calls each batch adds (cProfile), and how busy the machine was:
the 1-minute load average and the cores other processes kept busy
(/proc/stat's busy time minus this subprocess's own CPU time).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

OVERHEAD_TARGET = 0.02  # default CustomModel step vs stock fit: time per step
AUTO_SPEEDUP_TARGET = 1.3  # "auto" vs stock fit: speed
AUTO_VS_LIMIT_TARGET = 0.95  # "auto" vs the compute-only limit: speed
VARIANTS = ("stock_fit", "custom_default", "custom_auto", "compute_only")
LABELS = {
    "stock_fit": "`keras.Model.fit`",
    "custom_default": "`CustomModel.fit`, default step",
    "custom_auto": '`CustomModel.fit`, `steps_per_execution="auto"`',
    "compute_only": "compute-only limit",
}
LIMIT_LABELS = {
    "tensorflow": "whole epoch in one `tf.function`",
    "jax": "one jitted `jax.lax.scan` over the epoch",
    "torch": "the step's maths eagerly, batch after batch",
}


# ------------------------------------------------------------------ machine load


class Load:
    """How busy the machine is, sampled between timed epochs: the 1-minute
    load average, and the cores other processes kept busy since the last
    sample (all CPUs' busy time in /proc/stat, less this process's own)."""

    def __init__(self) -> None:
        self.load_1min: list[float] = []
        self.other_cores: list[float] = []
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + fields[4]  # idle, iowait
        busy = sum(fields[:8]) - idle  # user .. steal
        ticks = os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), busy / ticks, own.user + own.system

    def sample(self) -> None:
        self.load_1min.append(os.getloadavg()[0])
        now = self._read()
        if now is not None and self._last is not None:
            wall = now[0] - self._last[0]
            if wall > 0:
                others = (now[1] - self._last[1]) - (now[2] - self._last[2])
                self.other_cores.append(max(others, 0.0) / wall)
        self._last = now


# --------------------------------------------------------------- the subprocess


def fit_variant(base: type, x: Any, y: Any, **compile_kwargs: Any) -> Callable[[], None]:
    import keras
    from models import BATCH_SIZE, mlp

    model = mlp(base)
    model.compile(keras.optimizers.RMSprop(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], **compile_kwargs)

    def run(x: Any = x, y: Any = y) -> None:
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0, shuffle=False)

    run.model = model  # type: ignore[attr-defined]
    return run


def auto_tuner(run: Callable) -> Any:
    auto = getattr(getattr(run, "model", None), "_auto_steps", None)
    return None if auto is None else auto.tuners["train"]


def python_calls_per_batch(run: Callable, x: Any, y: Any, steps: int) -> float:
    """Python function calls each batch adds to an epoch of `run`: those of
    an epoch of `2 * steps` batches minus those of one of `steps`, so that
    what `fit` does once per call does not count (cProfile's count: the same
    on any machine, unlike times)."""
    from models import BATCH_SIZE

    counts = []
    for length in (steps, 2 * steps):
        xs, ys = x[: length * BATCH_SIZE], y[: length * BATCH_SIZE]
        run(xs, ys)  # untimed: a new length may trace again
        profile = cProfile.Profile()
        profile.enable()
        run(xs, ys)
        profile.disable()
        counts.append(sum(stat[1] for stat in pstats.Stats(profile).stats.values()))
    return (counts[1] - counts[0]) / steps


ORDERS = (
    ("stock_fit", "custom_default", "custom_auto", "compute_only"),
    ("compute_only", "custom_auto", "custom_default", "stock_fit"),
    ("custom_default", "stock_fit", "custom_auto", "compute_only"),
    ("compute_only", "custom_auto", "stock_fit", "custom_default"),
)


def block_order(block: int) -> tuple[str, ...]:
    """The variants' order in block `block`, cycling through `ORDERS`: the
    two epochs of each compared pair (default step and stock fit, "auto"
    and stock fit, "auto" and the limit) run next to each other or one
    apart, and each of the two runs first in half the blocks."""
    return ORDERS[block % len(ORDERS)]


def child(args: argparse.Namespace) -> None:
    import keras
    import numpy as np
    from models import BATCH_SIZE, arrays

    import customfit

    backend = keras.backend.backend()
    if backend != args.child:
        raise SystemExit(f"asked for the {args.child} backend, Keras runs {backend}")
    limit = importlib.import_module(f"compute_only_{backend}")
    x, y = arrays("mlp", args.steps)
    started = time.perf_counter()
    runs: dict[str, Callable] = {}
    for name in VARIANTS:
        keras.utils.set_random_seed(0)
        if name == "compute_only":
            runs[name] = limit.prepare("mlp", x, y, BATCH_SIZE)
        else:
            base = keras.Model if name == "stock_fit" else customfit.CustomModel
            extra = {"steps_per_execution": "auto"} if name == "custom_auto" else {}
            runs[name] = fit_variant(base, x, y, **extra)
    for run in runs.values():  # untimed: tracing, compilation
        run()
        run()
    tuner = auto_tuner(runs["custom_auto"])
    warmup = 0
    while not tuner.settled and warmup < args.auto_warmup:
        runs["custom_auto"]()
        warmup += 1
    steps_at_start = tuner.steps
    print(f"[{backend}] ready in {time.perf_counter() - started:.0f} s; \"auto\" at "
          f"{tuner.steps} batches per execution ({'settled' if tuner.settled else 'searching'}"
          f" after {warmup} more epochs); timing {args.blocks} blocks of {args.steps} steps",
          flush=True)

    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    load = Load()
    timed = time.perf_counter()
    for block in range(args.blocks):
        for name in block_order(block):
            start, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu)
        load.sample()
        if args.blocks >= 10 and (block + 1) % max(args.blocks // 5, 1) == 0:
            print(f"[{backend}] block {block + 1}/{args.blocks}, load {load.load_1min[-1]:.1f}",
                  flush=True)
    timed = time.perf_counter() - timed
    settled = f"{tuner.steps} ({'settled' if tuner.settled else 'still searching'})"

    calls = {}
    if args.calls_steps:
        for name in ("stock_fit", "custom_default", "custom_auto"):
            calls[name] = python_calls_per_batch(runs[name], x, y, args.calls_steps)

    versions = {"python": platform.python_version(), "keras": keras.__version__,
                "customfit": customfit.__version__, "numpy": np.__version__}
    if backend == "jax":
        import jax

        versions["jax"] = jax.__version__
        device = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    elif backend == "torch":
        import torch

        versions["torch"] = torch.__version__
        device = "GPU" if torch.cuda.is_available() else "cpu"
    else:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
        gpus = tf.config.list_physical_devices("GPU")
        device = "GPU" if gpus else "cpu"
    result = {
        "backend": backend, "versions": versions, "device": device,
        "steps": args.steps, "batch_size": BATCH_SIZE, "blocks": args.blocks,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "auto_settled_on": settled,
        "auto_steps_at_start": steps_at_start, "auto_warmup_epochs": warmup,
        # seconds per batch of the last executions timed at each number tried
        "auto_tuner_times": {str(k): v for k, v in tuner.times.items()},
        "python_calls_per_batch": calls, "calls_steps": args.calls_steps,
        "load_1min": load.load_1min, "other_cores": load.other_cores,
        "timed_seconds": timed, "total_seconds": time.perf_counter() - started,
    }
    Path(args.result).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------- statistics


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order
    statistics `j` and `n + 1 - j` with `P(Binomial(n, 1/2) < j) <= (1 -
    level) / 2`. The whole range when `n` is too small for the level."""
    ordered = sorted(values)
    n = len(ordered)
    tail, j, cumulative = (1 - level) / 2, 0, 0.0
    while j < n:
        cumulative += math.comb(n, j) / 2**n
        if cumulative > tail:
            break
        j += 1
    j = max(j, 1)  # P(X < j) <= tail; 1-based ranks j and n + 1 - j
    return ordered[j - 1], ordered[n - j]


def summary(values: list[float]) -> dict[str, Any]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    low, high = median_ci(values)
    return {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2],
            "ci95": [low, high], "n": len(values)}


def verdict(stats: dict, target: float, at_least: bool) -> str:
    """"met" or "MISSED" by the median; "(not resolved)" when the
    confidence interval of the median holds the target."""
    def good(value: float) -> bool:
        return value >= target if at_least else value <= target

    result = "met" if good(stats["median"]) else "MISSED"
    low, high = stats["ci95"]
    if good(low) != good(high):
        result += " (not resolved: the 95% CI holds the target)"
    return result


def analyse(result: dict) -> dict[str, Any]:
    s, cpu = result["seconds"], result["cpu_seconds"]
    blocks = range(len(s["stock_fit"]))
    ratios = {
        # time per step of the default step over stock fit's
        "default_vs_stock_time": [s["custom_default"][i] / s["stock_fit"][i] for i in blocks],
        # the same in this process's CPU time: what other processes take
        # from it while it waits for a core does not count
        "default_vs_stock_cpu": [cpu["custom_default"][i] / cpu["stock_fit"][i] for i in blocks],
        # speeds: the other's time over "auto"'s
        "auto_vs_stock_speed": [s["stock_fit"][i] / s["custom_auto"][i] for i in blocks],
        "auto_vs_limit_speed": [s["compute_only"][i] / s["custom_auto"][i] for i in blocks],
        # the headroom over stock fit that batches per execution work within
        "limit_vs_stock_speed": [s["stock_fit"][i] / s["compute_only"][i] for i in blocks],
    }
    stats = {name: summary(values) for name, values in ratios.items()}
    stats["default_vs_stock_time"]["verdict"] = verdict(
        stats["default_vs_stock_time"], 1 + OVERHEAD_TARGET, at_least=False)
    stats["default_vs_stock_cpu"]["verdict"] = verdict(
        stats["default_vs_stock_cpu"], 1 + OVERHEAD_TARGET, at_least=False)
    stats["auto_vs_stock_speed"]["verdict"] = verdict(
        stats["auto_vs_stock_speed"], AUTO_SPEEDUP_TARGET, at_least=True)
    stats["auto_vs_limit_speed"]["verdict"] = verdict(
        stats["auto_vs_limit_speed"], AUTO_VS_LIMIT_TARGET, at_least=True)
    return stats


# --------------------------------------------------------------------- report


def _interval(stats: dict, fmt: str) -> str:
    low, high = stats["ci95"]
    return (f"{format(stats['median'], fmt)} ({format(stats['q1'], fmt)}-"
            f"{format(stats['q3'], fmt)}; CI {format(low, fmt)}-{format(high, fmt)})")


def _spread(values: list[float]) -> str:
    if not values:
        return "not measured"
    return f"{statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


def backend_report(result: dict, stats: dict) -> str:
    backend = result["backend"]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    s = result["seconds"]
    steps = result["steps"]
    calls = result["python_calls_per_batch"]
    lines = [
        f"### {backend}", "",
        f"{versions}; device: {result['device']}. {result['blocks']} blocks of one "
        f"{steps}-step epoch (batch {result['batch_size']}) per variant; \"auto\" ran "
        f"{result['auto_steps_at_start']} batches per execution when the timing began, "
        f"{result['auto_settled_on']} when it ended. Load during the timed blocks: "
        f"1-minute load average {_spread(result['load_1min'])}; cores kept busy by other "
        f"processes {_spread(result['other_cores'])} of {os.cpu_count()}; timed part "
        f"{result['timed_seconds']:.0f} s, whole subprocess {result['total_seconds']:.0f} s.",
        "",
        "| variant | steps/s, median (quartiles) | ms per step: median, fastest epoch "
        "| CPU ms per step, median | Python calls per batch |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in VARIANTS:
        speeds = [steps / t for t in s[name]]
        q = statistics.quantiles(speeds, n=4) if len(speeds) > 1 else [speeds[0]] * 3
        label = LABELS[name] + (f": {LIMIT_LABELS[backend]}" if name == "compute_only" else "")
        cpu = 1e3 * statistics.median(result["cpu_seconds"][name]) / steps
        count = f"{calls[name]:.0f}" if name in calls else "-"
        wall = f"{1e3 * statistics.median(s[name]) / steps:.2f}, {1e3 * min(s[name]) / steps:.2f}"
        lines.append(f"| `{name}`: {label} | {statistics.median(speeds):.0f} "
                     f"({q[0]:.0f}-{q[2]:.0f}) | {wall} | {cpu:.2f} | {count} |")
    a, a_cpu, b, c, d = (stats[k] for k in (
        "default_vs_stock_time", "default_vs_stock_cpu", "auto_vs_stock_speed",
        "auto_vs_limit_speed", "limit_vs_stock_speed"))
    lines += [
        "",
        "| measure (paired within blocks) | median (quartiles; 95% CI of the median) "
        "| target | result |",
        "| --- | ---: | ---: | --- |",
        f"| default step vs stock fit, time per step | {_interval(a, '.3f')} "
        f"| <= {1 + OVERHEAD_TARGET:.2f} | {a['verdict']} |",
        f"| the same in CPU time per step | {_interval(a_cpu, '.3f')} "
        f"| <= {1 + OVERHEAD_TARGET:.2f} | {a_cpu['verdict']} |",
        f"| \"auto\" vs stock fit, speed | {_interval(b, '.3f')} "
        f"| >= {AUTO_SPEEDUP_TARGET:.2f} | {b['verdict']} |",
        f"| \"auto\" vs compute-only limit, speed | {_interval(c, '.3f')} "
        f"| >= {AUTO_VS_LIMIT_TARGET:.2f} | {c['verdict']} |",
        f"| compute-only limit vs stock fit, speed: the headroom over stock fit "
        f"| {_interval(d, '.3f')} | | |",
        "",
        "Fastest epoch: the least disturbed by other processes. CPU ms per step: "
        "this subprocess's CPU time (all its threads) over the epoch's steps." + (
            " Python calls per batch: cProfile's count for an epoch of "
            f"{2 * result['calls_steps']} batches minus one of {result['calls_steps']}, "
            "divided by the difference." if result["calls_steps"] else ""),
    ]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# ------------------------------------------------------------------ the parent


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run.py --backend", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", choices=["tensorflow", "jax", "torch"],
                        help="the backends to compare, each in a subprocess")
    parser.add_argument("--python", nargs="+", default=[], metavar="BACKEND=PATH",
                        help="the interpreter of a backend (default: this one)")
    parser.add_argument("--blocks", type=int, default=61,
                        help="timed blocks, one epoch of each variant each")
    parser.add_argument("--steps", type=int, default=200, help="training steps per epoch")
    parser.add_argument("--calls-steps", type=int, default=64,
                        help="epoch length of the Python-call count (0: skip it)")
    parser.add_argument("--auto-warmup", type=int, default=30,
                        help="most untimed epochs of \"auto\" to let it settle")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3 blocks of 20 steps")
    parser.add_argument("--out", type=Path, help="write the report (.md) and numbers (.json)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the report of a run written by --out, running nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks, args.steps, args.calls_steps, args.auto_warmup = 3, 20, 0, 2
    return args


def render(run: dict) -> str:
    """The report of a run: what `--out` writes as .md, from the numbers
    it writes as .json."""
    report = [
        f"Machine: {run['machine']}; 1-minute load average {run['load_at_start']:.1f} when "
        f"the run started, {run['load_at_end']:.1f} when it ended; {run['seconds']:.0f} s in "
        "all.", "",
    ]
    for result in run["results"].values():
        report += [backend_report(result, analyse(result)), ""]
    report += [f"FAILED: {name}" for name in run["failed"]]
    return "\n".join(report).rstrip() + "\n"


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.child:
        child(args)
        return 0
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return 0
    if not args.backend:
        raise SystemExit("--backend: name at least one backend")
    pythons = dict(item.split("=", 1) for item in args.python)
    unknown = set(pythons) - set(args.backend)
    if unknown:
        raise SystemExit(f"--python names backends not compared: {sorted(unknown)}")
    started = time.perf_counter()
    load_before = os.getloadavg()
    results, failed = {}, []
    for backend in args.backend:
        python = pythons.get(backend, sys.executable)
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "result.json"
            command = [python, str(HERE / "side_by_side.py"), "--child", backend,
                       "--result", str(path), "--blocks", str(args.blocks),
                       "--steps", str(args.steps), "--calls-steps", str(args.calls_steps),
                       "--auto-warmup", str(args.auto_warmup)]
            print(f"[{backend}] {python}", flush=True)
            done = subprocess.run(command, env=env, cwd=ROOT)
            if done.returncode or not path.exists():
                failed.append(f"{backend} (exit status {done.returncode})")
                continue
            results[backend] = json.loads(path.read_text())
    run = {"machine": machine(), "load_at_start": load_before[0],
           "load_at_end": os.getloadavg()[0], "seconds": time.perf_counter() - started,
           "failed": failed, "results": results}
    text = render(run)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        run["statistics"] = {b: analyse(result) for b, result in results.items()}
        args.out.with_suffix(".json").write_text(json.dumps(run, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
