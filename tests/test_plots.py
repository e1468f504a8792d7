"""TrainingPlot: per-batch loss of each epoch and History curves, to PNG/PDF."""

import builtins

import keras
import numpy as np
import pytest
import tensorflow as tf

import customfit
from customfit.callbacks import TrainingPlot
from tests import models


class Logged(customfit.CustomModel):
    def transform_gradients(self, gradients, variables):
        self.log("grad_norm", tf.linalg.global_norm(gradients))
        return gradients


def test_plot_files_hold_each_epochs_batches_and_the_history(digits, tmp_path):
    x, y = digits
    model = models.mlp(Logged)
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    plot = TrainingPlot(tmp_path / "plots" / "run", draw_every=3)
    history = model.fit(x[:256], y[:256], batch_size=64, epochs=3, verbose=0,
                        validation_data=(x[-64:], y[-64:]), callbacks=[plot]).history

    assert plot.files == [str(tmp_path / "plots" / "run.png"),
                          str(tmp_path / "plots" / "run.pdf")]
    assert (tmp_path / "plots" / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plots" / "run.pdf").read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["run.pdf", "run.png"]

    assert plot.drawn_epochs == [3]
    assert sorted(plot.batch_values) == [0, 1, 2]
    for epoch, values in plot.batch_values.items():
        assert len(values) == 4
        # Keras reports the epoch's running mean: the last one is the epoch's loss.
        assert values[-1] == history["loss"][epoch]
    for name in ("loss", "accuracy", "grad_norm", "val_loss", "val_accuracy"):
        assert plot.history[name] == [(e + 1, v) for e, v in enumerate(history[name])]

    image = __import__("matplotlib.image", fromlist=["imread"]).imread(plot.files[0])
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 50  # not blank


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r'pip install "customfit\[plot\]"'):
        TrainingPlot(tmp_path / "run")
    assert not list(tmp_path.iterdir())


def test_draws_every_n_epochs_and_at_the_end_without_changing_the_backend(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    plot = TrainingPlot(tmp_path / "run", formats=("png",), draw_every=2)
    plot.on_train_begin()
    for epoch in range(3):
        plot.on_epoch_begin(epoch)
        plot.on_train_batch_end(0, {"loss": 2.0 - epoch})
        plot.on_epoch_end(epoch, {"loss": 2.0 - epoch})
    assert plot.drawn_epochs == [2]
    plot.on_train_end()
    assert plot.drawn_epochs == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]
    assert matplotlib.get_backend() == backend


def test_epoch_and_batch_axes_have_whole_number_ticks(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    plot = TrainingPlot(tmp_path / "run", formats=("png",), draw_every=3)
    plot.on_train_begin()
    for epoch in range(3):
        plot.on_epoch_begin(epoch)
        for batch in range(3):
            plot.on_train_batch_end(batch, {"loss": 2.0 - epoch - batch / 10})
        plot.on_epoch_end(epoch, {"loss": 2.0 - epoch, "val_loss": 2.5 - epoch})
    assert plot.drawn_epochs == [3]

    batches, history = [ax for ax in figures[-1].axes if ax.get_visible()]
    assert (batches.get_xlabel(), history.get_xlabel()) == ("batch", "epoch")
    for ax in (batches, history):
        low, high = sorted(ax.get_xlim())
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        labels = [label.get_text().replace("\N{MINUS SIGN}", "-")
                  for label in ax.get_xticklabels() if low <= label.get_position()[0] <= high]
        assert labels and all(text.lstrip("-").isdigit() for text in labels), labels
