"""The first training step's check for a loss not scaled for
`tf.distribute`'s replicas, on top of the backend-neutral ones
(`customfit/_guards.py`: loss scaling forgotten under mixed precision).

**Loss not scaled for the replicas.** The optimizer sums the replicas'
gradients, so each replica must differentiate its share of the loss
(divided by `num_replicas_in_sync`). A step that differentiates the mean
loss of its part of the batch updates `num_replicas` times too far, and
Keras raises no error. (On JAX this cannot happen: under
`keras.distribution` one step sees the whole batch, and Keras does not
divide the loss per replica.)

`StepGuards.watching()` wraps the first training step (the trace of the
compiled step, or the first eager call) and raises `TrainingGuardError`,
which says what is wrong and how to fix it; later steps run with no check at
all.

How it works, and what it cannot see (only with `num_replicas_in_sync > 1`
and a compiled step: with `run_eagerly=True` tensors have no graph to
inspect): each `tf.GradientTape.gradient` call with variables as sources has
its target traced back through the graph. The calls are seen through
Python's profiling hook (`sys.setprofile`), set in each replica's thread
while its first step is traced: the step makes its own tapes, and
TensorFlow is not changed. The error is raised when the step's trace ends,
before anything runs. A term is *replica-scaled* when it passes through
Keras' own scaling (`compute_loss`, `compiled_loss`, Keras loss objects,
regularization: a multiplication by `1 / num_replicas`), an explicit
multiplication by `1 / num_replicas` or division by `num_replicas`, or a sum
over examples divided by a constant or by a size that includes the number
of replicas (`tf.nn.compute_average_loss`). A plain sum over examples is
replica-additive and fine too. A mean over examples (`tf.reduce_mean`), a
sum divided by the local batch size, or a reduction of replicated values
(regularization penalties on the weights) reaching the target without any
of these is an error. Not seen: any other factor equal to
`1 / num_replicas` counts as replica scaling (`0.5 * (a + b)` on two
replicas), a constant divisor is taken to be the global batch size, and
values computed inside nested `tf.function`s or control flow are not
followed (no error), and nothing is checked while a Python profiler (such
as `cProfile`) runs in that thread.

Every check is off for a model (or class) with `training_guards = False`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from customfit import _guards
from customfit._errors import TrainingGuardError

_GRADIENT_CODE = tf.GradientTape.gradient.__code__


class _Record(_guards.Record):
    """What one replica's first step did."""

    def __init__(self) -> None:
        super().__init__()
        self.unscaled_for_replicas: int | None = None  # replicas, when found


class StepGuards(_guards.StepGuards):
    """The backend-neutral guards, and the replica check under
    `tf.distribute` with several replicas."""

    def _new_record(self) -> _guards.Record:
        return _Record()

    @contextlib.contextmanager
    def _checking(self, record: _guards.Record) -> Iterator[None]:
        if self._model.distribute_strategy.num_replicas_in_sync > 1:
            with _seeing_tape_gradients():
                yield
        else:
            yield
        found = getattr(record, "unscaled_for_replicas", None)
        if found is not None:
            raise TrainingGuardError(_replica_message(found))


# ---------------------------------------------------------- replica scaling


@contextlib.contextmanager
def _seeing_tape_gradients() -> Iterator[None]:
    """While this thread traces its replica's step, each call of
    `tf.GradientTape.gradient` has its target checked (`_check_target`),
    seen through Python's profiling hook. Off under another profiler."""
    if sys.getprofile() is not None:
        yield
        return

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is _GRADIENT_CODE:
            arguments = frame.f_locals
            _check_target(arguments.get("target"), arguments.get("sources"))

    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(None)


def _check_target(target: Any, sources: Any) -> None:
    """Records in this thread's record a gradient of variables whose target
    is not scaled for the replicas."""
    record = _guards.current()
    if not isinstance(record, _Record) or record.unscaled_for_replicas is not None:
        return
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1 and any(
        isinstance(s, (tf.Variable, keras.Variable)) for s in tf.nest.flatten(sources)
    ):
        for tensor in tf.nest.flatten(target):
            if _classify(tensor, replicas) == _UNSCALED:
                record.unscaled_for_replicas = replicas
                return


