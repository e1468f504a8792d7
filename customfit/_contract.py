"""What customfit asks of a Keras backend: the loop contract.

`CustomModel`, its hooks, `log`, the Keras-2 helpers, saving, the callbacks
and every recipe are written once, with `keras.ops`, against the three
interfaces below. Each backend implements them in its own package
(`customfit/_tensorflow/`, `customfit/_jax/`), one module per interface,
and `customfit._backend` picks the modules of the backend Keras was
imported with. mypy checks each module against its interface
(`_backend.py` assigns them to names annotated with these types), and
`tools/check_imports.py` keeps `tensorflow`, `jax` and `torch` inside their
backend's package.

- `Loop`: how a step is differentiated, compiled and run by `fit`,
  `evaluate` and `predict`, and the stateful primitives a step uses
  (`gradients`, `cond`, `apply`, `state_scope`), and a step run once
  eagerly (`run_once`).
- `Replicas`: the replicas a step runs on (`tf.distribute` runs one step
  per replica; `keras.distribution` one step over the whole batch), as the
  recipes need them.
- `Cluster`: the processes of a multi-process run, as saving and resuming
  need them (who writes files, agreeing on a position, gathering state).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import keras
import numpy as np


class Loop(Protocol):
    """How a backend runs `CustomModel`'s steps."""

    END_OF_DATA: tuple[type[BaseException], ...]
    """What drawing from an exhausted iterator of the backend's data raises."""

    # ---- running a call (`_call.Call` owns it)

    def call_scope(self, model: keras.Model) -> AbstractContextManager:
        """What the backend needs around Keras' own `fit`, `evaluate`,
        `predict` and `train_on_batch`."""

    def optimizer_stand_in(self, model: keras.Model) -> Any:
        """What `model.optimizer` reads while compiled with none (None, or
        what the backend's trainer needs there while it runs)."""

    def maybe_symbolic_build(
        self, model: keras.Model, iterator: Any = None, data_batch: Any = None
    ) -> None:
        """`CustomModel._maybe_symbolic_build`."""

    def symbolic_build(
        self, model: keras.Model, iterator: Any = None, data_batch: Any = None
    ) -> None:
        """`CustomModel._symbolic_build`. The one of the two that the
        backend's `fit` and `evaluate` call with the epoch iterator is where
        the running call learns its data (`_call.symbolic_build`)."""

    def make_train_function(self, model: keras.Model) -> Callable: ...

    def make_test_function(self, model: keras.Model) -> Callable: ...

    def make_predict_function(self, model: keras.Model, keras_make: Callable) -> Callable: ...

    def predict_steps_per_execution(self, steps: int) -> int:
        """How many batches each execution of `predict` draws, with `steps`
        compiled."""

    # ---- inside a step

    def loss_gradients(
        self, model: keras.Model, x: Any, y: Any, sample_weight: Any
    ) -> tuple[Any, Any, list, list]:
        """`(y_pred, loss, gradients, variables)` of the default step: the
        forward pass and tracked loss, differentiated over the trainable
        variables with the loss scaled, the gradients unscaled."""

    def gradients(
        self, function: Callable[[], tuple[Any, Any]], variables: list
    ) -> tuple[Any, list]:
        """`function() -> (objective, aux)` run once: `(aux, gradients of
        objective w.r.t. variables)`; what it assigns to other variables is
        kept."""

    def pass_state(self, model: keras.Model) -> Any:
        """The model's state now, for a later pass over the same batch to
        read (`stateless_gradients(..., state=...)`): the values of its
        non-trainable variables (BatchNormalization statistics, seed
        generators) and, on PyTorch, torch's global random state, from which
        Keras' unseeded `Dropout` draws."""

    def stateless_gradients(
        self,
        function: Callable[[list], Any],
        sources: list,
        variables: list | None = None,
        state: Any = (),
    ) -> tuple[Any, list]:
        """`function(sources)` and its gradients w.r.t. `sources`, with
        `variables` reading `sources`, the model reading `state` (from
        `pass_state`) when given, and what it assigns discarded."""

    def cond(
        self, predicate: Any, if_true: Callable[[], None], if_false: Callable[[], None]
    ) -> None:
        """Runs one of two stateful functions, as `predicate` says."""

    def apply(
        self, optimizer: keras.optimizers.Optimizer, gradients: list, variables: list
    ) -> None: ...

    def state_scope(self, model: keras.Model) -> AbstractContextManager:
        """Where a recipe creates the variables its step updates."""

    def metric_creation_scope(self) -> AbstractContextManager | None:
        """Where `log` creates a metric now; None: note the name only."""

    def replica_results(self, metrics: dict[str, keras.metrics.Mean]) -> dict[str, Any] | None:
        """The logged metrics' results over every replica, where a replica
        reads only its part; None elsewhere."""

    # ---- resuming mid-epoch (`_resume.FitResume`)

    def data_replay(self, epoch_iterator: Any, steps_per_epoch: int | None) -> DataReplay:
        """Follows the data `fit`'s `epoch_iterator` draws, so that a backup
        records where they stand and a resumed `fit` puts them there."""

    def resuming_train_function(self, resume: Any, train_function: Callable) -> Callable:
        """`train_function` as Keras calls it, first reading and dropping the
        batches of the resumed epoch the interrupted run had trained, then
        putting the backup's metric values back (`resume`'s `skipping`,
        `skip`, `last_skip` and `restore_metrics`)."""

    def recording_summaries(self) -> AbstractContextManager:
        """Where `tf.summary` writes whatever its per-batch condition says
        (TensorBoard's epoch-end summaries)."""

    # ---- checking a step

    def run_once(
        self, model: keras.Model, step: Callable[[], Any], variables: list | tuple = ()
    ) -> Any:
        """`step()`, a stateful training step on one batch, run once and
        eagerly where the model's training step runs (so that it can take
        gradients, `cond` and `log`); returns its result
        (`customfit.testing.diagnose`). What it assigns is kept: to the
        variables a training step carries (the model's, its optimizers',
        its metrics', a recipe's) and to `variables` (on TensorFlow to
        every variable). Not compiled, no guards; on JAX a name it logs
        for the first time is noted, not created (metrics cannot be created
        inside the step's scope)."""

    def enable_op_determinism(self) -> None:
        """Makes the backend's ops deterministic (for parity checks)."""

    def two_replicas(self) -> Any:
        """Sets up two replicas on this process's CPU (a process started
        for `check_step`): the strategy to train under, or None where the
        setting is global."""


