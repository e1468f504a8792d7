"""`SAM`: Sharpness-Aware Minimization (Foret et al., 2021)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from customfit import steptools
from customfit._model import CustomModel, StepGradients, Tensor
from customfit.recipes import _options as options
from customfit.recipes._clipping import global_norm

# Added to the gradient norm before dividing, as in the authors' code.
_NORM_FLOOR = 1e-12


@keras.saving.register_keras_serializable(package="customfit")
class SAM(CustomModel):
    """Sharpness-Aware Minimization: descend with the gradient taken at the
    worst nearby weights.

    Per training batch, with `g` the gradient of the loss at the weights `w`:

    1. `e = rho * g / (||g|| + 1e-12)`, `||g||` the global L2 norm over all
       trainable variables;
    2. a second forward and backward pass on the same batch at `w + e` gives
       `g_sam`;
    3. `g_sam` (not `g`) goes through `transform_gradients` and
       `apply_gradients` as in the default step. `w` itself is never
       modified: the second pass reads `w + e` through a `keras.StatelessScope`,
       so the weights the optimizer updates are exactly `w`.

    The second pass sees the model state the first pass saw: the same batch,
    the same dropout masks (random-generator state) and the same
    BatchNormalization moving statistics; its state updates are discarded,
    so BatchNormalization statistics (and random generators) advance once per
    step, from the first pass. `loss` and the compiled metrics are those of
    the first pass, at `w`. With `rho=0` the step equals the default step
    bit for bit.

    **Per replica (m-sharpness).** Under `tf.distribute`, each replica
    computes `e` from the gradient of its own share of the batch, as in the
    paper's m-sharpness with `m` = the per-replica batch size; the optimizer
    then sums the replicas' `g_sam`. Two replicas of 64 therefore train like
    one device running SAM on micro-batches of 64 with
    `GradientAccumulation(accumulation_steps=2)`, not like SAM on 128.

    **Mixed precision.** Both passes scale the loss and unscale their
    gradients; a non-finite first gradient makes `g_sam` non-finite, which a
    `LossScaleOptimizer` skips as it skips any overflowing step.

    **Composition.** SAM replaces only how the step's gradient is computed:
    a user's `transform_gradients`/`apply_gradients`/`log`, clipping recipes
    and `GradientAccumulation` see `g_sam`, and `AdversarialTraining` hands
    SAM the adversarial batch, whatever their order among the bases.

    Args:
        rho: Radius of the neighbourhood, `>= 0` (the paper uses 0.05 for
            most CIFAR runs).

    Example:

    ```python
    model = customfit.recipes.SAM(inputs, outputs, rho=0.05)

    class Net(customfit.recipes.SAM, customfit.CustomModel):
        ...  # Net(rho=0.1)
    ```
    """

    def __init__(self, *args: Any, rho: float = 0.05, **kwargs: Any) -> None:
        rho = options.number("SAM", "rho", rho)
        super().__init__(*args, **kwargs)
        self.rho = rho

    def get_config(self) -> dict:
        config = super().get_config()
        config["rho"] = self.rho
        return config

    def compute_gradients(self, x: Any, y: Any, sample_weight: Any) -> StepGradients:
        state = steptools.pass_state(self)
        result = super().compute_gradients(x, y, sample_weight)
        if not result.variables:
            return result
        gradients = self._sharpness_aware_gradients(
            x, y, sample_weight, result.gradients, result.variables, state
        )
        return result._replace(gradients=gradients)

    def _sharpness_aware_gradients(
        self,
        x: Any,
        y: Any,
        sample_weight: Any,
        gradients: list,
        variables: list,
        state: Any,
    ) -> list:
        """`g_sam`: the unscaled gradient of the loss at `w + e`.

        Runs once per training batch, after the first backward pass. `state`
        is the model's state before the first pass (`steptools.pass_state`); the
        second pass reads it.
        """
        norm = global_norm(gradients)
        scale = self.rho / (norm + _NORM_FLOOR)
        perturbed = [
            ops.copy(v.value) if g is None else v.value + g * ops.cast(scale, g.dtype)
            for g, v in zip(gradients, variables)
        ]

        def scaled_loss(values: list) -> Tensor:
            y_pred = steptools.forward(self, x, training=True)
            loss = steptools.loss(self, x, y, y_pred, sample_weight)
            return loss if self.optimizer is None else self.optimizer.scale_loss(loss)

        _, sam_gradients = steptools.stateless_gradients(scaled_loss, perturbed, variables, state)
        return steptools.unscaled(self, sam_gradients)
