"""What a custom step costs: every variant in `variants.py`, interleaved and
repeated in one process, as ratios against stock `keras.Model.fit`.

    python3 benchmarks/run.py                      # full table, both models
    python3 benchmarks/run.py --quick              # a smoke run, seconds

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
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import customfit  # noqa: E402
from variants import MODELS, dataset, variants  # noqa: E402

OVERHEAD_TARGET = 0.02  # default CustomModel step vs stock fit
LOOP_TARGET = 0.10  # best documented CustomModel settings vs whole-epoch loop
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


def measure(model_name: str, steps: int, repeats: int, memory_repeats: int, spe: int,
            names: list[str] | None) -> dict:
    data = dataset(model_name, steps)
    chosen = {n: v for n, v in variants(spe).items() if not names or n in names}
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
                   "peak_mib": memory[name]} for name in runs}


def ratios(results: dict, name: str, reference: str = "stock_fit") -> list[float]:
    return [v / r for v, r in zip(results[name]["steps_per_s"],
                                  results[reference]["steps_per_s"])]


def table(model_name: str, results: dict) -> str:
    lines = [f"**{model_name}**", "",
             "| variant | steps/s (median) | speed vs stock fit: median (min-max) "
             "| peak memory above start, MiB: median (max) |",
             "| --- | ---: | ---: | ---: |"]
    for name, result in results.items():
        r = ratios(results, name)
        lines.append(
            f"| `{name}`: {result['label']} | {statistics.median(result['steps_per_s']):.0f} "
            f"| {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}) "
            f"| {statistics.median(result['peak_mib']):.1f} ({max(result['peak_mib']):.1f}) |")
    return "\n".join(lines)


def targets(model_name: str, results: dict) -> list[str]:
    found = []
    if {"stock_fit", "custom_default"} <= results.keys():
        overhead = 1 / statistics.median(ratios(results, "custom_default")) - 1
        met = "met" if overhead <= OVERHEAD_TARGET else "MISSED"
        found.append(f"{model_name}: default CustomModel step costs {overhead:+.1%} time per "
                     f"step vs stock fit (target <= {OVERHEAD_TARGET:.0%}): {met}")
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
    parser.add_argument("--quick", action="store_true", help="2 repeats of 20 steps")
    parser.add_argument("--out", type=Path, help="write the table (.md) and raw numbers (.json)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.memory_repeats, args.steps, args.steps_per_execution = 2, 1, 20, 5
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    names = sorted({"stock_fit", *args.variants}) if args.variants else None

    report = [f"Machine: {machine()}.",
              f"{args.repeats} repeats of {args.steps} steps (batch 32) per variant"
              + (", mixed_float16" if args.mixed_precision else "") + ".", ""]
    raw = {}
    for model_name in args.models:
        results = measure(model_name, args.steps, args.repeats, args.memory_repeats,
                          args.steps_per_execution, names)
        raw[model_name] = results
        report += [table(model_name, results), ""]
        report += [f"- {line}" for line in targets(model_name, results)] + [""]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
