"""One subprocess with two logical CPUs for every recipe's two-replica test:
each recipe trains on two replicas and on one device; the tests compare."""

import functools
import json

from tests.subproc import run_python_once

CODE = """
import json
import keras, numpy as np
from sklearn.datasets import load_digits
import customfit
from customfit import recipes
from tests import models

d = load_digits()
x, y = (d.data / 16).astype("float32")[:128], d.target.astype("int32")[:128]
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
one = tf.distribute.get_strategy()


class SAMAccumulated(recipes.SAM, recipes.GradientAccumulation):
    pass


class AccumulatedClipped(recipes.GradientAccumulation, recipes.GlobalNormClipping):
    pass  # clips and logs inside the update that runs once across replicas


def run(strategy, base, batch_size, **options):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = models.mlp(lambda i, o: base(i, o, **options), dropout=0)
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0,
                        shuffle=False).history
    state = getattr(model, "slow_weights", None) or getattr(model, "average_weights", [])
    return {"history": history, "weights": [w.tolist() for w in model.get_weights()],
            "iterations": int(model.optimizer.iterations.numpy()),
            "state": [v.numpy().tolist() for v in state]}


clip = dict(clip_norm=0.2)
agc = dict(clip_factor=0.02)
adv = dict(epsilon=0.1, attack="pgd", pgd_steps=3, input_range=(0.0, 1.0),
           train_on="both")
results = {
    "sam_two": run(two, recipes.SAM, 64, rho=0.1),
    "sam_one_accumulated": run(one, SAMAccumulated, 32, rho=0.1, accumulation_steps=2),
    "sam_one": run(one, recipes.SAM, 64, rho=0.1),
    "accumulation_two": run(two, AccumulatedClipped, 64, accumulation_steps=2, **clip),
    "accumulation_one": run(one, AccumulatedClipped, 64, accumulation_steps=2, **clip),
    "clipping_two": run(two, recipes.GlobalNormClipping, 64, **clip),
    "clipping_one": run(one, recipes.GlobalNormClipping, 64, **clip),
    "agc_two": run(two, recipes.AdaptiveGradientClipping, 64, **agc),
    "agc_one": run(one, recipes.AdaptiveGradientClipping, 64, **agc),
    "adversarial_two": run(two, recipes.AdversarialTraining, 64, **adv),
    "adversarial_one": run(one, recipes.AdversarialTraining, 64, **adv),
    "lookahead_two": run(two, recipes.Lookahead, 64, sync_period=3),
    "lookahead_one": run(one, recipes.Lookahead, 64, sync_period=3),
    "ema_two": run(two, recipes.WeightEMA, 64, momentum=0.9),
    "ema_one": run(one, recipes.WeightEMA, 64, momentum=0.9),
}
print("RESULTS" + json.dumps(results))
"""


@functools.lru_cache(maxsize=None)
def results() -> dict:
    """Runs the subprocess once per test run."""
    out = run_python_once(CODE, timeout=600, two_cpus=True)
    return json.loads(out.split("RESULTS", 1)[1])
