"""Reading weights: each actor's tensors are its own memory, not views of the checkpoint's files."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral import names
from mixtral.checkpoint import CheckpointReader
from mixtral.config import load_args, resolve_dtype
from workers.device import HUGE_PAGES_ENV

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def overwrite_in_place(shard: Path) -> None:
    """Zero every tensor byte of a safetensors file, in place (same inode), as an rsync --inplace would."""
    with shard.open("r+b") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        data_start = 8 + header_len
        f.seek(0, os.SEEK_END)
        size = f.tell() - data_start
        f.seek(data_start)
        f.write(bytes(size))


def test_weights_read_do_not_change_when_the_file_is_rewritten(make_ckpt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    checkpoint = make_ckpt(seed=5)
    copy = shutil.copytree(checkpoint, tmp_path / "model")
    reader = CheckpointReader(copy)
    name = names.expert_weight(0, 1, "w1")
    # In the file's own dtype: a conversion would copy anyway and hide a view.
    [(_, tensor)] = list(reader.read([name], dtype=resolve_dtype(load_args(copy), None)))
    before = tensor.clone()
    assert before.abs().sum() > 0
    overwrite_in_place(copy / reader.weight_map[name])
    assert torch.equal(tensor, before)


PROBE = """
import sys, torch
from mixtral import names
from mixtral.checkpoint import CheckpointReader
weights = list(CheckpointReader(sys.argv[1]).read(names.expert_weights(1, 0), dtype=torch.float32))
huge = [line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:")]
print(int(huge[0].split()[1]) * 1024)
"""


@pytest.mark.skipif(
    not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(), reason="the kernel has no transparent huge pages"
)
def test_weights_read_under_the_huge_pages_env_sit_in_huge_pages(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    # torch puts allocations of 2 MiB and more in huge pages, and fills whole pages only: 8 MiB matrices.
    checkpoint = make_ckpt(hidden_size=512, intermediate_size=4096, num_hidden_layers=1, num_local_experts=2)
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(checkpoint)],
        env=os.environ | HUGE_PAGES_ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(run.stdout.strip()) >= 2 << 20, "no expert weight landed in a huge page"
