"""DESIGN.md §3 from the import graph: each module imports only from lower layers, never upward."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "diffkit"

# Rank of each top-level unit; a module may import units of strictly lower rank (and its own package).
# analytic sits above samplers: its exact flow is the rk45 sampler at a tight tolerance. likelihood sits beside
# it: it calls denoisers through samplers.base, and only its tests use analytic.
RANK = {
    "_tensor": 0, "contracts": 0, "nets": 0, "data": 0,
    "paths": 1,
    "grids": 2, "precond": 2, "method": 2.5,
    "objectives": 3, "samplers": 3,
    "analytic": 4, "likelihood": 4, "onestep": 4, "codecs": 4, "flows": 4,
    "train": 5, "eval": 5, "registry": 5,
    # The jobs the CLI runs, each above what it uses.
    "config": 6, "report": 6, "generate": 7, "run": 8, "demo": 9,
    "cli": 10,
}
ISOLATED = {"nets": set(),  # nets import each other (own unit) and nothing else
            "data": {"contracts", "_tensor"}, "train": {"contracts", "_tensor"}}  # allowed diffkit imports


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def diffkit_imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("diffkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffkit") and node.level == 0:
            found |= {node.module + "." + a.name if node.module == "diffkit" else node.module for a in node.names}
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_unit_has_a_rank():
    units = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in MODULES} - {"__init__"}
    assert units <= set(RANK) | set(ISOLATED), f"give these a layer in test_layering.RANK: {units - set(RANK) - set(ISOLATED)}"


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_imports_point_down(path):
    me = path.relative_to(ROOT).parts[0].removesuffix(".py")
    if me == "__init__":
        return
    for imported in diffkit_imports(path):
        other = unit(imported)
        if other in ("", me):
            continue
        if me in ISOLATED:
            assert other in ISOLATED[me], f"{path.name}: {me} may not import diffkit.{other}"
        assert RANK.get(other, 99) < RANK.get(me, -1), f"{path.relative_to(ROOT)} imports {imported} (upward or sideways)"


def test_rule_can_fail(tmp_path):
    bad = tmp_path / "paths.py"
    bad.write_text("from diffkit.samplers import euler\n")
    assert unit(next(iter(diffkit_imports(bad)))) == "samplers" and RANK["samplers"] >= RANK["paths"]
