"""`Distiller`: a student trained on labels and on a frozen teacher's logits."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from customfit._backend import replicas
from customfit._keras import internals
from customfit._keras2 import track_loss
from customfit._model import CustomModel
from customfit.recipes._wrapped import deserialize_wrapped, serialize_wrapped


@keras.saving.register_keras_serializable(package="customfit")
class Distiller(CustomModel):
    """Knowledge distillation (Hinton et al., 2015) as a model that `fit`s.

    Student and teacher output **logits**. Per batch the student minimizes

        loss = alpha * hard + (1 - alpha) * T**2 * KL(softmax(t / T) || softmax(s / T))

    plus the student's own regularization losses, where `hard` is the loss
    given to `compile(loss=...)` on the labels and the student's logits `s`,
    `t` are the teacher's logits and `T` is the temperature. `alpha` weighs
    the hard (label) term, as `student_loss_weight` does in
    `keras.distillation.Distiller`. The KL term is averaged over the batch
    (weighted by `sample_weight` when given, like the hard term); `T**2`
    keeps its gradients on the scale of the hard term's as `T` changes.

    The teacher is frozen: it runs with `training=False` and is never updated.
    Calling the model (and `predict`, `evaluate`'s compiled metrics) uses the
    student. `fit`/`evaluate` report `loss` (the total above) and the
    compiled metrics of the student, plus `student_loss` (`hard`) and
    `distillation_loss` (the `T**2 * KL` term), each tracked like `loss`.

    Args:
        student: The `keras.Model` to train; outputs logits.
        teacher: A trained `keras.Model`, outputs logits of the same shape.
        temperature: `T > 0`; higher values soften both distributions.
        alpha: Weight of the hard loss, in `[0, 1]`; `1 - alpha` weighs the
            distillation term.

    Example:

    ```python
    distiller = customfit.recipes.Distiller(student, teacher, temperature=4.0,
                                            alpha=0.1)
    distiller.compile("adam",
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    distiller.fit(x, y, epochs=10)
    distiller.student.save("student.keras")
    ```
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model,
        temperature: float = 3.0,
        alpha: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise TypeError(
                    f"Distiller needs a keras.Model as {role}; got {type(model).__name__}."
                )
        if student is teacher:
            raise ValueError("student and teacher are the same model; pass two models.")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0; got {temperature!r}.")
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(
                f"alpha must be a number in [0, 1] (the weight of the label loss); got {alpha!r}."
            )
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")
        if student.built:
            self.built = True

    def call(self, x: Any, training: bool = False) -> Any:
        return self.student(x, training=training)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        """The distillation loss above; runs in every train and test step."""
        compile_loss = internals.compiled_loss_object(self)
        if compile_loss is None:
            raise ValueError(
                "Distiller needs the student's label loss: compile(optimizer, "
                "loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))"
                " (the student outputs logits)."
            )
        if y is None:
            raise ValueError(
                "Distiller trains on labels and the teacher: pass y to "
                "fit()/evaluate(), or yield (x, y) from the dataset."
            )
        hard = compile_loss(y, y_pred, sample_weight)
        teacher_logits = self.teacher(x, training=False)
        soft = self.distillation_loss(teacher_logits, y_pred, sample_weight)
        track_loss(self, hard, batch_of=x, tracker=self.student_loss_tracker)
        track_loss(self, soft, batch_of=x, tracker=self.distillation_loss_tracker)
        losses = [self.alpha * hard + (1.0 - self.alpha) * soft]
        losses.extend(
            internals.aggregate_additional_loss(self, extra) for extra in self.student.losses
        )
        return losses[0] if len(losses) == 1 else keras.ops.sum(losses)

    def distillation_loss(
        self, teacher_logits: Any, student_logits: Any, sample_weight: Any = None
    ) -> Any:
        """`T**2 * KL(softmax(t/T) || softmax(s/T))`, averaged over the batch.

        Computed from log-softmaxes (no clipping). Like Keras losses, the
        value returned under `tf.distribute` is this replica's share (divided
        by the number of replicas).
        """
        t = ops.cast(teacher_logits, "float32") / self.temperature
        s = ops.cast(student_logits, "float32") / self.temperature
        log_p = ops.log_softmax(t, axis=-1)
        log_q = ops.log_softmax(s, axis=-1)
        per_sample = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
        if sample_weight is not None:
            weight = ops.cast(sample_weight, per_sample.dtype)
            per_sample = per_sample * ops.reshape(weight, ops.shape(per_sample))
        kl = ops.sum(per_sample) / ops.cast(ops.size(per_sample), "float32")
        replica_count = replicas.count()
        if replica_count > 1:
            kl = kl * (1.0 / replica_count)
        return self.temperature**2 * kl

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            student=serialize_wrapped(self.student),
            teacher=serialize_wrapped(self.teacher),
            temperature=self.temperature,
            alpha=self.alpha,
        )
        return config

    @classmethod
    def from_config(cls, config: dict) -> Distiller:
        config = dict(config)
        for key in ("student", "teacher"):
            config[key] = deserialize_wrapped(config[key])
        return cls(**config)
