"""Every pair of step recipes, composed in one class, against a hand-written
NumPy reference of the meaning docs/recipes/composition.md gives it.

A linear model with SGD (tests/linear_reference.py) makes each recipe's
formula short enough to write out. Each case names the pair in the order
listed; tolerance: `CLOSE` (float32 training against a float64 reference).
"""

import functools
import itertools
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from customfit import CustomModel, recipes, steptools
from tests import linear_reference as ref

ROOT = Path(__file__).resolve().parent.parent
CLIP_NORM, CLIP_FACTOR, RHO, EPSILON, STEPS = 0.3, 0.05, 0.05, 0.1, 2

OPTIONS = {
    recipes.GlobalNormClipping: dict(clip_norm=CLIP_NORM),
    recipes.AdaptiveGradientClipping: dict(clip_factor=CLIP_FACTOR),
    recipes.GradientAccumulation: dict(accumulation_steps=STEPS),
    recipes.SAM: dict(rho=RHO),
    recipes.SkipNonFinite: {},
    recipes.AdversarialTraining: dict(epsilon=EPSILON, attack="fgsm"),
}
TRANSFORMS = {
    recipes.GlobalNormClipping: functools.partial(ref.clip_by_global_norm, clip_norm=CLIP_NORM),
    recipes.AdaptiveGradientClipping: functools.partial(ref.adaptive_clip,
                                                        clip_factor=CLIP_FACTOR),
}
REFUSED = {(recipes.GradientAccumulation, recipes.SkipNonFinite)}


def reference_options(bases) -> dict:
    """The Reference's settings for the recipes in `bases`, in their order."""
    return dict(
        adversarial=EPSILON if recipes.AdversarialTraining in bases else None,
        sam=RHO if recipes.SAM in bases else None,
        skip=recipes.SkipNonFinite in bases,
        accumulate=STEPS if recipes.GradientAccumulation in bases else None,
        transforms=[TRANSFORMS[b] for b in bases if b in TRANSFORMS],
    )


def composed(bases):
    options = {}
    for base in bases:
        options.update(OPTIONS[base])
    return type("".join(b.__name__ for b in bases), tuple(bases), {}), options


def pairs():
    """Each unordered pair once, in a composing order; both orders of the
    clipping pair, whose order matters."""
    found = []
    for a, b in itertools.combinations(OPTIONS, 2):
        found.append((b, a) if (a, b) in REFUSED else (a, b))
    clipping = (recipes.GlobalNormClipping, recipes.AdaptiveGradientClipping)
    found.append(clipping[::-1])
    return found


PAIRS = pairs()


@pytest.mark.parametrize("bases", PAIRS, ids=["+".join(b.__name__ for b in p) for p in PAIRS])
def test_pair_equals_reference(bases):
    cls, options = composed(bases)
    skips = recipes.SkipNonFinite in bases
    x, y = ref.data(batches=6 if skips else 4, bad_batch=2 if skips else None)
    model = ref.fit_recipe(cls, x, y, **options)
    expected = ref.Reference(ref.initial_weights(cls, **options), **reference_options(bases))
    expected.fit(x, y)
    assert int(model.optimizer.iterations) == expected.updates
    for got, want in zip(model.get_weights(), expected.weights):
        np.testing.assert_allclose(got, want, **ref.CLOSE)


@pytest.mark.parametrize("first", ["GlobalNormClipping", "AdaptiveGradientClipping"])
def test_the_clipping_recipes_clip_in_the_order_listed(first):
    """With both clippings active on some units only, the two orders give
    different weights, each its reference's."""
    clip_norm, clip_factor = 0.05, 0.3
    clippings = {
        "GlobalNormClipping": functools.partial(ref.clip_by_global_norm, clip_norm=clip_norm),
        "AdaptiveGradientClipping": functools.partial(ref.adaptive_clip,
                                                      clip_factor=clip_factor),
    }
    order = [first, *(name for name in clippings if name != first)]
    cls = type("Both", tuple(getattr(recipes, name) for name in order), {})
    options = dict(clip_norm=clip_norm, clip_factor=clip_factor)
    x, y = ref.data()
    weights = ref.initial_weights(cls, **options)
    expected, reversed_ = (
        ref.Reference(weights, transforms=[clippings[n] for n in names]).fit(x, y)
        for names in (order, order[::-1])
    )
    assert not np.allclose(expected[0], reversed_[0], rtol=1e-3, atol=0)
    for got, want in zip(ref.fit_recipe(cls, x, y, **options).get_weights(), expected):
        np.testing.assert_allclose(got, want, **ref.CLOSE)


