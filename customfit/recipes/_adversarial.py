"""Adversarial training on inputs: FGSM (Goodfellow et al., 2015) and PGD
(Madry et al., 2018), L-infinity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from customfit import steptools
from customfit._model import CustomModel, Tensor
from customfit.recipes import _options as options

ATTACKS = ("fgsm", "pgd")
TRAIN_ON = ("adversarial", "both")


def adversarial_examples(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any = None,
    *,
    epsilon: float,
    steps: int = 1,
    step_size: float | None = None,
    input_range: Sequence[float] | None = None,
) -> Any:
    """L-infinity adversarial inputs for a compiled `model`: FGSM or PGD.

    Starting from the clean inputs, `steps` times: move every floating-point
    input by `step_size * sign(d loss / d input)`, then project back into
    `[x - epsilon, x + epsilon]` and into `input_range`. `steps=1` with the
    default `step_size=epsilon` is FGSM; more steps are PGD without a random
    start (the basic iterative method), with `step_size` defaulting to
    `2.5 * epsilon / steps` as in Madry et al. The loss is the compiled one
    (`model.compute_loss`), with the model in inference mode
    (`training=False`: Dropout off, BatchNormalization on its moving
    statistics, no state updated). Under mixed precision the loss is scaled
    as in training so small input gradients do not vanish in float16; only
    their sign is used. Integer inputs (token ids) are left unchanged.

    Works on any compiled `keras.Model`, e.g. to measure the robustness of a
    model trained without this recipe.

    Args:
        model: A compiled `keras.Model`.
        x: Inputs, a tensor or a structure of tensors.
        y: Targets for the compiled loss.
        sample_weight: Optional sample weights for the loss.
        epsilon: Largest change of any input value, `>= 0`.
        steps: Gradient-sign steps, `>= 1`.
        step_size: Size of each step; see above for the default.
        input_range: `(low, high)` to clip the adversarial inputs to (e.g.
            `(0.0, 1.0)` for pixels scaled to [0, 1]), or None.

    Returns:
        The adversarial inputs, in the structure of `x`.
    """
    epsilon, steps, step_size, input_range = _attack_options(
        "adversarial_examples", epsilon, steps, step_size, input_range, "steps", "step_size"
    )
    flat = keras.tree.flatten(x)
    floating = [i for i, t in enumerate(flat) if t is not None and _is_floating(t)]
    if not floating:
        raise ValueError(
            "adversarial_examples: the inputs have no floating-point tensor to "
            "perturb (got dtypes "
            f"{[getattr(t, 'dtype', None) for t in flat]}). Cast continuous "
            "inputs to float32; integer inputs such as token ids cannot be "
            "perturbed this way."
        )
    flat = list(flat)
    clean = [ops.convert_to_tensor(flat[i]) for i in floating]

    def scaled_loss(adversarial: list) -> Tensor:
        for i, value in zip(floating, adversarial):
            flat[i] = value
        inputs = keras.tree.pack_sequence_as(x, flat)
        y_pred = model(inputs, training=False)
        loss = steptools.loss(model, inputs, y, y_pred, sample_weight, training=False)
        if getattr(model, "optimizer", None) is not None:
            loss = model.optimizer.scale_loss(loss)
        return loss

    adversarial = list(clean)
    for _ in range(steps):
        _, gradients = steptools.stateless_gradients(scaled_loss, adversarial)
        adversarial = [
            _step(a, c, g, epsilon, step_size, input_range)
            for a, c, g in zip(adversarial, clean, gradients)
        ]
    for i, value in zip(floating, adversarial):
        flat[i] = value
    return keras.tree.pack_sequence_as(x, flat)


def _is_floating(tensor: Any) -> bool:
    dtype = keras.backend.standardize_dtype(getattr(tensor, "dtype", "float32"))
    return "float" in dtype


def _step(
    adversarial: Any,
    clean: Any,
    gradient: Any,
    epsilon: float,
    step_size: float,
    input_range: Sequence[float] | None,
) -> Any:
    if gradient is None:  # this input does not affect the loss
        return adversarial
    direction = ops.sign(ops.where(ops.isfinite(gradient), gradient, ops.zeros_like(gradient)))
    dtype = adversarial.dtype
    moved = adversarial + ops.cast(step_size, dtype) * ops.cast(direction, dtype)
    moved = ops.clip(moved, clean - ops.cast(epsilon, dtype), clean + ops.cast(epsilon, dtype))
    if input_range is not None:
        moved = ops.clip(moved, ops.cast(input_range[0], dtype), ops.cast(input_range[1], dtype))
    return ops.stop_gradient(moved)


def _attack_options(
    recipe: str,
    epsilon: float,
    steps: int,
    step_size: float | None,
    input_range: Sequence[float] | None,
    steps_name: str,
    step_size_name: str,
) -> tuple[float, int, float, tuple[float, float] | None]:
    epsilon = options.number(recipe, "epsilon", epsilon)
    steps = options.integer(recipe, steps_name, steps)
    if step_size is None:
        step_size = epsilon if steps == 1 else 2.5 * epsilon / steps
    step_size = options.number(recipe, step_size_name, step_size)
    if input_range is not None:
        ok = isinstance(input_range, (tuple, list)) and len(input_range) == 2
        if ok:
            low, high = (
                options.number(recipe, "input_range[0]", v, minimum=-float("inf"))
                for v in input_range
            )
            ok = low < high
        if not ok:
            raise ValueError(
                f"{recipe}: input_range must be (low, high) with low < high, or "
                f"None; got {input_range!r}. Pass e.g. input_range=(0.0, 1.0) "
                "for inputs scaled to [0, 1]."
            )
        input_range = (low, high)
    return epsilon, steps, step_size, input_range


@keras.saving.register_keras_serializable(package="customfit")
class AdversarialTraining(CustomModel):
    """Adversarial training: each training batch is replaced by (or extended
    with) adversarial inputs crafted against the current weights.

    `train_step` crafts `x_adv = adversarial_examples(self, x, y, ...)` (FGSM
    or PGD, see `customfit.recipes.adversarial_examples`; the attack runs the
    model in inference mode and updates no state), then runs the rest of the
    step (`super().train_step`) on:

    - `train_on="adversarial"`: `(x_adv, y)` (Madry et al.);
    - `train_on="both"`: `x` and `x_adv` concatenated along the batch, so the
      loss is the mean of the clean and adversarial losses (Goodfellow et
      al.'s objective with weight 0.5) and the batch doubles.

    `loss` and the compiled metrics in `History` are those of the batch
    trained on; `evaluate` and `predict` use clean inputs.

    Under `tf.distribute` each replica attacks its own examples; each
    example's perturbation depends only on that example, so the result does
    not depend on the number of replicas. Under mixed precision the attack's
    loss is scaled like the training loss.

    **Composition.** It only changes the batch the step trains on, so `SAM`,
    `GradientAccumulation`, clipping recipes and a user's hooks run on the
    adversarial batch, whatever their order among the bases.

    Args:
        epsilon: Largest change of any input value (L-infinity), `>= 0`, in
            the units of the inputs.
        attack: `"fgsm"` (one step of size `epsilon`) or `"pgd"`.
        pgd_steps: PGD steps, `>= 1`.
        pgd_step_size: PGD step size; default `2.5 * epsilon / pgd_steps`.
        input_range: `(low, high)` to clip adversarial inputs to, e.g.
            `(0.0, 1.0)` for pixels in [0, 1]; None (default) clips nothing.
        train_on: `"adversarial"` or `"both"`, see above.

    Example:

    ```python
    model = customfit.recipes.AdversarialTraining(
        inputs, outputs, epsilon=0.1, attack="pgd", input_range=(0.0, 1.0))
    ```
    """

    def __init__(
        self,
        *args: Any,
        epsilon: float,
        attack: str = "pgd",
        pgd_steps: int = 7,
        pgd_step_size: float | None = None,
        input_range: Sequence[float] | None = None,
        train_on: str = "adversarial",
        **kwargs: Any,
    ) -> None:
        recipe = "AdversarialTraining"
        attack = options.choice(recipe, "attack", attack, ATTACKS)
        train_on = options.choice(recipe, "train_on", train_on, TRAIN_ON)
        epsilon, pgd_steps, step_size, input_range = _attack_options(
            recipe, epsilon, pgd_steps, pgd_step_size, input_range, "pgd_steps", "pgd_step_size"
        )
        super().__init__(*args, **kwargs)
        self.epsilon = epsilon
        self.attack = attack
        self.pgd_steps = pgd_steps
        self.pgd_step_size = None if pgd_step_size is None else step_size
        self.input_range = input_range
        self.train_on = train_on

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            epsilon=self.epsilon,
            attack=self.attack,
            pgd_steps=self.pgd_steps,
            pgd_step_size=self.pgd_step_size,
            input_range=None if self.input_range is None else list(self.input_range),
            train_on=self.train_on,
        )
        return config

    def adversarial_examples(self, x: Any, y: Any, sample_weight: Any = None) -> Any:
        """This model's attack (as configured) on a batch; runs once per
        training batch inside `train_step`, and can be called directly."""
        step_size: float | None
        if self.attack == "fgsm":
            steps, step_size = 1, self.epsilon
        else:
            steps, step_size = self.pgd_steps, self.pgd_step_size
        return adversarial_examples(
            self,
            x,
            y,
            sample_weight,
            epsilon=self.epsilon,
            steps=steps,
            step_size=step_size,
            input_range=self.input_range,
        )

    def train_step(self, data: Any) -> dict[str, Tensor]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x_adv = self.adversarial_examples(x, y, sample_weight)
        if self.train_on == "both":
            x, y, sample_weight = (
                _concat(x, x_adv),
                _concat(y, y),
                _concat(sample_weight, sample_weight),
            )
        else:
            x = x_adv
        return super().train_step(keras.utils.pack_x_y_sample_weight(x, y, sample_weight))


def _concat(first: Any, second: Any) -> Any:
    if first is None:
        return None
    return keras.tree.map_structure(lambda a, b: ops.concatenate([a, b], axis=0), first, second)
