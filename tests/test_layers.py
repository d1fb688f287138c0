"""The layers, read off the source: no import cycle among the project's modules, and every import goes to the
same layer or one the layer may use, never up. Imports inside functions count the same as those at the top.

Layers (README, "Layout"): core <- kernels <- models, core <- runtime, and applications on top of them all;
`cipherdm_spu` itself (its __init__, the public API) may import anything and nothing imports it. Modules
named here that do not exist yet are ignored; a module that exists but is not named here fails the test.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "cipherdm_spu"
#: where each installed package's modules live in the tree (setup.cfg's package_dir)
SOURCES = {PACKAGE: ROOT / "cipherdm_spu", f"{PACKAGE}.models": ROOT / "models", f"{PACKAGE}.protocols": ROOT / "protocols"}
#: layer: its modules, relative to cipherdm_spu ("models.*": every module of cipherdm_spu.models)
LAYERS = {
    "core": ["errors", "_version", "registry", "ops", "spu_config", "ring", "linalg", "spu_threads"],
    "kernels": ["protocols", "protocols.*", "floor_kernels"],
    "models": ["models", "models.*"],
    "runtime": ["private_dir", "compile_cache", "session", "profiling", "public_constants", "ir_audit", "cluster_config", "messages", "share_wire", "pki", "plan", "link_front", "console", "child_python", "compiler_process", "party",
                "client", "netem", "control", "driver"],
    "applications": ["sampling", "jobs", "stable_diffusion", "benchmark", "softmax_frontier", "quality", "mnist", "results", "minimax",
                     "cli_common", "sampling_cli", "sd_cli", "sd_images", "launch", "cluster"],
    "package": [""],
}
#: layer: the layers its modules may import (its own included)
MAY_IMPORT = {
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "models": {"core", "kernels", "models"},
    "runtime": {"core", "runtime"},
    "applications": {"core", "kernels", "models", "runtime", "applications"},
    "package": set(LAYERS),
}


def project_modules() -> dict:
    """module name: its source file, for every module of the installed packages."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict) -> set:
    """The project modules ``name`` imports anywhere in its source (``from X import m`` imports X.m if that
    is a module, else X)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
                found.update(next(([p] for p in prefixes if p in modules), []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
    found.discard(name)
    return found


def layer_of(module: str):
    """The layer LAYERS puts ``module`` in, or None."""
    relative = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    for layer, members in LAYERS.items():
        for member in members:
            if relative == member or (member.endswith(".*") and relative.startswith(member[:-1])):
                return layer
    return None


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    unplaced = sorted(module for module in graph if layer_of(module) is None)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py LAYERS: {unplaced}"


def test_imports_go_down_or_across_never_up(graph):
    upward = sorted(f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in graph.items() if layer_of(m)
                    for d in deps if layer_of(d) and layer_of(d) not in MAY_IMPORT[layer_of(m)])
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    cycles, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


def test_the_reader_finds_local_and_relative_imports():
    """The parser itself, on the forms the project uses: relative, absolute, function-local, module or name."""
    modules = project_modules()
    assert "cipherdm_spu.registry" in imported_modules("cipherdm_spu.protocols.cipherdm", modules["cipherdm_spu.protocols.cipherdm"], modules)
    assert imported_modules("cipherdm_spu.models.unet_2d", modules["cipherdm_spu.models.unet_2d"], modules) >= {
        "cipherdm_spu.ops", "cipherdm_spu.models.config", "cipherdm_spu.models.unet_blocks"}
