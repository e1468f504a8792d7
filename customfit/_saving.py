"""Saving and loading a `CustomModel`: random-generator state, checked loads,
atomic file replacement, and a warning for a class a file cannot name."""

from __future__ import annotations

import collections
import contextlib
import io
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, cast

import h5py
import keras
import numpy as np

from customfit import _optimizers
from customfit._errors import SavingWarning, UnreadableCheckpointError
from customfit._keras import internals

RNG_KEY_PREFIX = "customfit_rng_"


def rng_state_variables(model: keras.Model) -> list:
    """The model's state that is not a weight: the `SeedGenerator` states of
    Dropout and other random layers (Keras lists them in `variables`, not in
    `weights`, and does not save them)."""
    weight_ids = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weight_ids]


def array(variable: Any) -> np.ndarray:
    """A variable's value for a weights store. Read with `.numpy()`: NumPy 2
    warns (DeprecationWarning) when it converts Keras 3's TensorFlow
    variables itself, as their `__array__` takes no `copy=`."""
    return np.asarray(variable.numpy())


def save_rng_states(model: keras.Model, store: Any) -> None:
    for i, variable in enumerate(rng_state_variables(model)):
        store[f"{RNG_KEY_PREFIX}{i}"] = array(variable)


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
    optimizers = _optimizers.registered(model).values()
    for variable in model.variables + [v for o in optimizers for v in o.variables]:
        if id(variable) not in seen:
            seen.add(id(variable))
            state.append(variable)
    return state


def checked_load(
    model: keras.Model, filepath: Any, load: Callable[[], Any], skip_mismatch: bool = False
) -> Any:
    """Runs Keras' `load_weights`, leaving the model (weights, RNG and
    optimizer state) as it was if it fails or if the file holds weights this
    model did not take, with errors that say what is wrong.

    Keras matches the file to the model by the model's structure and raises
    when a layer of the model is missing from the file or has other shapes,
    after assigning the layers it had reached. A file with more layers than
    the model loads without a word. Here the model is put back in the first
    case, with Keras' message (code may match on it) followed by what differs;
    the second is refused too, unless `skip_mismatch` asks for Keras' partial
    loading. Any file Keras loads completely is accepted, whatever the
    attribute names its layers were reached by, and whatever optimizers of
    sub-models (a teacher compiled before it was distilled) it holds.
    """
    path = os.fspath(filepath)
    found = _structure_of_file(path)
    unread: list[str] = []
    missing: list[str] = []
    if found is not None and not skip_mismatch and model.built:
        unread, missing = _mismatched_entries(model, found, _own_structure(model))
    # An unbuilt optimizer would skip the saved state of a built one, with a
    # warning: build it first, over the variables `fit` builds it over.
    if found is None:  # sharded weights: as before training
        _optimizers.build_unbuilt(model)
    elif model.trainable_variables:
        _optimizers.build_over_all(
            model,
            [
                optimizer
                for name, optimizer in _optimizers.registered(model).items()
                if not optimizer.built and _optimizers.saved_as_built(found, name, optimizer)
            ],
        )
    state = all_state(model)
    before = [v.numpy() for v in state]

    def put_back() -> None:
        for variable, value in zip(state, before):
            variable.assign(value)

    try:
        result = load()
    except Exception as error:
        put_back()
        mismatch = _another_architecture(path, unread, missing)
        raise ValueError(
            f"Could not load {path} into this model: {_shortened(error)}\n"
            + (f"{mismatch}\n" if mismatch else "")
            + "The model was left unchanged."
        ) from error
    if unread:  # Keras took what fits and ignored the rest
        put_back()
        raise ValueError(f"{_another_architecture(path, unread, [])} The model was left unchanged.")
    return result


def _another_architecture(path: str, unread: list[str], missing: list[str]) -> str:
    """What differs between a file and the model, or "" if nothing does."""
    if not unread and not missing:
        return ""
    details = []
    for title, entries in (
        ("Weights not taken (shape)", unread),
        ("Weights of this model not in the file (shape)", missing),
    ):
        if entries:
            details.append(
                f"{title}: " + "; ".join(entries[:5]) + ("; ..." if len(entries) > 5 else "")
            )
    return (
        f"The checkpoint {path} does not fit this model: it was written by a "
        "different architecture (other layers, or other units). Load it into "
        "the model that saved it, build this model the same way, or pass "
        "skip_mismatch=True to load what fits. " + " ".join(details)
    )


def _own_structure(model: keras.Model) -> dict:
    """What `model.save_weights` writes now: entry -> shape. This save is
    customfit's, not the user's: NumPy 2's warnings about Keras' variables
    (see `array`) are not passed on."""
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="__array__ implementation", category=DeprecationWarning
        )
        own = os.path.join(directory, "own.weights.h5")
        model.save_weights(own)
        # A `.weights.h5` file, which `_structure_of_file` always reads.
        return cast(dict, _structure_of_file(own))


