"""SIGTERM during `fit`: finish the batch under way, write a backup, stop.

Preemptible cloud VMs and batch schedulers (SLURM, Kubernetes) send SIGTERM,
then SIGKILL after a grace period. While `CustomModel.fit` runs with a
`customfit.callbacks.BackupAndRestore`, its `FitResume` holds a
`SigtermWatch`: the first SIGTERM only sets `requested`, and the callback
acts on it at the next point where the training state is whole (before the
next batch or execution, or the next epoch, or when training ends): it
writes a backup there and raises `customfit.Preempted`, so that no batch
runs after the backup. A second SIGTERM is not waited for: it goes to the
handler that was there before `fit` (Python's default ends the process),
losing at most the batches since the last complete backup, which atomic
writes keep whole.

Outside such a `fit`, SIGTERM is left to whatever handled it before: the
watch installs its handler when `fit` starts and puts the previous one back
when it ends, however it ends. Under `MultiWorkerMirroredStrategy` it
installs nothing: TensorFlow's coordination service catches SIGTERM in C++,
and a worker that stopped alone would leave the others waiting in the
step's collectives.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

_Handler = Any  # a callable, signal.SIG_DFL or signal.SIG_IGN


class SigtermWatch:
    """Catches SIGTERM while one `fit` runs (a context manager).

    Nothing is installed outside the main thread (Python delivers signals
    there only), when SIGTERM is ignored (`SIG_IGN`) or caught outside
    Python (a native handler, seen on Linux), or when `enabled` is False.

    Attributes:
        requested: Whether a SIGTERM arrived that `fit` has not acted on yet.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._installed = False
        self._previous: _Handler = signal.SIG_DFL
        self._frame: FrameType | None = None

    def __enter__(self) -> SigtermWatch:
        self.requested = False
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None or previous == signal.SIG_IGN or _caught_natively(previous):
            return self
        self._previous = previous
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        """Puts the previous handler back; a SIGTERM that `fit` ended before
        acting on goes to it now."""
        self._uninstall()
        if self.requested:
            self.requested = False
            self._deliver()

    def acted(self) -> None:
        """`fit` stops for the SIGTERM: the previous handler is put back, and
        SIGTERM goes to it again from now on."""
        self._uninstall()
        self.requested = False

    def call_previous_handler(self) -> None:
        """Calls the handler that was there before `fit` with the SIGTERM
        that stopped it, if it is a Python function (the program's own)."""
        if callable(self._previous):
            self._previous(signal.SIGTERM, self._frame)

    def _uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # a second SIGTERM: stop now, as without `fit`
            self.acted()
            self._frame = frame
            self._deliver()
            return
        self.requested = True
        self._frame = frame
        # Not print(), which can fail with a reentrant call when the main
        # thread was writing to the same stream; and nothing may escape the
        # handler into `fit` (a closed stderr, a broken pipe).
        try:
            os.write(
                2,
                b"customfit: SIGTERM received; fit stops after the batch under way, "
                b"once a backup is written.\n",
            )
        except OSError:
            pass

    def _deliver(self) -> None:
        """SIGTERM again, for the previous handler (installed already)."""
        if callable(self._previous):
            self._previous(signal.SIGTERM, self._frame)
        elif self._previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGTERM)


def _caught_natively(python_handler: _Handler) -> bool:
    """Whether SIGTERM has a handler Python does not know of: one installed
    in C or C++ (TensorFlow's coordination service installs one), which
    `signal.getsignal` reports as `SIG_DFL`. Read from Linux's
    /proc/self/status; False where that does not exist."""
    if python_handler != signal.SIG_DFL:
        return False
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False
