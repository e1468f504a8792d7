"""`CustomModel` on Keras' JAX backend (the `Loop` of
`customfit._contract`): the stateful step run as Keras' stateless JAX step.

Keras' JAX `fit` calls `train_function(state, iterator)`, where `state` holds
the values of the trainable, non-trainable, optimizer and metric variables,
and expects the new values back; a step written for it threads them by hand.
customfit's steps and hooks read and assign variables as on TensorFlow. Each
compiled step (`StatelessStep`) runs them inside a `keras.StatelessScope`
that maps every variable to its value in `state`: reads see those values,
assignments are recorded, and the step returns the recorded values as the
new state. The gradient is `jax.value_and_grad` of the forward pass and the
loss over the trainable values, in a nested scope (`loss_gradients`).

Variables a step may update that Keras' state leaves out, the state of the
model's other optimizers and the metrics behind `log`, go in and out of the
compiled step as an extra argument, and are written back after each call.
`log` creates a metric the first time a name is logged; under `jax.jit`
nothing may be created, so each new step is first traced abstractly
(`jax.eval_shape`) to find the names it logs, and their metrics are created
before it is compiled.

Recipes are written once with the contract's `gradients`,
`stateless_gradients`, `cond` and `state_scope`; their own state
(`CustomModel.step_variables`) goes in and out of the compiled step with
the other extras.

A step written for stock Keras' JAX trainer, `train_step(self, state,
data)` (also `test_step`, `predict_step`), threads the state by hand, as
in the keras-io guide "Customizing what happens in fit() with JAX": it is
compiled by Keras' own `make_train_function` (`make_test_function`,
`make_predict_function`), so it runs exactly as on `keras.Model`, and
nothing of this module runs inside it (`stateless_override`).

An execution of `steps_per_execution` batches (or, with "auto", as many as
the call's `Channel` says) runs them as one jitted `jax.lax.scan` of the
one-batch step where Keras' JAX `_make_function` calls it once per batch
(see `StatelessStep._execution`), and hands every batch's logs to the
call's `PerBatchCallbacks` through that `Channel`.

A model compiled without `optimizer` (`recipes.GAN`) reads an empty
stand-in as `model.optimizer` while Keras' trainer runs it (`call_scope`,
`optimizer_stand_in`): Keras' JAX `fit` reads `model.optimizer.variables`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import jax
import keras

from customfit import _auto_steps, _call, _guards, _optimizers, _step
from customfit._jax import resume
from customfit._keras import internals
from customfit._keras2 import track_loss

END_OF_DATA: tuple[type[BaseException], ...] = ()

# With "auto", the most batches one scan runs; an execution of more runs
# several. Each length compiles the step anew (seconds for a large model),
# while a longer scan saves only a dispatch per batch, which is microseconds:
# so "auto", trying 4, 16, 64, ... batches per execution, compiles two
# scans. A fixed `steps_per_execution` runs its executions as one scan each
# (one length; Keras' own tests allow two traces of the step for 20).
LONGEST_SCAN = 16

# The models whose `fit`, `evaluate` or `train_on_batch` Keras runs now.
_KERAS_RUNNING: contextvars.ContextVar[tuple[keras.Model, ...]] = contextvars.ContextVar(
    "customfit_keras_jax_running", default=()
)
_NO_OPTIMIZER = internals.NoOptimizer()

# The `StatelessStep` running now (its variables are what the step reads).
_running: list[StatelessStep] = []


def metric_creation_scope() -> Any:
    """Where `log` creates a metric: nowhere inside an abstract trace
    (Keras' symbolic build: the name is noted and its metric created before
    the step is compiled), directly outside any scope; inside a compiled
    step it is too late."""
    if not _running:
        in_trace = internals.current_stateless_scope() is not None
        return None if in_trace else contextlib.nullcontext()
    raise RuntimeError(
        "log() was called with a name the step did not log when it was first "
        "traced. On the JAX backend a step must log the same names each time "
        "it runs (a name logged only on some batches: log it on every batch, "
        "with weight=0 when it does not apply)."
    )


def replica_results(metrics: dict[str, keras.metrics.Mean]) -> None:
    """None: under `keras.distribution` the step sees the whole batch, and
    the metric values are global already."""
    return None


@contextlib.contextmanager
def call_scope(model: keras.Model) -> Iterator[None]:
    """Keras' JAX `fit`, `evaluate` and `train_on_batch` read
    `model.optimizer.variables`, also for a model whose optimizers are all
    held elsewhere (`recipes.GAN`): while they run, such a model's
    `optimizer` reads as a stand-in (`optimizer_stand_in`)."""
    running = _KERAS_RUNNING.set((*_KERAS_RUNNING.get(), model))
    try:
        yield
    finally:
        _KERAS_RUNNING.reset(running)


def optimizer_stand_in(model: keras.Model) -> Any:
    """What `model.optimizer` reads when the model has none: an empty
    stand-in while Keras' JAX trainer runs the model (`call_scope`), else
    None."""
    if any(running is model for running in _KERAS_RUNNING.get()):
        return _NO_OPTIMIZER
    return None


def maybe_symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """Keras' JAX trainer has no `_maybe_symbolic_build`: as `symbolic_build`."""
    symbolic_build(model, iterator, data_batch)


def symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """What Keras' JAX `fit` and `evaluate` call with the epoch iterator."""
    _call.symbolic_build(model, internals.keras_symbolic_build, iterator, data_batch)


def apply(optimizer: keras.optimizers.Optimizer, gradients: list, variables: list) -> None:
    """`optimizer.apply(gradients, variables)` inside the step's scope.

    A `LossScaleOptimizer` decides between two stateful updates with
    `ops.cond`, whose branches cannot assign variables under JAX; Keras' JAX
    loop calls its `stateless_apply`, and so does this, over the values of
    the step's scope."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer.apply(gradients, variables)
        return
    _guards.check_scaled(optimizer)  # in a guarded first step
    built_over = internals.optimizer_variables_built_over(optimizer)
    if [id(v) for v in variables] != [id(v) for v in built_over]:
        raise NotImplementedError(
            "On the JAX backend a LossScaleOptimizer (mixed precision) applies "
            "gradients to all the variables it was built with, in that order; "
            "use one optimizer per group of variables, built over that group."
        )
    scope = internals.current_stateless_scope()
    assert scope is not None  # the StatelessStep's
    trainable, optimizer_values = optimizer.stateless_apply(
        [scope.get_current_value(v) for v in optimizer.variables],
        gradients,
        [scope.get_current_value(v) for v in variables],
    )
    for variable, value in zip(variables, trainable):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, optimizer_values):
        variable.assign(value)


def make_train_function(model: keras.Model) -> Callable:
    if stateless_override(model, "train_step"):
        _refuse_auto_steps(model, "train_step")
        keras.Model.make_train_function(model, force=True)
        return model.train_function
    _optimizers.build_unbuilt(model)
    return StatelessStep(model, "train")


def make_test_function(model: keras.Model) -> Callable:
    if stateless_override(model, "test_step"):
        _refuse_auto_steps(model, "test_step")
        keras.Model.make_test_function(model, force=True)
        return model.test_function
    return StatelessStep(model, "test")


def predict_steps_per_execution(steps: int) -> int:
    return steps


def make_predict_function(model: keras.Model, keras_make: Callable) -> Callable:
    if stateless_override(model, "predict_step"):
        keras_make()
        return model.predict_function
    return StatelessStep(model, "predict")


def _refuse_auto_steps(model: keras.Model, step: str) -> None:
    """Before any step: "auto" sizes customfit's executions, which a step
    compiled by Keras' own trainer does not run."""
    if model._auto_steps is not None:
        raise ValueError(
            f'steps_per_execution="auto" sizes the executions of customfit\'s '
            f"steps; {type(model).__name__}.{step}(state, data) is written for "
            "Keras' own JAX trainer, which runs a fixed number of batches per "
            "call. Compile with a number, e.g. steps_per_execution=32, or write "
            f"the step as {step}(self, data) with customfit's hooks."
        )


