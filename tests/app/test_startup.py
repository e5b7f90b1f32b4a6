"""Start-up time of the `subnetdp` command (issue 17, item 11): `--help` and `train --help` never
import torch (it takes seconds), and `plan` does not import torch._dynamo. Checked on the modules
a fresh interpreter has loaded, which is deterministic, rather than by the clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; what it printed last (JSON) and the modules loaded."""
    probe = f"""
import json, sys, contextlib, io
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
{''.join('        ' + line + chr(10) for line in code.strip().splitlines())}
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{"out": out.getvalue(), "modules": sorted(sys.modules)}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["--version"], ["sweep", "--help"],
                                  ["demo", "--help"], ["export", "--help"], ["plan", "--help"]])
def test_help_and_version_start_without_importing_torch(argv) -> None:
    found = _modules_after(f"from subnetdp.app.cli import main\nmain({argv!r})")
    assert "usage: subnetdp" in found["out"] or found["out"].startswith("subnetdp "), found["out"][:500]
    assert not [m for m in found["modules"] if m == "torch" or m.startswith("torch.")], argv


def test_version_reads_torch_from_its_metadata() -> None:
    import torch

    found = _modules_after("from subnetdp.app.cli import main\nmain(['--version'])")
    assert f"(torch {torch.__version__}, python " in found["out"]


@pytest.mark.slow
def test_import_subnetdp_is_lazy_and_the_readme_api_still_imports() -> None:
    found = _modules_after("import subnetdp\nprint(subnetdp.__version__)")
    assert "torch" not in found["modules"] and found["out"].strip()
    found = _modules_after("from subnetdp import SubnetworkDataParallel, SubnetworkSimulator, plan_for, Plan\n"
                           "import subnetdp\nprint(SubnetworkDataParallel.__name__, subnetdp.engine.__name__, "
                           "sorted(set(subnetdp.__all__) - set(dir(subnetdp))))")
    assert found["out"].split() == ["SubnetworkDataParallel", "subnetdp.engine", "[]"]


@pytest.mark.slow
def test_plan_does_not_import_torch_dynamo_and_counts_the_same_flops() -> None:
    found = _modules_after("from subnetdp.app.cli import main\n"
                           "main(['plan', '--model', 'resnet18', '--workers', '8', '--width', '8'])")
    assert "algebraic connectivity" in found["out"] and "torch" in found["modules"]
    assert "torch._dynamo" not in found["modules"]  # about 1 s of imports, for nothing
    # the counts are FlopCounterMode's (which imports torch._dynamo: run second)
    found = _modules_after("""
import sys, torch
from torch.utils.flop_counter import FlopCounterMode
from subnetdp.engine.planning import count_flops, run_example
from subnetdp.models import resnet18
model, x = resnet18(num_classes=10, in_channels=3, width=8), torch.randn(2, 3, 16, 16)
ours, before = count_flops(model, x), "torch._dynamo" in sys.modules
with FlopCounterMode(display=False) as counter:
    run_example(model, x)
theirs = {name[len("ResNet") + 1:] if name != "ResNet" else "": float(sum(v.values()))
          for name, v in counter.get_flop_counts().items() if name.startswith("ResNet")}
print(before, ours == theirs, len(ours) > 30, ours[""] > 0)
""")
    assert found["out"].split() == ["False", "True", "True", "True"], found["out"]
    assert "torch._dynamo" in found["modules"]  # imported by FlopCounterMode


def test_the_nproc_launcher_checks_a_config_without_importing_torch(tmp_path) -> None:
    """Everything `subnetdp train --workers N` checks before torchrun starts (config, builder keys,
    workers, run folder, a resume's checkpoint) runs without torch: a launch starts a second
    sooner, and the workers pay for torch once each."""
    config = tmp_path / "c.toml"
    config.write_text('[model]\nname = "resnet18"\nwidth = 4\n[data]\nname = "synthetic-images"\n')
    found = _modules_after(
        "import subnetdp.app.launch as launch\n"
        "def stop(*args, **kwargs):\n"
        "    print('torchrun would start now')\n"
        "    raise SystemExit(0)\n"
        "launch.torchrun_command = stop\n"
        "from subnetdp.app.cli import main\n"
        f"main(['train', {str(config)!r}, '--workers', '2', '--out', {str(tmp_path / 'run')!r}])")
    assert "torchrun would start now" in found["out"]
    assert not [m for m in found["modules"] if m == "torch" or m.startswith("torch.")]
