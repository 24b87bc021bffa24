"""ARCHITECTURE.md §3 from the import graph: each module imports only from lower layers, never upward."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "diffkit"

# Rank of each top-level unit; a module may import units of strictly lower rank (and its own package).
# analytic sits above samplers: its exact flow is the rk45 sampler at a tight tolerance. likelihood sits beside
# it: it calls denoisers through samplers.base, and only its tests use analytic.
RANK = {
    "_tensor": 0, "contracts": 0, "nets": 0, "data": 0, "scaling": 0, "lowrank": 0, "adapters": 0,
    "paths": 1,
    "grids": 2, "precond": 2, "method": 2.5,
    "objectives": 3, "samplers": 3,
    "analytic": 4, "likelihood": 4, "onestep": 4, "codecs": 4, "flows": 4, "interop": 4, "finetune": 4,
    "train": 5, "eval": 5, "registry": 5,
    # The jobs the CLI runs, each above what it uses.
    "config": 6, "report": 6, "latent": 6.5, "generate": 7, "calibration": 7.5, "interop_jobs": 7.6, "run": 8,
    "compression": 8.5, "export": 8.5, "tune": 8.5, "demo": 9,
    "cli": 10,
}
ISOLATED = {"nets": set(),  # nets import each other (own unit) and nothing else
            "data": {"contracts", "_tensor"}, "train": {"contracts", "_tensor"}}  # allowed diffkit imports


def unit(module: str) -> str:
    """The top-level unit of an absolute module name: diffkit.samplers.ode -> samplers ('' for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: pathlib.Path, root: pathlib.Path) -> set[str]:
    """The absolute modules of the package at `root` that the file `path` imports, at any depth of its code.

    A relative import is resolved against the file's own package: in diffkit/samplers/ode.py,
    `from ..grids import karras` is diffkit.grids and `from . import base` is diffkit.samplers.base.
    """
    name = root.name
    package = [name, *path.relative_to(root).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == name}
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module == name:  # `from diffkit import paths`: the names are modules
            found |= {f"{name}.{a.name}" for a in node.names}
        elif module.split(".")[0] == name:
            found.add(module)
    return found


def violations(root: pathlib.Path) -> list[str]:
    """Every import in the package at `root` that breaks the layering, one line each, in file order."""
    found = []
    for path in sorted(root.rglob("*.py")):
        me = path.relative_to(root).parts[0].removesuffix(".py")
        if me == "__init__":
            continue
        where = path.relative_to(root).as_posix()
        for imported in sorted(imports(path, root)):
            other = unit(imported)
            if other in ("", me):
                continue
            if me in ISOLATED and other not in ISOLATED[me]:
                found.append(f"{where} imports {imported}: {me} may import only {sorted(ISOLATED[me])}")
            elif RANK.get(other, 99) >= RANK.get(me, -1):
                found.append(f"{where} imports {imported}: upward or sideways")
    return found


def test_every_unit_has_a_rank():
    units = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.rglob("*.py")} - {"__init__"}
    assert units <= set(RANK) | set(ISOLATED), f"give these a layer in test_layering.RANK: {units - set(RANK) - set(ISOLATED)}"


def test_imports_point_down():
    assert violations(ROOT) == []


def test_the_check_finds_each_kind_of_violation(tmp_path):
    root = tmp_path / "diffkit"
    files = {
        "__init__.py": "from diffkit import cli\n",  # the package itself may import anything
        "paths.py": "import torch\nfrom diffkit.samplers import euler\n",  # upward
        "precond.py": "from diffkit import paths\nfrom diffkit.grids import karras\n",  # down; sideways
        "objectives.py": "from .precond import Precond\n",  # relative, down
        "samplers/__init__.py": "",
        "samplers/ode.py": "from . import base\nfrom .base import prepare\nfrom ..paths import VE\n"  # own, own, down
                           "def sample():\n    from ..generate import run\n",  # relative upward, inside a function
        "train/loop.py": "from diffkit._tensor import per_sample\nimport diffkit.nets.embed\n",  # allowed; isolated
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert imports(root / "samplers/ode.py", root) == {"diffkit.samplers", "diffkit.samplers.base", "diffkit.paths",
                                                       "diffkit.generate"}
    assert violations(root) == [
        "paths.py imports diffkit.samplers: upward or sideways",
        "precond.py imports diffkit.grids: upward or sideways",
        "samplers/ode.py imports diffkit.generate: upward or sideways",
        "train/loop.py imports diffkit.nets.embed: train may import only ['_tensor', 'contracts']",
    ]
