"""The Keras-2 helpers that tutorials and books call inside `train_step`.

Keras 3 still answers to `self.compiled_loss(...)` and
`self.compiled_metrics.update_state(...)`, but with a deprecation warning, and
the latter feeds the predictions to the loss tracker, so the `loss` column
reports the mean prediction instead of the loss. customfit restores what those
calls meant: the same loss and the same logs as stock `fit`.
"""

from __future__ import annotations

from typing import Any

import keras

from customfit._keras import internals


class CompiledLoss:
    """`model.compiled_loss`: the compiled loss, tracked as stock `fit` tracks it.

    Calling it returns the loss configured in `compile()` plus the
    regularization losses, and adds that total to the `loss` metric weighted by
    the batch size, exactly as `keras.Model.train_step` does. Under
    `tf.distribute` the returned loss is this replica's share (divided by the
    number of replicas), ready for `tape.gradient`; the tracked value is the
    full loss.

    It never calls `compute_loss`, so a `compute_loss` override may call it.
    """

    def __init__(self, model: keras.Model) -> None:
        self._model = model

    def __call__(
        self,
        y: Any,
        y_pred: Any,
        sample_weight: Any = None,
        regularization_losses: list | None = None,
    ) -> Any:
        """Returns the total loss and records it in the `loss` metric.

        Args:
            y: Targets.
            y_pred: The model's predictions.
            sample_weight: Optional sample weights.
            regularization_losses: Extra losses to add. `None` adds the model's
                own `self.losses` (regularizers and `add_loss`), as stock `fit`
                does; passing `self.losses` explicitly, as Keras 2 tutorials do,
                counts them once, not twice.
        """
        model = self._model
        compile_loss = internals.compiled_loss_object(model)
        if compile_loss is None:
            raise ValueError(
                "self.compiled_loss(...) needs a loss from compile(): call "
                'model.compile(optimizer=..., loss="...") or compute the loss '
                "yourself in train_step."
            )
        if y is None:
            raise ValueError(missing_targets_message())
        if regularization_losses is None:
            regularization_losses = model.losses
        losses = []
        loss = compile_loss(y, y_pred, sample_weight)
        if loss is not None:
            losses.append(loss)
        losses.extend(
            internals.aggregate_additional_loss(model, extra) for extra in regularization_losses
        )
        if not losses:
            total = keras.ops.zeros(())
        elif len(losses) == 1:
            total = losses[0]
        else:
            total = keras.ops.sum(losses)
        track_loss(model, total, batch_of=y_pred)
        return total


class CompiledMetrics:
    """`model.compiled_metrics`: the metrics passed to `compile()`, nothing else.

    `update_state` updates the compiled `metrics` and `weighted_metrics` only;
    the loss is tracked by `compiled_loss`.
    """

    def __init__(self, model: keras.Model) -> None:
        self._model = model

    def _compile_metrics(self) -> Any:
        return internals.compiled_metrics_object(self._model)

    def update_state(self, y: Any, y_pred: Any, sample_weight: Any = None) -> None:
        compile_metrics = self._compile_metrics()
        if compile_metrics is not None:
            compile_metrics.update_state(y, y_pred, sample_weight)

    def reset_state(self) -> None:
        compile_metrics = self._compile_metrics()
        if compile_metrics is not None:
            compile_metrics.reset_state()

    def result(self) -> dict[str, Any]:
        compile_metrics = self._compile_metrics()
        if compile_metrics is None or not compile_metrics.built:
            return {}
        return compile_metrics.result()

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        compile_metrics = self._compile_metrics()
        if compile_metrics is None:
            return []
        return expand_compile_metrics(compile_metrics)


def track_loss(
    model: keras.Model, loss: Any, batch_of: Any, tracker: keras.metrics.Mean | None = None
) -> None:
    """Adds `loss` to the `loss` metric (or to `tracker`) as stock `fit`
    does: the full (cross-replica) loss, weighted by the batch size."""
    first = next(t for t in keras.tree.flatten(batch_of) if t is not None)
    if tracker is None:
        tracker = internals.loss_tracker(model)
    tracker.update_state(
        internals.unscale_loss_for_distribution(loss),
        sample_weight=keras.ops.shape(first)[0],
    )


def missing_targets_message() -> str:
    return (
        "The data has no targets, but the loss given to compile() compares "
        "predictions with targets. Pass y to fit()/evaluate(), or yield "
        "(x, y) from your dataset; for a loss without targets, compile "
        "without loss= and compute it in compute_loss() or with add_loss()."
    )


class _NamedMetric(internals.MetricsList):
    """One metric of `compile(metrics=...)`, under the name stock logs use.

    It is a `MetricsList` of one so that Keras callbacks that look inside
    compiled metrics (`ModelCheckpoint`/`EarlyStopping` finding whether to
    maximize) still find the metric.
    """

    def __init__(self, metric: keras.metrics.Metric, name: str) -> None:
        super().__init__([metric], name=name)

    def result(self) -> Any:
        return self.metrics[0].result()


def expand_compile_metrics(compile_metrics: Any) -> list[keras.metrics.Metric]:
    """The compiled metrics one by one, each named as its key in the logs.

    Falls back to `[compile_metrics]` (stock behaviour) when the names cannot
    be matched one-to-one.
    """
    if not compile_metrics.built:
        return []
    expanded = compile_metrics.__dict__.get("_customfit_expanded")
    if expanded is None:
        named = internals.compiled_metric_log_names(compile_metrics)
        if len(named) != len(compile_metrics.metrics):
            expanded = [compile_metrics]
        else:
            expanded = [_NamedMetric(m, name) for name, m in named.items()]
        # Plain attribute: Keras must not track the views as extra state.
        object.__setattr__(compile_metrics, "_customfit_expanded", expanded)
    return expanded
