"""The README's and docs/deploy.md's tables of what one run yields are the committed
results/deploy/<task>/models.json, as scripts/deploy_tables.py prints them; each record names its
command and machine, and matches the figures its training run recorded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("deploy_tables", ROOT / "scripts" / "deploy_tables.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_documents_show_the_committed_records() -> None:
    tables = _script()
    assert tables.summary_table() in (ROOT / "README.md").read_text()
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for task, table in tables.full_tables().items():
        assert table in deploy, task


def test_each_record_is_complete_and_matches_its_run() -> None:
    for task, _ in _script().TASKS:
        record = json.loads((ROOT / "results" / "deploy" / task / "models.json").read_text())
        assert record["command"].startswith("subnetdp report ") and record["machine"]["torch"]
        assert record["matches_run"] and all(r["recorded"] is not None for r in record["rows"]), task
        assert [r["model"] for r in record["rows"]][-1] == "ensemble of 4"
        assert (ROOT / "results" / "deploy" / task / "models.png").is_file()
