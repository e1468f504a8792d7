"""`CustomModel`: stock `fit`'s step, split into hooks a user overrides one at a time."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import keras

from customfit import _auto_steps, _call, _dev_modes, _guards, _optimizers, _saving, _step
from customfit._backend import loop
from customfit._keras import internals, versions
from customfit._keras2 import (
    CompiledLoss,
    CompiledMetrics,
    missing_targets_message,
)
from customfit._step_logging import StepLogs

Tensor = Any
"""A tensor of Keras' backend: a `tf.Tensor`, a `jax.Array` or a `torch.Tensor`."""


class StepGradients(NamedTuple):
    """What `CustomModel.compute_gradients` returns.

    Attributes:
        y_pred: The model's output on the batch, for `compute_metrics`.
        loss: The loss as `compute_loss` returned it: unscaled, under
            `tf.distribute` this replica's share.
        gradients: One unscaled gradient per variable, this replica's, of
            this batch only; `None` for a variable the loss does not reach.
        variables: The variables differentiated, `trainable_weights`.
    """

    y_pred: Any
    loss: Any
    gradients: list
    variables: list


@keras.saving.register_keras_serializable(package="customfit")
class CustomModel(keras.Model):
    """A `keras.Model` whose training step is built from overridable hooks.

    With nothing overridden, `fit`, `evaluate` and `predict` give the same
    results as `keras.Model`, bit for bit. Use it like `keras.Model`: as
    `CustomModel(inputs, outputs)` or as the base class of a subclassed model.

    The training step, in order (`train_step`):

    1. forward pass `self(x, training=True)` and `compute_loss(...)` under a
       `tf.GradientTape` (on JAX, differentiated by `jax.value_and_grad`);
       the loss is added to the `loss` metric;
    2. the loss is scaled for mixed precision (`optimizer.scale_loss`) and
       differentiated w.r.t. `trainable_weights`; the gradients are unscaled;
    3. `transform_gradients(gradients, variables)`;
    4. `apply_gradients(gradients, variables)`;
    5. `compute_metrics(...)`, whose dict (plus every `log`ged value) goes to
       callbacks, the progress bar and `History`.

    Steps 1 and 2 are the seam `compute_gradients`; 3 and 4 run inside the
    seam `update_weights`. Recipes (`customfit.recipes`, and your own) override
    these and `step_variables` and compose in the order their classes are
    listed (see the guide "Write your own recipe").

    Each hook can be overridden alone; `train_step`/`test_step` can still be
    overridden whole, with the Keras-2 helpers `compiled_loss`,
    `compiled_metrics` and `metrics` behaving as they did in `tf.keras`.
    On Keras' JAX backend the same hooks and steps, written with
    `keras.ops`, run as Keras' stateless JAX step (see the JAX guide).

    Example:

    ```python
    from keras import ops

    class ClippedModel(customfit.CustomModel):
        def transform_gradients(self, gradients, variables):
            norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in gradients))
            self.log("grad_norm", norm)
            return [g * ops.minimum(1.0, 1.0 / norm) for g in gradients]
    ```

    The first training step is checked for two mistakes that train silently
    wrong in Keras, and raises `customfit.TrainingGuardError` (a
    `ValueError`) naming the fix: gradients applied
    by a `LossScaleOptimizer` (mixed precision) without `scale_loss` on the
    loss, and, under `tf.distribute`, a loss not divided by the number of
    replicas. Set `training_guards = False` (on the class or the model) if
    such a step is intended.
    """

    training_guards: bool = True
    """Whether the first training step is checked (see the class docstring)."""

    require_all_gradients: bool = False
    """Whether a trainable variable without a gradient (one the loss does not
    depend on) is an error. By default it is left unchanged and the optimizer
    warns, as in Keras; set it to True, on the class or the model, to stop
    the first step instead, naming the variables."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if internals.is_functional_call(args, kwargs) and not isinstance(
            self, internals.Functional
        ):
            # keras.Model would rewrite the bases of this class (and of every
            # base up to keras.Model) in place to insert Functional, breaking
            # later subclasses that define their own __init__. Switch this one
            # instance to a functional subclass instead.
            self.__class__ = _functional_twin(type(self))
        super().__init__(*args, **kwargs)
        # Plain attributes: not model state that Keras should track or save.
        object.__setattr__(
            self, "_step_logs", StepLogs(loop.metric_creation_scope, loop.replica_results)
        )
        object.__setattr__(self, "_compiled_loss", CompiledLoss(self))
        object.__setattr__(self, "_compiled_metrics", CompiledMetrics(self))

    # ----------------------------------------------------------------- hooks

    def transform_gradients(
        self, gradients: list[Tensor], variables: list[keras.Variable]
    ) -> list[Tensor]:
        """Changes the gradients before they are applied. Default: identity.

        Runs once per training batch inside the default `train_step`, after
        `tape.gradient` and before `apply_gradients`. The gradients it sees are
        unscaled (mixed-precision loss scaling already undone) and belong to
        this replica: under `tf.distribute` each replica sees the gradient of
        its own share of the loss (the loss is divided by the number of
        replicas), and the optimizer sums them across replicas afterwards;
        Keras' own `clipnorm`/`global_clipnorm` clip at this point too. It is
        the place for clipping, noise, masking and gradient logging.

        Args:
            gradients: One gradient per variable, in the order of `variables`.
                A gradient is `None` when the variable does not affect the loss.
            variables: `self.trainable_weights`.

        Returns:
            One gradient per variable, in the same order. A variable whose
            gradient is `None` is left unchanged and the optimizer warns, as
            in Keras (an error with `require_all_gradients = True`).

        Example:

        ```python
        def transform_gradients(self, gradients, variables):  # from keras import ops
            norms = [ops.sqrt(ops.sum(ops.square(g))) for g in gradients]
            self.log("grad_norm", ops.sqrt(sum(n * n for n in norms)))
            return [g / ops.maximum(n, 1.0) for g, n in zip(gradients, norms)]  # norms <= 1
        ```
        """
        return gradients

    def apply_gradients(
        self, gradients: Sequence[Tensor], variables: Sequence[keras.Variable]
    ) -> None:
        """Applies the gradients to the variables. Default: the optimizer.

        Runs once per training batch inside the default `train_step`, right
        after `transform_gradients`, with unscaled per-replica gradients (see
        there). The default hands them to `self.optimizer`; with a
        `LossScaleOptimizer` it re-applies the loss scale first, which is exact
        (the scale is a power of two), so the optimizer's own finite check and
        dynamic scale update keep working.

        Override it to use several optimizers or to skip updates; call
        `super().apply_gradients(...)` for the optimizer's update.

        Example:

        ```python
        def apply_gradients(self, gradients, variables):
            n = len(self.encoder.trainable_weights)
            self.encoder_optimizer.apply(gradients[:n], variables[:n])
            super().apply_gradients(gradients[n:], variables[n:])
        ```
        """
        scale = internals.loss_scale_in_use(self.optimizer)
        if scale is not None:
            gradients = [_step.multiply(g, scale) for g in gradients]
            _guards.gradients_rescaled(self.optimizer)
        loop.apply(self.optimizer, list(gradients), list(variables))

    def value_and_gradients(
        self,
        function: Callable[[], Any],
        variables: Sequence[keras.Variable],
        has_aux: bool = False,
    ) -> tuple[Any, list[Tensor]]:
        """Runs `function()` and differentiates what it returns w.r.t.
        `variables`, on TensorFlow and JAX alike: for a `train_step`
        overridden whole (two players, two losses) that takes its own
        gradients.

        `function` takes no argument and returns a scalar loss, or, with
        `has_aux=True`, `(loss, aux)`, `aux` any structure of tensors (the
        predictions, parts of the loss). It runs once, as under a
        `tf.GradientTape` on TensorFlow; on JAX it runs under
        `jax.value_and_grad` inside the compiled step, and what it assigns
        (BatchNormalization statistics, `log`, metrics) is kept as on
        TensorFlow. Read values from what this returns, not from inside
        `function` (they are traced there on JAX). The gradients are those of
        the loss as returned: under mixed precision, return
        `optimizer.scale_loss(loss)` and unscale the gradients, as with a
        tape. Call it inside the step (`fit`, `train_on_batch`).

        Returns:
            `(value, gradients)`: `value` is what `function` returned, and
            `gradients` one per variable, in order (on TensorFlow `None` for
            a variable the loss does not reach, on JAX zeros).

        Example:

        ```python
        def train_step(self, data):
            x, y = data

            def loss_fn():
                y_pred = self(x, training=True)
                return self.compute_loss(x, y, y_pred), y_pred

            variables = self.trainable_variables
            (loss, y_pred), gradients = self.value_and_gradients(
                loss_fn, variables, has_aux=True)
            self.apply_gradients(gradients, variables)
            return self.compute_metrics(x, y, y_pred)
        ```
        """

        def objective() -> tuple[Tensor, Any]:
            value = function()
            return (value[0] if has_aux else value), value

        value, gradients = loop.gradients(objective, list(variables))
        return value, list(gradients)

    def log(
        self,
        name: str,
        value: Any,
        weight: Any = None,
        reduction: Literal["mean", "last"] = "mean",
    ) -> None:
        """Reports a value next to the loss and metrics.

        Call it anywhere in `train_step`, `test_step` or a hook, in place of
        a `keras.metrics.Mean` tracker and the `metrics` property listing it.
        It shows in the progress bar, `History`, callback logs and
        TensorBoard; values logged from `test_step` are reported by
        `evaluate` and as `val_<name>`. Values reset at the start of each
        epoch and each `evaluate`, and a mid-epoch resume restores them.

        With `reduction="mean"` (the default) the column is the mean over the
        epoch so far, computed as `keras.metrics.Mean.update_state(value,
        sample_weight=weight)` computes it, so it gives the same numbers as
        the tracker it replaces: a scalar counts `weight` times (once without
        a weight); a vector, e.g. a per-example loss, counts each element (each
        row, averaged over its other axes) once, or with its entry of `weight`.
        Keras' `loss` column weights each batch by its size; log the parts of
        a loss with `weight=keras.ops.shape(x)[0]` and they add up to it.
        With `reduction="last"`, the column is the value of the last call
        (its weighted mean if it is a vector).

        Under `tf.distribute` the column is the weighted mean over replicas,
        as for Keras' metrics. A per-replica quantity is taken as it is: the
        loss from `compute_loss` is already divided by the number of
        replicas, so on two replicas it shows half the one-device value. On
        JAX the step sees the whole batch, also under `keras.distribution`.
        There a step must log the same names every time it runs.

        Args:
            name: The column name; must not clash with a compiled metric.
            value: A number or a tensor of any shape.
            weight: `sample_weight` for `Mean.update_state`: a scalar, or a
                tensor broadcastable to `value`. None counts each value once.
            reduction: `"mean"` over the epoch, or the `"last"` value. One
                reduction per name.

        Example:

        ```python
        class VAE(customfit.CustomModel):
            def compute_loss(self, x=None, y=None, y_pred=None,
                             sample_weight=None, training=True):
                reconstruction, kl = ...
                batch_size = keras.ops.shape(x)[0]
                self.log("reconstruction_loss", reconstruction, weight=batch_size)
                self.log("kl_loss", kl, weight=batch_size)
                return reconstruction + kl  # the `loss` column
        ```
        """
        self._step_logs.log(name, value, weight, reduction, reserved_names=self._metric_names)

    # ------------------------------------------------------------- the steps

    def train_step(self, data: Any, *stateless: Any) -> Any:
        """One training step on one batch, as stock `fit`'s: the forward pass
        and the loss, their gradients, `transform_gradients`,
        `apply_gradients`, then the metrics (the class docstring gives the
        order and what each part sees).

        Override a hook to change one part. Override this method to write the
        whole step, as for `keras.Model`: with the Keras-2 helpers
        (`compiled_loss`, `compiled_metrics`, `metrics`), `compute_loss`, and
        `value_and_gradients` to take gradients on every backend. It returns
        the logs (`{name: value}`) that callbacks, the progress bar and
        `History` get.

        Called as `train_step(state, data)`, by a step written for stock
        Keras' JAX trainer (`super().train_step(state, data)`), it is Keras'
        own stateless step."""
        if stateless:
            return keras.Model.train_step(self, data, *stateless)
        return _step.train_step(self, data)

    # ------------------------------------------------- seams for recipes

    def compute_gradients(self, x: Any, y: Any, sample_weight: Any) -> StepGradients:
        """The forward pass, the loss and its gradients: the first part of
        the default `train_step`.

        Runs once per training batch (per micro-batch under
        `GradientAccumulation`), first in the step. The default runs
        `self(x, training=True)` and `compute_loss`, adds the loss to the
        `loss` metric as stock `fit` does, scales it for mixed precision
        (`optimizer.scale_loss`), differentiates it w.r.t.
        `trainable_weights` and unscales the gradients.

        Override it to change how the step's gradient is computed (`SAM`'s
        second pass); call `super().compute_gradients(...)` for the default.

        Returns:
            `StepGradients(y_pred, loss, gradients, variables)`: the loss as
            `compute_loss` returned it (unscaled; under `tf.distribute` this
            replica's share), one unscaled gradient per variable of this
            replica's share of the batch (`None` for a variable the loss
            does not reach), not accumulated. `y_pred` goes to
            `compute_metrics`.

        Example:

        ```python
        def compute_gradients(self, x, y, sample_weight):  # from keras import ops
            result = super().compute_gradients(x, y, sample_weight)
            noisy = [g + 1e-3 * keras.random.normal(ops.shape(g), seed=self.seeds)
                     for g in result.gradients]
            return result._replace(gradients=noisy)
        ```
        """
        return StepGradients(*loop.loss_gradients(self, x, y, sample_weight))

    def update_weights(
        self, loss: Tensor, gradients: list[Tensor], variables: list[keras.Variable]
    ) -> None:
        """Whether, when and with which gradient the weights are updated: the
        second part of the default `train_step`.

        Runs once per training batch, right after `compute_gradients`, with
        what it returned: this replica's unscaled gradients of this batch
        (not accumulated). The default runs `transform_gradients`, checks
        the result (one gradient per variable) and runs `apply_gradients`.

        Override it to decide whether and when the update runs
        (`SkipNonFinite`, `GradientAccumulation`); call
        `super().update_weights(...)` for the update itself, inside
        `customfit.steptools.cond` when the decision is a tensor. Variables
        it assigns besides the model's and the optimizer's are returned by
        `step_variables`. Returns nothing.

        Example:

        ```python
        def update_weights(self, loss, gradients, variables):
            steptools.cond(keras.ops.isfinite(loss),
                           lambda: super(Net, self).update_weights(loss, gradients, variables),
                           lambda: None)
        ```
        """
        _step.update_weights(self, loss, gradients, variables)

    def step_variables(self) -> list[keras.Variable]:
        """The variables the training step assigns besides the model's, its
        optimizers' and its metrics': a recipe's accumulators, averages and
        counters. Default: none.

        Called before the train function is made (on every backend, before
        the first training step) and again while it is traced. A recipe
        creates its variables here the first time, under
        `customfit.steptools.state_scope(self)`, keeps them on the model
        (not as tracked attributes of a built model: Keras locks its state),
        returns them every time, and saves them in `save_own_variables`.
        The JAX and PyTorch loops carry them through the compiled step.

        Example:

        ```python
        def step_variables(self):
            if self._updates is None:
                with steptools.state_scope(self):
                    self._updates = keras.Variable(0, dtype="int", trainable=False)
            return [*super().step_variables(), self._updates]
        ```
        """
        return []

    def test_step(self, data: Any, *stateless: Any) -> Any:
        """One evaluation step: forward pass, loss, metrics; no update.
        `test_step(state, data)` is Keras' own stateless step (see
        `train_step`)."""
        if stateless:
            return keras.Model.test_step(self, data, *stateless)
        return _step.test_step(self, data)

    def predict_step(self, data: Any, *stateless: Any) -> Any:
        """One prediction step: `self(x, training=False)`, as in Keras.
        `predict_step(state, data)` is Keras' own stateless step (see
        `train_step`)."""
        if stateless:
            return keras.Model.predict_step(self, data, *stateless)
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return _step.forward(self, x, training=False)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Tensor:
        """Keras' `compute_loss`, with errors that say what to change."""
        has_compiled_loss = internals.compiled_loss_object(self) is not None
        if not has_compiled_loss and not self.losses:
            raise ValueError(
                "There is no loss to minimize: compile() got no loss= and the "
                "model adds none. Pass loss=... to compile(), call "
                "self.add_loss(...) in call(), or override compute_loss()."
            )
        if has_compiled_loss and y is None:
            raise ValueError(missing_targets_message())
        return super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )

    # ------------------------------------------------------ Keras-2 helpers

    @property
    def compiled_loss(self) -> CompiledLoss:
        """Keras-2 `self.compiled_loss(y, y_pred, sample_weight=None,
        regularization_losses=None)`: the compiled loss plus regularization,
        tracked in `loss` as stock `fit` tracks it."""
        return self._compiled_loss

    @property
    def compiled_metrics(self) -> CompiledMetrics:
        """Keras-2 `self.compiled_metrics.update_state(y, y_pred,
        sample_weight=None)`: updates the metrics passed to `compile()`."""
        return self._compiled_metrics

    # ------------------------------------------------------------ optimizers

    @property
    def optimizer(self) -> Any:
        """`compile`'s optimizer, as on `keras.Model` (absent before
        `compile`). A model compiled without one (`recipes.GAN`) reads None,
        except on JAX while Keras' trainer runs it: an empty stand-in there,
        since Keras' JAX `fit` reads `model.optimizer.variables`."""
        try:
            optimizer = self.__dict__["optimizer"]
        except KeyError:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute 'optimizer'"
            ) from None
        return loop.optimizer_stand_in(self) if optimizer is None else optimizer

    @optimizer.setter
    def optimizer(self, optimizer: keras.optimizers.Optimizer | None) -> None:
        self.__dict__["optimizer"] = optimizer

    @property
    def optimizers(self) -> Mapping[str, keras.optimizers.Optimizer]:
        """Every optimizer of the model, by name; read-only.

        `"optimizer"` for `self.optimizer` first (when set), then each other
        attribute that holds a `keras.optimizers.Optimizer` (such as
        `self.head_optimizer`, or a GAN's `generator_optimizer` and
        `discriminator_optimizer`), by attribute name, in the order the
        attributes were first assigned. An optimizer kept inside a list or
        dict is not listed (`save` stores it all the same): give it an
        attribute of its own.

        What the model does for each of them:

        - one not yet built when training starts is built over all
          `trainable_variables`, as Keras builds `self.optimizer`: before the
          first step is traced, or, if the model is built by that step, when
          the step first applies it. `load_weights` builds it the same way
          when the file holds its state, so a loaded file (also
          `customfit.callbacks.BackupAndRestore`) restores it. Build it
          yourself over the variables it updates (e.g.
          `self.head_optimizer.build(self.head.trainable_variables)` in
          `__init__`) to keep slots for those only;
        - when the model has any optimizer besides `self.optimizer`, `fit`
          adds to the epoch logs (`History`, `CSVLogger`, `TensorBoard`) the
          learning rate of each one that follows a `LearningRateSchedule`:
          `learning_rate` for `self.optimizer`, as Keras names it,
          `learning_rate_<name>` for the others. Constant rates are left out
          (they add nothing, and `History` keeps stock fit's columns);
        - `customfit.callbacks.LearningRateScheduler` and `ReduceLROnPlateau`
          change all of them, or the ones they name.

        Each optimizer counts its own updates in `optimizer.iterations`: one
        applied twice per batch counts two per batch, and a
        `LearningRateSchedule` is evaluated at that optimizer's own count.
        Callbacks' `batch` and `epoch` arguments count batches and epochs,
        whatever the number of optimizers.
        """
        return _optimizers.registered(self)

    @optimizers.setter
    def optimizers(self, value: Any) -> None:
        raise AttributeError(
            "CustomModel.optimizers lists the model's optimizers and cannot be "
            "assigned. Assign each optimizer to an attribute of its own "
            "(self.head_optimizer = keras.optimizers.Adam()), and it is listed "
            "under that name; keep a collection under another name."
        )

    # ---------------------------------------------------------------- saving

    def save_own_variables(self, store: Any) -> None:
        """Keras' own state of the model, plus the state of its random layers.

        Called by `save`, `save_weights` and the checkpoint callbacks. Keras
        saves weights and optimizer state but not the `SeedGenerator` state of
        Dropout and other random layers, so training resumed from a file would
        draw other dropout masks than training that never stopped. This saves
        them too, so resumed training equals uninterrupted training.
        """
        super().save_own_variables(store)
        _saving.save_rng_states(self, store)

    def save_assets(self, dir_path: str) -> None:
        """Keras' hook for files besides the weights, which Keras calls on
        every model in a whole-model save only: `save("model.keras")`,
        `keras.saving.save_model`, `ModelCheckpoint` without
        `save_weights_only`, pickling. Writes nothing.

        Warns (`customfit.SavingWarning`, once per class) when the class is
        not registered with Keras, so that `keras.models.load_model` could not
        find it again; decorate subclasses with
        `@keras.saving.register_keras_serializable()`. A subclass that
        overrides it calls `super().save_assets(dir_path)`.
        """
        _saving.warn_if_unregistered(_defined_class(type(self)))
        inherited = getattr(super(), "save_assets", None)
        if inherited is not None:
            inherited(dir_path)

    def load_own_variables(self, store: Any) -> None:
        """Loads what `save_own_variables` saved; files written by
        `keras.Model` (without random-layer state) load as before."""
        own, rng_states = _saving.split_rng_states(store)
        super().load_own_variables(own)
        _saving.load_rng_states(self, rng_states)

    def load_weights(self, filepath: Any, skip_mismatch: bool = False, **kwargs: Any) -> None:
        """Keras' `load_weights`, with errors that name the problem and no
        half-loaded model.

        A missing, truncated or corrupt file, or one written by a different
        architecture, raises `FileNotFoundError` or `ValueError` and leaves
        every weight, random-layer state and optimizer variable as it was
        (Keras alone loads another architecture's file partly, with a
        warning). `skip_mismatch=True` keeps Keras' partial loading. An
        unbuilt optimizer is built first, so its saved state is restored
        rather than skipped.
        """
        return _saving.checked_load(
            self,
            filepath,
            lambda: super(CustomModel, self).load_weights(
                filepath, skip_mismatch=skip_mismatch, **kwargs
            ),
            skip_mismatch=skip_mismatch,
        )

    # ------------------------------------------------------------ plumbing

    @property
    def steps_per_execution(self) -> int:
        """Keras' `compile(steps_per_execution=...)`, plus `"auto"`.

        With `"auto"`, `fit` and `evaluate` choose how many batches each
        execution of the compiled step runs, from measured times: from one
        batch up, as long as that makes a batch faster and an execution
        takes under 0.2 s (the progress bar and callbacks keep updating
        several times a second). Callbacks see every batch, with its own
        index and logs, bit for bit as with one batch per execution. An
        execution never runs past a batch after which a callback reads the
        weights (`ModelCheckpoint` and `BackupAndRestore` with
        `save_freq=N`, `fit(validate_every_n_batches=N)`); a callback with
        other per-batch methods, unless it has `reads_only_logs = True`,
        makes that call run one batch per execution, with a warning.
        `predict` runs one batch per execution, and this attribute reads 1
        (the compile config keeps `"auto"`).

        Example:

        ```python
        model.compile("adam", "sparse_categorical_crossentropy",
                      steps_per_execution="auto")
        ```

        `predict` on PyTorch runs one batch per execution, whatever the
        number (`loop.predict_steps_per_execution`).
        """
        call = _call.innermost(self)
        if call is not None and call.method == "predict":
            return loop.predict_steps_per_execution(self._fixed_steps_per_execution)
        return self._fixed_steps_per_execution

    @steps_per_execution.setter
    def steps_per_execution(self, value: int | str) -> None:
        _auto_steps.set_steps_per_execution(self, value)

    def make_train_function(self, force: bool = False) -> Callable:
        if self.train_function is None or force:
            _step.checked_step_variables(self)
            # Keras' attribute (None until made), declared for mypy.
            self.train_function: Callable | None = loop.make_train_function(self)
        return self.train_function

    def make_test_function(self, force: bool = False) -> Callable:
        if self.test_function is None or force:
            # Keras' attribute, as above.
            self.test_function: Callable | None = loop.make_test_function(self)
        return self.test_function

    def make_predict_function(self, force: bool = False) -> Callable:
        if self.predict_function is None or force:
            # Keras' attribute, as above.
            self.predict_function: Callable | None = loop.make_predict_function(
                self, lambda: super(CustomModel, self).make_predict_function(force=True)
            )
        return self.predict_function

    def fit(
        self,
        *args: Any,
        quick_run: int | None = None,
        overfit_batches: int | None = None,
        validate_every_n_batches: int | None = None,
        **kwargs: Any,
    ) -> keras.callbacks.History:
        """Keras' `fit`, plus three run modes for developing a model.

        Every Keras argument works as in `keras.Model.fit`. The run modes are
        off by default:

        Args:
            quick_run: Train one epoch of at most this many batches, then
                validate on at most this many; a smoke test of the whole loop
                (callbacks included) that takes seconds.
            overfit_batches: Train every epoch on the same first
                `overfit_batches` batches, unshuffled (a shuffling `tf.data`
                pipeline is cached after its first pass), and validate on at
                most as many. A model that cannot drive this loss towards zero
                has a bug.
            validate_every_n_batches: Also validate after every this many
                training batches (a multiple of `steps_per_execution`). The
                results reach the callbacks after it in that batch's logs as
                `val_<name>`; the training metrics keep running, so the
                epoch's training logs are unchanged. Needs `validation_data`
                or `validation_split`.

        Example:

        ```python
        model.fit(x, y, validation_split=0.2, quick_run=2)
        model.fit(x, y, epochs=200, overfit_batches=1)
        model.fit(x, y, validation_data=(xv, yv), validate_every_n_batches=50)
        ```
        """
        self._require_compiled("fit")
        versions.check_once()
        modes = _dev_modes.DevModes(quick_run, overfit_batches, validate_every_n_batches)
        return _call.Call(self, "fit", args, kwargs, modes).run(super().fit)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Keras' `evaluate`; callbacks see every batch, also with
        `steps_per_execution > 1`."""
        self._require_compiled("evaluate")
        versions.check_once()
        return _call.Call(self, "evaluate", args, kwargs).run(super().evaluate)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """Keras' `predict`."""
        return _call.Call(self, "predict", args, kwargs).run(super().predict)

    def train_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        self._require_compiled("train_on_batch")
        with self._step_logs.in_phase("train"):
            with loop.call_scope(self):
                return super().train_on_batch(*args, **kwargs)

    def test_on_batch(self, *args: Any, **kwargs: Any) -> Any:
        self._require_compiled("test_on_batch")
        with self._step_logs.in_phase("test"):
            return super().test_on_batch(*args, **kwargs)

    def get_metrics_result(self) -> dict[str, Any]:
        """Keras' results of `metrics`, plus the values from `log`.

        Keras reports an epoch with these results when their names are the
        step's log names (otherwise with the last step's logs): the logged
        columns are part of them, so an epoch's `History` values come from
        the metric states, as in stock `fit`, also under `tf.distribute`."""
        results = super().get_metrics_result()
        for name, value in self._step_logs.results().items():
            results.setdefault(name, value)
        return results

    def _metrics_behind_logs(self) -> list[keras.metrics.Metric]:
        """Every metric whose state makes the current phase's logs: `metrics`
        and the values from `log`."""
        return [*self.metrics, *self._step_logs.metrics]

    def reset_metrics(self) -> None:
        super().reset_metrics()
        for metric in self._step_logs.all_metrics:
            metric.reset_state()

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        loop.maybe_symbolic_build(self, iterator=iterator, data_batch=data_batch)

    def _symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        loop.symbolic_build(self, iterator=iterator, data_batch=data_batch)

    def _require_compiled(self, method: str) -> None:
        if not self.compiled:
            raise RuntimeError(
                f"{type(self).__name__}.{method}() needs compile() first: call "
                'model.compile(optimizer="adam", loss=...) before '
                f"model.{method}()."
            )

    def _metric_names(self) -> set[str]:
        """The log names of the model's metrics (compiled ones once built)."""
        names: set[str] = set()
        for metric in self.metrics:
            if isinstance(metric, internals.CompileMetrics):
                if metric.built:
                    names.update(internals.compiled_metric_log_names(metric))
            else:
                names.add(metric.name)
        return names


_TWIN_ATTRIBUTE = "_customfit_functional_twin"


def _defined_class(cls: type) -> type:
    """The class the user defined: `cls`, or the class `cls` is the
    functional twin of."""
    base = cls.__bases__[0]
    return base if base.__dict__.get(_TWIN_ATTRIBUTE) is cls else cls


def _functional_twin(cls: type) -> type:
    """`cls` with keras' `Functional` mixed in, made once per class."""
    twin = cls.__dict__.get(_TWIN_ATTRIBUTE)
    if twin is None:
        # Reachable by its qualified name (`Net._customfit_functional_twin`),
        # so that pickle finds the class it pickles.
        twin = type(
            cls.__name__,
            (cls, internals.Functional),
            {"__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}.{_TWIN_ATTRIBUTE}"},
        )
        internals.share_registered_name(twin, cls)
        setattr(cls, _TWIN_ATTRIBUTE, twin)
    return twin
