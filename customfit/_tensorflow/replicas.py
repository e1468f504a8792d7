"""A step's replicas under `tf.distribute` (the `Replicas` contract).

`tf.distribute` runs one copy of the step per replica, each on its part of
the batch; the optimizer sums the replicas' gradients. Decisions that must
be the same on every replica are taken once, in cross-replica context: the
optimizer synchronizes replicas (`merge_call`), which is not allowed inside
a `tf.cond` taken per replica (as in Keras' `LossScaleOptimizer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf
from keras import ops

from customfit._keras import internals


def count() -> int:
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def in_replica_context() -> bool:
    return tf.distribute.has_strategy() and tf.distribute.get_replica_context() is not None


def summed(gradients: list) -> list:
    """For decisions that must not depend on how a batch is split."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(gradients)
    present = [g for g in gradients if g is not None]
    total = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(total) for g in gradients]


def update_on_every_replica_if(predicate: Callable[[], Any], update: Callable[[], None]) -> None:
    """`predicate()` is read in cross-replica context."""

    def decide(strategy: tf.distribute.Strategy) -> None:
        tf.cond(
            predicate(),
            lambda: strategy.extended.call_for_each_replica(update),
            lambda: None,
        )

    tf.distribute.get_replica_context().merge_call(decide)


def skip_on_every_replica_if(
    model: Any, skip: Any, gradients: list, update: Callable[[list], None]
) -> None:
    """The replicas' decisions all-reduced, so if any replica skips, all
    skip; then `model._count_skip()` (a skip, or halted) or the update on
    every replica, through `model._updated`."""
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync > 1:
        overflow = tf.logical_not(_all_finite(gradients))
        flags = tf.cast(tf.stack([skip, overflow]), tf.int32)
        flags = context.all_reduce(tf.distribute.ReduceOp.SUM, flags) > 0
        skip = flags[0]
        if internals.loss_scale_in_use(model.optimizer) is not None:
            gradients = _overflowed_everywhere(flags[1], gradients)

    def decide(strategy: tf.distribute.Strategy, skip: Any, gradients: list) -> None:
        skip = strategy.experimental_local_results(skip)[0]
        tf.cond(
            model._skip_state.halted.value | skip,
            model._count_skip,
            lambda: model._updated(
                lambda: strategy.extended.call_for_each_replica(update, args=(gradients,))
            ),
        )

    context.merge_call(decide, args=(skip, list(gradients)))


def _all_finite(tensors: list) -> Any:
    finite = ops.convert_to_tensor(True)
    for t in tensors:
        if t is not None:
            t = getattr(t, "values", t)  # a tf.IndexedSlices' values
            finite = ops.logical_and(finite, ops.all(ops.isfinite(t)))
    return finite


def _overflowed_everywhere(overflow: Any, gradients: list) -> list:
    """Every replica's gradients made non-finite when any replica's are.

    Under `MirroredStrategy`, Keras' `LossScaleOptimizer` decides from the
    first replica's gradients alone whether to apply them; an overflow on
    another replica would reach the weights through the all-reduce (inf
    weights in stock `fit`). With the overflow on every replica, the
    optimizer skips the step and lowers the scale, as on one device.
    Finite gradients are returned unchanged (selected, not recomputed).
    """

    def poisoned(g: tf.Tensor) -> tf.Tensor:
        return tf.where(overflow, tf.fill(tf.shape(g), tf.constant(float("nan"), g.dtype)), g)

    result = []
    for g in gradients:
        if isinstance(g, tf.IndexedSlices):
            g = tf.IndexedSlices(poisoned(g.values), g.indices, g.dense_shape)
        elif g is not None:
            g = poisoned(g)
        result.append(g)
    return result


def global_batch_noise(seed: int, counter: Any, batch: Any, shape: list, kind: str) -> Any:
    """Each replica takes its rows of the global batch's noise."""
    context = tf.distribute.get_replica_context()
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if context is None or replicas == 1:
        offset, total = tf.zeros((), "int32"), batch
    else:
        sizes = context.all_gather(tf.reshape(batch, [1]), axis=0)
        replica = tf.cast(context.replica_id_in_sync_group, "int32")
        offset = tf.reduce_sum(sizes[:replica])
        total = tf.reduce_sum(sizes)
    global_shape = tf.concat([tf.reshape(total, [1]), tf.constant(shape, "int32")], 0)
    if kind == "latent":
        noise = tf.random.stateless_normal(
            global_shape, tf.stack([tf.constant(seed, "int64"), counter])
        )
    else:
        noise = tf.random.stateless_uniform(
            global_shape, tf.stack([tf.constant(~seed, "int64"), counter])
        )
    return noise[offset : offset + batch]
