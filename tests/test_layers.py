"""The package's layers, read from the source: the library (miniproclip/*.py) imports neither the training code
(miniproclip/training/) nor the toy world (miniproclip/toy/); the training code does not import the toy world; no
module imports itself through others (imports inside functions count); and no library function takes train.py's
argparse namespace. eval.py's flags and flow (miniproclip/eval_cli.py) are an entry point, importable by tests: it
uses the library, which never imports it."""

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "miniproclip"
ENTRY_POINTS = {"miniproclip.eval_cli"}  # eval.py's flags and flow: orchestration over its args, like eval.py


def module_names() -> dict[str, Path]:
    """{"miniproclip.toy.world": path, ...} for every module of the package (a package is its __init__.py)."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["miniproclip", *path.relative_to(PACKAGE).with_suffix("").parts]
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (a `from X import y` of a submodule y
    counts as importing X.y; of a name defined in X, as importing X)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found |= {f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                      for alias in node.names}
    return {target for target in found if target in modules and target != name and target != "miniproclip"}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(name: str) -> str:
    if name in ENTRY_POINTS:
        return "entry"
    return "training" if name.startswith("miniproclip.training") else "toy" if name.startswith("miniproclip.toy") \
        else "library"


def test_the_graph_is_read_right():
    """The reader finds the imports it must (relative, absolute, of submodules, inside functions)."""
    graph = import_graph()
    assert {"miniproclip.clip", "miniproclip.head"} <= graph["miniproclip.model"]
    assert "miniproclip.training.stages" in graph["miniproclip.training.build"]
    assert "miniproclip.api" in graph["miniproclip"]  # `from .api import load_model` inside __getattr__
    assert "miniproclip.toy.world" in graph["miniproclip.toy.defaults"]


def test_every_module_imports():
    """Each module on its own (a relative import of a module that moved fails here, not in a user's run)."""
    for name in sorted(module_names()):
        importlib.import_module(name)


def test_layers_import_one_way():
    allowed = {"library": {"library"}, "training": {"library", "training"}, "toy": {"library", "training", "toy"},
               "entry": {"library"}}
    wrong = sorted(f"{name} -> {target}" for name, targets in import_graph().items() for target in targets
                   if layer(target) not in allowed[layer(name)])
    assert not wrong


def test_no_module_imports_itself_through_others():
    graph, cycles = import_graph(), []

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles


def test_no_library_function_takes_the_argparse_namespace():
    """train.py's settings go down as explicit values: no library function has an `args` parameter."""
    takers = []
    for name, path in module_names().items():
        if layer(name) != "library":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                params = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
                if "args" in params:
                    takers.append(f"{name}.{node.name}")
    assert not takers
