"""The promised layout, and imports that run one way:
core <- strategies <- server; core <- client; simulation uses server and client.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedretrain", "strategies", "server", "client", "simulation")
# What each package may import of the others (itself always).
ALLOWED = {
    "fedretrain": set(),
    "strategies": {"fedretrain"},
    "server": {"fedretrain", "strategies"},
    "client": {"fedretrain"},
    "simulation": {"fedretrain", "server", "client", "strategies"},
}
# The console command is the process edge: it dispatches to every role, lazily.
EDGE_MODULES = {REPO / "fedretrain" / "cli.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        if path in EDGE_MODULES:
            continue
        wrong = (_imports(path) & set(PACKAGES)) - ALLOWED[package] - {package}
        if wrong:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(wrong)}")
    assert not offenders, "\n".join(offenders)


def test_promised_layout_exists():
    for name in ("pyproject.toml", "README.md", "Makefile", ".ci/run", "server", "client", "strategies", "conf",
                 "tests", "simulation", "fedretrain"):
        assert (REPO / name).exists(), name


def test_flower_components_point_at_the_apps():
    import tomllib

    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from fedretrain.config.compose import RUN_CONFIG_KEYS

    # The app's run_config is exactly what the ServerApp reads: nothing else reaches it.
    assert set(app["config"]) == set(RUN_CONFIG_KEYS) == {"experiment", "overrides", "run-dir", "resume", "sites-file"}