def _mismatched_entries(
    model: keras.Model, found: dict, expected: dict
) -> tuple[list[str], list[str]]:
    """The weights in the file (`found`) with no counterpart among the
    model's own (`expected`), and the model's own with none in the file,
    matched by shape, not by name: a layer reached through another attribute
    name is saved under another path, and Keras still loads it. Optimizer
    state is left out (see `_is_optimizer_state`); Keras restores it when the
    counts agree and warns otherwise."""
    optimizer_names = _optimizer_attribute_names(model)
    left = {
        entry: shape
        for entry, shape in expected.items()
        if not _is_optimizer_state(entry, optimizer_names)
    }
    elsewhere = []  # under a path this model does not save to
    for entry, shape in sorted(found.items()):
        if _is_optimizer_state(entry, optimizer_names):
            continue
        if left.get(entry) == shape:
            del left[entry]
        else:
            elsewhere.append((entry, shape))
    available = collections.Counter(left.values())
    unread = []
    for entry, shape in elsewhere:
        if available[shape]:
            available[shape] -= 1
        else:
            unread.append(f"{entry} {shape}")
    missing = []
    for entry, shape in sorted(left.items()):
        if _may_be_absent(entry):
            continue
        if available[shape]:
            available[shape] -= 1
            missing.append(f"{entry} {shape}")
    return unread, missing


def _may_be_absent(entry: str) -> bool:
    """Whether a model's own entry may be missing from a file Keras loads
    completely: customfit's random-generator state and a model's own
    variables (e.g. a recipe's counters), which stock Keras files lack and
    which keep their values when absent."""
    return entry.startswith("vars/") or entry.split("/")[-1].startswith(RNG_KEY_PREFIX)


def _optimizer_attribute_names(model: keras.Model) -> set[str]:
    """The names the optimizers of the model and of its layers are saved
    under (`_optimizers.registered`, applied to each)."""
    names = {"optimizer"}
    for layer in internals.all_layers(model):
        names.update(_optimizers.registered(layer))
    return names


def _is_optimizer_state(entry: str, optimizer_names: set[str]) -> bool:
    """Whether a file entry belongs to an optimizer: a group named like one
    of this model's optimizer attributes, or named `*optimizer` (state of an
    optimizer the file's model had and this one lacks, e.g. a teacher that
    was compiled before it was distilled)."""
    groups = entry.split("/")[:-1]
    return any(g in optimizer_names or g.endswith("optimizer") for g in groups)


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
    entries: dict[str, tuple[int, ...]] = {}
    with h5py.File(source, "r") as f:
        f.visititems(
            lambda name, obj: (
                entries.__setitem__(name, tuple(obj.shape))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
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
            raise UnreadableCheckpointError(corrupt)
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None or "model.weights.h5" not in archive.namelist():
                    raise UnreadableCheckpointError(corrupt)
        except zipfile.BadZipFile as error:
            raise UnreadableCheckpointError(corrupt) from error
    elif path.endswith(".h5"):
        try:
            with h5py.File(path, "r"):
                pass
        except OSError as error:
            raise UnreadableCheckpointError(corrupt) from error


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


_WARNED_UNREGISTERED: weakref.WeakSet[type] = weakref.WeakSet()


def warn_if_unregistered(cls: type) -> None:
    """Warns once per class when Keras cannot find `cls` again by the name a
    saved file records for it, so that `keras.models.load_model` would fail.

    Keras writes `keras.saving.get_registered_name(cls)` (the bare class
    name unless the class is registered) and, loading, looks that name up
    among the registered classes and the `custom_objects` in scope."""
    if cls in _WARNED_UNREGISTERED:
        return
    name = keras.saving.get_registered_name(cls)
    if keras.saving.get_registered_object(name) is cls:
        return
    _WARNED_UNREGISTERED.add(cls)
    warnings.warn(
        f"{cls.__qualname__} is saved under the name '{name}', which Keras "
        "cannot find when loading: keras.models.load_model will fail with "
        f'"Could not locate class {name!r}". Decorate the class with '
        "@keras.saving.register_keras_serializable() (and import or define it "
        f"before loading), or load with custom_objects={{{name!r}: {cls.__name__}}}. "
        "The file itself is complete.",
        SavingWarning,
        stacklevel=2,
    )


@contextlib.contextmanager
def written_by_chief(path: str, chief: bool, process: str) -> Iterator[str]:
    """Where a process of a multi-process run writes what belongs at
    `path`: `path` itself on the chief, a file of the same name in a private
    temporary directory on the others (deleted when the block ends), so that
    every process runs the same saving code and the shared path holds one
    writer's file. `process` names the process in the directory's name."""
    if chief:
        yield path
        return
    directory = tempfile.mkdtemp(prefix=f"customfit-{process}-")
    try:
        yield os.path.join(directory, os.path.basename(path))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
