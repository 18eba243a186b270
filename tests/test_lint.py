"""Guards on the code itself: the linter, the generated README table, and the layering of the package."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = set(sys.stdlib_module_names)


def _python_files(folder: str) -> list[str]:
    out = []
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
        out += [os.path.join(base, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _imports(path: str, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(level, dotted name) of every import in a file; level > 0 for relative imports."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and not node.module:  # from . import x
                out += [(node.level, alias.name) for alias in node.names]
            else:
                out.append((node.level, node.module or ""))
    return out


def _module_of(path: str) -> str:
    return os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")


def _resolve(path: str, level: int, name: str) -> str:
    """The package-relative module an import names (relative imports resolved against `path`)."""
    if not level:
        return name
    package = _module_of(path).split(".")
    if not path.endswith("__init__.py"):
        package = package[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join(package + ([name] if name else []))


def test_ruff_passes():
    pytest.importorskip("ruff")
    completed = subprocess.run([sys.executable, "-m", "ruff", "check", ROOT], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_readme_key_table_is_generated_from_the_config():
    script = os.path.join(ROOT, "scripts", "readme_config_table.py")
    completed = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_pure_math_imports_only_torch_and_the_standard_library():
    pure = ("losses", "schedules", "accounting")
    for name in pure:
        path = os.path.join(ROOT, "trainer", f"{name}.py")
        for level, module in _imports(path):
            if level:  # one pure module may use another
                assert _resolve(path, level, module) in {f"trainer.{p}" for p in pure}, (
                    f"trainer/{name} imports .{module}")
                continue
            top = module.split(".")[0]
            assert top in STDLIB or top == "torch", f"trainer/{name} imports {module}"


def test_the_trainer_knows_nothing_of_nodes_demo_or_comfy():
    comfy_adapter = os.path.join(ROOT, "trainer", "adapters", "comfy.py")
    for path in _python_files("trainer"):
        for level, name in _imports(path):
            module = _resolve(path, level, name)
            top = module.split(".")[0]
            assert top not in ("nodes", "demo"), f"{_module_of(path)} imports {module}"
            if path != comfy_adapter:
                assert top not in ("comfy", "comfy_extras", "folder_paths"), f"{_module_of(path)} imports {module}"


def test_the_trainer_reaches_the_demo_only_through_the_builtin_registry():
    """Issue 31: `builtin:<name>` resolves through trainer/builtins.py, which the demo fills; no trainer module
    names the demo's folder (a path dependency the import checks above cannot see)."""
    for path in _python_files("trainer"):
        tree = ast.parse(open(path, encoding="utf-8").read())
        literals = {node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not literals & {"demo", "texture_teacher"}, f"{_module_of(path)} names a folder of the demo"
    from decoupled_dmd.trainer import builtins

    assert {"mnist", "texture"} <= set(builtins.names())  # registered by demo/__init__.py on the package's import
    assert builtins.resolve("builtin:texture").endswith(os.path.join("demo", "texture_teacher"))
    assert builtins.resolve("builtin:demo") == builtins.resolve("builtin:mnist")  # the old name still works


def test_the_product_never_imports_the_research_harness_and_pip_does_not_install_it():
    """Issue 31: research/ (the studies, the run pool, the teacher-training scripts) runs from a checkout only."""
    import tomllib

    for folder in ("trainer", "demo", "nodes"):
        for path in _python_files(folder):
            for level, name in _imports(path):
                module = _resolve(path, level, name) if level else name
                assert "research" not in module.split("."), f"{_module_of(path)} imports {module}"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    packages = project["tool"]["setuptools"]["packages"]
    assert not [p for p in packages if "research" in p] and "decoupled_dmd.demo" in packages
    for path in _python_files("research"):  # the harness reaches the product through its public modules
        for level, name in _imports(path):
            if level:
                assert _resolve(path, level, name).split(".")[0] in ("research", "demo", "trainer"), path


def test_no_import_cycles_even_through_lazy_imports():
    graph = {}
    files = [p for folder in ("trainer", "demo", "nodes", "research") for p in _python_files(folder)]
    known = {_module_of(p) for p in files}
    for path in files:
        targets = set()
        for level, name in _imports(path, module_level_only=False):
            if level:
                module = _resolve(path, level, name)
                while module and module not in known:
                    module = module.rpartition(".")[0]
                if module and module != _module_of(path):
                    targets.add(module)
        graph[_module_of(path)] = targets

    def visit(node, stack):
        assert node not in stack, "import cycle: " + " -> ".join(stack[stack.index(node):] + [node])
        for target in graph.get(node, ()):
            visit(target, stack + [node])

    for module in graph:
        visit(module, [])


def test_the_readmes_install_commands_have_no_placeholders_to_fill_in():
    """Every shell block in the README runs as written: no `<this repository>`-style blank to guess."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"```bash\n(.*?)```", handle.read(), flags=re.S)
    assert blocks
    blanks = [line for block in blocks for line in block.splitlines()
              if re.search(r"<[a-z][a-z ]*>", line.split("#")[0])]
    assert not blanks, blanks
