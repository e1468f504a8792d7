"""Fails when a backend library is imported outside its backend's package.

customfit's core, hooks, helpers and recipes are written against the loop
contract (`customfit/_contract.py`) alone:

- `tensorflow`, `jax` and `torch` may be imported only in modules inside a
  package named after that backend: `customfit/_tensorflow/`,
  `customfit/_jax/`, `customfit/_torch/`, and their Keras adapters
  `customfit/_keras/_tensorflow/` and so on;
- `keras.src` (Keras' private modules) only inside `customfit/_keras/`.

Every `import` statement counts, also one inside a function.
Run: `python3 tools/check_imports.py` (exit status 1 and one line per
import otherwise).
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "customfit"
BACKENDS = {"tensorflow": "_tensorflow", "jax": "_jax", "jaxlib": "_jax", "torch": "_torch"}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations(path: pathlib.Path) -> list[str]:
    relative = path.relative_to(PACKAGE.parent)
    folders = set(relative.parts[:-1])
    problems = []
    for line, module in imported_modules(ast.parse(path.read_text(), str(path))):
        top = module.split(".")[0]
        if top in BACKENDS and BACKENDS[top] not in folders:
            problems.append(
                f"{relative}:{line}: imports {module}; only modules in a "
                f"{BACKENDS[top]}/ package may (put it behind the loop contract)"
            )
        if (module == "keras.src" or module.startswith("keras.src.")) and "_keras" not in folders:
            problems.append(
                f"{relative}:{line}: imports {module}; Keras' private modules "
                "are imported in customfit/_keras/ only"
            )
    return problems


def main() -> int:
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in violations(path)]
    for problem in problems:
        print(problem)
    print(f"check_imports: {len(problems)} misplaced imports" if problems else "check_imports: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
