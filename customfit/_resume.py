"""Exact mid-epoch resume for `customfit.callbacks.BackupAndRestore`.

When a `CustomModel` is fitted with a `BackupAndRestore` among its callbacks,
the call's `FitCall` makes a `FitResume` (`for_fit`) and has the callback list
Keras gets built as a `ResumeCallbackList`; it tells the `FitResume` the epoch
iterator `fit` builds. When the callback restores a backup taken after
`batch` batches of epoch `epoch`:

- the data is put where the interrupted run had it: the backend's
  `DataReplay` (`_backend.loop.data_replay`) follows what `fit`'s epoch
  iterator draws (the iterators made of a `tf.data` dataset, NumPy's random
  state on JAX), each backup records its `position`, and a resumed `fit`
  `restore`s it. Then, in the resumed epoch, the first `batch` batches are
  read and dropped without training: the train function is wrapped
  (`_backend.loop.resuming_train_function`), and the callbacks do not hear
  of those batches, so they see the real numbers;
- the metric variables (the running means in the per-batch logs), saved per
  replica, are restored before the first trained batch, after tracing the
  step so that metrics created while tracing exist;
- Keras' process-wide `SeedGenerator` (unseeded `keras.random` calls) gets its
  saved state back.

Everything else the step depends on (weights, optimizer state, the
`SeedGenerator`s of Dropout and other random layers) is in the weights file.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, cast

import keras
import numpy as np

from customfit import _backend, _preemption
from customfit._contract import DataReplay
from customfit._errors import ResumeWarning
from customfit._keras import internals

_SEED_KEY = "keras_global_seed_generator"


def needs_resume_support(callback: Any) -> bool:
    return getattr(callback, "_customfit_resumes_fit", False)


class ResumeCallbackList(keras.callbacks.CallbackList):
    """Keras' `CallbackList`, silent for the batches a resumed epoch skips.

    In the resumed epoch, batches `0 .. skip_below - 1` were trained before
    the interruption: the train function reads them without training, and
    no callback hears of them. Later batches reach the callbacks with their
    real numbers. `step` is the batch (or first batch of the execution,
    with `steps_per_execution > 1`) the train function is about to run.

    The backup callbacks go first, so a backup taken when an epoch or batch
    begins holds the state before any other callback acts on that epoch or
    batch (a relative learning-rate schedule is not applied twice on resume).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callbacks.sort(key=lambda callback: not needs_resume_support(callback))
        self.step: int | None = None
        self.skip_below = 0
        self.resume_at: tuple[int, int] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.step = None
        self.skip_below = 0
        if self.resume_at is not None and self.resume_at[0] == epoch:
            self.skip_below = self.resume_at[1]
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.step = batch
        if batch >= self.skip_below:
            super().on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.step is None or self.step >= self.skip_below:
            super().on_train_batch_end(batch, logs)


