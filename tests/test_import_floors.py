"""The package's floors, checked statically (issue 32 item 3): ``core`` (math) imports no other
floor, ``layers`` only ``core``, ``surgery`` (plain-PyTorch model surgery) ``core`` and ``layers``,
``engine`` (when to factorize, plain PyTorch) the floors below it and torchmetrics (its output-shift
metric) but no Lightning, and only ``integration`` imports Lightning. Read from the source with ``ast``
(every import, also those inside functions), so a lazy import cannot hide a wrong direction."""

from __future__ import annotations

import ast
from pathlib import Path

import factorize_plugin

PACKAGE = Path(factorize_plugin.__file__).resolve().parent
FLOORS = {"core": 1, "layers": 2, "surgery": 3, "engine": 4, "integration": 5}
LIGHTNING = ("lightning", "pytorch_lightning", "jsonargparse")
METRICS = ("torchmetrics",)  # from the engine up


def _imports(path: Path) -> list[str]:
    """Absolute dotted names of everything ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out += [f"{base}.{alias.name}" if not node.module else base for alias in node.names]
    return out


def _floor(dotted: str) -> int | None:
    parts = dotted.split(".")
    return FLOORS.get(parts[1]) if parts[0] == "factorize_plugin" and len(parts) > 1 else None


def test_imports_point_down_the_floors_only():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        floor = _floor(".".join(path.relative_to(PACKAGE.parent).parts))
        if floor is None:
            continue  # the package's __init__ / __main__: the front door, above every floor
        for name in _imports(path):
            target = _floor(name)
            if target is not None and target > floor:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
            if floor < FLOORS["integration"] and name.split(".")[0] in LIGHTNING:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name} (Lightning lives in integration/ only)")
            if floor < FLOORS["engine"] and name.split(".")[0] in METRICS:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name} (metrics live in engine/ and above)")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_relative_imports():
    names = _imports(PACKAGE / "surgery" / "swap" / "refactorize.py")
    assert "factorize_plugin.core.solver" in names and "factorize_plugin.layers.sharded" in names
