"""Saving and loading a `CustomModel`: random-generator state, checked loads,
atomic file replacement."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import uuid
import zipfile
from typing import Any, Callable, Iterator

import h5py
import keras
import numpy as np

from customfit import _optimizers

RNG_KEY_PREFIX = "customfit_rng_"


def rng_state_variables(model: keras.Model) -> list:
    """The model's state that is not a weight: the `SeedGenerator` states of
    Dropout and other random layers (Keras lists them in `variables`, not in
    `weights`, and does not save them)."""
    weight_ids = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weight_ids]


def save_rng_states(model: keras.Model, store: Any) -> None:
    for i, variable in enumerate(rng_state_variables(model)):
        store[f"{RNG_KEY_PREFIX}{i}"] = variable


def split_rng_states(store: Any) -> tuple[dict, list]:
    """The model's own entries (as Keras expects them) and the saved RNG states."""
    own = {k: store[k] for k in store.keys() if not k.startswith(RNG_KEY_PREFIX)}
    count = sum(1 for k in store.keys() if k.startswith(RNG_KEY_PREFIX))
    return own, [store[f"{RNG_KEY_PREFIX}{i}"] for i in range(count)]


def load_rng_states(model: keras.Model, saved: list) -> None:
    if not saved:  # A file written by keras.Model: nothing to restore.
        return
    variables = rng_state_variables(model)
    if len(saved) != len(variables):
        raise ValueError(
            f"The file holds {len(saved)} random-generator state(s) (Dropout "
            f"and other random layers) but the model has {len(variables)}: "
            "it was saved by a different architecture. Load it into the model "
            "that saved it."
        )
    for variable, value in zip(variables, saved):
        variable.assign(np.asarray(value))


def all_state(model: keras.Model) -> list:
    """Every variable `load_weights` may assign: model, RNG, optimizers."""
    seen: set[int] = set()
    state = []
    optimizers = [getattr(model, "optimizer", None)] + [
        v for v in vars(model).values() if isinstance(v, keras.optimizers.Optimizer)
    ]
    for variable in model.variables + [
        v for o in optimizers if o is not None for v in o.variables
    ]:
        if id(variable) not in seen:
            seen.add(id(variable))
            state.append(variable)
    return state


def checked_load(
    model: keras.Model, filepath: Any, load: Callable[[], Any], skip_mismatch: bool = False
) -> Any:
    """Runs Keras' `load_weights` only on a file written by this architecture,
    with errors that say what is wrong; leaves the model (weights, RNG and
    optimizer state) as it was if it fails.

    Keras' own `load_weights` matches weights by the model's structure and is
    lenient: a file from another architecture can load partly, with only a
    warning about the optimizer. Here the weights in the file must be exactly
    those this model saves (optimizer state may be absent), unless
    `skip_mismatch` asks for Keras' partial loading.
    """
    path = os.fspath(filepath)
    found = _structure_of_file(path)
    if found is not None and model.built and not skip_mismatch:
        _check_same_structure(model, path, found)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built and model.built:
        # Otherwise Keras skips the optimizer's saved state with a warning.
        optimizer.build(model.trainable_variables)
    _optimizers.build_unbuilt(model)  # the others too, as before training
    state = all_state(model)
    before = [v.numpy() for v in state]
    try:
        return load()
    except Exception as error:
        for variable, value in zip(state, before):
            variable.assign(value)
        raise ValueError(
            f"Could not load {path} into this model: {_shortened(error)}\n"
            "The model was left unchanged."
        ) from error


def _check_same_structure(model: keras.Model, path: str, found: dict) -> None:
    with tempfile.TemporaryDirectory() as directory:
        own = os.path.join(directory, "own.weights.h5")
        model.save_weights(own)
        expected = _structure_of_file(own)
    optimizers = {"optimizer"} | {
        name for name, v in vars(model).items()
        if isinstance(v, keras.optimizers.Optimizer)
    }

    def compared(entry: str) -> bool:
        return (entry.split("/", 1)[0] not in optimizers
                and not entry.startswith(f"vars/{RNG_KEY_PREFIX}"))

    differences = [
        f"{entry}: file {found.get(entry, 'missing')}, model "
        f"{expected.get(entry, 'missing')}"
        for entry in sorted(set(expected) | set(found))
        if compared(entry) and expected.get(entry) != found.get(entry)
    ]
    if differences:
        listed = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
        raise ValueError(
            f"The checkpoint {path} does not fit this model: it was written by "
            "a different architecture (other layers, units or order). Load it "
            "into the model that saved it, or build this model the same way. "
            f"Nothing was loaded. Weights that differ (shape): {listed}"
        )


def _structure_of_file(path: str) -> dict | None:
    """Every array in a `.weights.h5` or `.keras` file: entry -> shape. None
    for formats not checked here (sharded weights)."""
    _check_readable(path)
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            with archive.open("model.weights.h5") as f:
                return _datasets(io.BytesIO(f.read()))
    if path.endswith(".h5"):
        return _datasets(path)
    return None


def _datasets(source: Any) -> dict:
    entries = {}
    with h5py.File(source, "r") as f:
        f.visititems(lambda name, obj: entries.__setitem__(name, tuple(obj.shape))
                     if isinstance(obj, h5py.Dataset) else None)
    return entries


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No checkpoint at {path}. Check the path; ModelCheckpoint and "
            "BackupAndRestore write their files only after an epoch ends."
        )
    corrupt = (
        f"{path} is not a readable Keras checkpoint (truncated or corrupt). "
        "Nothing was loaded; load an intact file, e.g. one written by "
        "customfit.callbacks.ModelCheckpoint, which replaces files atomically."
    )
    if path.endswith(".keras"):
        if not zipfile.is_zipfile(path):
            raise ValueError(corrupt)
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None or "model.weights.h5" not in archive.namelist():
                    raise ValueError(corrupt)
        except zipfile.BadZipFile as error:
            raise ValueError(corrupt) from error
    elif path.endswith(".h5"):
        try:
            with h5py.File(path, "r"):
                pass
        except OSError as error:
            raise ValueError(corrupt) from error


def _shortened(message: Any, limit: int = 500) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit] + " ..."


@contextlib.contextmanager
def atomic_destination(path: str) -> Iterator[str]:
    """A temporary path next to `path` (same suffix) to write to; it replaces
    `path` in one `os.replace` only if the block finishes. A crash or an error
    while writing leaves any existing file at `path` as it was."""
    directory, name = os.path.split(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{uuid.uuid4().hex[:12]}-{name}")
    try:
        yield temporary
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomically(path: str, text: str) -> None:
    with atomic_destination(path) as temporary:
        with open(temporary, "w") as f:
            f.write(text)