def stateless_override(model: keras.Model, step: str) -> bool:
    """Whether the model's `step` (`"train_step"`, `"test_step"`,
    `"predict_step"`) is written for stock Keras' JAX trainer:
    `step(self, state, data) -> (outputs, state)`, which needs two positional
    arguments where customfit's steps take one (`data`).

    Such a step threads every variable by hand, so Keras' JAX trainer runs
    it: its `make_train_function` (`make_test_function`,
    `make_predict_function`) compiles and calls it exactly as for
    `keras.Model`. customfit adds nothing inside it: no hooks, `log`,
    Keras-2 helpers (they assign variables), other optimizers' state,
    recipe state or checks after each execution; everything outside the
    step (the rest of `fit`, `evaluate`, saving) stays as for any
    `CustomModel`."""
    try:
        parameters = inspect.signature(getattr(model, step)).parameters.values()
    except (TypeError, ValueError):  # no signature to read: customfit's way
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return len(required) >= 2


class StatelessStep:
    """One of the model's steps (`train_step`, `test_step` or `predict_step`)
    compiled as Keras' JAX loop calls it.

    Called as `step(state, iterator) -> (outputs, state)`, it is Keras'
    `train_function`/`test_function`/`predict_function`: runs
    `steps_per_execution` batches, jitted unless the model runs eagerly or
    `jit_compile=False`.

    Attributes:
        after_each_execution: Callables run on the host after every call, in
            order (`recipes.SkipNonFinite` checks its limits there); if one
            raises, the new state is put back into the variables first.
        extras: The variables the step may update that Keras' `state` leaves
            out, in the order of the extra argument; None until the step
            was first traced.
    """

    def __init__(self, model: keras.Model, phase: str) -> None:
        self._model = model
        self._phase = phase
        self.extras: list[keras.Variable] | None = None
        self._compiled: Callable | None = None
        self._compiled_scan: Callable | None = None
        self.after_each_execution: list[Callable[[], None]] = []
        # The first training step's guards: the step's first run, which is
        # the abstract trace that finds the names it logs, before anything
        # is applied; an error leaves the model as it was (`__call__`).
        self._guards = _guards.StepGuards(model) if phase == "train" else None
        if phase == "predict":
            self._step = internals.make_jax_function(model, self._one_batch, True)
        else:
            self._step = self._execution

    def __call__(self, state: Any, iterator: Any) -> Any:
        extra_values = None if self.extras is None else [v.value for v in self.extras]
        try:
            outputs, (new_state, extra_values) = self._step((state, extra_values), iterator)
        except BaseException:
            self._put_back(state)
            raise
        for variable, value in zip(self.extras or (), extra_values):
            variable.assign(value)
        try:
            for check in self.after_each_execution:
                check()
        except BaseException:
            self._put_back(new_state)
            raise
        return outputs, new_state

    def _execution(self, packed: tuple[Any, Any], iterator: Any) -> tuple[Any, Any]:
        """Keras' JAX `_make_function` for a train or test step: the step
        on the next batch, then on each following one up to the execution's
        number or the end of the data; with more than one planned, every
        batch's logs go to the call's `Channel`.

        When the step is jitted, batches of one shape run as jitted
        `jax.lax.scan`s of the one-batch step over them (`_scanned`): the
        execution's number of them per scan (with "auto", at most
        `LONGEST_SCAN`), and
        what remains (the data ended) in scans of powers of
        `_auto_steps.GROWTH` (the numbers "auto" tries), so that only a few
        lengths are ever compiled."""
        channel = _call.channel_of(self._model)
        steps = (channel.steps if channel is not None else None) or (
            self._model.steps_per_execution
        )
        if steps == 1:
            outputs, packed = self._one_batch(packed, next(iterator))
        else:
            every_batch, packed = self._batches(packed, iterator, steps)
            outputs = every_batch[-1]
            if channel is not None:
                channel.rows = every_batch
        if channel is not None and channel.wait:
            jax.block_until_ready(outputs)
        return outputs, packed

    def _batches(self, packed: tuple[Any, Any], iterator: Any, steps: int) -> tuple[list, Any]:
        """Up to `steps` batches from `iterator`, scanned where they can be:
        `(each batch's outputs, packed state)`."""
        batches = [next(iterator)]
        for _ in range(steps - 1):
            try:
                batches.append(next(iterator))
            except StopIteration:
                break
        packed = self._discovered(packed, batches[0])
        every_batch: list = []
        longest = 1
        if self._scans():
            auto = self._model._auto_steps is not None
            longest = min(steps, LONGEST_SCAN) if auto else steps
        for chunk in _chunks(batches, longest):
            if len(chunk) > 1:
                outputs, packed = self._scanned(packed, chunk)
                every_batch.extend(outputs)
            else:
                outputs, packed = self._one_batch(packed, chunk[0])
                every_batch.append(outputs)
        return every_batch, packed

    def _scanned(self, packed: tuple[Any, Any], batches: list) -> tuple[list, Any]:
        """The compiled step over `batches` in one call: `(each batch's
        outputs, packed state)`."""
        if self._compiled_scan is None:
            self._compiled_scan = jax.jit(self._scan, donate_argnums=0)
        state, extra_values = packed
        every_batch, state, extra_values = self._compiled_scan(state, extra_values, batches)
        return every_batch, (state, extra_values)

    def _scans(self) -> bool:
        """Whether an execution of several batches may run as one scan: when
        the step is jitted, and with no `keras.distribution` (whose batches
        are laid out one by one)."""
        return not self._eager() and keras.distribution.distribution() is None

    def _scan(self, state: Any, extra_values: Any, batches: list) -> tuple[list, Any, Any]:
        def one_batch(carry: tuple[Any, Any], data: Any) -> tuple[tuple[Any, Any], Any]:
            outputs, state, extra_values = self._stateless(*carry, data)
            return (state, extra_values), outputs

        stacked = jax.tree.map(lambda *batch: jax.numpy.stack(batch), *batches)
        (state, extra_values), stacked_outputs = jax.lax.scan(
            one_batch, (state, extra_values), stacked
        )
        every_batch = [
            jax.tree.map(lambda outputs, i=i: outputs[i], stacked_outputs)
            for i in range(len(batches))
        ]
        return every_batch, state, extra_values

    def trace_ahead(self, state: Any, data: Any) -> None:
        """Traces the step for `data` (one batch) without running it, so
        that the metrics of the names it logs exist before its first call."""
        if self.extras is None:
            self._discover_logged_names(state, data)

    def _put_back(self, state: Any) -> None:
        """Keras' JAX `fit` takes the values out of the variables while it
        trains and puts them back at the end of an epoch; a step that raised
        (a mistake found when it is traced, or a recipe's check after it)
        ends `fit` before that. Put back the values not consumed, so the
        model still works after the error."""
        for variables, values in zip(self.state_variables(), state):
            for variable, value in zip(variables, values):
                if not (hasattr(value, "is_deleted") and value.is_deleted()):
                    variable.assign(value)
        internals.jax_state_put_back(self._model)

    def state_variables(self) -> list[list[keras.Variable]]:
        """The variables behind Keras' `state`, group by group."""
        model = self._model
        groups = [model.trainable_variables, model.non_trainable_variables]
        if self._phase == "train":
            # [] for a model without `optimizer` (Keras' fit runs with a stand-in).
            groups.append([] if model.optimizer is None else model.optimizer.variables)
        if self._phase != "predict":
            groups.append(model.metrics_variables)
        return groups

    def variables(self) -> list[keras.Variable]:
        """Every variable the step reads from its arguments."""
        return [v for group in self.state_variables() for v in group] + list(self.extras or ())

    def _one_batch(self, packed: tuple[Any, Any], data: Any) -> tuple[Any, tuple[Any, Any]]:
        if self.extras is None:
            packed = self._discovered(packed, data)
        state, extra_values = packed
        if self._compiled is None:
            self._compiled = self._compile(state)
        outputs, state, extra_values = self._compiled(state, extra_values, data)
        return outputs, (state, extra_values)

    def _discovered(self, packed: tuple[Any, Any], data: Any) -> tuple[Any, Any]:
        """`packed`, once the names the step logs are known (found now, with
        `data`, on the first call): with the extra variables' values."""
        if self.extras is not None:
            return packed
        state, _ = packed
        self._discover_logged_names(state, data)
        extras: list[keras.Variable] = self.extras or []  # set by the discovery
        return state, [v.value for v in extras]

    def _discover_logged_names(self, state: Any, data: Any) -> None:
        """Traces the step abstractly to create the metrics of the names it
        logs, then fixes `extras`."""
        step_logs = self._model._step_logs
        self.extras = self._extra_variables()
        if self._phase != "predict":
            extra_values = [v.value for v in self.extras]
            with step_logs.discovering():
                try:
                    jax.eval_shape(self._stateless, state, extra_values, data)
                except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
                    if not self._eager():
                        raise
                    # A step run eagerly may read values (`.numpy()`): run it
                    # once more, its updates discarded.
                    self._stateless(state, extra_values, data)
            step_logs.create_discovered()
        self.extras = self._extra_variables()

    @property
    def discovering(self) -> bool:
        """Whether the step runs now to find the names it logs."""
        return self._model._step_logs.is_discovering

    def _eager(self) -> bool:
        return bool(self._model.run_eagerly or not self._model.jit_compile)

    def _extra_variables(self) -> list[keras.Variable]:
        if self._phase == "predict":
            return []
        known = {id(v) for group in self.state_variables() for v in group}
        extras: list[keras.Variable] = []
        if self._phase == "train":
            for optimizer in _optimizers.registered(self._model).values():
                extras.extend(v for v in optimizer.variables if id(v) not in known)
            own = _step.checked_step_variables(self._model)
            extras.extend(v for v in own if id(v) not in known)
        for metric in self._model._step_logs.all_metrics:
            extras.extend(v for v in metric.variables if id(v) not in known)
        return extras

    def _compile(self, state: Any) -> Callable:
        if self._eager():
            return self._stateless
        out_shardings = None
        if keras.distribution.distribution() is not None:
            # The new state laid out as the old, as Keras' JAX loop asks.
            out_shardings = (
                None,
                jax.tree.map(lambda value: value.sharding, state),
                [v.value.sharding for v in self.extras or ()],
            )
        return jax.jit(self._stateless, donate_argnums=0, out_shardings=out_shardings)

    def _stateless(self, state: Any, extra_values: Any, data: Any) -> tuple[Any, Any, Any]:
        """The step on one batch, from and to values: `(outputs, state,
        extra_values)`."""
        groups = self.state_variables()
        extras = self.extras or []
        mapping = [(v, x) for vs, xs in zip(groups, state) for v, x in zip(vs, xs)]
        mapping.extend(zip(extras, extra_values))
        # Collecting `add_loss` losses, as `model.losses` does outside a scope.
        with (
            keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope,
            self._running(),
        ):
            outputs = self._stateful(data)
        state = tuple(
            [_current(scope, v, x) for v, x in zip(vs, xs)] for vs, xs in zip(groups, state)
        )
        return outputs, state, [_current(scope, v, x) for v, x in zip(extras, extra_values)]

    def _stateful(self, data: Any) -> Any:
        model = self._model
        if self._phase == "predict":
            return model.predict_step(data)
        step = model.train_step if self._phase == "train" else model.test_step
        guarded = self._guards.watching() if self._guards else contextlib.nullcontext()
        with model._step_logs.in_phase(self._phase), guarded:
            return _step.checked_logs(model, step(data), f"{self._phase}_step")

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        _running.append(self)
        try:
            yield
        finally:
            _running.pop()


