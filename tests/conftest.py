"""Shared test set-up, and the markers of the tiers (pyproject.toml lists them):

    slow   given by hand: seconds each (whole CLI runs, torchrun, several process groups)
    dist   set here: the test runs real torch.distributed ranks (tests/_dist.py, torchrun)
    cli    set here: the test runs the `subnetdp` command (its main() or a subprocess)

dist and cli are found in the source of the test, of the fixtures it uses and of the functions of
its module (and of tests/_runs.py, tests/_dist.py) that it calls, two calls deep.
"""

import ast
import inspect
import os
import sys

import pytest

# Helpers (tests/_dist.py, tests/_models.py) import as top-level modules, in spawned workers too.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

SIGNS = {"dist": ("run_distributed(", "torchrun", "--workers\", \"2\"]", "Tree(", "\"--workers\", \"2\", \"--out\"",
                  "\"--workers\", \"2\")", "nproc"),
         "cli": ("main([", "cli(", "_train(", "_run_cli(", "subnetdp.app.cli", "Tree(")}


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _called(source: str) -> set[str]:
    try:
        tree = ast.parse(inspect.cleandoc(source) if source.startswith((" ", "\t")) else source)
    except SyntaxError:
        return set()
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _reach(item) -> str:
    """The source of the test, its fixtures and the module-level functions they call (two deep)."""
    namespace = dict(vars(item.module))
    texts = [_source(item.function)]
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            texts.append(_source(fixturedef.func))
    seen: set[str] = set()
    for _ in range(2):
        for name in set().union(*map(_called, texts)) - seen:
            seen.add(name)
            target = namespace.get(name)
            if inspect.isfunction(target) and not target.__module__.startswith(("subnetdp", "torch")):
                texts.append(_source(target))
    return "\n".join(texts)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if not hasattr(item, "module") or not hasattr(item, "function"):
            continue
        reached = _reach(item)
        for marker, signs in SIGNS.items():
            if any(sign in reached for sign in signs):
                item.add_marker(getattr(pytest.mark, marker))
    # the long tests first (real ranks, then whole runs), so that the test processes of
    # `bash scripts/test.sh` (pytest-xdist) end together rather than on one last long test
    def weight(item) -> int:
        return 2 * (item.get_closest_marker("dist") is not None) + (item.get_closest_marker("slow") is not None)

    items.sort(key=weight, reverse=True)  # stable: file order within each weight
