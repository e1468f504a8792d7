"""`CustomModel.log`: values logged from inside a step, reported like metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf


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
        self.total.assign(tf.zeros_like(self.total))
        self.count.assign(tf.zeros_like(self.count))
        super().update_state(values, sample_weight=sample_weight)


REDUCTIONS = {cls.reduction: cls for cls in (EpochMean, LastValue)}


class StepLogs:
    """The values a model logs with `CustomModel.log`, one metric per name and
    phase ("train" for `fit`'s steps, "test" for `evaluate` and validation), so
    a value logged only while evaluating never shows up as a training column.

    A name's metric is created the first time a step logs it. That happens while
    Keras traces the step, so the variables are created under `tf.init_scope()`:
    outside the traced graph, in the model's distribution strategy, exactly like
    variables created before `fit`. Under `tf.distribute` the metric variables
    are summed across replicas on read, so a logged value is a weighted mean
    over replicas, as Keras' own `Mean` metrics are.

    Attributes:
        phase: Where values logged now go: "train" or "test".
    """

    def __init__(self) -> None:
        self.phase = "train"
        self._by_phase: dict[str, dict[str, keras.metrics.Mean]] = {
            "train": {},
            "test": {},
        }

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
            with tf.init_scope():
                metric = REDUCTIONS[reduction](name=name)
            by_name[name] = metric
        elif metric.reduction != reduction:
            raise ValueError(
                f'log("{name}", ...) is called with reduction="{reduction}" and '
                f'elsewhere with reduction="{metric.reduction}". Use one '
                "reduction per name, or two names."
            )
        metric.update_state(value, sample_weight=weight)

    def results(self) -> dict[str, tf.Tensor]:
        """The current phase's values, over all replicas.

        Inside a step under `tf.distribute` (a replica context), a metric
        variable reads as this replica's part only, and Keras then averages
        the replicas' logs: a mean of per-replica means, which is not the
        weighted mean when replicas see different numbers of examples (the
        last, short batch). So there the states are summed across replicas
        first (one all-reduce per step), and every replica logs the result
        the metrics give when read outside the step, which Keras reports for
        the epoch."""
        by_name = self._by_phase[self.phase]
        context = tf.distribute.get_replica_context()
        if not by_name or context is None or context.num_replicas_in_sync == 1:
            return {name: m.result() for name, m in by_name.items()}
        summed = context.all_reduce(
            tf.distribute.ReduceOp.SUM,
            {name: (tf.identity(m.total), tf.identity(m.count)) for name, m in by_name.items()},
        )
        return {
            name: tf.math.divide_no_nan(total, count) for name, (total, count) in summed.items()
        }