def test_accumulation_before_skipping_is_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match="List SkipNonFinite first"):
        composed((recipes.GradientAccumulation, recipes.SkipNonFinite))


def test_the_docs_table_lists_every_pair():
    page = (ROOT / "docs" / "recipes" / "composition.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \+ `(\w+)` \|", page, re.MULTILINE)
    documented = {frozenset(row) for row in rows}
    expected = {frozenset(b.__name__ for b in p) for p in itertools.combinations(OPTIONS, 2)}
    assert documented == expected


# ----------------------------------------------- a recipe of the user's own


class EveryOtherBatch(CustomModel):
    """A recipe written with public names only: `update_weights` passes every
    second batch on and drops the others."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = None

    def step_variables(self):
        if self.batches is None:
            with steptools.state_scope(self):
                variable = keras.Variable(0, dtype="int", trainable=False, name="batches")
            object.__setattr__(self, "batches", variable)
        return [*super().step_variables(), self.batches]

    def update_weights(self, loss, gradients, variables):
        self.batches.assign_add(1)
        steptools.cond(
            self.batches.value % 2 == 0,
            lambda: super(EveryOtherBatch, self).update_weights(loss, gradients, variables),
            lambda: None,
        )


class EveryOtherReference(ref.Reference):
    """Listed first, the user's recipe decides on each batch, before
    accumulation sees it; listed after `GradientAccumulation`, on each
    accumulated update."""

    def __init__(self, weights, outer, **options):
        super().__init__(weights, **options)
        self.stage = "before_accumulation" if outer else "after_accumulation"
        self.batches = 0

    def passes(self, stage):
        if stage != self.stage:
            return True
        self.batches += 1
        return self.batches % 2 == 0


@pytest.mark.parametrize("outer", [True, False], ids=["listed_first", "listed_after"])
def test_a_recipe_of_public_names_composes_in_the_order_stated(outer):
    bases = (recipes.GradientAccumulation, recipes.GlobalNormClipping)
    order = (EveryOtherBatch, *bases) if outer else (*bases, EveryOtherBatch)
    cls = type("Mine", order, {})
    options = dict(accumulation_steps=STEPS, clip_norm=CLIP_NORM)
    x, y = ref.data(batches=8)
    model = ref.fit_recipe(cls, x, y, **options)
    expected = EveryOtherReference(ref.initial_weights(cls, **options), outer,
                                   **reference_options(bases))
    expected.fit(x, y)
    for got, want in zip(model.get_weights(), expected.weights):
        np.testing.assert_allclose(got, want, **ref.CLOSE)


# ------------------------------------------------------------- bad seams


class ReturnsTwo(CustomModel):
    def compute_gradients(self, x, y, sample_weight):
        result = super().compute_gradients(x, y, sample_weight)
        return result.loss, result.gradients


class DropsAGradient(CustomModel):
    def compute_gradients(self, x, y, sample_weight):
        result = super().compute_gradients(x, y, sample_weight)
        return result._replace(gradients=result.gradients[:1])


class ReturnsGradients(CustomModel):
    def update_weights(self, loss, gradients, variables):
        super().update_weights(loss, gradients, variables)
        return gradients


class ReturnsAName(CustomModel):
    def step_variables(self):
        return ["counter"]


@pytest.mark.parametrize("cls, message", [
    (ReturnsTwo, r"ReturnsTwo.compute_gradients\(\) must return StepGradients.*got tuple"),
    (DropsAGradient, r"DropsAGradient.compute_gradients\(\).*got 1 gradients for 2 variables"),
    (ReturnsGradients, r"ReturnsGradients.update_weights\(\) returned list; it must return None"),
    (ReturnsAName, r"ReturnsAName.step_variables\(\) must return a list of keras.Variable"),
], ids=["compute_gradients_tuple", "compute_gradients_short", "update_weights_value",
        "step_variables_names"])
def test_a_seam_returning_the_wrong_structure_names_the_recipe(cls, message):
    x, y = ref.data(batches=1)
    with pytest.raises(TypeError, match=message):
        ref.fit_recipe(cls, x, y)