def _replica_message(replicas: int) -> str:
    return (
        f"The training step differentiates a loss that is not scaled for the "
        f"{replicas} replicas: a mean over this replica's part of the batch (or "
        "a term such as a weight penalty) that is not divided by the number of "
        "replicas. The optimizer sums the replicas' gradients, so the update "
        f"would be {replicas} times too large. Fix: compute the loss with "
        "`self.compute_loss(x, y, y_pred)` or `self.compiled_loss(y, y_pred)` "
        "(or a Keras loss object), which scale it, or with "
        "`tf.nn.compute_average_loss(per_example_loss, "
        "global_batch_size=...)`, or divide it by "
        f"`self.distribute_strategy.num_replicas_in_sync`. {_guards.SWITCH}"
    )


# Kinds of tensors on the way from a loss back to the data and the weights.
_NEUTRAL = "neutral"  # constants, no gradient
_ORIGIN = "origin"  # values not yet reduced over the batch
_SUMMED = "summed"  # a sum over examples: replica-additive, correct
_SCALED = "scaled"  # divided by the number of replicas, correct
_UNSCALED = "unscaled"  # a mean, or replicated values, not divided
_UNKNOWN = "unknown"  # not followed (control flow, nested functions)

_DATA_OPS = {
    "Placeholder",
    "IteratorGetNext",
    "IteratorGetNextSync",
    "MultiDeviceIteratorGetNextFromShard",
    "OptionalGetValue",
}
_NO_GRADIENT_OPS = {
    "Const",
    "StopGradient",
    "Shape",
    "ShapeN",
    "Size",
    "Rank",
    "ZerosLike",
    "OnesLike",
    "Fill",
    "Range",
    "VarIsInitializedOp",
    "PreventGradient",
}
_OPAQUE_OPS = {
    "If",
    "StatelessIf",
    "While",
    "StatelessWhile",
    "Case",
    "StatelessCase",
    "PartitionedCall",
    "StatefulPartitionedCall",
    "Switch",
    "Merge",
    "Enter",
    "Exit",
    "NextIteration",
}
_PASS_OPS = {
    "Identity",
    "IdentityN",
    "Cast",
    "Reshape",
    "Squeeze",
    "ExpandDims",
    "Neg",
    "AddV2",
    "Add",
    "AddN",
    "Sub",
    "Pack",
    "ConcatV2",
    "Concat",
    "Unpack",
    "StridedSlice",
    "GatherV2",
    "Slice",
    "EnsureShape",
    "CheckNumerics",
}
_DIVISIONS = {"RealDiv", "Div", "DivNoNan", "TrueDiv"}
_MAX_OPS = 200_000


def _classify(tensor: Any, replicas: int) -> str:
    """The kind of a graph tensor (see above); `_UNKNOWN` for eager ones."""
    if not hasattr(tensor, "op") or not hasattr(tensor, "graph"):
        return _UNKNOWN
    try:
        _ = tensor.op
    except AttributeError:  # EagerTensor.op raises
        return _UNKNOWN
    return _Classifier(tensor.graph, replicas).kind(tensor)


