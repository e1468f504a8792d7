"""Every exception and warning customfit raises to its users, in one place.

All are exported by `customfit` itself, on every backend, so that a user
can catch or filter them without importing a backend-specific module.
"""

from __future__ import annotations


class CompatibilityWarning(UserWarning):
    """customfit runs on a Keras or TensorFlow release it is not tested with,
    or one whose training loop differs from the code customfit reproduces.

    Training still runs; whether `CustomModel` still equals stock `fit` on
    that release is unknown. `python -m customfit check` compares them on
    the installed versions in under a minute."""


class ResumeWarning(UserWarning):
    """`fit` cannot resume exactly where it was interrupted.

    Warned when `fit` starts with `customfit.callbacks.BackupAndRestore(
    save_freq=N)` and an input or setting it cannot resume exactly mid-epoch
    (a generator, `keras.utils.PyDataset`, `steps_per_epoch`,
    `run_eagerly=True`), when a resumed epoch's metrics cannot be restored,
    and once per process when `CustomModel.fit` gets Keras' own
    `keras.callbacks.BackupAndRestore`, which restarts an interrupted epoch
    from its first batch. Training still resumes from the backup's weights
    and optimizer state."""


class SavingWarning(UserWarning):
    """A saved model could not be loaded back as it is.

    Warned once per class, when a `CustomModel` subclass is saved whole
    (`model.save("m.keras")`, `keras.saving.save_model`, `ModelCheckpoint`
    without `save_weights_only`) while Keras cannot find the class by the
    name the file records: `keras.models.load_model` would then fail with
    "Could not locate class". Register the class with
    `@keras.saving.register_keras_serializable()`, or pass
    `custom_objects={"Name": Name}` when loading."""


class TrainingGuardError(ValueError):
    """The first training step would train silently wrong; the message says
    why and how to fix it (see `CustomModel.training_guards`)."""


class UnreadableCheckpointError(OSError, ValueError):
    """A checkpoint file that is truncated or corrupt.

    An `OSError`, as Keras and h5py raise for such files (Keras'
    `BackupAndRestore(double_checkpoint=True)` falls back to its other backup
    on one), and a `ValueError` for code written against earlier customfit
    releases."""


class Preempted(BaseException):
    """`fit` stopped on SIGTERM after writing a backup.

    Raised by `CustomModel.fit` with a `customfit.callbacks.BackupAndRestore`
    when the process receives SIGTERM (a preemptible VM or a scheduler
    ending the job): the batch or execution under way finished, the backup
    holds the state after it, and no batch ran after the backup. Running the
    same script again resumes from there. Left uncaught, it ends the process
    with a non-zero exit status.

    Like `KeyboardInterrupt`, it is a `BaseException`, not an `Exception`:
    an `except Exception` around `fit` (to log and go on, or to retry) does
    not keep running a process that was asked to end.

    Attributes:
        backup_dir: The directory holding the backup.
        epoch: The epoch a restart resumes in (0-based), None without a
            backup (nothing was trained).
        batch: The number of batches of that epoch already trained, None
            without a backup.
    """

    def __init__(self, message: str, backup_dir: str, epoch: int | None, batch: int | None) -> None:
        super().__init__(message)
        self.backup_dir = backup_dir
        self.epoch = epoch
        self.batch = batch

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.backup_dir, self.epoch, self.batch)


__all__ = [
    "CompatibilityWarning",
    "Preempted",
    "ResumeWarning",
    "SavingWarning",
    "TrainingGuardError",
    "UnreadableCheckpointError",
]

# Named as users import them, in tracebacks and warnings too.
for _name in __all__:
    globals()[_name].__module__ = "customfit"
