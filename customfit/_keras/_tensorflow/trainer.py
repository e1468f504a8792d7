"""The private parts of Keras' TensorFlow trainer customfit relies on
(`keras/src/backend/tensorflow/trainer.py`, Keras 3.10 to 3.15).

`tests/test_keras_internals.py` checks each assumption made here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from keras import tree
from keras.src.backend.tensorflow import trainer as _tf_trainer


def reduce_per_replica(values: Any, strategy: tf.distribute.Strategy, reduction: str) -> Any:
    """Keras' reduction of a step's per-replica outputs (`_make_function`'s)."""
    return _tf_trainer.reduce_per_replica(values, strategy, reduction=reduction)


def autoconvert_optionals(model: keras.Model, step: Callable) -> Callable:
    """`step` taking batches whose `tf.experimental.Optional` parts become
    None, as in Keras' `_make_function` (Keras 3.12 and later; earlier ones
    pass batches on as they are, and so does this)."""
    convert = getattr(model, "_autoconvert_optionals", None)
    return step if convert is None else convert(step)


def symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """Keras' `_maybe_symbolic_build`, working under every strategy.

    Before `fit`/`evaluate` under a strategy, Keras builds the model from the
    shapes of one batch. It first merges a distributed batch with
    `strategy.reduce("MEAN", batch, axis=None)`, which takes one tensor, not a
    nest: under `MultiWorkerMirroredStrategy` that raises `ValueError: Attempt
    to convert a value (PerReplica ...)`. Only shapes and dtypes are used, so
    one replica's part of the batch is taken instead.
    """
    if model._distribute_strategy is None:
        return
    strategy = model.distribute_strategy
    if iterator is not None:
        # Keras 3.10 yields `(step, batches)`, later releases
        # `(begin_step, end_step, batches)`.
        for *_, batches in iterator:
            data_batch = next(batches)
            break

    def one_replica(value: Any) -> Any:
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    with strategy.scope():
        model._symbolic_build(data_batch=tree.map_structure(one_replica, data_batch))


def logs_reduced_along_first_axis(strategy: tf.distribute.Strategy) -> bool:
    """Whether Keras reduces a step's logs with `strategy.reduce("MEAN", value,
    axis=0)` (multi-worker collective strategies), which needs rank-1 values:
    a scalar raises `Invalid reduction dimension 0 for input with 0 dimensions`.
    Under every other strategy Keras averages the replicas' scalars."""
    return _tf_trainer._collective_all_reduce_multi_worker(strategy)


def wrap_epoch_iterator_dataset(epoch_iterator: Any, wrapper: Callable) -> Any:
    """Replaces the (distributed) dataset `fit`'s `TFEpochIterator` makes
    each epoch's iterator from (by `iter()`, in `_get_iterator`) with
    `wrapper(dataset)`; returns the dataset."""
    dataset = epoch_iterator._distributed_dataset
    epoch_iterator._distributed_dataset = wrapper(dataset)
    return dataset
