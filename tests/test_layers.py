"""The package's layers: each imports only from the layers below it (imports inside functions
included). core <- storage <- tasks <- flows <- apps (cli, explorer, groundtruth); core imports
neither prefect nor zarr; the explorer reads the store through storage and core only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it installs as (pyproject's package-dir)
FOLDERS = {"neuron_embeddings": "neuron_embeddings", "storage": "neuron_embeddings.storage",
           "tasks": "neuron_embeddings.tasks", "flows": "neuron_embeddings.flows"}
LAYERS = {  # module prefix -> rank; a module may import ranks <= its own
    "neuron_embeddings.core": 0, "neuron_embeddings.storage": 1, "neuron_embeddings.tasks": 2,
    "neuron_embeddings.flows": 3, "neuron_embeddings.cli": 4, "neuron_embeddings.explorer": 4,
    "neuron_embeddings.groundtruth": 4,
}
FORBIDDEN = {  # module prefix -> third-party packages it must not import
    "neuron_embeddings.core": ("prefect", "prefect_dask", "zarr"),
    "neuron_embeddings.storage": ("prefect", "prefect_dask"),
    "neuron_embeddings.explorer": ("prefect", "prefect_dask"),
}
ONLY_FROM = {"neuron_embeddings.explorer": ("neuron_embeddings.core", "neuron_embeddings.storage",
                                            "neuron_embeddings.explorer")}


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer_of(module: str) -> str | None:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def imports(source: str, module: str, is_package: bool) -> list[str]:
    """Every module imported anywhere in `source` (absolute names; relative ones resolved), and
    every string literal passed to importlib.import_module / __import__."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            found += [f"{base}.{a.name}" for a in node.names] if base == "neuron_embeddings" else [base]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(node.args[0].value)
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    here = layer_of(module)
    if here is None:  # the package's own __init__ (its version only)
        here = "neuron_embeddings.core"
    bad = []
    for name in imports(source, module, is_package):
        top = name.split(".")[0]
        if any(module.startswith(p) and top in pkgs for p, pkgs in FORBIDDEN.items()):
            bad.append(f"{module} imports {name} (not allowed in {here})")
        if top != "neuron_embeddings":
            continue
        target = layer_of(name)
        if target is None:
            if name != "neuron_embeddings":
                bad.append(f"{module} imports {name}, which is in no layer")
            continue
        if LAYERS[target] > LAYERS[here]:
            bad.append(f"{module} ({here}) imports {name} ({target}): an import that goes up")
        allowed = next((v for p, v in ONLY_FROM.items() if module.startswith(p)), None)
        if allowed and not any(name == a or name.startswith(a + ".") for a in allowed):
            bad.append(f"{module} imports {name}: it may import only {', '.join(allowed)}")
    return bad


def test_no_import_goes_up():
    found = modules()
    assert "neuron_embeddings.tasks.registry" in found and "neuron_embeddings.core.scan" in found
    bad = [v for m, p in found.items() for v in violations(m, p.read_text(), p.name == "__init__.py")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module, source", [
    ("neuron_embeddings.core.scan", "def f():\n    from neuron_embeddings.tasks.common import run_unit\n"),
    ("neuron_embeddings.core.cluster", "import zarr\n"),
    ("neuron_embeddings.storage.store", "from neuron_embeddings.flows import run\n"),
    ("neuron_embeddings.tasks.embed", "from ..flows.run import neuron_embeddings_run\n"),
    ("neuron_embeddings.explorer.data", "from neuron_embeddings.tasks.summarise import summarise_store\n"),
    ("neuron_embeddings.core.units", "import importlib\nimportlib.import_module('neuron_embeddings.storage.store')\n"),
])
def test_the_check_catches_upward_imports(module, source):
    assert violations(module, source), f"not caught: {source!r} in {module}"


def test_downward_imports_pass():
    assert not violations("neuron_embeddings.tasks.embed", "from neuron_embeddings.core.scan import merge_blocks\n"
                          "from neuron_embeddings.storage import store\nfrom . import common\n")
