"""`customfit.recipes.Distiller`: Hinton-style distillation, checked by hand and
against stock training and `keras.distillation`. Runs on TensorFlow (the
suite) and on JAX (`nox -s jax`)."""

import keras
import numpy as np
import pytest
from keras.ops import convert_to_numpy

from customfit.recipes import Distiller


def logits_mlp(units, seed, dropout=0.0, batchnorm=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((64,)), keras.layers.Dense(units, activation="relu")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    return keras.Sequential(layers + [keras.layers.Dense(10)])


def cross_entropy():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def teacher(digits):
    """A trained teacher that was compiled and fit on its own first."""
    x, y = digits
    keras.utils.set_random_seed(0)
    model = logits_mlp(64, seed=0, dropout=0.2, batchnorm=True)
    model.compile(keras.optimizers.Adam(1e-2), cross_entropy(), metrics=["accuracy"])
    model.fit(x[:512], y[:512], batch_size=64, epochs=2, verbose=0)
    return model


def compiled(distiller, **kwargs):
    distiller.compile(keras.optimizers.Adam(1e-2), cross_entropy(),
                      metrics=["accuracy"], **kwargs)
    return distiller


def scalar(tensor):
    """A loss as a Python float (on PyTorch, detached from the graph first)."""
    return float(convert_to_numpy(tensor))


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_loss_equals_a_hand_computation(digits, teacher):
    x, y = digits[0][:32], digits[1][:32]
    temperature, alpha = 3.0, 0.3
    distiller = compiled(Distiller(logits_mlp(16, seed=1), teacher, temperature, alpha))
    s = convert_to_numpy(distiller.student(x)).astype("float64")
    t = convert_to_numpy(teacher(x, training=False)).astype("float64")

    hard = -log_softmax(s)[np.arange(32), y].mean()
    log_p, log_q = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    expected = alpha * hard + (1 - alpha) * temperature**2 * kl

    loss = distiller.compute_loss(x, y, distiller(x))
    assert scalar(loss) == pytest.approx(expected, rel=1e-5)  # float32 vs float64
    logs = distiller.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    assert logs["student_loss"] == pytest.approx(hard, rel=1e-5)
    assert logs["distillation_loss"] == pytest.approx(temperature**2 * kl, rel=1e-5)
    accuracy = (s.argmax(-1) == y).mean()
    assert logs["accuracy"] == pytest.approx(accuracy)  # the student's metric

    weights = np.linspace(0.5, 1.5, 32)
    weighted = alpha * (weights * -log_softmax(s)[np.arange(32), y]).mean() + (
        1 - alpha) * temperature**2 * (weights * (np.exp(log_p) * (log_p - log_q)).sum(-1)).mean()
    loss = distiller.compute_loss(x, y, distiller(x), sample_weight=weights.astype("float32"))
    assert scalar(loss) == pytest.approx(weighted, rel=1e-5)


def test_teacher_is_never_updated(digits, teacher):
    x, y = digits[0][:256], digits[1][:256]
    before = [w.copy() for w in teacher.get_weights()]  # incl. BatchNorm statistics
    distiller = compiled(Distiller(logits_mlp(16, seed=1), teacher, 4.0, 0.1))
    distiller.fit(x, y, batch_size=64, epochs=1, verbose=0)
    for b, a in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(b, a)
    assert not teacher.trainable
    assert [v.path for v in distiller.trainable_weights] == [
        v.path for v in distiller.student.trainable_weights]


def test_alpha_one_trains_exactly_like_the_student_alone(digits, teacher):
    """alpha=1 vs the same student compiled and fit on its own, stock Keras."""
    x, y = digits[0][:300], digits[1][:300]
    fit = dict(batch_size=64, epochs=2, verbose=0, validation_data=(x[:100], y[:100]))

    def student():
        return logits_mlp(16, seed=5, dropout=0.2)

    alone = student()
    alone.compile(keras.optimizers.Adam(1e-2), cross_entropy(), metrics=["accuracy"])
    keras.utils.set_random_seed(9)
    expected = alone.fit(x, y, **fit).history

    distiller = compiled(Distiller(student(), teacher, temperature=4.0, alpha=1.0))
    keras.utils.set_random_seed(9)
    history = distiller.fit(x, y, **fit).history
    for key in expected:
        assert history[key] == expected[key], key
    for a, b in zip(alone.get_weights(), distiller.student.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert distiller.evaluate(x, y, verbose=0)[:2] == alone.evaluate(x, y, verbose=0)


def test_keras_file_round_trip(digits, teacher, tmp_path):
    x, y = digits[0][:256], digits[1][:256]
    distiller = compiled(Distiller(logits_mlp(16, seed=1), teacher, 2.5, 0.25))
    distiller.fit(x, y, batch_size=64, epochs=1, verbose=0)
    distiller.save(tmp_path / "distiller.keras")
    loaded = keras.models.load_model(tmp_path / "distiller.keras")  # safe_mode on

    assert type(loaded) is Distiller
    assert (loaded.temperature, loaded.alpha) == (2.5, 0.25)
    assert not loaded.teacher.trainable
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), distiller.predict(x, verbose=0))
    assert loaded.evaluate(x, y, verbose=0) == distiller.evaluate(x, y, verbose=0)
    for a, b in zip(distiller.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(convert_to_numpy(a), convert_to_numpy(b), err_msg=a.path)
    assert int(loaded.optimizer.iterations) == 4


def keras_distiller(student, teacher, temperature, alpha, kl=None):
    from keras.distillation import Distiller as KerasDistiller, LogitsDistillation

    loss = LogitsDistillation(temperature, kl) if kl else LogitsDistillation(temperature)
    model = KerasDistiller(teacher, student, loss, student_loss_weight=alpha)
    model.compile(keras.optimizers.Adam(1e-2), cross_entropy(), metrics=["accuracy"])
    return model


def test_same_as_keras_distillation_with_a_kl_divergence_instance(digits, teacher):
    x, y = digits[0][:256], digits[1][:256]
    ours = compiled(Distiller(logits_mlp(16, seed=1), teacher, 3.0, 0.2))
    theirs = keras_distiller(logits_mlp(16, seed=1), teacher, 3.0, 0.2,
                             kl=keras.losses.KLDivergence())
    # Keras clips probabilities to [1e-7, 1] and divides them; we subtract
    # log-softmaxes: float32 rounding apart, the same loss.
    assert scalar(theirs.compute_loss(x, y, theirs(x))) == pytest.approx(
        scalar(ours.compute_loss(x, y, ours(x))), rel=1e-5)
    ours_history = ours.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False).history
    theirs_history = theirs.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False).history
    np.testing.assert_allclose(ours_history["loss"], theirs_history["loss"], rtol=1e-5)
    for a, b in zip(ours.student.get_weights(), theirs.student.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_keras_default_logits_distillation_is_a_different_loss(digits, teacher):
    """Pins a difference the README states: Keras 3.15's default
    `LogitsDistillation(loss="kl_divergence")` resolves to a plain function,
    which skips the softmax and the T**2 factor of its `KLDivergence` branch."""
    x, y = digits[0][:64], digits[1][:64]
    theirs = keras_distiller(logits_mlp(16, seed=1), teacher, 3.0, 0.0)
    s, t = theirs.student(x) / 3.0, teacher(x, training=False) / 3.0
    raw = keras.ops.mean(keras.losses.kl_divergence(t, s))
    assert scalar(theirs.compute_loss(x, y, theirs(x))) == pytest.approx(scalar(raw), rel=1e-6)
    ours = compiled(Distiller(theirs.student, teacher, 3.0, 0.0))
    assert scalar(ours.compute_loss(x, y, ours(x))) != pytest.approx(scalar(raw), rel=0.1)


def test_mixed_precision_trains(digits, mixed_float16):
    x, y = digits[0][:256], digits[1][:256]
    teacher = logits_mlp(32, seed=0)
    distiller = compiled(Distiller(logits_mlp(16, seed=1), teacher, 4.0, 0.5))
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    before = [w.copy() for w in distiller.student.get_weights()]
    history = distiller.fit(x, y, batch_size=64, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert all(np.isfinite(w).all() for w in distiller.get_weights())
    assert all(not np.array_equal(b, a) for b, a in zip(before, distiller.student.get_weights()))


def test_bad_arguments_say_what_to_do(digits, teacher):
    student = logits_mlp(16, seed=1)
    with pytest.raises(ValueError, match="alpha"):
        Distiller(student, teacher, temperature=2.0, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        Distiller(student, teacher, temperature=0.0)
    distiller = Distiller(student, teacher)
    distiller.compile("adam")
    with pytest.raises(ValueError, match="from_logits=True"):
        distiller.fit(digits[0][:64], digits[1][:64], verbose=0)



def test_composes_with_a_gradient_recipe(digits, teacher):
    from customfit.recipes import GlobalNormClipping

    class ClippedDistiller(GlobalNormClipping, Distiller):
        pass

    distiller = ClippedDistiller(logits_mlp(16, seed=1), teacher, 4.0, 0.1, clip_norm=1e-3)
    distiller.compile(keras.optimizers.SGD(1.0), cross_entropy())
    before = [w.copy() for w in distiller.student.get_weights()]
    distiller.fit(digits[0][:64], digits[1][:64], batch_size=64, verbose=0)
    step = np.sqrt(sum(((w - b) ** 2).sum()
                       for w, b in zip(distiller.student.get_weights(), before)))
    assert 0 < step <= 1e-3 * (1 + 1e-5)
