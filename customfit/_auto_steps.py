"""`compile(steps_per_execution="auto")`: how many batches each execution
runs, chosen from measured times, never across a batch at which a callback
reads the weights.

Every batch still reaches the callbacks with its own index and logs
(`_per_batch`), so the number of batches per execution changes nothing a
callback sees, except the weights a callback reads during a batch: those are
the weights after the execution's last batch. So:

- an execution never runs past a batch after which a callback reads the
  weights: for the customfit and Keras callbacks that save every N batches
  (`ModelCheckpoint`, `BackupAndRestore`) and `fit(validate_every_n_batches=)`
  the batches are known (customfit's callbacks say which with a
  `_customfit_execution_limit(batch)` method), and executions end there;
- a callback that only reads its `logs` per batch (the progress bar,
  `History`, `TensorBoard`, `customfit.callbacks.TrainingPlot`, any callback
  with the attribute `reads_only_logs = True`) or has no per-batch method
  allows any number;
- any other callback with a per-batch method might read the weights or stop
  training in the middle of an execution: with one among the callbacks, the
  call runs one batch per execution, and a warning names it once.

The number itself comes from a `StepsTuner` per phase (training,
evaluation), which the model keeps from `compile` to `compile`: starting
from one batch, it multiplies the number by `GROWTH` while that makes a
batch no slower (by more than `MAX_LOSS`: more batches per execution only
share the execution's fixed costs among more batches, so a measured loss
under that is noise) and an execution stays under `MAX_SECONDS` (so the
progress bar and callbacks still update several times a second) and within
an epoch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras

from customfit import _per_batch
from customfit._keras import epoch_iterator as epoch_iteration
from customfit._keras import internals

AUTO = "auto"

GROWTH = 4
SAMPLES = 3  # samples timed per candidate; the fastest counts
SAMPLE_SECONDS = 0.05  # a sample: consecutive executions lasting at least this
MAX_LOSS = 0.10
MAX_SECONDS = 0.2
MAX_STEPS = 4096

_LOGS_ONLY = (
    keras.callbacks.ProgbarLogger,
    keras.callbacks.History,
    keras.callbacks.TensorBoard,
)
_SAVING_EVERY_N_BATCHES = (keras.callbacks.ModelCheckpoint, keras.callbacks.BackupAndRestore)


def set_steps_per_execution(model: keras.Model, value: int | str) -> None:
    """`compile(steps_per_execution=value)`: a number, or `AUTO`."""
    auto = value == AUTO
    # Plain attributes: settings, not state to track or save.
    object.__setattr__(model, "_fixed_steps_per_execution", 1 if auto else value)
    object.__setattr__(model, "_auto_steps", AutoStepsPerExecution() if auto else None)


class StepsTuner:
    """Chooses the number of batches per execution of one phase from the
    wall time of executions.

    Attributes:
        steps: The number it proposes for the next execution.
        settled: Whether the search is over (see the module docstring).
            Once settled, `steps` only shrinks, when executions
            take longer than `MAX_SECONDS` (bigger batches, a slower
            model); a new `compile` searches again.
        times: Seconds per batch of the last `SAMPLES` samples of each
            number of batches tried; a sample spans consecutive full
            executions lasting `SAMPLE_SECONDS` or more (one execution of
            a batch or a few is too short to time).
    """

    def __init__(self) -> None:
        self.steps = 1
        self.settled = False
        self.times: dict[int, list[float]] = {}
        self._sample = (0, 0.0)  # (batches, seconds) of the sample being timed

    def observe(self, steps: int, seconds: float) -> None:
        """One execution of `steps` batches took `seconds` (from its start
        to the start of the next, callbacks included). Executions of another
        size than proposed (cut at an epoch's end or a callback's batch)
        are not counted, nor is the first of each size: it may include
        compiling the step for that size (on JAX, a scan of that length)."""
        if steps != self.steps:
            return
        if steps not in self.times:
            self.times[steps] = []
            self._sample = (0, 0.0)
            return
        batches, total = self._sample[0] + steps, self._sample[1] + seconds
        if total < SAMPLE_SECONDS:
            self._sample = (batches, total)
            return
        self._sample = (0, 0.0)
        samples = self.times[steps]
        samples.append(total / batches)
        del samples[:-SAMPLES]
        if len(samples) < SAMPLES:
            return
        fastest = min(samples)
        if self.settled:
            if steps > 1 and steps * fastest > MAX_SECONDS:  # batches got slower
                self.steps = steps // GROWTH
                self.times[self.steps] = []
                self._sample = (0, 0.0)
            return
        previous = self.times.get(steps // GROWTH)
        if previous is not None and fastest > min(previous) * (1 + MAX_LOSS):
            self._settle(steps // GROWTH)
        elif steps * GROWTH > MAX_STEPS or steps * GROWTH * fastest > MAX_SECONDS:
            self._settle(steps)
        else:
            self.steps = steps * GROWTH

    def fit_within(self, batches: int) -> None:
        """An epoch has `batches` batches: a number proposed above that can
        never run in full to be timed, so the search ends at the number
        tried before it."""
        if not self.settled and self.steps > max(batches, 1) and self.steps > 1:
            self._settle(self.steps // GROWTH)

    def _settle(self, steps: int) -> None:
        self.steps = steps
        self.settled = True
        self.times[steps] = []  # measured afresh, to notice slower batches
        self._sample = (0, 0.0)


class AutoStepsPerExecution:
    """The state `compile(steps_per_execution="auto")` gives a model: one
    `StepsTuner` per phase, kept across `fit` and `evaluate` calls (the
    validation of every epoch included).

    Attributes:
        tuners: Phase ("train", "test") -> its tuner.
        warned: Names of the callbacks already warned about.
    """

    def __init__(self) -> None:
        self.tuners = {"train": StepsTuner(), "test": StepsTuner()}
        self.warned: set[str] = set()


class ExecutionPlan:
    """How one `fit` or `evaluate` call of a model compiled with
    `steps_per_execution="auto"` sizes its executions.

    Attributes:
        phase: "train" (`fit`) or "test" (`evaluate`).
        tuner: The phase's `StepsTuner`.
        limits: For each callback that reads the weights every few batches
            (and the resume, while it drops trained batches), a function of
            the next batch's index giving the most batches the execution may
            run, or None for no limit there.
        blocking: Names of the callbacks that make every execution one
            batch (see the module docstring).
    """

    def __init__(
        self,
        model: keras.Model,
        phase: str,
        callbacks: list,
        channel: Any,
        limits: Sequence[Callable[[int], int | None]] = (),
    ) -> None:
        auto = model._auto_steps
        self.phase = phase
        self.tuner = auto.tuners[phase]
        self.limits: list[Callable[[int], int | None]] = list(limits)
        self.blocking: list[str] = []
        self._channel = channel  # the call's `_per_batch.Channel`
        self._last: tuple[int, float] | None = None  # (steps, start) of the running execution
        for callback in callbacks:
            limit = _execution_limit(callback, phase)
            if limit is _one_batch:
                self.blocking.append(type(callback).__name__)
            elif limit is not None:
                self.limits.append(limit)
        new = sorted(set(self.blocking) - auto.warned)
        if new:
            auto.warned.update(new)
            warnings.warn(
                f"steps_per_execution='auto' runs one batch per execution in this "
                f"model's {'fit' if phase == 'train' else 'evaluate'}: the callback(s) "
                f"{', '.join(new)} may read the weights or stop training after any "
                "batch. A callback that only reads its `logs` in per-batch methods "
                "and never sets `model.stop_training` there can say so with the "
                "attribute `reads_only_logs = True`.",
                UserWarning,
                stacklevel=2,
            )

    def install(self, epoch_iterator: Any) -> None:
        """Makes `epoch_iterator` size each execution with `next_steps`."""
        epoch_iteration.size_executions(epoch_iterator, self.next_steps)

    def next_steps(self, batch: int, remaining: int | None) -> int:
        """The number of batches of the execution starting at `batch` (its
        index in the epoch), `remaining` batches being left in the epoch
        (None: unknown). Also times the previous execution of the epoch."""
        now = time.perf_counter()
        if self._last is not None and batch > 0:
            steps, start = self._last
            self.tuner.observe(steps, now - start)
        if batch == 0 and remaining is not None:
            self.tuner.fit_within(remaining)
        steps = 1 if self.blocking else self.tuner.steps
        for limit in self.limits:
            most = limit(batch)
            if most is not None:
                steps = min(steps, most)
        if remaining is not None:
            steps = min(steps, remaining)
        steps = max(steps, 1)
        self._last = (steps, now)
        self._channel.steps = steps
        self._channel.wait = not self.tuner.settled
        return steps

    def finish(self) -> None:
        """The call ended: the step functions run `steps_per_execution`
        batches again."""
        self._channel.steps = None
        self._channel.wait = False


def _one_batch(batch: int) -> int:
    return 1


def _execution_limit(callback: Any, phase: str) -> Callable[[int], int | None] | None:
    """None when `callback` allows any number of batches per execution, else
    a function of the next batch's index giving the most it allows
    (`_one_batch` for a callback that may read the weights at any batch)."""
    own = getattr(callback, "_customfit_execution_limit", None)
    if own is not None:  # a customfit callback that knows its batches
        return own if phase == "train" else None
    if isinstance(callback, _LOGS_ONLY) or getattr(callback, "reads_only_logs", False):
        return None
    if isinstance(callback, _SAVING_EVERY_N_BATCHES) and phase == "train":
        every = callback.save_freq
        if every == "epoch":
            return None
        return lambda batch: every - internals.batches_since_save(callback)
    return _one_batch if _per_batch.has_batch_hooks(callback, phase) else None


def every_n_batches(every: int, batch: int) -> int:
    """The most batches an execution starting at `batch` may run when a
    callback reads the weights after batch `every - 1`, `2 * every - 1`,
    ... of each epoch."""
    return every - batch % every
