"""What a custom step costs: every variant in `variants.py`, interleaved and
repeated in one process, as ratios against stock `keras.Model.fit`.

    python3 benchmarks/run.py                      # every table, both models
    python3 benchmarks/run.py --quick              # a smoke run, seconds
    python3 benchmarks/run.py --backend tensorflow jax \
        --python jax=/work/jaxenv/bin/python       # every backend, side by side

With `--backend`, the side-by-side comparison of `side_by_side.py` runs
instead (`python3 benchmarks/run.py --backend tensorflow --help` for its
options): stock fit, the default CustomModel step, "auto" and the backend's
compute-only limit, on each backend in a subprocess of its own. Without it,
everything below, on TensorFlow:

Four parts, in one process: the variants of `variants.py` on each model
(with the compute-only limit: the step's maths alone in one `tf.function`
per epoch); the default step's cost over stock fit, from many short paired
epochs and a count of Python calls per batch (`--overhead-pairs`); a sweep of
fixed `steps_per_execution` values against "auto" (`--sweep`); and how steps
per second change with the batch size and the MLP's width, for stock fit,
the default CustomModel step and "auto" (`--scaling-batches`,
`--scaling-widths`).

Each repeat runs one timed epoch of every variant, in a rotated order, after
one untimed epoch per variant (tracing, XLA compilation). Speed is training
steps per second; a variant's ratio is its speed over stock fit's in the same
repeat, so slow drifts of the machine cancel; the table gives the median over
repeats and the spread (min-max). Peak memory is measured in separate, untimed
epochs: the most the process held above its level at the start of the epoch
(resident memory sampled every millisecond on CPU; TensorFlow's own peak
counter on GPU).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

if __name__ == "__main__" and any(a.split("=")[0] == "--backend" for a in sys.argv[1:]):
    # The side-by-side comparison: a subprocess per backend, none imported here.
    import side_by_side

    sys.exit(side_by_side.main(sys.argv[1:]))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import customfit  # noqa: E402
from variants import (  # noqa: E402
    MODELS,
    dataset,
    fixed_k_variant,
    scaling_variants,
    variants,
)

OVERHEAD_TARGET = 0.02  # default CustomModel step vs stock fit
LOOP_TARGET = 0.10  # best documented CustomModel settings vs whole-epoch loop
AUTO_VS_BEST_K_TARGET = 0.05  # "auto" vs the best fixed steps_per_execution
AUTO_SPEEDUP_TARGET = 1.3  # "auto" vs stock fit
BEST_SETTINGS = ("custom_default_spe", "custom_default_spe_xla")
WHOLE_EPOCH = ("loop_whole_epoch", "loop_whole_epoch_xla_step")


class PeakMemory:
    """Peak memory above the level at `start()`, in MiB."""

    def __init__(self) -> None:
        self.gpu = bool(tf.config.list_logical_devices("GPU"))
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def __enter__(self) -> "PeakMemory":
        if self.gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
            self._base = tf.config.experimental.get_memory_info("GPU:0")["current"]
        else:
            self._base = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc) -> None:
        if self.gpu:
            self._peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._rss())
        self.mib = (self._peak - self._base) / 2**20


def measure(model_name: str, steps: int, repeats: int, memory_repeats: int,
            chosen: dict, data=None) -> dict:
    """Each of `chosen` (name -> (label, prepare)) trained on `model_name`,
    `repeats` timed epochs of `steps` batches each, rotated."""
    data = data if data is not None else dataset(model_name, steps)
    runs = {}
    for name, (_, prepare) in chosen.items():
        keras.utils.set_random_seed(0)
        runs[name] = prepare(model_name, data)
        runs[name]()  # untimed: tracing and compilation
    speed = {name: [] for name in runs}
    memory = {name: [] for name in runs}
    order = list(runs)
    for repeat in range(repeats):
        for name in order[repeat % len(order):] + order[:repeat % len(order)]:
            start = time.perf_counter()
            runs[name]()
            speed[name].append(steps / (time.perf_counter() - start))
    # Separate epochs: the sampling thread would slow the timed ones.
    for _ in range(memory_repeats):
        for name in order:
            with PeakMemory() as peak:
                runs[name]()
            memory[name].append(peak.mib)
    return {name: {"label": chosen[name][0], "steps_per_s": speed[name],
                   "peak_mib": memory[name], "settled_on": settled_on(runs[name])}
            for name in runs}


def settled_on(run) -> str | None:
    """The batches per execution a "auto" variant's training tuner proposes
    at the end, and whether its search is over."""
    auto = getattr(getattr(run, "model", None), "_auto_steps", None)
    if auto is None:
        return None
    tuner = auto.tuners["train"]
    return f"{tuner.steps} ({'settled' if tuner.settled else 'still searching'})"


def ratios(results: dict, name: str, reference: str = "stock_fit") -> list[float]:
    return [v / r for v, r in zip(results[name]["steps_per_s"],
                                  results[reference]["steps_per_s"])]


def table(model_name: str, results: dict) -> str:
    lines = [f"**{model_name}**" if model_name else "", "",
             "| variant | steps/s (median) | speed vs stock fit: median (min-max) "
             "| peak memory above start, MiB: median (max) |",
             "| --- | ---: | ---: | ---: |"]
    for name, result in results.items():
        r = ratios(results, name)
        memory = result["peak_mib"]
        lines.append(
            f"| `{name}`: {result['label']} | {statistics.median(result['steps_per_s']):.0f} "
            f"| {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}) "
            + (f"| {statistics.median(memory):.1f} ({max(memory):.1f}) |" if memory
               else "| not measured |"))
    return "\n".join(lines)


def targets(model_name: str, results: dict) -> list[str]:
    found = []
    best = [n for n in BEST_SETTINGS if n in results]
    loops = [n for n in WHOLE_EPOCH if n in results]
    if best and loops:
        fastest = max(best, key=lambda n: statistics.median(results[n]["steps_per_s"]))
        loop = max(loops, key=lambda n: statistics.median(results[n]["steps_per_s"]))
        gap = 1 / statistics.median(ratios(results, fastest, reference=loop)) - 1
        met = "met" if gap <= LOOP_TARGET else "MISSED"
        found.append(f"{model_name}: `{fastest}` costs {gap:+.1%} time per step vs "
                     f"`{loop}` (target <= {LOOP_TARGET:.0%}): {met}")
    return found


def python_calls(run) -> int:
    """Python function calls in one epoch of `run` (cProfile's count: the
    same on any machine, unlike times)."""
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    return sum(stat[1] for stat in pstats.Stats(profile).stats.values())


def python_calls_per_batch(model_name: str, name: str, steps: int) -> float:
    """Python function calls each batch adds to an epoch of variant `name`:
    the difference between epochs of `2 * steps` and `steps` batches, so
    that what `fit` does once per call does not count."""
    counts = []
    for length in (steps, 2 * steps):
        run = variants(1)[name][1](model_name, dataset(model_name, length))
        run()  # tracing
        counts.append(python_calls(run))
    return (counts[1] - counts[0]) / steps


def overhead(model_name: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The default CustomModel step against stock fit, from many short epochs
    run in pairs (the order alternating), so that the machine's drifts,
    which on a shared machine are larger than the difference, cancel: the
    median over pairs of the time ratio, its quartiles, and the Python
    function calls per batch."""
    steps = args.overhead_steps
    data = dataset(model_name, steps)
    runs = {name: variants(1)[name][1](model_name, data)
            for name in ("stock_fit", "custom_default")}
    for run in runs.values():
        run()
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for pair in range(args.overhead_pairs):
        for name in list(runs)[:: 1 if pair % 2 else -1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    ratio = [c / s for c, s in zip(times["custom_default"], times["stock_fit"])]
    quartiles = statistics.quantiles(ratio, n=4)
    calls = {name: python_calls_per_batch(model_name, name, steps) for name in runs}
    cost = statistics.median(ratio) - 1
    text = "\n".join([
        f"**{model_name}, default step vs stock fit** ({args.overhead_pairs} pairs of "
        f"{steps}-step epochs, batch 32)", "",
        "| | stock fit | `CustomModel`, default step |", "| --- | ---: | ---: |",
        f"| ms per step (median) | {1e3 * statistics.median(times['stock_fit']) / steps:.3f} "
        f"| {1e3 * statistics.median(times['custom_default']) / steps:.3f} |",
        f"| Python calls per batch | {calls['stock_fit']:.0f} "
        f"| {calls['custom_default']:.0f} |",
        f"| time vs stock fit, median (quartiles) | 1 | {1 + cost:.4f} "
        f"({quartiles[0]:.3f}-{quartiles[2]:.3f}) |"])
    found = [f"{model_name}: default CustomModel step costs {cost:+.1%} time per step vs "
             f"stock fit (target <= {OVERHEAD_TARGET:.0%}): "
             + ("met" if cost <= OVERHEAD_TARGET else "MISSED")]
    return text, found


def sweep(model_name: str, args: argparse.Namespace) -> tuple[str, list[str]]:
    """Fixed steps_per_execution values against "auto" and stock fit."""
    chosen = {"stock_fit": variants(1)["stock_fit"], "custom_auto": variants(1)["custom_auto"]}
    chosen.update({f"custom_k{k}": fixed_k_variant(k) for k in args.sweep})
    results = measure(model_name, args.steps, args.repeats, 0, chosen)
    # The best k is chosen on the even repeats and compared with "auto" on
    # the odd ones: the fastest of several noisy medians, compared on the
    # same repeats, would be biased upwards.
    fixed = [n for n in results if n.startswith("custom_k")]
    best = max(fixed, key=lambda n: statistics.median(results[n]["steps_per_s"][::2]))
    auto_vs_best = statistics.median(ratios(results, "custom_auto", reference=best)[1::2])
    speedup = statistics.median(ratios(results, "custom_auto"))
    found = [
        f"{model_name}: \"auto\" ends on {results['custom_auto']['settled_on']} batches "
        "per execution",
        f"{model_name}: best fixed k (chosen on the even repeats) is `{best}`; \"auto\" runs "
        f"at {auto_vs_best:.3f} of its speed on the odd repeats (target >= "
        f"{1 - AUTO_VS_BEST_K_TARGET:.2f}): "
        + ("met" if auto_vs_best >= 1 - AUTO_VS_BEST_K_TARGET else "MISSED"),
        f"{model_name}: \"auto\" runs at {speedup:.3f}x stock fit (target >= "
        f"{AUTO_SPEEDUP_TARGET}x): " + ("met" if speedup >= AUTO_SPEEDUP_TARGET else "MISSED"),
    ]
    return table(f"{model_name}, steps_per_execution sweep", results), found


def scaling(args: argparse.Namespace) -> str:
    """Steps/s of stock fit and ratios of the default step and "auto", over
    batch sizes and MLP widths."""
    lines = ["**mlp, by batch size and width** (steps/s of stock fit; others as ratios to "
             "it, median (min-max))", "",
             "| width | batch | stock fit steps/s | default step | \"auto\" |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for width in args.scaling_widths:
        for batch in args.scaling_batches:
            data = dataset("mlp", args.scaling_steps, batch_size=batch)
            results = measure("mlp", args.scaling_steps, args.scaling_repeats, 0,
                              scaling_variants(width), data)
            cells = []
            for name in ("custom_default", "custom_auto"):
                r = ratios(results, name)
                cells.append(f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})")
            stock = statistics.median(results["stock_fit"]["steps_per_s"])
            lines.append(f"| {width} | {batch} | {stock:.0f} | {cells[0]} | {cells[1]} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def machine() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    device = ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name)
                       for g in gpus) or f"CPU only, {os.cpu_count()} cores"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{device}; {cpu}; Python {platform.python_version()}, TensorFlow "
            f"{tf.__version__}, Keras {keras.__version__}, customfit {customfit.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", help="only these variants (and stock_fit)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500, help="training steps per epoch")
    parser.add_argument("--steps-per-execution", type=int, default=50)
    parser.add_argument("--mixed-precision", action="store_true",
                        help="mixed_float16 policy (meant for GPUs)")
    parser.add_argument("--overhead-pairs", type=int, default=61,
                        help="paired epochs measuring the default step's cost (0: skip)")
    parser.add_argument("--overhead-steps", type=int, default=100)
    parser.add_argument("--sweep", nargs="*", type=int, default=[4, 16, 32, 64, 128, 256],
                        help="fixed steps_per_execution values compared with auto "
                             "(none: skip the sweep)")
    parser.add_argument("--scaling-batches", nargs="*", type=int, default=[32, 128, 512],
                        help="batch sizes of the scaling table (none: skip it)")
    parser.add_argument("--scaling-widths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--scaling-steps", type=int, default=100)
    parser.add_argument("--scaling-repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 20 steps")
    parser.add_argument("--out", type=Path, help="write the table (.md) and raw numbers (.json)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.memory_repeats, args.steps, args.steps_per_execution = 2, 1, 20, 5
        args.sweep, args.scaling_batches, args.scaling_widths = [4], [32], [64]
        args.overhead_pairs, args.overhead_steps = 3, 10
        args.scaling_steps, args.scaling_repeats = 10, 2
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    names = sorted({"stock_fit", *args.variants}) if args.variants else None

    report = [f"Machine: {machine()}.",
              f"{args.repeats} repeats of {args.steps} steps (batch 32) per variant"
              + (", mixed_float16" if args.mixed_precision else "") + ".", ""]
    raw = {}
    for model_name in args.models:
        chosen = {n: v for n, v in variants(args.steps_per_execution).items()
                  if not names or n in names}
        results = measure(model_name, args.steps, args.repeats, args.memory_repeats, chosen)
        raw[model_name] = results
        part = [table(model_name, results), ""]
        part += [f"- {line}" for line in targets(model_name, results)] + [""]
        report += part
        print("\n".join(part), flush=True)
    for model_name in args.models if args.overhead_pairs else []:
        text, found = overhead(model_name, args)
        report += [text, ""] + [f"- {line}" for line in found] + [""]
        print(text, *found, sep="\n", flush=True)
    for model_name in args.models if args.sweep else []:
        text, found = sweep(model_name, args)
        report += [text, ""] + [f"- {line}" for line in found] + [""]
        print(text, *found, sep="\n", flush=True)
    if args.scaling_batches:
        report += [scaling(args), ""]
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
