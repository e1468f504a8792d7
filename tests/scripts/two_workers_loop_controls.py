"""One worker of a two-worker cluster running the loop controls; prints
RESULTS and a JSON dict.

    TF_CONFIG=... python tests/scripts/two_workers_loop_controls.py

- skipping: `recipes.SkipNonFinite` where only worker 1's share of batch 1
  holds a NaN, and the same model on the data without batch 1 (each worker
  reads its own share: `distribute_datasets_from_function`);
- per_batch: every batch's callback logs with `steps_per_execution` 4 and 1;
- validation: `fit` with `validate_every_n_batches=3` and without.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=60))
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import customfit  # noqa: E402
from customfit import recipes  # noqa: E402
from tests import models  # noqa: E402
from tests.scripts.resumable_training import Record  # noqa: E402

GLOBAL_BATCH, BATCHES = 32, 6
digits = load_digits()
X = (digits.data / 16).astype("float32")
Y = digits.target.astype("int32")


def shares(drop=(), nan_in=None):
    """Worker `w` reads rows w, w + 2, ... of each global batch; batches in
    `drop` are left out; `nan_in=(batch, worker)` puts a NaN pixel there."""
    x, y = X[:GLOBAL_BATCH * BATCHES].copy(), Y[:GLOBAL_BATCH * BATCHES]
    if nan_in is not None:
        batch, worker = nan_in
        x[batch * GLOBAL_BATCH + worker, 10] = np.nan

    def dataset(context):
        keep = [b for b in range(BATCHES) if b not in drop]
        rows = np.concatenate([np.arange(b * GLOBAL_BATCH, (b + 1) * GLOBAL_BATCH)
                               for b in keep])
        mine = rows[context.input_pipeline_id::context.num_input_pipelines]
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        return tf.data.Dataset.from_tensor_slices((x[mine], y[mine])).batch(per_replica)

    return strategy.distribute_datasets_from_function(dataset)


def state(model):
    return {"weights": [w.tolist() for w in model.get_weights()],
            "optimizer": [v.numpy().tolist() for v in model.optimizer.variables]}


def train(base, data, epochs=1, **compile_kwargs):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = models.mlp(base, dropout=0)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                      **compile_kwargs)
    record = Record()
    history = model.fit(data, epochs=epochs, verbose=0, shuffle=False,
                        callbacks=[record]).history
    return model, history, record


skipping, skip_history, _ = train(recipes.SkipNonFinite, shares(nan_in=(1, 1)))
reference, _, _ = train(customfit.CustomModel, shares(drop=(1,)))

per_batch = {}
for k in (1, 4):
    model, history, record = train(customfit.CustomModel, shares(), epochs=2,
                                   steps_per_execution=k)
    per_batch[k] = {"batches": record.batches, "history": history, **state(model)}

validation = {}
validation_data = (X[-64:], Y[-64:])
for every in (None, 3):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = models.mlp(customfit.CustomModel, dropout=0)
        model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    record = Record()
    history = model.fit(X[:GLOBAL_BATCH * BATCHES], Y[:GLOBAL_BATCH * BATCHES],
                        batch_size=GLOBAL_BATCH, epochs=1, verbose=0, shuffle=False,
                        validation_data=validation_data, validate_every_n_batches=every,
                        callbacks=[record]).history
    validation[str(every)] = {"batches": record.batches, "history": history, **state(model)}

print("RESULTS" + json.dumps({
    "worker": strategy.cluster_resolver.task_id,
    "skipping": {"skipped": skipping.skipped_steps, "history": skip_history,
                 **state(skipping)},
    "reference": state(reference),
    "per_batch": per_batch,
    "validation": validation,
}))