class FitResume:
    """What one `CustomModel.fit` call needs to resume exactly (see module).

    Attributes:
        model: The model being fitted.
        arguments: Keras `fit`'s arguments, by name.
        callbacks: The `ResumeCallbackList` Keras runs, once built; None when
            the caller passed a `keras.callbacks.CallbackList` of its own.
        epoch_iterator: `fit`'s epoch iterator, once `fit` has made it.
        data: Its `DataReplay`, from then on.
        inexact: Why a backup taken mid-epoch could not resume this `fit`
            exactly (a generator, `steps_per_epoch`, ...), or "".
        sigterm: The `SigtermWatch` of this call, installed while Keras'
            `fit` runs; off under `MultiWorkerMirroredStrategy`, where a
            worker that stops alone would leave the others waiting.
    """

    def __init__(self, model: keras.Model, arguments: dict, inexact: str = "") -> None:
        self.model = model
        self.arguments = arguments
        self.inexact = inexact
        self.callbacks: ResumeCallbackList | None = None
        self.epoch_iterator: Any = None
        self.data: DataReplay | None = None
        self._original_train_function: Callable | None = None
        self._metric_values: dict | None = None
        self.sigterm = _preemption.SigtermWatch(enabled=not _backend.cluster.multi_worker(model))

    def __enter__(self) -> FitResume:
        self.sigterm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        """After Keras' `fit`: the model's own train function and the
        previous SIGTERM handler again."""
        if self._original_train_function is not None:
            self.model.train_function = self._original_train_function
            self._original_train_function = None
        self.sigterm.__exit__(*exc)

    def saw_epoch_iterator(self, iterator: Any) -> None:
        """`fit` made its epoch iterator (before the callbacks' list)."""
        if self.epoch_iterator is not None or iterator is None:
            return
        self.epoch_iterator = iterator
        self.data = _backend.loop.data_replay(iterator, self.arguments.get("steps_per_epoch"))

    def restore(self, epoch: int, batch: int, state: dict) -> None:
        """Puts data, metrics and random state where the backup was taken."""
        if self.data is not None:
            self.data.restore(state)
        if batch == 0:
            return
        if self.callbacks is None:
            raise ValueError(
                f"The backup was taken after batch {batch} of epoch {epoch}, "
                "and resuming mid-epoch needs `callbacks=` as a list, not a "
                "keras.callbacks.CallbackList. Pass the callbacks as a list."
            )
        num_batches = getattr(self.epoch_iterator, "num_batches", None)
        if num_batches is not None and batch >= num_batches:
            raise ValueError(
                f"The backup was taken after batch {batch} of epoch {epoch}, "
                f"but an epoch now has {num_batches} batches: fit() was "
                "called with other data or batch size than the interrupted "
                "run. Call it as before, or delete the backup directory."
            )
        self.callbacks.resume_at = (epoch, batch)
        self._metric_values = state
        self._original_train_function = self.model.train_function
        self.model.train_function = _backend.loop.resuming_train_function(
            self, self.model.train_function
        )

    def execution_limit(self, batch: int) -> int | None:
        """At most one batch per execution while the resumed epoch's
        trained batches are read and dropped (one per call of the train
        function), no limit after."""
        callbacks = self.callbacks
        if callbacks is not None and batch < callbacks.skip_below:
            return 1
        return None

    # ---- what the backend's `resuming_train_function` uses

    def skipping(self) -> bool:
        """Whether the execution about to run reads batches of the resumed
        epoch that the interrupted run had trained."""
        callbacks = cast(ResumeCallbackList, self.callbacks)
        return callbacks.step is not None and callbacks.step < callbacks.skip_below

    def last_skip(self) -> bool:
        """Whether the execution being skipped is the resumed epoch's last
        one to skip."""
        callbacks = cast(ResumeCallbackList, self.callbacks)
        step = cast(int, callbacks.step)
        return step + self.model.steps_per_execution >= callbacks.skip_below

    def skip(self, iterator: Any) -> list:
        """Reads and returns the execution's batches, untrained."""
        callbacks = cast(ResumeCallbackList, self.callbacks)
        ended: tuple[type[BaseException], ...] = (StopIteration, *_backend.loop.END_OF_DATA)
        batches = []
        for _ in range(self.model.steps_per_execution):
            try:
                batches.append(next(iterator))
            except ended:
                raise ValueError(
                    f"The data ran out after {callbacks.step} batches while "
                    f"skipping the {callbacks.skip_below} batches the interrupted "
                    "run had trained in this epoch: fit() was called with other "
                    "data than that run. Call it as before, or delete the backup "
                    "directory."
                ) from None
        return batches

    @property
    def metrics_pending(self) -> bool:
        """Whether the backup's metric values are still to be restored."""
        return self._metric_values is not None

    def restore_metrics(self) -> None:
        """Puts the backup's metric values into the metric variables, once."""
        if self._metric_values is not None:
            restore_metrics(self.model, self._metric_values)
            self._metric_values = None


# The caller of `CustomModel.fit`, seen from `for_fit`: for_fit <-
# Call.__init__ <- CustomModel.fit <- the caller.
_USER_FRAME = 4


def for_fit(model: keras.Model, arguments: dict) -> FitResume | None:
    """A `FitResume` for a `fit` call (Keras' arguments, by name) with a
    callback that resumes training, warning first if it cannot be exact."""
    callbacks = arguments.get("callbacks")
    if isinstance(callbacks, keras.callbacks.CallbackList):
        listed = callbacks.callbacks
    else:
        listed = list(keras.tree.flatten(callbacks)) if callbacks else []
    if any(isinstance(c, keras.callbacks.BackupAndRestore) for c in listed):
        warnings.warn(
            "keras.callbacks.BackupAndRestore restarts an interrupted epoch "
            "from its first batch (with save_freq=N it trains the epoch's "
            "first batches again, with its metrics restarted) and writes no "
            "backup on SIGTERM. customfit.callbacks.BackupAndRestore takes the "
            "same backup_dir, save_freq and delete_checkpoint, resumes at the "
            "next untrained batch exactly, and backs up on SIGTERM.",
            ResumeWarning,
            stacklevel=_USER_FRAME,
        )
    resuming = [c for c in listed if needs_resume_support(c)]
    if not resuming:
        return None
    inexact = _inexact_mid_epoch(model, arguments)
    if inexact and any(getattr(c, "save_freq", "epoch") != "epoch" for c in resuming):
        warnings.warn(
            "BackupAndRestore(save_freq=...) cannot resume this fit() exactly "
            f"mid-epoch: {inexact}. Weights and optimizer state are restored; "
            "use NumPy arrays or a tf.data.Dataset for an exact resume.",
            ResumeWarning,
            stacklevel=_USER_FRAME,
        )
    return FitResume(model, arguments, inexact)


