"""The promised layout, and imports that run one way, exactly as the README states it:
core <- strategies <- server; core <- client; simulation uses strategies, server and client;
the command line (cli/) uses all of them, and nothing imports it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedretrain", "strategies", "server", "client", "simulation", "cli")


def readme_rule() -> dict[str, set[str]]:
    """The README's "may import" table: package -> the other packages it may import."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| package | may import |")
    rule: dict[str, set[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        package, allowed = (cell.strip() for cell in line.strip("|").split("|"))
        rule[package.strip("`")] = set(re.findall(r"`(\w+)`", allowed))
    return rule


ALLOWED = readme_rule()


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
        wrong = (_imports(path) & set(PACKAGES)) - ALLOWED[package] - {package}
        if wrong:
            offenders.append(f"{path.relative_to(REPO)} imports {sorted(wrong)}")
    assert not offenders, "\n".join(offenders)


def test_the_readme_rule_covers_every_package_and_nothing_imports_the_command_line():
    assert set(ALLOWED) == set(PACKAGES)
    assert not any("cli" in allowed for allowed in ALLOWED.values())
    assert ALLOWED["fedretrain"] == set()


def test_promised_layout_exists():
    for name in (
        "pyproject.toml",
        "README.md",
        "Makefile",
        ".ci/run",
        "server",
        "client",
        "strategies",
        "conf",
        "tests",
        "simulation",
        "fedretrain",
        "cli",
    ):
        assert (REPO / name).exists(), name


def test_flower_components_point_at_the_apps():
    import tomllib

    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    from fedretrain.config.compose import RUN_CONFIG_KEYS

    # The app's run_config is exactly what the ServerApp reads: nothing else reaches it.
    assert (
        set(app["config"])
        == set(RUN_CONFIG_KEYS)
        == {
            "experiment",
            "overrides",
            "run-dir",
            "resume",
            "sites-file",
            "mode",
            "poll-file",
            "train-nodes",
        }
    )
