"""Memory bound of a copy: peak RSS grows by a few row blocks, not by a tensor or a shard.

The copy runs in a subprocess. The kernel's peak-RSS counter (VmHWM) is reset through
/proc/self/clear_refs just before the copy, so the peak covers the copy alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

MIB = 2**20

CHILD = r"""
import json, re, sys
from pipeline.storage import ShardedWriter, copy_checkpoint, open_checkpoint

def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024

source, destination, block_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
reader = open_checkpoint(source)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
copy_checkpoint(reader, ShardedWriter(destination, max_shard_bytes=128 * 2**20), block_bytes=block_bytes)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset peak RSS")
def test_copy_peak_memory_is_a_few_blocks(tmp_path: Path):
    # Three tensors of 64 MiB each; a copy that held one whole tensor would add >= 64 MiB.
    generator = torch.Generator().manual_seed(0)
    save_file(
        {f"t{i}": torch.randn(4096, 4096, generator=generator) for i in range(3)},
        tmp_path / "source.safetensors",
    )
    block_bytes = 8 * MIB

    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "source.safetensors"), str(tmp_path / "out"), str(block_bytes)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert completed.returncode == 0, completed.stderr
    measured = json.loads(completed.stdout)

    growth = measured["peak"] - measured["before"]
    assert growth < 5 * block_bytes, f"peak RSS grew by {growth / MIB:.1f} MiB during the copy"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
