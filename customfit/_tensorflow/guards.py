"""Checks that stop the first training step when it would train silently wrong.

Two mistakes in a hand-written `train_step` train without any error in Keras:

* **Loss scaling forgotten** (mixed precision). Under `mixed_float16` Keras
  wraps the optimizer in a `LossScaleOptimizer`, which divides the gradients it
  is given by the loss scale (2**15 at first). A step that differentiates the
  loss without `optimizer.scale_loss(loss)` therefore updates the weights
  32768 times too little: practically not at all.
* **Loss not scaled for the replicas** (`tf.distribute`). The optimizer sums
  the replicas' gradients, so each replica must differentiate its share of the
  loss (divided by `num_replicas_in_sync`). A step that differentiates the
  mean loss of its part of the batch updates `num_replicas` times too far.

`StepGuards.watching()` wraps the first training step (the trace of the
compiled step, or the first eager call) and raises `TrainingGuardError`, which
says what is wrong and how to fix it; later steps run with no check at all.

How each check works, and what it cannot see:

* Loss scaling: while the step runs, each `LossScaleOptimizer` among the
  model's optimizers (`CustomModel.optimizers`: `model.optimizer` and those
  held by its attributes, e.g. a GAN's two) records calls to its
  `scale_loss`. Its `apply` (which `apply_gradients` calls) raises when
  `scale_loss` of that same optimizer was not called earlier in the step.
  Gradients given to `CustomModel.apply_gradients` are unscaled by contract
  (the hook applies the loss scale itself), so they count as scaled. Not
  seen: an optimizer not in `CustomModel.optimizers` (kept in a list, say),
  `scale_loss` called but its result not differentiated.
* Replica scaling (only with `num_replicas_in_sync > 1` and a compiled step:
  with `run_eagerly=True` tensors have no graph to inspect): each
  `tf.GradientTape.gradient` call with variables as sources has its target
  traced back through the graph. The calls are seen through Python's
  profiling hook (`sys.setprofile`), set in each replica's thread while its
  first step is traced: the step makes its own tapes, and TensorFlow is not
  changed. The error is raised when the step's trace ends, before anything
  runs. A term is *replica-scaled* when it passes
  through Keras' own scaling (`compute_loss`, `compiled_loss`, Keras loss
  objects, regularization: a multiplication by `1 / num_replicas`), an
  explicit multiplication by `1 / num_replicas` or division by
  `num_replicas`, or a sum over examples divided by a constant or by a size
  that includes the number of replicas (`tf.nn.compute_average_loss`). A plain
  sum over examples is replica-additive and fine too. A mean over examples
  (`tf.reduce_mean`), a sum divided by the local batch size, or a reduction
  of replicated values (regularization penalties on the weights) reaching the
  target without any of these is an error. Not seen: any other factor equal
  to `1 / num_replicas` counts as replica scaling (`0.5 * (a + b)` on two
  replicas), a constant divisor is taken to be the global batch size, and
  values computed inside nested `tf.function`s or control flow are not
  followed (no error), and nothing is checked while a Python profiler
  (such as `cProfile`) runs in that thread.

Both checks are off for a model (or class) with `training_guards = False`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import keras
import numpy as np
import tensorflow as tf

from customfit import _optimizers
from customfit._errors import TrainingGuardError
from customfit._keras import internals

_SWITCH = (
    "If this is intended, set `training_guards = False` on the model (or its "
    "class) to turn these checks off."
)


class _Record:
    """What one replica's first step did."""

    def __init__(self) -> None:
        self.scaled: set[int] = set()  # ids of optimizers given a scaled loss
        self.unscaled_for_replicas: int | None = None  # replicas, when found


# Thread id -> record of the step running in that thread. MirroredStrategy
# traces each replica's step in its own thread.
_active: dict[int, _Record] = {}
_lock = threading.Lock()
_GRADIENT_CODE = tf.GradientTape.gradient.__code__


def _current() -> _Record | None:
    return _active.get(threading.get_ident())


def gradients_rescaled(optimizer: Any) -> None:
    """Called by `CustomModel.apply_gradients`, which multiplies unscaled
    gradients by the loss scale itself before `optimizer.apply`."""
    record = _current()
    if record is not None:
        record.scaled.add(id(optimizer))


class StepGuards:
    """The guards of one model: armed until a training step completes."""

    def __init__(self, model: keras.Model) -> None:
        self._model = model
        self._armed = True
        self._running = 0
        self._stack: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Wraps one (per-replica) training step."""
        if not self._armed or not getattr(self._model, "training_guards", True):
            yield
            return
        key = threading.get_ident()
        with _lock:
            if self._running == 0:
                self._stack = self._install()
            self._running += 1
            record = _active[key] = _Record()
        completed = False
        try:
            if self._model.distribute_strategy.num_replicas_in_sync > 1:
                with _seeing_tape_gradients():
                    yield
            else:
                yield
            if record.unscaled_for_replicas is not None:
                raise TrainingGuardError(_replica_message(record.unscaled_for_replicas))
            completed = True
        finally:
            with _lock:
                _active.pop(key, None)
                self._running -= 1
                if self._running == 0:
                    # Set by `_install` while any step is running.
                    stack, self._stack = cast(contextlib.ExitStack, self._stack), None
                    stack.close()
                    if completed:
                        self._armed = False

    def _install(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for optimizer in _loss_scale_optimizers(self._model):
            stack.enter_context(
                internals.intercepted(optimizer, "scale_loss", _recording_scale_loss(optimizer))
            )
            stack.enter_context(
                internals.intercepted(optimizer, "apply", _checking_apply(optimizer))
            )
        return stack


# ------------------------------------------------------------- loss scaling


def _loss_scale_optimizers(model: keras.Model) -> list:
    """The `LossScaleOptimizer`s among the model's optimizers
    (`CustomModel.optimizers`)."""
    return [
        optimizer
        for optimizer in _optimizers.registered(model).values()
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    ]


def _recording_scale_loss(optimizer: Any) -> Callable[[Any], Any]:
    original = optimizer.scale_loss

    def scale_loss(loss: Any) -> Any:
        record = _current()
        if record is not None:
            record.scaled.add(id(optimizer))
        return original(loss)

    return scale_loss


def _checking_apply(optimizer: Any) -> Callable[..., Any]:
    original = optimizer.apply

    def apply(grads: Any, trainable_variables: Any = None) -> Any:
        record = _current()
        if record is not None and id(optimizer) not in record.scaled:
            raise TrainingGuardError(_unscaled_message(optimizer))
        return original(grads, trainable_variables)

    return apply


def _unscaled_message(optimizer: Any) -> str:
    scale = internals.loss_scale_in_use(optimizer)
    shown = f"{float(scale):g}" if isinstance(scale, (int, float)) else "2**15 at first"
    return (
        f"The training step applies gradients with the LossScaleOptimizer "
        f"{optimizer.name!r} (mixed precision), but never passed the loss to "
        f"its scale_loss(). The optimizer divides the gradients by the loss "
        f"scale ({shown}), so the weights would barely change. Fix: inside the "
        "GradientTape, differentiate `loss = self.optimizer.scale_loss(loss)` "
        "(the same optimizer that applies the gradients), or hand unscaled "
        "gradients to `self.apply_gradients(gradients, variables)`, which "
        f"scales them. {_SWITCH}"
    )


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
    record = _current()
    if record is None or record.unscaled_for_replicas is not None:
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
        f"`self.distribute_strategy.num_replicas_in_sync`. {_SWITCH}"
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
