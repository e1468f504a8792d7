"""Rewrites Keras' own test files so that their models are built on a base
chosen at run time (`conformance_base.Model`, `.Sequential`, `.Trainer`).

The rules are textual and few; `rewrite` reports every rule that matched and
`leftovers` finds references to a model base that no rule covered, so a new
Keras test file that builds models another way fails the run instead of
silently testing stock Keras.

For a backend other than TensorFlow, run without TensorFlow installed,
`lazy_tensorflow_imports` also turns a test file's module-level TensorFlow
imports into names that import TensorFlow when first used (the harness then
skips the test that uses them, saying so), so that a file's tests that need
no TensorFlow still run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BASE_MODULE = "conformance_base"


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern
    replacement: str


def _rule(name: str, pattern: str, replacement: str) -> Rule:
    return Rule(name, re.compile(pattern, re.MULTILINE), replacement)


RULES = (
    _rule("import Model",
          r"^from keras\.src\.models(?:\.model)? import Model$",
          f"from {BASE_MODULE} import Model"),
    _rule("import Sequential",
          r"^from keras\.src\.models(?:\.sequential)? import Sequential$",
          f"from {BASE_MODULE} import Sequential"),
    _rule("attribute Model",
          r"(?<![\w.])(?:keras\.models|keras|models)\.Model\b",
          f"{BASE_MODULE}.Model"),
    _rule("attribute Sequential",
          r"(?<![\w.])(?:keras\.models|keras|models)\.Sequential\b",
          f"{BASE_MODULE}.Sequential"),
    # `class X(Trainer, layers.Dense)`: a layer mixed with a bare trainer.
    # The model base goes after a concrete layer, so that the layer's `call`
    # comes before `keras.Model.call` (which raises) in the method order;
    # before `layers.Layer`, which it derives from.
    _rule("Trainer mixin with Layer",
          r"\(\s*Trainer,\s*layers\.Layer\s*\)",
          f"({BASE_MODULE}.Trainer, layers.Layer)"),
    _rule("Trainer mixin with a concrete layer",
          r"\(\s*Trainer,\s*(layers\.\w+)\s*\)",
          rf"(\1, {BASE_MODULE}.Trainer)"),
    _rule("Trainer.__init__",
          r"\bTrainer\.__init__\(self\)",
          f"{BASE_MODULE}.Trainer.__init__(self)"),
)

# What would build a model on stock Keras if left alone.
_LEFTOVERS = re.compile(
    r"\b(?:keras\.models|keras|models)\.(?:Model|Sequential)\b"
    r"|^from keras\.src\.models(?:\.\w+)? import (?:Model|Sequential)$"
    r"|\(\s*Trainer\s*,",
    re.MULTILINE,
)


def rewrite(source: str) -> tuple[str, dict[str, int]]:
    """The rewritten source and how often each rule matched."""
    counts = {}
    for rule in RULES:
        source, n = rule.pattern.subn(rule.replacement, source)
        if n:
            counts[rule.name] = n
    if counts:
        source = _with_import(source)
    return source, counts


def leftovers(source: str) -> list[str]:
    """Lines that still reference a stock model base."""
    lines = source.splitlines()
    return sorted({lines[source.count("\n", 0, m.start())].strip()
                   for m in _LEFTOVERS.finditer(source)})


def _with_import(source: str) -> str:
    """`import conformance_base` after any `from __future__` line."""
    line = f"import {BASE_MODULE}\n"
    future = list(re.finditer(r"^from __future__ import .*\n", source, re.MULTILINE))
    if future:
        end = future[-1].end()
        return source[:end] + line + source[end:]
    return line + source


# Keras' skips of its `steps_per_execution` tests on PyTorch, as a decorator
# (`skipif(backend.backend() == "torch", reason=...)`) or in the test
# (`if ... backend.backend() == "torch": self.skipTest(...)`).
_TORCH_STEPS_PER_EXECUTION_SKIP = re.compile(
    r'backend\.backend\(\) == "torch"(?P<rest>[,:]\s*(?:reason=|self\.skipTest\())'
    r'(?P<reason>"`steps_per_execution` not implemented for torch yet")'
)


def unskip_torch_steps_per_execution(source: str) -> tuple[str, int]:
    """`source` with Keras' skips of its `steps_per_execution` tests on
    PyTorch turned off (their condition `False`), and how many: stock
    Keras refuses more than one batch per execution there, `CustomModel`
    runs them. (For the `CustomModel` run only; the control keeps them.)"""
    return _TORCH_STEPS_PER_EXECUTION_SKIP.subn(r"False\g<rest>\g<reason>", source)


# `import tensorflow[.x] [as name]` or `from tensorflow[.x] import a [as b], ...`
# at the start of a line (a module-level import; indented ones, inside a test,
# already import when the test runs).
_TENSORFLOW_IMPORT = re.compile(
    r"^(?:import (?P<module>tensorflow(?:\.\w+)*)(?: as (?P<alias>\w+))?"
    r"|from (?P<package>tensorflow(?:\.\w+)*) import (?P<names>[\w ,]+))[ \t]*$",
    re.MULTILINE,
)


def lazy_tensorflow_imports(source: str) -> tuple[str, int]:
    """`source` with each module-level TensorFlow import replaced by
    `conformance_base.tensorflow(...)` assignments, and how many it replaced;
    a module-level TensorFlow import of another form is left for
    `tensorflow_leftovers` to report."""

    def replace(match: re.Match) -> str:
        if match.group("module"):
            module = match.group("module")
            name = match.group("alias") or module.split(".")[0]
            if not match.group("alias") and module != "tensorflow":
                # `import tensorflow.x` binds `tensorflow`.
                return f'tensorflow = {BASE_MODULE}.tensorflow("tensorflow")'
            return f'{name} = {BASE_MODULE}.tensorflow("{module}")'
        lines = []
        for part in match.group("names").split(","):
            attribute, _, alias = (w.strip() for w in part.partition(" as "))
            lines.append(f'{alias or attribute} = {BASE_MODULE}.tensorflow('
                         f'"{match.group("package")}", "{attribute}")')
        return "\n".join(lines)

    source, n = _TENSORFLOW_IMPORT.subn(replace, source)
    if n and not re.search(rf"^import {BASE_MODULE}$", source, re.MULTILINE):
        source = _with_import(source)
    return source, n


def tensorflow_leftovers(source: str) -> list[str]:
    """Module-level TensorFlow imports that `lazy_tensorflow_imports` left."""
    return sorted({m.group(0).strip() for m in re.finditer(
        r"^(?:import tensorflow\b|from tensorflow\b).*$", source, re.MULTILINE)})
