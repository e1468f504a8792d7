"""Exact mid-epoch resume for `customfit.callbacks.BackupAndRestore`.

When a `CustomModel` is fitted with a `BackupAndRestore` among its callbacks,
the call's `FitCall` makes a `FitResume` (`for_fit`) and has the callback list
Keras gets built as a `ResumeCallbackList`; it tells the `FitResume` the epoch
iterator `fit` builds. When the callback restores a backup taken after
`batch` batches of epoch `epoch`:

- the data is put where the interrupted run had it. `fit` makes iterators
  of one dataset (Keras makes one when an epoch starts and one after each
  full epoch), and each `iter()` draws new seeds for a `tf.data` `shuffle`
  with `reshuffle_each_iteration=True`. The dataset is wrapped to count
  them, each backup records the count, and a resumed `fit` makes and drops
  iterators until the resumed epoch's iterator is the one it had (NumPy
  input: Keras' permutation is the same for every iterator, so this changes
  nothing). Then, in the resumed epoch, the first `batch` batches are read
  and dropped without training: the train function is wrapped, and the
  callbacks do not hear of those batches, so they see the real numbers;
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
        self._dataset: _CountingDataset | None = None
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
        internals.wrap_epoch_iterator_dataset(iterator, self._count_iterators)

    def restore(self, epoch: int, batch: int, state: dict) -> None:
        """Puts data, metrics and random state where the backup was taken."""
        number = state.get("data_iterator")
        self._advance_data(None if number is None else int(number))
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
        self.model.train_function = self._train_function

    def data_iterator_number(self, batch: int) -> int | None:
        """How many iterators `fit` will have made of its data when the
        epoch that a backup taken now resumes gets its iterator (that one
        included): the current epoch's after `batch` > 0 batches, the next
        one's at an epoch's start."""
        if self._dataset is None:
            return None
        return self._dataset.iterators_made + (0 if batch else 1)

    def execution_limit(self, batch: int) -> int | None:
        """At most one batch per execution while the resumed epoch's
        trained batches are read and dropped (one per call of the train
        function), no limit after."""
        callbacks = self.callbacks
        if callbacks is not None and batch < callbacks.skip_below:
            return 1
        return None

    def _advance_data(self, number: int | None) -> None:
        if number is None or self._dataset is None:
            return
        if self.arguments.get("steps_per_epoch") is not None:
            return  # Keras reuses one iterator across epochs: see the warning.
        # Each iterator draws new seeds (tf.data `shuffle` with
        # `reshuffle_each_iteration=True`): make and drop as many as the
        # interrupted process had made before the resumed epoch's.
        while self._dataset.iterators_made < number - 1:
            iter(self._dataset)

    def _count_iterators(self, dataset: Any) -> _CountingDataset:
        self._dataset = _CountingDataset(dataset)
        return self._dataset

    def _train_function(self, iterator: Any) -> Any:
        # Installed by `restore` only with the callbacks' list known and the
        # original train function saved; `__exit__` uninstalls it.
        callbacks = cast(ResumeCallbackList, self.callbacks)
        if callbacks.step is not None and callbacks.step < callbacks.skip_below:
            self._skip(iterator, callbacks.step, callbacks.skip_below)
            if callbacks.step + self.model.steps_per_execution < callbacks.skip_below:
                return {}
            # The last call that skips returns the epoch's logs as the
            # interrupted run left them: with data of unknown length, a
            # backup may follow the epoch's last batch, and Keras ends the
            # epoch with these logs.
            self._restore_metrics(iterator)
            return self.model.get_metrics_result()
        self._restore_metrics(iterator)
        return cast(Callable, self._original_train_function)(iterator)

    def _restore_metrics(self, iterator: Any) -> None:
        """Puts back the backup's metric values, once, after tracing the
        step so that metrics created while tracing exist."""
        if self._metric_values is None:
            return
        trace_ahead = getattr(self._original_train_function, "trace_ahead", None)
        if trace_ahead is not None:  # a customfit StepFunction
            trace_ahead(iterator)
        restore_metrics(self.model, self._metric_values)
        self._metric_values = None

    def _skip(self, iterator: Any, step: int, skip_below: int) -> None:
        ended: tuple[type[BaseException], ...] = (StopIteration, *_backend.loop.END_OF_DATA)
        for _ in range(self.model.steps_per_execution):
            try:
                next(iterator)
            except ended:
                raise ValueError(
                    f"The data ran out after {step} batches while skipping the "
                    f"{skip_below} batches the interrupted run had trained in "
                    "this epoch: fit() was called with other data than that "
                    "run. Call it as before, or delete the backup directory."
                ) from None


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


class _CountingDataset:
    """A dataset that counts the iterators made of it."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.iterators_made = 0

    def __iter__(self) -> Any:
        self.iterators_made += 1
        return iter(self.dataset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)


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
    number = None if resume is None else resume.data_iterator_number(batch)
    if number is not None:
        state["data_iterator"] = np.asarray(number)
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
