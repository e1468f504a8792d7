"""Callbacks for training that survives crashes, and plots of a run.

- `ModelCheckpoint`: Keras' `ModelCheckpoint` that replaces its file
  atomically and keeps `save_best_only`'s best value across a restart.
- `BackupAndRestore`: resumes a killed `fit` from the last finished epoch,
  or with `save_freq=N` from the next untrained batch, exactly; its backup is
  replaced atomically, checked against the model, and saved after every
  other callback has seen the epoch (or batch), and on SIGTERM it writes a
  backup and stops `fit` (`customfit.Preempted`). `customfit.ResumeWarning`
  flags input it cannot resume exactly mid-epoch.
- `LearningRateScheduler`, `ReduceLROnPlateau`: Keras' callbacks, for every
  optimizer of the model (`CustomModel.optimizers`) or the ones named.
- `TrainingPlot`: draws the per-batch loss of each epoch and the `History`
  curves to PNG/PDF with matplotlib (`pip install "customfit[plot]"`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import keras
import numpy as np

from customfit import _auto_steps, _call, _optimizers, _resume
from customfit._backend import BACKEND, cluster
from customfit._errors import Preempted, ResumeWarning
from customfit._keras import internals
from customfit._saving import atomic_destination, write_text_atomically

__all__ = [
    "BackupAndRestore",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "ReduceLROnPlateau",
    "TrainingPlot",
]


class ModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`keras.callbacks.ModelCheckpoint` that never leaves a broken file and
    remembers the best value across restarts.

    Same arguments as Keras' callback. Three differences:

    - Each file is written to a temporary file in the same directory and moved
      over the checkpoint in one `os.replace` when complete. A crash, a kill or
      an error while saving leaves the previous checkpoint intact (Keras'
      callback writes into the checkpoint file itself).
    - Under `MultiWorkerMirroredStrategy` only the chief writes the files
      (the others save into private temporary directories they delete), so
      the workers can share one directory.
    - With `save_best_only=True`, the best monitored value is kept in
      `<filepath>.best.json` next to the checkpoint. When `fit` starts past
      epoch 0 (resumed by `BackupAndRestore` or `initial_epoch`), the value is
      read back, so a resumed run only overwrites the best checkpoint with a
      better one. A run starting at epoch 0 starts from scratch as in Keras.
    """

    def __init__(self, filepath: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        super().__init__(filepath, *args, **kwargs)
        self.best_path = f"{self.filepath}.best.json"
        self._first_epoch_of_fit = True

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Runs when `fit` starts, before any batch: checks that the
        checkpoint's directory can be written; the next epoch decides whether
        to resume."""
        super().on_train_begin(logs)
        self._first_epoch_of_fit = True
        directory = os.path.dirname(self.filepath)
        if "{" not in directory:  # else it depends on the epoch or the logs
            _require_writable_directory(directory, "ModelCheckpoint", self.model)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Runs before each epoch; on the first of a resumed `fit`, reads the
        best value saved by the interrupted run."""
        super().on_epoch_begin(epoch, logs)
        if self._first_epoch_of_fit:
            self._first_epoch_of_fit = False
            if epoch > 0 and self.save_best_only:
                self._restore_best(epoch)

    def _save_model(self, epoch: int, batch: int | None, logs: dict) -> None:
        # Keras' own method writes into `filepath` directly; this replaces it.
        logs = logs or {}
        filepath = internals.checkpoint_file_path(self, epoch, batch, logs)
        if not internals.checkpoint_should_save(self, epoch, batch, logs, filepath):
            return
        with (
            cluster.written_to(filepath, self.model) as target,
            atomic_destination(target) as temporary,
        ):
            if self.save_weights_only:
                self.model.save_weights(temporary, overwrite=True)
            else:
                self.model.save(temporary, overwrite=True)
        if self.save_best_only and self.best is not None and cluster.is_chief(self.model):
            write_text_atomically(
                self.best_path,
                json.dumps({"monitor": self.monitor, "best": float(self.best), "epoch": epoch}),
            )

    def _restore_best(self, epoch: int) -> None:
        if not os.path.exists(self.best_path):
            return
        try:
            with open(self.best_path) as f:
                saved = json.load(f)
            best, saved_epoch, monitor = saved["best"], saved["epoch"], saved["monitor"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"Cannot read {self.best_path} ({error}). Delete it to start "
                "the best-so-far comparison afresh."
            ) from error
        if monitor != self.monitor:
            raise ValueError(
                f"{self.best_path} tracks '{monitor}', this ModelCheckpoint "
                f"monitors '{self.monitor}'. Use another filepath or delete it."
            )
        if saved_epoch < epoch:
            self.best = best


_STATE_FILE = "backup.json"
_FORMAT = "customfit.BackupAndRestore/2"
_READABLE_FORMATS = ("customfit.BackupAndRestore/1", _FORMAT)


class BackupAndRestore(keras.callbacks.Callback):
    """Resumes a killed training run where it stopped: from the last
    finished epoch, or from the last saved batch with `save_freq=N`.

    Put it in `fit`'s callbacks and run the same script again after a crash:
    `fit` restores the weights, optimizer state and random-layer state saved
    by the interrupted run and continues from there. On CPU with fixed seeds
    and op determinism, the resumed run ends with the same weights, optimizer
    state and `History`, bit for bit, as one that never stopped (for a
    `CustomModel`, which also saves the state of Dropout's random generator).

    With `save_freq=N` (a `CustomModel` only), a backup is also taken every N
    batches, and a resumed `fit` continues with the next batch the
    interrupted run had not trained:

    - the data position: each epoch's data is made as in the interrupted run
      (a `tf.data` `shuffle(..., reshuffle_each_iteration=True)` draws the
      same order as in that epoch), and the batches it had trained in the
      resumed epoch are read and dropped without training;
    - the running means of the epoch (`loss`, metrics, `CustomModel.log`
      columns; per replica under `tf.distribute`), so the per-batch logs, the
      epoch's logs and `History` are those of the uninterrupted run;
    - Keras' global `SeedGenerator` (unseeded `keras.random` calls);
    - callbacks see the real batch numbers; the dropped batches reach no
      callback (the progress bar starts at the first trained batch,
      `ModelCheckpoint(save_freq=...)` counts from there).

    Exact for NumPy arrays (also with `shuffle=True`) and `tf.data`
    datasets whose order depends only on their seeds. Not exact, with a
    `customfit.ResumeWarning` at the start of `fit`: a Python generator,
    `keras.utils.PyDataset` or other input whose own state (position,
    shuffling) is not saved; `steps_per_epoch` (epochs share one iterator);
    `run_eagerly=True` (metrics created in the first step start from zero).
    Not saved: TensorFlow's stateful random ops without a seed
    (`tf.random.uniform` in a step) and the global NumPy/Python generators.
    With `steps_per_execution=K`, backups are taken at execution boundaries
    only (the first batch of an execution at or past each multiple of N).
    A kill during validation repeats the batches since the last backup and
    the validation, which gives the same result.

    SIGTERM (a preemptible VM or a scheduler ending the job; `CustomModel`
    only): the batch under way finishes (with `steps_per_execution=K`, the
    execution; in an epoch's last batch or its validation, the validation
    and the epoch's end too), a backup of the state after it is written,
    whatever `save_freq` is, and `fit` raises `customfit.Preempted` before
    any other batch runs; the process, left to it, exits non-zero, and the
    same script started again resumes there exactly. A backup mid-epoch is
    written where it resumes exactly: not for the inputs listed above (the
    last backup stays, and `Preempted` says so) unless `save_freq=N` asks
    for mid-epoch backups anyway. A SIGTERM handler the program had set is
    put back and called once the backup is written. A second SIGTERM ends
    the process at once through that handler (Python's default ends it),
    losing at most the batches since the last complete backup. Under
    `MultiWorkerMirroredStrategy`, TensorFlow catches SIGTERM itself and the
    worker trains on until SIGKILL ends it; the others then stop with an
    error, and the restarted cluster resumes from the last complete backup
    (`save_freq=N` bounds what is repeated). Outside `fit`, and in a `fit`
    run outside the main thread (Python's signals reach that thread only),
    SIGTERM is handled as it was before.

    Differences from `keras.callbacks.BackupAndRestore`, which it replaces:

    - with `save_freq=N`, Keras records the batch but retrains the resumed
      epoch's first batches, with the epoch's metrics restarted;
    - each backup is saved when the next epoch (or batch) begins, after
      every callback (e.g. `ModelCheckpoint`) has handled the finished one,
      whatever their order in the list;
    - the weights go to a new file and `backup.json`, which names it, is
      replaced atomically afterwards: a kill at any moment leaves the previous
      or the new backup, never a mix or a truncated file;
    - under `MultiWorkerMirroredStrategy`, every worker takes part in each
      backup (the metric state of every replica is gathered from all of
      them) and only the chief writes it; `backup_dir` must be on a file
      system all workers share, and a restart in which they see different
      backups is an error before training;
    - a directory holding another model's backup, or anything else, is an
      error before training starts, and is left untouched;
    - after a resumed `fit`, the model's next `fit` starts at its own
      `initial_epoch` again.

    Args:
        backup_dir: A directory used only by this callback.
        save_freq: `"epoch"` to back up after each epoch, or an integer N to
            also back up every N batches within an epoch (`CustomModel` only).
        delete_checkpoint: Delete the directory when `fit` finishes.
    """

    _customfit_resumes_fit = True  # CustomModel.fit prepares the resume

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        save_freq: str | int = "epoch",
        delete_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if not backup_dir:
            raise ValueError("BackupAndRestore needs a backup_dir, got an empty one.")
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise ValueError(
                f'save_freq must be "epoch" or a number of batches (1 or more), got {save_freq!r}.'
            )
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self.state_path = os.path.join(self.backup_dir, _STATE_FILE)
        self._epochs_done: int | None = None
        self._epoch = 0
        self._last_backup_batch = 0
        self._resumed_at: tuple[int, int] | None = None
        self._backed_up_at: tuple[int, int] | None = None
        self._trained_since_backup = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Runs when `fit` starts, before any batch: refuses what could not
        be backed up or restored, then restores the backup, if there is one."""
        self._epochs_done = None
        self._resumed_at = None
        self._backed_up_at = None
        self._trained_since_backup = False
        if not self.model.built:
            # A backup is loaded into the model's weights before the first
            # batch of a restarted fit, when they must already exist.
            raise ValueError(
                f"BackupAndRestore needs a built model: {type(self.model).__name__} "
                "has no weights yet (a subclassed model is built by its first "
                "call), so a restarted fit could not load its backup. Build it "
                "before fit(): call it on a batch, model(x[:1]), or call "
                "model.build(input_shape). Nothing was trained."
            )
        _require_writable_directory(self.backup_dir, "BackupAndRestore", self.model)
        if self.save_freq != "epoch" and _call.resume_of(self.model) is None:
            raise ValueError(
                f"BackupAndRestore(save_freq={self.save_freq}) resumes "
                "mid-epoch through CustomModel.fit; this model is a "
                f"{type(self.model).__name__}. Build it as a "
                'customfit.CustomModel, or use save_freq="epoch".'
            )
        state = self._read_state()
        position = [-1, -1] if state is None else [state["epoch"], state.get("batch", 0)]
        if not cluster.agreed(position, self.model):
            raise ValueError(
                f"The workers see different backups in {self.backup_dir} (this "
                f"one: {'none' if state is None else position}). Put backup_dir "
                "on a file system all workers share, so that they resume from "
                "the same backup."
            )
        if state is None:
            return
        weights = os.path.join(self.backup_dir, state["weights"])
        try:
            self.model.load_weights(weights)
            saved = self._read_saved_state(state)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot restore the backup in {self.backup_dir}: {error}\n"
                f"Delete {self.backup_dir} to train from scratch."
            ) from error
        epoch, batch = state["epoch"], state.get("batch", 0)
        internals.set_initial_epoch(self.model, epoch)
        _resume.restore_global_state(saved)
        resume = _call.resume_of(self.model)
        if resume is not None:
            resume.restore(epoch, batch, saved)
        elif batch:
            raise ValueError(
                f"The backup in {self.backup_dir} was taken after batch {batch} "
                f"of epoch {epoch}; resuming mid-epoch needs a "
                f"customfit.CustomModel, this model is a {type(self.model).__name__}."
            )
        self._resumed_at = self._backed_up_at = (epoch, batch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Runs after each epoch; the backup follows when the next one begins."""
        self._epochs_done = epoch + 1

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Runs before each epoch: saves the state after the previous one,
        then stops `fit` if SIGTERM arrived."""
        if self._epochs_done is not None:
            self._save(self._epochs_done)
        self._epoch = epoch
        self._last_backup_batch = 0
        if self._resumed_at is not None and self._resumed_at[0] == epoch:
            self._last_backup_batch = self._resumed_at[1]
        if self._sigterm_requested():
            self._stop_for_sigterm()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        """Runs before each batch: if SIGTERM arrived, saves the state after
        the previous batches and stops `fit`; with `save_freq=N`, saves it
        once N more batches have run since the last backup."""
        if _call.replayed_begin(self.model):
            return  # replayed after its execution ran: not the state before it
        if self._sigterm_requested():
            inexact = self._mid_epoch_backup_refused()
            if self._trained_since_backup and inexact is None:
                self._save(self._epoch, batch)
            self._stop_for_sigterm(inexact)
        if self.save_freq == "epoch":
            return
        save_freq = cast(int, self.save_freq)  # not "epoch": a number of batches
        if batch // save_freq > self._last_backup_batch // save_freq:
            self._save(self._epoch, batch)
            self._last_backup_batch = batch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Runs after each trained batch (the resumed epoch's skipped
        batches reach no callback)."""
        self._trained_since_backup = True

    def _customfit_execution_limit(self, batch: int) -> int | None:
        """`steps_per_execution="auto"`: an execution ends before each
        batch at which a backup is taken."""
        if self.save_freq == "epoch":
            return None
        return _auto_steps.every_n_batches(cast(int, self.save_freq), batch)

    def on_train_end(self, logs: dict | None = None) -> None:
        """Runs when `fit` ends: deletes the backup, or saves the final
        state; after a SIGTERM, saves the final state and stops `fit`, so
        that the script started again finds training done."""
        internals.set_initial_epoch(self.model, None)
        if self._sigterm_requested():
            if self.model.stop_training:
                # A callback ended training (EarlyStopping): a restart has
                # no epoch left to train either.
                self._save(self.params["epochs"])
            elif self._epochs_done is not None:
                self._save(self._epochs_done)
            self._stop_for_sigterm()
        if self.delete_checkpoint:
            if not cluster.is_chief(self.model):
                return
            if os.path.exists(self.state_path):
                os.remove(self.state_path)  # first: no half-deleted backup
            if os.path.isdir(self.backup_dir):
                shutil.rmtree(self.backup_dir)
        elif self._epochs_done is not None:
            self._save(self._epochs_done)

    def _save(self, epoch: int, batch: int = 0) -> None:
        """Saves the state after `epoch` epochs and `batch` more batches
        (every worker; only the chief writes into `backup_dir`)."""
        self._trained_since_backup = False
        self._backed_up_at = (epoch, batch)
        stem = f"epoch-{epoch}" + (f"-batch-{batch}" if batch else "")
        weights_name, state_name = f"{stem}.weights.h5", f"{stem}.state.npz"
        with (
            cluster.written_to(os.path.join(self.backup_dir, weights_name), self.model) as target,
            atomic_destination(target) as temporary,
        ):
            self.model.save_weights(temporary)
        # Any values: numpy's stubs would match an ndarray to savez's allow_pickle.
        saved: dict[str, Any] = _resume.capture_state(
            self.model, batch, _call.resume_of(self.model)
        )
        if not cluster.is_chief(self.model):
            return
        with atomic_destination(os.path.join(self.backup_dir, state_name)) as temporary:
            with open(temporary, "wb") as f:
                np.savez(f, **saved)
        write_text_atomically(
            self.state_path,
            json.dumps(
                {
                    "format": _FORMAT,
                    "backend": BACKEND,
                    "epoch": epoch,
                    "batch": batch,
                    "weights": weights_name,
                    "state": state_name,
                    "model": _fingerprint(self.model),
                }
            ),
        )
        for name in os.listdir(self.backup_dir):
            if (
                _is_backup_leftover(name)
                and name not in (weights_name, state_name)
                and not name.startswith(".tmp-")
            ):
                os.remove(os.path.join(self.backup_dir, name))

    def _sigterm_requested(self) -> bool:
        resume = _call.resume_of(self.model)
        return resume is not None and resume.sigterm.requested

    def _mid_epoch_backup_refused(self) -> str | None:
        """Why a backup taken now, mid-epoch, would not resume exactly, or
        None. With `save_freq=N` such backups are taken anyway (`fit` warned
        when it started)."""
        resume = cast(_resume.FitResume, _call.resume_of(self.model))
        if resume.callbacks is None:
            return "fit got a keras.callbacks.CallbackList, not a list of callbacks"
        if self.save_freq == "epoch" and resume.inexact:
            return resume.inexact
        return None

    def _stop_for_sigterm(self, not_backed_up: str | None = None) -> None:
        """Ends `fit` for the SIGTERM; the backup on disk (if any) holds the
        state a restart begins with. `not_backed_up`: why the batches since
        that backup were not backed up."""
        sigterm = cast(_resume.FitResume, _call.resume_of(self.model)).sigterm
        sigterm.acted()
        sigterm.call_previous_handler()
        if self._backed_up_at is None:
            where = "no batch was trained, so there is no backup to write"
            epoch, batch = None, None
        else:
            epoch, batch = self._backed_up_at
            where = (
                f"the backup in {self.backup_dir} holds the state after {epoch} "
                f"epochs and {batch} batches"
            )
        if not_backed_up is not None and self._trained_since_backup:
            where += (
                "; the batches trained since then were not backed up, because a "
                f"backup mid-epoch would not resume exactly: {not_backed_up}"
            )
        raise Preempted(
            f"fit stopped on SIGTERM: {where}. Run the same script again to resume there.",
            self.backup_dir,
            epoch,
            batch,
        )

    def _read_saved_state(self, state: dict) -> dict:
        name = state.get("state")
        if name is None:  # written by format 1: weights only
            return {}
        with np.load(os.path.join(self.backup_dir, name)) as saved:
            return {key: saved[key] for key in saved.files}

    def _read_state(self) -> dict | None:
        if not os.path.isdir(self.backup_dir):
            return None
        names = os.listdir(self.backup_dir)
        if _STATE_FILE not in names:
            foreign = [n for n in names if not _is_backup_leftover(n)]
            if foreign:
                raise ValueError(
                    f"backup_dir {self.backup_dir} already holds files that are "
                    f"not a customfit backup ({', '.join(sorted(foreign)[:5])}). "
                    "Give BackupAndRestore a directory of its own."
                )
            return None
        try:
            with open(self.state_path) as f:
                state = json.load(f)
            if state.get("format") not in _READABLE_FORMATS:
                raise ValueError(f"unknown format {state.get('format')!r}")
            state["epoch"], state["weights"], state["model"]  # noqa: B018
        except (OSError, ValueError, KeyError, AttributeError) as error:
            raise ValueError(
                f"{self.state_path} is not a readable backup ({error}). Delete "
                f"{self.backup_dir} to train from scratch."
            ) from error
        # Backups without "backend" come from releases that backed up on
        # TensorFlow only.
        written_by = state.get("backend", "tensorflow")
        if written_by != BACKEND:
            raise ValueError(
                f"The backup in {self.backup_dir} was written under Keras' "
                f"{written_by} backend; this fit runs on {BACKEND}. A backup "
                "resumes exactly only on the backend that wrote it (each records "
                "where its data and per-replica metrics stand in its own way). "
                f"Resume with KERAS_BACKEND={written_by}, or delete "
                f"{self.backup_dir} to train from scratch. Nothing was loaded."
            )
        if state["model"] != _fingerprint(self.model):
            raise ValueError(
                f"The backup in {self.backup_dir} was written by a different "
                f"model ({_describe(state['model'])}; this one is "
                f"{_describe(_fingerprint(self.model))}). Use another backup_dir "
                f"for this model, or delete {self.backup_dir} to train it from "
                "scratch."
            )
        return state


def _is_backup_leftover(name: str) -> bool:
    """Files a kill can leave behind without a committed `backup.json`."""
    return name.startswith(".tmp-") or (
        name.startswith("epoch-") and (name.endswith(".weights.h5") or name.endswith(".state.npz"))
    )


def _fingerprint(model: keras.Model) -> dict:
    return {
        "class": type(model).__name__,
        "weights": [[list(w.shape), str(w.dtype)] for w in model.weights],
    }


def _describe(fingerprint: dict) -> str:
    weights = fingerprint.get("weights", [])
    shapes = ", ".join("x".join(map(str, s)) or "scalar" for s, _ in weights[:4])
    more = ", ..." if len(weights) > 4 else ""
    return f"{fingerprint.get('class')} with {len(weights)} weights: {shapes}{more}"


class TrainingPlot(keras.callbacks.Callback):
    """Draws a run to image files as it trains: the loss within each
    epoch, batch by batch, one line per epoch, and the `History` curves
    (training and validation) of every metric, one panel per metric.

    The per-batch values are the ones Keras passes to callbacks: the mean loss
    of the epoch so far, so each line ends at that epoch's `loss`. Logged
    values (`CustomModel.log`) are drawn like metrics.

    Needs matplotlib (`pip install "customfit[plot]"`); it draws off-screen
    (Agg) and never opens windows or changes matplotlib's global backend.

    Args:
        path: File name without extension, e.g. "runs/plots/training".
        formats: Extensions to write, each one a file: ("png", "pdf").
        batch_metric: The per-batch log to draw in the first panel.
        draw_every: Redraw after every this many epochs (drawing takes about
            a second); the files are always redrawn when `fit` ends.
    """

    reads_only_logs = True  # per batch, `steps_per_execution="auto"` may group batches

    def __init__(
        self,
        path: str | os.PathLike,
        formats: Sequence[str] = ("png", "pdf"),
        batch_metric: str = "loss",
        draw_every: int = 1,
    ) -> None:
        super().__init__()
        _require_matplotlib()
        if draw_every < 1:
            raise ValueError(f"draw_every must be at least 1, got {draw_every}.")
        self.path = os.fspath(path)
        self.formats = tuple(formats)
        self.batch_metric = batch_metric
        self.draw_every = draw_every
        self.drawn_epochs: list[int] = []  # epochs finished at each drawing
        self._epochs_done = 0
        self.batch_values: dict[int, list[float]] = {}
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._epoch = 0

    @property
    def files(self) -> list[str]:
        """The files written, one per format."""
        return [f"{self.path}.{fmt}" for fmt in self.formats]

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Runs when `fit` starts, before any batch: checks that the files'
        directory can be written."""
        _require_writable_directory(os.path.dirname(self.path), "TrainingPlot", self.model)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Runs before each epoch: starts its per-batch line."""
        self._epoch = epoch
        self.batch_values[epoch] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Runs after each training batch: records the batch's value."""
        value = (logs or {}).get(self.batch_metric)
        if value is not None:
            self.batch_values[self._epoch].append(float(value))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Runs after each epoch (after validation): records it, redraws
        every `draw_every` epochs."""
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append((epoch + 1, float(value)))
        self._epochs_done = epoch + 1
        if (epoch + 1) % self.draw_every == 0:
            self.draw()

    def on_train_end(self, logs: dict | None = None) -> None:
        """Runs when `fit` ends: draws what the last redraw missed."""
        if self._epochs_done and self._epochs_done not in self.drawn_epochs[-1:]:
            self.draw()

    def draw(self) -> list[str]:
        """Writes the figure to every format now (on the chief only, under
        `MultiWorkerMirroredStrategy`); returns the file names."""
        model = getattr(self, "model", None)
        if model is not None and not cluster.is_chief(model):
            return self.files
        Figure, FigureCanvasAgg = _require_matplotlib()
        names = [n for n in self.history if not n.startswith("val_")]
        names += [n[4:] for n in self.history if n.startswith("val_") and n[4:] not in self.history]
        names.sort(key=lambda n: n != self.batch_metric)  # its curve first
        panels = 1 + len(names)
        columns = min(panels, 3)
        rows = -(-panels // columns)
        figure = Figure(figsize=(5 * columns, 3.6 * rows), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        self._draw_batches(axes[0])
        for ax, name in zip(axes[1:], names):
            self._draw_history(ax, name)
        for ax in axes[panels:]:
            ax.set_visible(False)
        if os.path.dirname(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for filename in self.files:
            with atomic_destination(filename) as temporary:
                figure.savefig(temporary, format=filename.rsplit(".", 1)[1], dpi=110)
        self.drawn_epochs.append(self._epochs_done)
        return self.files

    def _draw_batches(self, ax: Any) -> None:
        import matplotlib
        from matplotlib.ticker import MaxNLocator

        colormap = matplotlib.colormaps["viridis"]
        epochs = sorted(self.batch_values)
        for i, epoch in enumerate(epochs):
            values = self.batch_values[epoch]
            colour = colormap(i / max(len(epochs) - 1, 1))
            ax.plot(range(1, len(values) + 1), values, color=colour, label=f"epoch {epoch + 1}")
        ax.set_title(f"{self.batch_metric} within each epoch")
        ax.set_xlabel("batch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no batch 1.5
        ax.set_ylabel(f"{self.batch_metric} (mean of the epoch so far)")
        ax.grid(alpha=0.3)
        if epochs:
            ax.legend(fontsize="small", ncols=1 + len(epochs) // 8)

    def _draw_history(self, ax: Any, name: str) -> None:
        from matplotlib.ticker import MaxNLocator

        for key, style, label in ((name, "o-", "training"), (f"val_{name}", "s--", "validation")):
            points = self.history.get(key)
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")


def _require_matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "customfit.callbacks.TrainingPlot draws with matplotlib, which is "
            'not installed. Install it with: pip install "customfit[plot]"'
        ) from error
    return Figure, FigureCanvasAgg


# ----------------------------------------------- learning rates of several optimizers


class LearningRateScheduler(keras.callbacks.LearningRateScheduler):
    """`keras.callbacks.LearningRateScheduler` for every optimizer of the model.

    Keras' callback sets only `model.optimizer`'s learning rate. This one sets
    each optimizer in `model.optimizers` (`CustomModel.optimizers`: the
    compiled one as "optimizer", and every optimizer held as an attribute,
    by attribute name), at the start of each epoch, and adds their learning
    rates to the epoch logs (`learning_rate` for `model.optimizer`,
    `learning_rate_<name>` for the others). With only `model.optimizer` it
    behaves as Keras' callback.

    Args:
        schedule: `schedule(epoch, lr) -> float`, called with the epoch index
            (from 0) and that optimizer's current learning rate, for every
            optimizer; or a mapping `{name: schedule}` that sets only the
            optimizers it names, each with its own schedule. `schedule(epoch)`
            is accepted too, as in Keras.
        verbose: 1 prints each change.

    Example:

    ```python
    customfit.callbacks.LearningRateScheduler({
        "generator_optimizer": lambda epoch, lr: 2e-4 * 0.9 ** epoch,
        "discriminator_optimizer": lambda epoch, lr: 1e-4 * 0.9 ** epoch,
    })
    ```
    """

    def __init__(
        self,
        schedule: Callable[..., float] | Mapping[str, Callable[..., float]],
        verbose: int = 0,
    ) -> None:
        if isinstance(schedule, Mapping):
            bad = [name for name, f in schedule.items() if not callable(f)]
            if not schedule or bad:
                raise TypeError(
                    "LearningRateScheduler takes one schedule, or a non-empty "
                    "mapping {optimizer name: schedule(epoch, lr)}; "
                    f"{'got an empty mapping' if not schedule else f'{bad} are not callable'}."
                )
        elif not callable(schedule):
            raise TypeError(
                "LearningRateScheduler's schedule must be a function "
                f"schedule(epoch, lr) -> float, or a mapping of them; got "
                f"{type(schedule).__name__}."
            )
        super().__init__(schedule, verbose=verbose)

    def _optimizers(self) -> dict[str, Any]:
        names = list(self.schedule) if isinstance(self.schedule, Mapping) else None
        return _optimizers.selected(self.model, names, "LearningRateScheduler")

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Runs when `fit` starts: checks the names before any training."""
        _optimizers.settable(self._optimizers(), "LearningRateScheduler")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Runs before each epoch: sets each optimizer's learning rate."""
        for name, optimizer in self._optimizers().items():
            schedule = self.schedule[name] if isinstance(self.schedule, Mapping) else self.schedule
            current = _optimizers.rate(optimizer)
            try:
                learning_rate = schedule(epoch, current)
            except TypeError:  # schedule(epoch), as Keras accepts
                learning_rate = schedule(epoch)
            if not isinstance(learning_rate, (float, np.floating)):
                raise ValueError(
                    f"The schedule for '{name}' must return a float; got "
                    f"{learning_rate!r}. Return e.g. float(lr * 0.5)."
                )
            optimizer.learning_rate = float(learning_rate)
            if self.verbose > 0:
                print(
                    f"\nEpoch {epoch + 1}: LearningRateScheduler setting "
                    f"{name} learning rate to {float(learning_rate)}."
                )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Runs after each epoch: adds the learning rates to the logs."""
        if logs is not None:
            logs.update(_optimizers.learning_rates(self._optimizers()))


class ReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """`keras.callbacks.ReduceLROnPlateau` for every optimizer of the model.

    Same arguments and decision as Keras' callback (monitored value, `mode`,
    `min_delta`, `patience`, `cooldown`, `min_lr`), but when the monitored
    value stops improving it multiplies the learning rate of each optimizer in
    `model.optimizers` by `factor` (each stays at least `min_lr`), or of the
    ones named in `optimizers`, instead of `model.optimizer`'s only. It adds
    their learning rates (before the reduction) to the epoch logs, as Keras'
    callback does for `model.optimizer`.

    Args:
        optimizers: Names from `model.optimizers` to reduce; None for all.
        **kwargs: As for `keras.callbacks.ReduceLROnPlateau`.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        optimizers: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(optimizers, str):
            optimizers = [optimizers]
        if optimizers is not None and not optimizers:
            raise ValueError(
                "ReduceLROnPlateau got optimizers=[]: name at least one, or "
                "pass None to reduce all of the model's optimizers."
            )
        super().__init__(
            monitor=monitor,
            factor=factor,
            patience=patience,
            verbose=verbose,
            mode=mode,
            min_delta=min_delta,
            cooldown=cooldown,
            min_lr=min_lr,
            **kwargs,
        )
        self.optimizers = None if optimizers is None else list(optimizers)

    def _optimizers(self) -> dict[str, Any]:
        return _optimizers.selected(self.model, self.optimizers, "ReduceLROnPlateau")

    def on_train_begin(self, logs: dict | None = None) -> None:
        """Runs when `fit` starts: resets the wait, checks the names."""
        super().on_train_begin(logs)
        _optimizers.settable(self._optimizers(), "ReduceLROnPlateau")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Runs after each epoch: logs the learning rates, and reduces them
        after `patience` epochs without improvement."""
        logs = logs if logs is not None else {}
        optimizers = self._optimizers()
        logs.update(_optimizers.learning_rates(optimizers))
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(
                f"Learning rate reduction is conditioned on metric "
                f"`{self.monitor}` which is not available. Available metrics "
                f"are: {','.join(list(logs.keys()))}.",
                stacklevel=2,
            )
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if internals.monitor_improved(self, current, self.best):
            self.best: float = current  # Keras' attribute, declared for mypy
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                reduced = [
                    self._reduce(name, optimizer, epoch) for name, optimizer in optimizers.items()
                ]
                if any(reduced):
                    self.cooldown_counter: int = self.cooldown  # Keras' attribute, as above
                    self.wait = 0

    def _reduce(self, name: str, optimizer: Any, epoch: int) -> bool:
        old = _optimizers.rate(optimizer)
        if old <= np.float32(self.min_lr):
            return False
        new = max(old * self.factor, self.min_lr)
        optimizer.learning_rate = new
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing {name} learning rate to {new}.")
        return True


def _require_writable_directory(directory: str, callback: str, model: keras.Model | None) -> None:
    """Refuses, before the first batch, a directory a callback would fail to
    write to at its first save, after training up to it. Created if absent,
    as the callback would. Only the chief writes (see `_cluster`); a callback
    driven without a model writes from this process."""
    if not directory or (model is not None and not cluster.is_chief(model)):
        return
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise OSError(
            f"{callback} cannot write to {directory}: {error.strerror or error}. "
            "Give it a directory this process can create and write to. Nothing "
            "was trained."
        ) from error


def __getattr__(name: str) -> object:
    if name == "ResumeWarning":  # until 0.7
        warnings.warn(
            "customfit.callbacks.ResumeWarning is customfit.ResumeWarning now "
            "(every customfit exception and warning is in customfit); the old "
            "name goes in customfit 0.7.",
            DeprecationWarning,
            stacklevel=2,
        )
        return ResumeWarning
    raise AttributeError(f"module 'customfit.callbacks' has no attribute {name!r}")
