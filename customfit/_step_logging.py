"""`CustomModel.log`: values logged from inside a step, reported like metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import keras


class EpochMean(keras.metrics.Mean):
    """`log(..., reduction="mean")`: Keras' `Mean`, over the whole epoch."""

    reduction = "mean"


class LastValue(keras.metrics.Mean):
    """`log(..., reduction="last")`: the (weighted) mean of the last call
    only. Its state is a `Mean`'s, replaced at each call instead of added to,
    so under `tf.distribute` (variables summed over replicas when read) the
    result is the weighted mean of each replica's last value."""

    reduction = "last"

    def update_state(self, values: Any, sample_weight: Any = None) -> None:
        for variable in (self.total, self.count):
            variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
        super().update_state(values, sample_weight=sample_weight)


REDUCTIONS = {cls.reduction: cls for cls in (EpochMean, LastValue)}


class StepLogs:
    """The values a model logs with `CustomModel.log`, one metric per name and
    phase ("train" for `fit`'s steps, "test" for `evaluate` and validation), so
    a value logged only while evaluating never shows up as a training column.

    A name's metric is created the first time a step logs it, inside
    `creation_scope()`, which the backend's loop provides: on TensorFlow the
    step is being traced, and the variables are created under
    `tf.init_scope()`, outside the traced graph, in the model's distribution
    strategy, exactly like variables created before `fit`; on JAX the loop
    first traces the step abstractly while `discovering()`, which collects
    new names without creating anything, and then creates their metrics with
    `create_discovered()` before the step is compiled. Under `tf.distribute`
    the metric variables are summed across replicas on read, so a logged
    value is a weighted mean over replicas, as Keras' own `Mean` metrics
    are.

    Attributes:
        phase: Where values logged now go: "train" or "test".
    """

    def __init__(
        self,
        creation_scope: Callable[[], AbstractContextManager[Any] | None],
        replica_results: Callable[[dict[str, keras.metrics.Mean]], dict[str, Any] | None],
    ) -> None:
        """
        Args:
            creation_scope: The context a new metric is created in, or None
                when it cannot be created now: the name is then noted, as
                while `discovering()`.
            replica_results: The results of the metrics given, summed across
                the replicas of a replica context, or None outside one.
        """
        self.phase = "train"
        self._by_phase: dict[str, dict[str, keras.metrics.Mean]] = {
            "train": {},
            "test": {},
        }
        self._creation_scope = creation_scope
        self._replica_results = replica_results
        # (phase, name) -> reduction, of names logged for the first time
        # while `discovering()` (None when not), and of those not created yet.
        self._discovered: dict[tuple[str, str], str] | None = None
        self._pending: dict[tuple[str, str], str] = {}

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    @property
    def metrics(self) -> list[keras.metrics.Mean]:
        """The current phase's metrics, in the order names were first logged."""
        return list(self._by_phase[self.phase].values())

    @property
    def all_metrics(self) -> list[keras.metrics.Mean]:
        return [m for by_name in self._by_phase.values() for m in by_name.values()]

    @contextlib.contextmanager
    def discovering(self) -> Iterator[None]:
        """While open, a name logged for the first time is noted, not
        created; `create_discovered()` creates the noted ones."""
        self._discovered = {}
        try:
            yield
        finally:
            self._pending.update(self._discovered)
            self._discovered = None

    @property
    def is_discovering(self) -> bool:
        """Whether `discovering()` is open."""
        return self._discovered is not None

    def create_discovered(self) -> None:
        """Creates the metrics of the names `discovering()` noted."""
        for (phase, name), reduction in self._pending.items():
            if name not in self._by_phase[phase]:
                self._by_phase[phase][name] = REDUCTIONS[reduction](name=name)
        self._pending = {}

    def log(
        self,
        name: str,
        value: Any,
        weight: Any,
        reduction: str,
        reserved_names: Callable[[], set[str]],
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"log() takes a non-empty string name; got {name!r}. "
                'Call it as self.log("grad_norm", value).'
            )
        if reduction not in REDUCTIONS:
            raise ValueError(
                f'log("{name}", ..., reduction={reduction!r}): reduction is one '
                f"of {', '.join(map(repr, REDUCTIONS))}."
            )
        by_name = self._by_phase[self.phase]
        metric = by_name.get(name)
        if metric is None:
            if name in reserved_names():
                raise ValueError(
                    f'log("{name}", ...) clashes with the metric "{name}" the '
                    "model already reports. Pick another name, e.g. "
                    f'"{name}_logged".'
                )
            scope = None if self._discovered is not None else self._creation_scope()
            if scope is None:
                pending = self._pending if self._discovered is None else self._discovered
                pending.setdefault((self.phase, name), reduction)
                return
            with scope:
                metric = REDUCTIONS[reduction](name=name)
            by_name[name] = metric
        elif metric.reduction != reduction:
            raise ValueError(
                f'log("{name}", ...) is called with reduction="{reduction}" and '
                f'elsewhere with reduction="{metric.reduction}". Use one '
                "reduction per name, or two names."
            )
        metric.update_state(value, sample_weight=weight)

    def results(self) -> dict[str, Any]:
        """The current phase's values, over all replicas (see
        `replica_results`)."""
        by_name = self._by_phase[self.phase]
        summed = self._replica_results(by_name) if by_name else None
        if summed is not None:
            return summed
        return {name: m.result() for name, m in by_name.items()}
