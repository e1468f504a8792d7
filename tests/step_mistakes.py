"""A whole `train_step` written by hand, correct unless told to make one of
the usual mistakes; `Net.mistake` names it. Module level, so that
`customfit.testing.check_step` can import the build functions in its
two-replica process."""

import keras
import tensorflow as tf

import customfit

MISTAKES = [
    "loss_not_tracked",
    "loss_tracks_predictions",
    "metric_not_reset",
    "training_not_passed",
    "gradients_on_weights",
    "regularization_dropped",
    "none_gradients",
]
REPLICA_MISTAKES = ["loss_not_scaled_for_replicas", "loss_tracked_per_replica"]


class Net(customfit.CustomModel):
    """Dense(L2) -> BatchNorm -> Dropout -> softmax, with a step in the style
    of the Keras guide: its own loss tracker and metric, listed in `metrics`."""

    mistake = None

    def __init__(self, layers_that_train_differently=True, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(
            16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-2))
        self.norm = keras.layers.BatchNormalization() if layers_that_train_differently else None
        self.drop = keras.layers.Dropout(0.3) if layers_that_train_differently else None
        self.out = keras.layers.Dense(10, activation="softmax")
        self.unused = keras.layers.Dense(3)
        self.unused.build((None, 4))
        # The fix for a None gradient: freeze what does not affect the loss.
        self.unused.trainable = self.mistake == "none_gradients"
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        h = self.hidden(x)
        if self.norm is not None:
            h = self.drop(self.norm(h, training=training), training=training)
        return self.out(h)

    @property
    def metrics(self):
        if self.mistake == "metric_not_reset":
            return [self.loss_tracker]
        return [self.loss_tracker, self.accuracy]

    def train_step(self, data):
        x, y = data
        mistake = self.mistake
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            if mistake == "training_not_passed":
                y_pred = self(x)
            else:
                y_pred = self(x, training=True)
            loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, y_pred))
            if mistake != "regularization_dropped":
                loss = loss + keras.ops.sum(self.losses)
            replica_loss = loss if mistake == "loss_not_scaled_for_replicas" else loss / replicas
        if mistake == "gradients_on_weights":
            variables = self.weights
        else:
            variables = self.trainable_weights
        gradients = tape.gradient(replica_loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        if mistake == "loss_tracks_predictions":
            self.loss_tracker.update_state(y_pred)
        elif mistake == "loss_tracked_per_replica":
            self.loss_tracker.update_state(replica_loss)
        elif mistake != "loss_not_tracked":
            self.loss_tracker.update_state(loss)
        self.accuracy.update_state(y, y_pred)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy.result()}


def with_mistake(mistake):
    return type(f"Net_{mistake}", (Net,), {"mistake": mistake})


def build_correct():
    return Net(layers_that_train_differently=False)


def build_unscaled_loss():
    return with_mistake("loss_not_scaled_for_replicas")(layers_that_train_differently=False)


def build_loss_tracked_per_replica():
    return with_mistake("loss_tracked_per_replica")(layers_that_train_differently=False)


class PythonState(customfit.CustomModel):
    """Divides each gradient by a Python counter of batches: eagerly it counts
    every batch, compiled it is read once, while the step is traced."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(10, activation="softmax")
        self.batches_seen = 0

    def call(self, x):
        return self.dense(x)

    def transform_gradients(self, gradients, variables):
        self.batches_seen += 1
        return [g / self.batches_seen for g in gradients]


def build_python_state():
    return PythonState()
