"""`CustomModel.log`: scalars logged from inside a step, reported like metrics."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import keras
import tensorflow as tf


class StepLogs:
    """The scalars a model logs with `CustomModel.log`, one `Mean` per name and
    phase ("train" for `fit`'s steps, "test" for `evaluate` and validation), so
    a value logged only while evaluating never shows up as a training column.

    A name's metric is created the first time a step logs it. That happens while
    Keras traces the step, so the variables are created under `tf.init_scope()`:
    outside the traced graph, in the model's distribution strategy, exactly like
    variables created before `fit`. Under `tf.distribute` the metric variables
    are summed across replicas on read, so a logged value is averaged over
    replicas the way Keras averages its own metrics.

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
        self, name: str, value, reserved_names: Callable[[], set[str]]
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"log() takes a non-empty string name; got {name!r}. "
                'Call it as self.log("grad_norm", value).'
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
                metric = keras.metrics.Mean(name=name)
            by_name[name] = metric
        value = tf.convert_to_tensor(value)
        if value.shape.rank != 0:
            if value.shape.num_elements() != 1:
                raise ValueError(
                    f'log("{name}", value) takes a scalar; got shape '
                    f"{value.shape}. Reduce it first, e.g. "
                    f'self.log("{name}", tf.reduce_mean(value)).'
                )
            value = tf.reshape(value, ())
        metric.update_state(tf.cast(value, metric.dtype))

    def results(self) -> dict[str, tf.Tensor]:
        """The current phase's values."""
        return {name: m.result() for name, m in self._by_phase[self.phase].items()}