def _inexact_mid_epoch(model: keras.Model, arguments: dict) -> str:
    """Why a backup taken mid-epoch could not resume this `fit` exactly
    ("" if it could)."""
    x = arguments.get("x")
    problems = []
    if (
        isinstance(x, keras.utils.PyDataset)
        or inspect.isgenerator(x)
        or (x is not None and not _is_replayable(x))
    ):
        if isinstance(x, keras.utils.PyDataset):
            kind = f"keras.utils.PyDataset ({type(x).__name__})"
        elif inspect.isgenerator(x):
            kind = "Python generator"
        else:
            kind = type(x).__name__
        problems.append(
            f"the input is a {kind}, whose own state (position, "
            "shuffling) is not saved: the resumed epoch starts from its "
            "beginning after skipping the trained batches, which only equals "
            "the interrupted run if each epoch yields the same batches"
        )
    if arguments.get("steps_per_epoch") is not None:
        problems.append(
            "steps_per_epoch is set, so epochs share one iterator and a "
            "resumed run reads the data from another position"
        )
    if model.run_eagerly:
        problems.append(
            "run_eagerly=True creates metrics in the first step, after the "
            "saved metric values are restored, so the resumed epoch's logs "
            "can differ"
        )
    return "; ".join(problems)


def _is_replayable(x: Any) -> bool:
    if isinstance(x, np.ndarray) or internals.is_tf_dataset(x):
        return True
    if isinstance(x, dict):
        return all(_is_replayable(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_is_replayable(v) for v in x)
    return hasattr(x, "__array__") and hasattr(x, "shape")  # pandas, JAX, ...


# ------------------------------------------------------ the saved state


def metric_variables(model: keras.Model) -> list[tuple[str, Any]]:
    """Every variable behind the training logs (`CustomModel.log` columns
    included), named by metric."""
    return [
        (f"{metric.name}/{i}", variable)
        for metric in model._metrics_behind_logs()
        for i, variable in enumerate(metric.variables)
    ]


def capture_state(
    model: keras.Model, batch: int, resume: FitResume | None
) -> dict[str, np.ndarray]:
    """The state the weights file lacks after `batch` batches of an epoch:
    metric variables (one row per replica, mid-epoch only), Keras' global
    seed generator and the number of data iterators made (see `FitResume`)."""
    state: dict[str, np.ndarray] = {}
    if resume is not None and resume.data is not None:
        state.update(resume.data.position(batch))
    with_metrics = batch > 0
    generator = internals.global_seed_generator()
    if generator is not None:
        state[_SEED_KEY] = np.asarray(generator.state.numpy())
    if with_metrics:
        variables = metric_variables(model)
        state["metric_names"] = np.array([name for name, _ in variables], dtype=str)
        for i, values in enumerate(metric_values(model)):
            state[f"metric_{i}"] = values
    return state


def metric_values(model: keras.Model) -> list[np.ndarray]:
    """The value of each of `metric_variables(model)`, one row per replica:
    every replica of the cluster, gathered from every process (a
    collective, which every process runs at the same point)."""
    return _backend.cluster.every_replica(model, [v for _, v in metric_variables(model)])


def assign_metric_values(model: keras.Model, values: list[np.ndarray]) -> None:
    """Puts back what `metric_values` returned, replica by replica."""
    _backend.cluster.assign_every_replica(model, [v for _, v in metric_variables(model)], values)


def restore_global_state(state: dict) -> None:
    if _SEED_KEY in state:
        internals.global_seed_generator(create=True).state.assign(state[_SEED_KEY])


def restore_metrics(model: keras.Model, state: dict) -> None:
    names = [str(n) for n in state.get("metric_names", [])]
    variables = metric_variables(model)
    if names != [name for name, _ in variables]:
        warnings.warn(
            "The resumed epoch's metrics differ from the saved ones "
            f"({', '.join(names)} saved; the model has "
            f"{', '.join(name for name, _ in variables)}); they restart from "
            "zero, so this epoch's logs are not those of the interrupted run.",
            ResumeWarning,
            stacklevel=2,
        )
        return
    assign_metric_values(model, [state[f"metric_{i}"] for i in range(len(variables))])
