"""The package's shape: no import cycles (read from the source with ``ast``, so lazy imports inside
functions count too), no plotting library imported by ``import petl_lightning``, small files."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "petl_lightning"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["petl_lightning.cli"], "the scan found the package"
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_import_does_not_import_plotting_from_the_package() -> None:
    """No package module imports matplotlib when the package is imported (charts load it lazily).
    torchmetrics imports matplotlib itself when it is installed, so the check is on who asks."""
    probe = (
        "import builtins, sys, traceback\n"
        "real = builtins.__import__\n"
        "bad = []\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] == 'matplotlib':\n"
        "        frames = [f.filename for f in traceback.extract_stack()[:-1]]\n"
        "        if frames and 'petl_lightning' in frames[-1]: bad.append(frames[-1])\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import petl_lightning, petl_lightning.cli, petl_lightning.callbacks\n"
        "print('petl_lightning.plotting' in sys.modules, bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False []", out.stdout


def sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}


def test_deploy_imports_no_method() -> None:
    """Deployment reads a model through its protocol (``deploy/protocol.py``), never a method's internals."""
    graph = import_graph()
    deploy = {m: edges for m, edges in graph.items() if m.startswith("petl_lightning.deploy")}
    assert deploy and not {e for edges in deploy.values() for e in edges if e.startswith("petl_lightning.methods")}


def test_no_private_lightning_override_no_hidden_module_and_no_base_branch_in_dyn_adapter() -> None:
    """LightningCLI / ModelCheckpoint are extended through their documented hooks only; modules are
    registered, not hidden; Dyn-Adapter stacks its exits on the base's block contract, whatever the base."""
    src = sources()
    overrides = ("def _parse_ckpt_path", "def _run_subcommand", "def _save_checkpoint")
    assert not [(f, o) for f, text in src.items() for o in overrides if o in text]
    assert not [f for f, text in src.items() if "object.__setattr__" in text]
    dyn = "".join(text for f, text in src.items() if f.startswith("methods/dyn_adapter/"))
    for branch in ("DyTBlock", 'base == "dyt"', "skippable_tokens", "DyTViT"):
        assert branch not in dyn, branch


def test_one_version_source() -> None:
    import tomllib

    import petl_lightning

    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert petl_lightning.__version__ == __import__("importlib.metadata").metadata.version("petl-lightning")
