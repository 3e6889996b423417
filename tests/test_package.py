"""The package's shape: no import cycles, the Engine is a facade nothing below imports, every config key is
read somewhere."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from twostage.config import Config

PACKAGE = Path(__file__).resolve().parents[1] / "twostage"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """Every import of one of our modules, anywhere in a module (top level, functions, TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name, deps = _module(path), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("twostage")
            ):
                # "from twostage import ingest" imports the submodule, not the package's facade
                subs = {
                    f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")
                }
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("twostage")}
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 25 and "twostage.pipeline" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_cli_and_the_whole_command_runners_use_the_engine():
    users = {name for name, deps in import_graph().items() if "twostage.engine" in deps}
    # the demo and tuning run whole commands (tuning in copies of the project), as a user of the CLI would
    assert users == {"twostage", "twostage.cli", "twostage.demo", "twostage.tune"}


def test_every_config_key_is_read_outside_config():
    """A key is read as ``<section>.<key>`` (``config.reranker.depth``), through a local or parameter named
    ``cfg`` or ``config`` that holds the section (``cfg.depth``), or by its section's class
    (``RerankerConfig.depth``)."""
    code = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py") if p.name != "config.py")
    unread = []
    for section in dataclasses.fields(Config):
        owner = type(getattr(Config(), section.name)).__name__
        for key in dataclasses.fields(getattr(Config(), section.name)):
            readers = rf"\b(?:{section.name}|cfg|config|{owner})\.{key.name}\b"
            if not re.search(readers, code):
                unread.append(f"{section.name}.{key.name}")
    assert unread == []


def _requirements() -> tuple[list[str], dict[str, list[str]]]:
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project["dependencies"], project["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_each_extra_installs_at_most_one_faiss_build():
    """faiss-cpu and faiss-gpu-* provide the same module: the base must pull neither, and no install the
    README names (an extra, alone or with dev) may pull two."""
    from twostage.index import FAISS_BUILDS

    base, extras = _requirements()
    assert not _names(base) & set(FAISS_BUILDS)
    assert _names(extras["cpu"]) == {"faiss-cpu"}
    assert _names(extras["gpu"]) == {"faiss-gpu-cu12"}
    for name, reqs in extras.items():
        assert len(_names(reqs) & set(FAISS_BUILDS)) <= 1, name
    assert not _names(extras["dev"]) & set(FAISS_BUILDS), "dev is combined with cpu or gpu"
    makefile = (PACKAGE.parent / "Makefile").read_text(encoding="utf-8")
    assert "EXTRAS ?= cpu,dev" in makefile


def test_two_faiss_builds_are_reported(monkeypatch, caplog):
    import twostage.index as index

    monkeypatch.setattr(index, "faiss_builds", lambda: ["faiss-cpu", "faiss-gpu-cu12"])
    monkeypatch.setattr(index, "_checked_builds", [])
    with caplog.at_level("WARNING", logger="twostage.index"):
        index._faiss()
    assert "several FAISS builds are installed (faiss-cpu, faiss-gpu-cu12)" in caplog.text
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12" in caplog.text
