"""The package reads as its layers: the loss engine (`trl_qaloss.engine`), the TRL integration, the command line
(`trl_qaloss.cli`). Imports only go down the layers, no module imports itself back through others, importing the
config or the package loads no engine code, each module has one name, and neither the package nor the benchmarks
import the tests."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_qaloss"
LAYERS = ("engine", "integration", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "trl_qaloss.__main__":  # `python -m trl_qaloss`: the command line
        return "cli"
    for name in ("engine", "cli"):
        if module == f"trl_qaloss.{name}" or module.startswith(f"trl_qaloss.{name}."):
            return name
    return "integration"


def package_imports() -> dict[str, set[str]]:
    """`{module: the package modules it imports}`, at module level or inside functions, from the source."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            imported |= {name for name in names if name in modules and name != module}
        graph[module] = imported
    return graph


def test_imports_only_go_down_the_layers():
    upward = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in package_imports().items()
        for target in targets
        if LAYERS.index(layer(target)) > LAYERS.index(layer(module)) and not module.startswith("trl_qaloss.demo")
    ]
    assert not upward, upward


def test_no_import_cycle():
    graph = package_imports()
    # A package's __init__ importing its own modules is how a package is made, not a cycle between modules.
    edges = {
        m: {t for t in targets if not m.endswith(("trl_qaloss", ".engine", ".cli"))} for m, targets in graph.items()
    }
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def imported_top_levels(path: Path) -> set[str]:
    """The top-level names of the modules that the file at `path` imports, anywhere in it (relative imports aside)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_the_package_and_the_benchmarks_import_nothing_from_the_tests():
    """What the benchmarks share with the tests lives in the package (`trl_qaloss.testing_utils`): the tests are not
    shipped, and a benchmark runs without them."""
    files = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
    assert any(path.parent.name == "benchmarks" for path in files)
    importing_tests = [str(path.relative_to(ROOT)) for path in files if "tests" in imported_top_levels(path)]
    assert not importing_tests, importing_tests


def loaded_modules(statement: str) -> list[str]:
    """The package modules that `statement` loads in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(m for m in sys.modules if m.startswith('trl_qaloss')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return sorted(result.stdout.split())


def test_importing_the_config_loads_no_engine_code():
    """Only the names of the options, the release differences and the error type: no tensor code of the package."""
    assert loaded_modules("import trl_qaloss.config") == [
        "trl_qaloss",
        "trl_qaloss._log_filters",
        "trl_qaloss.compat",
        "trl_qaloss.config",
        "trl_qaloss.engine",
        "trl_qaloss.engine.options",
        "trl_qaloss.errors",
    ]


def test_importing_the_package_loads_nothing_until_a_name_is_used():
    assert loaded_modules("import trl_qaloss") == ["trl_qaloss", "trl_qaloss._log_filters"]
    assert "trl_qaloss.trainer" in loaded_modules("from trl_qaloss import QALossSFTTrainer")


def test_the_public_names_import():
    import trl_qaloss

    for name in trl_qaloss.__all__:
        assert getattr(trl_qaloss, name) is not None, name
    assert set(trl_qaloss.__all__) <= set(dir(trl_qaloss))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        trl_qaloss.nothing  # noqa: B018
    namespace: dict = {}
    exec("from trl_qaloss import *", namespace)
    assert {"QALossConfig", "QALossSFTTrainer", "reorder_answers", "set_matching_loss"} <= namespace.keys()


@pytest.mark.parametrize(
    "name",
    [
        "answer_order",
        "inference",
        "logprobs",
        "loss",
        "matching",
        "parsing",
        "reduction",
        "reference",
        "separators",
        "similarity",
    ],
)
def test_a_module_has_one_name(name):
    """A module is imported under its layer's name only (`trl_qaloss.engine.loss`, `trl_qaloss.cli.inference`),
    never directly under the package."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"trl_qaloss.{name}")


def test_the_command_line_entry_point():
    """`pyproject.toml`'s `trl-qaloss` entry point and the train command's functions, still importable from the
    command-line package."""
    import tomllib

    from trl_qaloss.cli import training

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["trl-qaloss"]
    module, _, function = entry.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    from trl_qaloss.cli import load_datasets, make_parser, model_init_kwargs, parse_args, train  # noqa: F401

    assert train is training.train and parse_args is training.parse_args


def test_documented_imports():
    from trl_qaloss.data import format_qas, format_qas_dataset, load_qa_dataset  # noqa: F401
    from trl_qaloss.engine.parsing import parse_qa_text  # noqa: F401
    from trl_qaloss.engine.reference import reorder_answers_reference, set_matching_loss_reference  # noqa: F401
