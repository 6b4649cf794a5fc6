"""The package's imports go one way: kernels ← foundation (with the base-kind registry) ← backends (launchers, PyTorch
paths, the path table) ← the autograd driver ← router (dispatch) ← functional API ← modules ← injector ← adapters / PEFT
/ Trainer glue ← the base-kind plug-ins, with no import cycle and no module importing another's private names. Read
from the package's own source (every import, also inside functions), so a lazy import cannot hide a cycle.
docs/architecture.md draws the same layers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fused_lora"
KERNELS = ROOT / "kernels"

# Each module's layer: a module imports only modules of its own layer or below.
LAYERS = [
    ("kernels", ["kernels.*"]),
    ("foundation", ["hardware", "fallback", "dropout", "validation", "reference", "config", "call", "segments",
                    "bases.__init__"]),
    ("backends", ["backends.*"]),
    ("autograd", ["autograd.*"]),
    ("router", ["dispatch"]),
    ("functional", ["functional", "diagnostics"]),
    ("modules", ["layer", "quantized", "multi_layer"]),
    ("injector", ["injector"]),
    ("glue", ["adapters", "peft", "peft_mixed", "hf_trainer", "multi_adapters"]),
    ("plug-ins", ["bases.*"]),  # a base kind's file names the paths and modules it uses; lower layers ask the registry
    ("package", ["__init__"]),
]


def module_name(path: Path) -> str:
    """'backends.lora_triton' for fused_lora/backends/lora_triton.py, 'kernels.dora' for kernels/dora.py."""
    if path.is_relative_to(KERNELS):
        return "kernels." + path.stem
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1] + ["__init__"]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    found.update({module_name(p): p for p in KERNELS.glob("*.py")})
    return found


def resolve(current: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, list[str]]]:
    """(imported module within the package, names imported from it) for one import statement; nothing outside."""
    known = modules()
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.startswith("fused_lora."):
                out.append((alias.name.removeprefix("fused_lora."), []))
        return out
    if node.level == 0:
        if not (node.module or "").startswith("fused_lora"):
            return out
        base = (node.module or "").removeprefix("fused_lora").removeprefix(".")
    else:
        package = current.split(".")[:-1]  # the importing module's package ("backends.x" → ["backends"])
        if current.endswith("__init__") or current in ("__init__",):
            package = current.split(".")[:-1]
        up = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        base = ".".join([*up, node.module] if node.module else up)
    for alias in node.names:
        candidate = f"{base}.{alias.name}" if base else alias.name
        if candidate in known or f"{candidate}.__init__" in known:  # `from . import module`
            out.append((candidate, []))
        else:
            out.append((base or "__init__", [alias.name]))
    return out


def graph() -> dict[str, dict[str, list[str]]]:
    edges: dict[str, dict[str, list[str]]] = {}
    for name, path in modules().items():
        deps: dict[str, list[str]] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in resolve(name, node):
                    target = target if target in modules() else f"{target}.__init__"
                    if target != name:
                        deps.setdefault(target, []).extend(names)
        edges[name] = deps
    return edges


LISTED = {pattern for _, patterns in LAYERS for pattern in patterns}


def layer_of(name: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
                return rank
    raise AssertionError(f"fused_lora.{name} is in no layer of tests/test_architecture.py: place it")


def test_every_module_has_a_layer_and_a_one_line_docstring():
    for name, path in modules().items():
        layer_of(name)
        if name.endswith("__init__") and name != "__init__":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.relative_to(ROOT)} has no module docstring saying what it holds"


def test_imports_go_down_the_layers():
    wrong = []
    for name, deps in graph().items():
        for target in deps:
            if target.endswith("__init__") and target != "__init__" and target not in LISTED:
                continue  # a subpackage's __init__ that holds only its docstring
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "imports going up the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges = {name: set(deps) for name, deps in graph().items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_private_names_cross_modules():
    crossing = [f"{name} imports {n} from {target}" for name, deps in graph().items() for target, names in deps.items()
                for n in names if n.startswith("_") and not n.startswith("__")]
    assert not crossing, "private names imported across modules:\n" + "\n".join(crossing)


def test_the_checker_sees_a_cycle_and_a_private_import():
    """The checks above can fail: the resolver finds relative imports, `from . import x` and private names."""
    node = ast.parse("from ..dropout import _generator\nfrom . import lora_torch\nfrom ..layer import LoRALinear").body
    assert resolve("backends.dora_torch", node[0]) == [("dropout", ["_generator"])]
    assert resolve("backends.dora_torch", node[1]) == [("backends.lora_torch", [])]
    assert layer_of(resolve("backends.dora_torch", node[2])[0][0]) > layer_of("backends.dora_torch")
