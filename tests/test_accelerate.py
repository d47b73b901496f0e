"""The accelerate recipes in experiments/accelerate: each parses as an accelerate config, and cpu.yaml launches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "experiments" / "accelerate"
EXPECTED = {
    "cpu.yaml": "NO",
    "single_gpu.yaml": "NO",
    "ddp.yaml": "MULTI_GPU",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
}

# A few optimizer steps under Accelerator; writes what it saw so the test can check it.
TRAIN_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator

accelerator = Accelerator()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
before = model.weight.detach().clone()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(32, 4), torch.randn(32, 1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
for xb, yb in loader:
    loss = torch.nn.functional.mse_loss(model(xb), yb)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
if accelerator.is_main_process:
    changed = not torch.equal(accelerator.unwrap_model(model).weight.detach().cpu(), before)
    json.dump({"num_processes": accelerator.num_processes, "device": str(accelerator.device),
               "mixed_precision": accelerator.mixed_precision, "changed": changed}, open(sys.argv[1], "w"))
"""


def test_every_expected_config_is_present():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_as_an_accelerate_config(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    cfg = ClusterConfig.from_yaml_file(str(CONFIG_DIR / name))  # rejects unknown top-level keys
    assert cfg.distributed_type.value == EXPECTED[name]
    assert cfg.num_processes >= 1 and cfg.num_machines == 1
    # accelerate launch copies each deepspeed_config key onto its own flag of the same name.
    flags = {action.dest for action in launch_command_parser()._actions}
    unknown = set(cfg.deepspeed_config) - flags
    assert not unknown, f"{name}: deepspeed_config keys accelerate launch does not know: {sorted(unknown)}"
    if cfg.distributed_type.value == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == (2 if "zero2" in name else 3)
    assert cfg.use_cpu == (name == "cpu.yaml")


def test_cpu_config_launches_a_training_script(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / "cpu.yaml"),
           str(script), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {"num_processes": 1, "device": "cpu", "mixed_precision": "no", "changed": True}