class DataReplay(Protocol):
    """Where a `fit`'s data stand, for a backup, and putting them there."""

    def position(self, batch: int) -> dict[str, np.ndarray]:
        """What a backup taken after `batch` batches of the epoch records
        (at 0: for the next epoch)."""

    def restore(self, saved: Mapping[str, np.ndarray]) -> None:
        """Before the resumed epoch draws its data: as `position` found them
        (nothing for a backup that recorded no position)."""


class Replicas(Protocol):
    """The replicas a step runs on, as the recipes need them."""

    def count(self) -> int:
        """Replicas running the step in sync (1 where a step sees the whole
        batch)."""

    def in_replica_context(self) -> bool:
        """Whether the step runs as one of several replicas' copies."""

    def summed(self, gradients: list) -> list:
        """The gradients summed over the replicas (themselves with one)."""

    def update_on_every_replica_if(
        self, predicate: Callable[[], Any], update: Callable[[], None]
    ) -> None:
        """`update()` on every replica when `predicate()`, decided once."""

    def skip_on_every_replica_if(
        self, model: Any, skip: Any, gradients: list, update: Callable[[list], None]
    ) -> None:
        """`recipes.SkipNonFinite`'s decision, taken once for all replicas."""

    def global_batch_noise(
        self, seed: int, counter: Any, batch: Any, shape: list, kind: str
    ) -> Any:
        """This replica's rows of `(global batch, *shape)` random numbers
        drawn from `(seed, counter)`: `"latent"` N(0, 1), else U(0, 1)."""


class Cluster(Protocol):
    """The processes of one training run."""

    LOST_CONTACT: tuple[type[BaseException], ...]
    """What a collective raises when a peer process is gone."""

    def multi_worker(self, model: keras.Model) -> bool:
        """Whether the model trains across several processes."""

    def is_chief(self, model: keras.Model) -> bool:
        """Whether this process writes the files."""

    def written_to(self, path: str, model: keras.Model) -> AbstractContextManager[str]:
        """Where this process writes what belongs at `path`."""

    def agreed(self, values: list[int], model: keras.Model) -> bool:
        """Whether every process passed the same `values` (a collective)."""

    def every_replica(self, model: keras.Model, variables: list) -> list:
        """Each variable's value on every replica, stacked."""

    def assign_every_replica(self, model: keras.Model, variables: list, values: list) -> None:
        """The inverse of `every_replica`."""

    def lost_contact_message(self, model: keras.Model, error: BaseException) -> str: ...


__all__ = ["Cluster", "DataReplay", "Loop", "Replicas"]
