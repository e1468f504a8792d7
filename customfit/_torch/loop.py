"""`CustomModel` on Keras' PyTorch backend (the `Loop` of
`customfit._contract`): the stateful step, run eagerly as Keras' PyTorch
trainer runs its own.

Keras' PyTorch `fit` calls `train_function(data)` with a list of
`steps_per_execution` batches. customfit's step function runs the checked
step on each, in order, and hands every batch's logs to the call's
`PerBatchCallbacks` through its `Channel` (Keras' own PyTorch trainer
refuses more than one batch per execution). Gradients are
`torch.autograd.grad` of the objective over the variables' tensors: the
values `loss.backward()` accumulates into `.grad`, which customfit leaves
alone.

Exact mid-epoch resume: `customfit/_torch/resume.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import keras
import torch

from customfit import _call, _guards, _optimizers, _step
from customfit._keras import epoch_iterator as epoch_iteration
from customfit._keras import internals
from customfit._torch import resume

END_OF_DATA: tuple[type[BaseException], ...] = ()

# How many `gradients` calls enclose the code running now: a gradient taken
# inside one (a gradient penalty) must stay differentiable.
_DIFFERENTIATING: contextvars.ContextVar[int] = contextvars.ContextVar(
    "customfit_torch_differentiating", default=0
)


def _grad(objective: Any, variables: list) -> list:
    """The gradients of `objective` w.r.t. `variables`: None for a variable
    it does not reach or one that is not differentiable (a non-trainable
    variable's tensor does not require grad), as on TensorFlow."""
    tensors = [v.value for v in variables]
    gradients: list = [None] * len(tensors)
    reached = [i for i, t in enumerate(tensors) if t.requires_grad]
    if not reached or not getattr(objective, "requires_grad", False):
        return gradients
    found = torch.autograd.grad(
        objective,
        [tensors[i] for i in reached],
        allow_unused=True,
        create_graph=_DIFFERENTIATING.get() > 0,
    )
    for i, gradient in zip(reached, found):
        gradients[i] = gradient
    return gradients


def loss_gradients(
    model: keras.Model, x: Any, y: Any, sample_weight: Any
) -> tuple[Any, Any, list, list]:
    """The forward pass and the tracked loss; the loss scaled for mixed
    precision, differentiated, the gradients unscaled."""
    y_pred = _step.forward(model, x, training=True)
    loss = _step.tracked_loss(model, x, y, y_pred, sample_weight, training=True)
    scaled = loss if model.optimizer is None else model.optimizer.scale_loss(loss)
    variables = model.trainable_weights
    if not variables:
        return y_pred, loss, [], variables
    return y_pred, loss, _step.unscaled(model, _grad(scaled, variables)), variables


@contextlib.contextmanager
def _differentiating() -> Iterator[None]:
    running = _DIFFERENTIATING.set(_DIFFERENTIATING.get() + 1)
    try:
        yield
    finally:
        _DIFFERENTIATING.reset(running)


def gradients(function: Callable[[], tuple[Any, Any]], variables: list) -> tuple[Any, list]:
    """Runs `function() -> (objective, aux)` once and returns `aux` and the
    gradients of `objective` w.r.t. `variables`."""
    with _differentiating():
        objective, aux = function()
    return aux, _grad(objective, variables)


@dataclasses.dataclass(frozen=True)
class PassState:
    """The model's state for a repeated pass over a batch (`pass_state`).

    Attributes:
        values: `(variable, value)` for each non-trainable variable.
        random_state: torch's global (CPU) random state.
    """

    values: list[tuple[Any, Any]]
    random_state: torch.Tensor


def pass_state(model: keras.Model) -> PassState:
    """The values of the model's non-trainable variables and torch's global
    random state (Keras' unseeded `Dropout` draws from it on PyTorch)."""
    return PassState(_step.non_trainable_values(model), torch.get_rng_state())


def stateless_gradients(
    function: Callable[[list], Any],
    sources: list,
    variables: list | None = None,
    state: PassState | list | tuple = (),
) -> tuple[Any, list]:
    """`function(sources)`, a scalar, and its gradients w.r.t. `sources`,
    in a `keras.StatelessScope` in which `variables` (when given) read
    `sources` and the variables of `state` its values; what it assigns is
    discarded. With a `PassState`, `function` draws from its random state,
    and torch's is left as it was. Inside an enclosing `gradients` call the
    result stays differentiable (a gradient penalty)."""
    sources = [
        s if getattr(s, "requires_grad", False) else keras.ops.convert_to_tensor(s).detach()
        for s in sources
    ]
    sources = [s if s.requires_grad else s.requires_grad_() for s in sources]
    values = state.values if isinstance(state, PassState) else list(state)
    mapping = [*zip(variables or (), sources), *values]
    with contextlib.ExitStack() as scopes:
        if isinstance(state, PassState):
            scopes.enter_context(torch.random.fork_rng(devices=[]))
            torch.set_rng_state(state.random_state)
        scopes.enter_context(
            keras.StatelessScope(
                state_mapping=mapping, collect_losses=True, initialize_variables=False
            )
        )
        value = function(sources)
    outer = _DIFFERENTIATING.get() > 0
    grads = torch.autograd.grad(value, sources, allow_unused=True, create_graph=outer)
    return value, list(grads)


def metric_creation_scope() -> Any:
    """Where `log` creates a metric: here, eagerly, as it runs."""
    return contextlib.nullcontext()


def replica_results(metrics: dict[str, keras.metrics.Mean]) -> None:
    return None


def apply(optimizer: keras.optimizers.Optimizer, gradients: list, variables: list) -> None:
    """As Keras' PyTorch `train_step` applies them: outside autograd."""
    with torch.no_grad():
        optimizer.apply(gradients, variables)


def make_train_function(model: keras.Model) -> Callable:
    _optimizers.build_unbuilt(model)
    return _StepFunction(model, "train")


def make_test_function(model: keras.Model) -> Callable:
    return _StepFunction(model, "test")


def predict_steps_per_execution(steps: int) -> int:
    """One: each batch runs eagerly either way, and Keras' PyTorch epoch
    iterator would draw a whole execution past the data's end (warning that
    the data ran out). Callbacks then see every batch of `predict`."""
    return 1


def make_predict_function(model: keras.Model, keras_make: Callable) -> Callable:
    """`predict_step` on each batch Keras' PyTorch loop hands over, outside
    autograd, the outputs concatenated (Keras' own refuses more than one
    batch per execution), compiled with `jit_compile=True` as Keras'
    is."""
    step = torch.compile(model.predict_step) if model.jit_compile else model.predict_step

    def function(batches: list) -> Any:
        with torch.no_grad():
            outputs = [step(data) for data in batches]
        if len(outputs) == 1:
            return outputs[0]
        return keras.tree.map_structure(lambda *each: torch.cat(each), *outputs)

    return function


class _StepFunction:
    """The model's `train_step` or `test_step` as Keras' PyTorch loop calls
    it: `function(batches) -> logs` of the last batch, the step run on each
    batch in order (`test_step` outside autograd; with `jit_compile=True`
    through `torch.compile`, as Keras' runs its own), the first training
    step guarded, every batch's logs to the call's `Channel` when there are
    several.

    Attributes:
        after_each_execution: Callables run after every call, in order
            (`recipes.SkipNonFinite` checks its limits there).
    """

    def __init__(self, model: keras.Model, phase: str) -> None:
        self._model = model
        self._phase = phase
        self._guards = _guards.StepGuards(model) if phase == "train" else None
        self.after_each_execution: list[Callable[[], None]] = []
        step = model.train_step if phase == "train" else model.test_step
        # `jit_compile=True`: as Keras' PyTorch trainer compiles its step.
        self._step = torch.compile(step) if model.jit_compile else step

    def __call__(self, batches: list) -> Any:
        channel = _call.channel_of(self._model)
        every_batch = [self._one_batch(data) for data in batches]
        if channel is not None and len(batches) > 1:
            channel.rows = every_batch
        for check in self.after_each_execution:
            check()
        return every_batch[-1]

    def discover(self, data: Any) -> None:
        """Runs the step on `data` to create the metrics of the names it
        logs, changing nothing else (before a backup's metric values are
        put back)."""
        if self._phase == "train":
            resume.discovery(self._model, lambda: self._model.train_step(data))

    def _one_batch(self, data: Any) -> Any:
        model = self._model
        step = self._step
        guarded = self._guards.watching() if self._guards else contextlib.nullcontext()
        gradients_off = torch.no_grad() if self._phase == "test" else contextlib.nullcontext()
        with model._step_logs.in_phase(self._phase), guarded, gradients_off:
            logs = _step.checked_logs(model, step(data), f"{self._phase}_step")
        # A log may be a view of a tensor the next batch changes in place.
        return {name: value.detach().clone() for name, value in logs.items()}


def call_scope(model: keras.Model) -> Any:
    return contextlib.nullcontext()


def optimizer_stand_in(model: keras.Model) -> None:
    """None: Keras' PyTorch trainer runs models without an optimizer."""
    return None


def maybe_symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """Keras' PyTorch trainer has no `_maybe_symbolic_build`: as
    `symbolic_build`."""
    symbolic_build(model, iterator, data_batch)


def symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """What Keras' PyTorch `fit` and `evaluate` call with the epoch iterator."""
    _call.symbolic_build(model, internals.keras_symbolic_build, iterator, data_batch)
    if iterator is not None and model._auto_steps is None and model.steps_per_execution > 1:
        _size_executions(iterator, model.steps_per_execution)


def _size_executions(epoch_iterator: Any, steps: int) -> None:
    """Keras' PyTorch epoch iterator draws `steps_per_execution` batches for
    each execution (stock Keras allows only 1 there), also for an epoch's
    last, shorter one, where the data would read as running out: each
    execution draws at most what the epoch has left."""
    epoch_iteration.size_executions(
        epoch_iterator,
        lambda batch, remaining: steps if remaining is None else min(steps, remaining),
    )


def state_scope(model: keras.Model) -> Any:
    return contextlib.nullcontext()


def cond(predicate: Any, if_true: Callable[[], None], if_false: Callable[[], None]) -> None:
    """Runs `if_true()` or `if_false()` as `predicate` says: eagerly, as
    written."""
    if bool(predicate):
        if_true()
    else:
        if_false()


def data_replay(epoch_iterator: Any, steps_per_epoch: int | None) -> resume.TorchRandomReplay:
    return resume.TorchRandomReplay(epoch_iterator, steps_per_epoch)


resuming_train_function = resume.resuming_train_function


def recording_summaries() -> Any:
    return contextlib.nullcontext()


def run_once(model: keras.Model, step: Callable[[], Any], variables: list | tuple = ()) -> Any:
    """`step()`: PyTorch runs it eagerly, as written."""
    return step()


def enable_op_determinism() -> None:
    torch.use_deterministic_algorithms(True)


def two_replicas() -> None:
    raise ValueError(
        "Keras' PyTorch backend runs fit on one device of one process "
        "(keras.distribution has no PyTorch implementation): there are no two "
        "replicas to compare."
    )