class _Classifier:
    def __init__(self, graph: Any, replicas: int) -> None:
        self._replicas = replicas
        self._kinds: dict[Any, tuple[str, bool]] = {}
        self._captured: dict[Any, Any] = {}
        for external, internal in getattr(graph, "captures", ()):
            self._captured[id(internal)] = external

    def kind(self, tensor: Any) -> str:
        # Post-order over the ops the target depends on, without recursion.
        stack = [(tensor.op, False)]
        seen = 0
        while stack:
            op, inputs_done = stack.pop()
            if op in self._kinds:
                continue
            if inputs_done:
                self._kinds[op] = self._op_kind(op)
                continue
            seen += 1
            if seen > _MAX_OPS:
                return _UNKNOWN
            stack.append((op, True))
            if op.type not in _NO_GRADIENT_OPS and op.type not in _OPAQUE_OPS:
                for t in op.inputs:
                    if t.op not in self._kinds:
                        stack.append((t.op, False))
        return self._kinds[tensor.op][0]

    # Each op gets (kind, depends on the replica's data).

    def _input(self, t: Any) -> tuple[str, bool]:
        return self._kinds[t.op]

    def _static(self, t: Any) -> Any:
        value = None
        if t.op.type == "Placeholder" and id(t) in self._captured:
            external = self._captured[id(t)]
            if hasattr(external, "numpy"):
                try:
                    value = external.numpy()
                except Exception:  # noqa: BLE001 - not a plain captured value
                    value = None
        else:
            try:
                value = tf.get_static_value(t)
            except Exception:  # noqa: BLE001 - not foldable
                value = None
        if value is None:
            return None
        value = np.asarray(value)
        if value.size != 1 or value.dtype.kind not in "fiu":
            return None
        return float(value.reshape(()))

    def _is(self, t: Any, number: float) -> bool:
        value = self._static(t)
        return value is not None and abs(value - number) <= 1e-3 * abs(number)

    def _op_kind(self, op: Any) -> tuple[str, bool]:
        kind = op.type
        if kind in _NO_GRADIENT_OPS:
            return _NEUTRAL, False
        if kind in _OPAQUE_OPS:
            return _UNKNOWN, True
        inputs = [self._input(t) for t in op.inputs]
        data = any(d for _, d in inputs)
        if kind in _DATA_OPS:
            if kind == "Placeholder":
                output = op.outputs[0]
                if output.dtype == tf.resource or id(output) in self._captured:
                    return (_NEUTRAL if self._static(output) is not None else _ORIGIN), False
            return _ORIGIN, True
        if kind == "Mul":
            if any(self._is(t, 1.0 / self._replicas) for t in op.inputs):
                return _SCALED, data
            return _product(k for k, _ in inputs), data
        if kind in _DIVISIONS:
            denominator = op.inputs[1]
            if self._is(denominator, float(self._replicas)):
                return _SCALED, data
            numerator = inputs[0][0]
            if numerator == _SUMMED:
                if self._static(denominator) is not None or self._mentions_replicas(denominator):
                    return _SCALED, data  # a sum over the global batch size
                return _UNSCALED, data  # a mean over this replica's batch
            return numerator, data
        if kind in ("Mean", "Sum"):
            top = inputs[0]
            over_batch = self._reduces_batch(op)
            if over_batch is None:
                return (_UNKNOWN if top[0] == _ORIGIN else top[0]), data
            if top[0] == _ORIGIN and over_batch:
                if kind == "Sum" and top[1]:
                    return _SUMMED, data
                return _UNSCALED, data
            return top[0], data
        if kind in _PASS_OPS:
            return _sum(k for k, _ in inputs), data
        # Anything else computes new values from its inputs.
        kinds = {k for k, _ in inputs}
        if kinds <= {_NEUTRAL}:
            return _NEUTRAL, data
        if _UNKNOWN in kinds:
            return _UNKNOWN, data
        return _ORIGIN, data

    def _reduces_batch(self, op: Any) -> bool | None:
        """Whether a reduction includes axis 0 (the batch); False for a
        scalar input (nothing reduced); None when not known statically."""
        rank = op.inputs[0].shape.rank
        if rank == 0:
            return False
        try:
            axes = tf.get_static_value(op.inputs[1])
        except Exception:  # noqa: BLE001 - not foldable
            axes = None
        if axes is None or rank is None:
            return None
        return 0 in {int(a) % rank for a in np.asarray(axes).ravel()}

    def _mentions_replicas(self, t: Any) -> bool:
        """Whether a (dynamic) divisor multiplies by the number of replicas,
        as `tf.nn.compute_average_loss` does without `global_batch_size`."""
        pending, seen = [t.op], 0
        while pending and seen < 64:
            op = pending.pop()
            seen += 1
            if op.type == "Mul" and any(self._is(i, float(self._replicas)) for i in op.inputs):
                return True
            pending.extend(i.op for i in op.inputs)
        return False


def _sum(kinds: Any) -> str:
    """A sum (or a reshaping) of terms: wrong if any term is wrong."""
    kinds = set(kinds) - {_NEUTRAL}
    if not kinds:
        return _NEUTRAL
    if _UNSCALED in kinds:
        return _UNSCALED
    if _UNKNOWN in kinds:
        return _UNKNOWN
    if kinds == {_ORIGIN}:
        return _ORIGIN
    if kinds == {_SUMMED}:
        return _SUMMED
    if _ORIGIN in kinds:
        return _UNKNOWN
    return _SCALED


def _product(kinds: Any) -> str:
    """A product: scaled if any factor is."""
    kinds = set(kinds)
    for kind in (_SCALED, _UNKNOWN, _UNSCALED, _SUMMED, _ORIGIN):
        if kind in kinds:
            return kind
    return _NEUTRAL
