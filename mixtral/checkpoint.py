"""Reads named tensors from a safetensors checkpoint, opening only the shards that hold them.

Every actor reads its own weights through one CheckpointReader, which keeps a log of the shards
it opened and the tensors it read: that log is how the tests show that a worker read only its
expert and the coordinator no expert at all.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from mixtral.config import ModelArgs, load_args
from mixtral.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where tensors are read: checking a path (the CLI's first step) needs none
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory and its parsed config.json: what every actor is handed."""

    path: Path
    args: ModelArgs
    # The Hugging Face repo the directory came from (mixtral.hub), if any: an actor on a node whose
    # cache lacks `path` fetches the repo into its own cache (local_path).
    repo_id: str | None = None
    served_name: str | None = None  # what clients call it (serve's --served-model-name), where it is served

    @staticmethod
    def open(path: str | Path, *, repo_id: str | None = None) -> Checkpoint:
        """Read and check config.json; raise CheckpointError saying what is wrong."""
        return Checkpoint(Path(path), load_args(path), repo_id)

    @property
    def name(self) -> str:
        """The model's name and its metrics label: the name it is served under, else the repo id, else
        the directory's name."""
        return self.served_name or self.repo_id or self.path.name

    def local_path(self) -> Path:
        """The directory on this node: `path`, or for a Hub checkpoint not here, this node's copy of the repo."""
        if self.repo_id is None or self.path.is_dir():
            return self.path
        from mixtral.hub import from_hub

        return from_hub(self.repo_id)

    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.local_path())


@dataclass
class ReadLog:
    shards_opened: list[str] = field(default_factory=list)
    tensors_read: list[str] = field(default_factory=list)


class CheckpointReader:
    """Maps tensor names to shards (through the index, or the single file) and reads them."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.root = Path(checkpoint)
        self.weight_map = _weight_map(self.root)
        self.log = ReadLog()

    def verify(self) -> None:
        """Open every shard's header (no tensor data) and check it holds what the index says."""
        by_shard: dict[str, set[str]] = defaultdict(set)
        for name, shard in self.weight_map.items():
            by_shard[shard].add(name)
        for shard, expected in sorted(by_shard.items()):
            path = self.root / shard
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; the index names it but it is not in the checkpoint")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    missing = expected - set(f.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is corrupt or unreadable ({e}); re-download or re-create it") from None
            if missing:
                raise CheckpointError(f"{path} lacks {len(missing)} tensors the index names, e.g. {min(missing)}")

    def read(self, names: Iterable[str], *, dtype: torch.dtype, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) for `names`, opening each shard that holds any of them once."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"{self.root}: tensor {name} is missing from the checkpoint")
            by_shard[self.weight_map[name]].append(name)
        for shard, shard_names in sorted(by_shard.items()):
            path = self.root / shard
            if not path.is_file():
                raise CheckpointError(f"{path} is missing; the index names it but it is not in the checkpoint")
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    self.log.shards_opened.append(shard)
                    for name in shard_names:
                        tensor = f.get_tensor(name)
                        self.log.tensors_read.append(name)
                        # A copy, always: safetensors hands out views of a private file mapping. Those
                        # change if the file is rewritten in place, and sit in 4 KiB page-cache pages; a
                        # copy is torch's own memory (huge pages under workers.device.HUGE_PAGES_ENV).
                        yield name, tensor.to(device=device, dtype=dtype, copy=True)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} is corrupt or unreadable ({e}); re-download or re-create it") from None


def _weight_map(root: Path) -> dict[str, str]:
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is corrupt ({e!r}); it needs a 'weight_map' object") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
        return weight_map
    single = root / SINGLE_FILE
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt", device="cpu") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{single} is corrupt or unreadable ({e})") from None
    raise CheckpointError(f"{root} holds no {INDEX_FILE} or {SINGLE_FILE}; is it a safetensors checkpoint?")