def _chunks(batches: list, longest: int) -> Iterator[list]:
    """`batches` cut, in order, into runs of equal-shaped batches to scan:
    of `longest` batches while that many alike are left, then of the
    largest power of `_auto_steps.GROWTH` that fits (a batch shaped unlike
    the one before it, the data's last and smaller one, starts a run)."""
    start = 0
    while start < len(batches):
        alike = start + 1
        first = _signature(batches[start])
        while alike < min(len(batches), start + longest) and _signature(batches[alike]) == first:
            alike += 1
        left = alike - start
        size = longest if left >= longest else _power_up_to(left)
        yield batches[start : start + size]
        start += size


def _power_up_to(count: int) -> int:
    """The largest power of `_auto_steps.GROWTH` not above `count` (>= 1)."""
    power = 1
    while power * _auto_steps.GROWTH <= count:
        power *= _auto_steps.GROWTH
    return power


def _signature(batch: Any) -> tuple:
    """What two batches share when they stack into one scan: structure,
    shapes and dtypes."""
    leaves, structure = jax.tree.flatten(batch)
    return structure, tuple((x.shape, x.dtype) for x in leaves)


class _RunOnce(StatelessStep):
    """The training step's scope for `run_once`: the step runs for real
    there, not to find the names it logs (`cond` takes one branch)."""

    @property
    def discovering(self) -> bool:
        return False


