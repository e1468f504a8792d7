"""`tests/step_mistakes.py`'s hand-written step, written for every backend:
`self.value_and_gradients` in place of a `tf.GradientTape`, one device (no
replica scaling). Correct unless `Net.mistake` names one of the usual
mistakes; `none_gradients` is left out: on JAX a variable the loss does not
reach gets a zero gradient, not None."""

import keras

import customfit

MISTAKES = [
    "loss_not_tracked",
    "loss_tracks_predictions",
    "metric_not_reset",
    "training_not_passed",
    "gradients_on_weights",
    "regularization_dropped",
]


class Net(customfit.CustomModel):
    """Dense(L2) -> BatchNorm -> Dropout -> softmax, with a step in the style
    of the Keras guide: its own loss tracker and metric, listed in `metrics`."""

    mistake = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(
            16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-2))
        self.norm = keras.layers.BatchNormalization()
        self.drop = keras.layers.Dropout(0.3)
        self.out = keras.layers.Dense(10, activation="softmax")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        h = self.drop(self.norm(self.hidden(x), training=training), training=training)
        return self.out(h)

    @property
    def metrics(self):
        if self.mistake == "metric_not_reset":
            return [self.loss_tracker]
        return [self.loss_tracker, self.accuracy]

    def train_step(self, data):
        x, y = data
        mistake = self.mistake

        def loss_fn():
            y_pred = self(x) if mistake == "training_not_passed" else self(x, training=True)
            loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, y_pred))
            if mistake != "regularization_dropped":
                loss = loss + keras.ops.sum(self.losses)
            return loss, y_pred

        variables = self.weights if mistake == "gradients_on_weights" else self.trainable_weights
        (loss, y_pred), gradients = self.value_and_gradients(loss_fn, variables, has_aux=True)
        self.optimizer.apply_gradients(zip(gradients, variables))
        if mistake == "loss_tracks_predictions":
            self.loss_tracker.update_state(y_pred)
        elif mistake != "loss_not_tracked":
            self.loss_tracker.update_state(loss)
        self.accuracy.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}


def with_mistake(mistake):
    return type(f"Net_{mistake}", (Net,), {"mistake": mistake})
