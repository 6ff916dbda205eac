"""The repository's own promises: README and CI run the same test command; every package is installed."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line for block in blocks[:2] for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, "the README opens with two commands: run the main job, run the tests"
    test_command = commands[1]
    assert "pytest" in test_command and "torch==2.13.0" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "torch==2.13.0" in commands[0]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    on_disk = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                on_disk.add(".".join([name, *rel.parts]))
    assert on_disk == set(config["packages"])


def _imports(layer: str, folder: Path) -> dict[str, set[str]]:
    """{module: modules it imports (anywhere in the file, relative imports resolved)} for one package folder."""
    import ast

    graph = {}
    for path in folder.rglob("*.py"):
        rel = path.relative_to(folder).with_suffix("")
        parts = [layer, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        package = parts if path.name == "__init__.py" else parts[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` names modules
        graph[".".join(parts)] = found
    return graph


def test_import_graph_runs_one_way_without_cycles():
    """kernels <- engine <- privimage: kernels imports neither the engine nor the application, the engine never
    imports the application, and no module of either imports itself back through others (DESIGN.md)."""
    graph = {**_imports("privimage.kernels", ROOT / "kernels"), **_imports("privimage.engine", ROOT / "engine")}
    for module, imported in graph.items():
        allowed = ("privimage.kernels",) if module.startswith("privimage.kernels") else \
            ("privimage.kernels", "privimage.engine")
        # (`from privimage import kernels` also names the bare package, whose __init__ imports nothing)
        upward = sorted(m for m in imported if m.startswith("privimage.") and not m.startswith(allowed))
        assert not upward, f"{module} imports {upward}: imports run kernels <- engine <- privimage only"
    edges = {m: {i for i in imported if i in graph and i != m} for m, imported in graph.items()}
    for m in edges:  # a package's __init__ re-exports its modules: its own modules never import it back
        if any(other.startswith(m + ".") for other in graph):
            edges[m] = set()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(path + [n])}"
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