def run_once(model: keras.Model, step: Callable[[], Any], variables: list | tuple = ()) -> Any:
    """`step()` once, not jitted, in a training `StatelessStep`'s scope
    (every variable the step carries, and `variables`, mapped to its value,
    so that `gradients`, `cond` and `log` work as in `fit`), then what it
    assigned to those written to the variables. A name it logs for the
    first time is noted, not created (as while a step is traced); an error
    leaves every variable as it was."""
    runner = _RunOnce(model, "train")
    runner.extras = runner._extra_variables()
    carried = runner.variables()
    known = {id(v) for v in carried}
    carried += [v for v in variables if id(v) not in known]
    mapping = [(v, v.value) for v in carried]
    with (
        model._step_logs.discovering(),
        keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope,
        runner._running(),
    ):
        outputs = step()
    for variable, value in zip(carried, [scope.get_current_value(v) for v in carried]):
        if value is not None:
            variable.assign(value)
    return outputs


def _current(scope: keras.StatelessScope, variable: keras.Variable, value: Any) -> Any:
    current = scope.get_current_value(variable)
    return value if current is None else current


def loss_gradients(
    model: keras.Model, x: Any, y: Any, sample_weight: Any
) -> tuple[Any, Any, list, list]:
    """The forward pass and the loss, differentiated over the trainable
    values (`gradients`); the loss tracked, the gradients unscaled."""

    def scaled_loss() -> tuple[Any, tuple[Any, Any]]:
        y_pred = _step.forward(model, x, training=True)
        loss = internals.compute_loss(
            model, x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        scaled = loss if model.optimizer is None else model.optimizer.scale_loss(loss)
        return scaled, (y_pred, loss)

    variables = model.trainable_variables
    if not variables:
        _, (y_pred, loss) = scaled_loss()
        grads: list = []
    else:
        (y_pred, loss), grads = gradients(scaled_loss, variables)
        grads = _step.unscaled(model, grads)
    track_loss(model, loss, batch_of=x)
    return y_pred, loss, grads, variables


def gradients(function: Callable[[], tuple[Any, Any]], variables: list) -> tuple[Any, list]:
    """Runs `function() -> (objective, aux)` once and returns `aux` and the
    gradients of `objective`, a scalar, w.r.t. `variables`; what `function`
    assigns to other variables (BatchNormalization statistics, random-layer
    seeds, metrics) is kept, as on TensorFlow under a `tf.GradientTape`.

    Runs inside a `StatelessStep`: `function` runs in a nested scope that
    maps `variables` to the values `jax.value_and_grad` differentiates and
    every other variable to its current value; what it assigns is then
    assigned in the step's scope."""
    if not _running:
        raise RuntimeError(
            "On the JAX backend gradients are taken inside the model's compiled "
            "step (fit, train_on_batch); call train_step there."
        )
    differentiated_ids = {id(v) for v in variables}
    others = [v for v in _running[-1].variables() if id(v) not in differentiated_ids]
    outer = internals.current_stateless_scope()
    assert outer is not None  # the StatelessStep's

    def run(values: list, other_values: list) -> tuple[Any, tuple[Any, list]]:
        mapping = [*zip(variables, values), *zip(others, other_values)]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as inner:
            objective, aux = function()
        updated = [_current(inner, v, x) for v, x in zip(others, other_values)]
        return objective, (aux, updated)

    values = [_current(outer, v, v.value) for v in variables]
    other_values = [_current(outer, v, v.value) for v in others]
    (_, (aux, updated)), grads = jax.value_and_grad(run, has_aux=True)(values, other_values)
    for variable, value in zip(others, updated):
        variable.assign(value)
    return aux, list(grads)


def state_scope(model: keras.Model) -> Any:
    """Where a recipe creates the state its step updates: anywhere (JAX has
    no graph to stay out of)."""
    return contextlib.nullcontext()


def cond(predicate: Any, if_true: Callable[[], None], if_false: Callable[[], None]) -> None:
    """Runs `if_true()` or `if_false()`, stateful functions, as `predicate`
    says.

    When `predicate` is traced (a jitted step), as `jax.lax.cond` over the
    values of the step's variables: each branch runs in a scope of its own,
    and what it assigns becomes the variables' values (an assignment in
    `keras.ops.cond` would leak a tracer); when it is a value (a step run
    eagerly), as Python's `if`. While an eagerly run step is run to find
    the names it logs, the branch not taken runs too, its updates discarded,
    so that the names logged in either branch are found."""
    scope = internals.current_stateless_scope()
    if not _running or scope is None or not isinstance(predicate, jax.core.Tracer):
        taken, other = (if_true, if_false) if bool(predicate) else (if_false, if_true)
        if _running and scope is not None and _running[-1].discovering:
            mapping = [(v, _current(scope, v, v.value)) for v in _running[-1].variables()]
            with keras.StatelessScope(state_mapping=mapping):
                other()
        taken()
        return
    variables = _running[-1].variables()

    def stateless(branch: Callable[[], None]) -> Callable[[list], list]:
        def run(values: list) -> list:
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as inner:
                branch()
            return [_current(inner, v, x) for v, x in zip(variables, values)]

        return run

    values = [_current(scope, v, v.value) for v in variables]
    updated = jax.lax.cond(predicate, stateless(if_true), stateless(if_false), values)
    for variable, value in zip(variables, updated):
        variable.assign(value)


def pass_state(model: keras.Model) -> list[tuple[Any, Any]]:
    """The values of the model's non-trainable variables, seed generators
    included."""
    return _step.non_trainable_values(model)


def stateless_gradients(
    function: Callable[[list], Any],
    sources: list,
    variables: list | None = None,
    state: list | tuple = (),
) -> tuple[Any, list]:
    """As `_tf_loop.stateless_gradients` (the same contract), differentiated
    by `jax.value_and_grad`; inside a compiled step, "every other variable"
    reads its value in the step's scope."""
    mapped = {id(v) for v in variables or ()} | {id(v) for v, _ in state}
    outer = internals.current_stateless_scope()
    others: list = []
    if _running and outer is not None:
        others = [
            (v, _current(outer, v, v.value))
            for v in _running[-1].variables()
            if id(v) not in mapped
        ]

    def differentiated(sources: list) -> Any:
        mapping = [*zip(variables or (), sources), *state, *others]
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            return function(sources)

    value, gradients = jax.value_and_grad(differentiated)(list(sources))
    return value, list(gradients)


def data_replay(epoch_iterator: Any, steps_per_epoch: int | None) -> resume.NumpyRandomReplay:
    return resume.NumpyRandomReplay(epoch_iterator, steps_per_epoch)


resuming_train_function = resume.resuming_train_function


def recording_summaries() -> Any:
    """Nothing to switch: Keras' TensorBoard callback on JAX writes no
    summaries from inside the step."""
    return contextlib.nullcontext()


def enable_op_determinism() -> None:
    """Nothing: XLA on CPU is deterministic."""


def two_replicas() -> None:
    """`DataParallel` over the two CPU devices `XLA_FLAGS` asked for, set
    globally."""
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")[:2])
    )
