"""Resumable sharded outputs (the encode and sample stages). A directory holds plan.json (what
the shards are made of; a different plan refuses to mix), shard files and, written after each,
its done marker `shard-NNNNN.json`: a shard with both is done and skipped on a rerun. Shard k
covers items [k * size, (k + 1) * size); worker w of W does shards w, w + W, ...; whoever finds
every shard done merges (writes the manifest)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from . import manifest

PLAN, MANIFEST, DONE = "plan.json", "manifest.json", "shard-{:05d}.json"


def worker_of(shard: int = 0, num_shards: int = 1, error: type[Exception] = ValueError,
              flags: str = "--shard {} of --num-shards {}") -> tuple[int, int]:
    """(worker, workers): job `shard` of `num_shards` times torchrun's RANK of WORLD_SIZE."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= shard < num_shards:
        raise error(f"{flags.format(shard, num_shards)}: want 0 <= shard < num_shards")
    return shard * world + rank, num_shards * world


def digest(hashes) -> str:
    """One hash of a set of shards: sha256 over their sha256s, in order."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def main_rank() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


class Shards:
    """The shards of `out`: `count` items in shards of `size`, files named `name` ("shard-{:05d}.npz")."""

    def __init__(self, out: str | Path, count: int, size: int, name: str, error: type[Exception] = RuntimeError):
        self.out, self.name, self.error = Path(out), name, error
        self.ranges = [(k * size, min((k + 1) * size, count)) for k in range(math.ceil(count / size))]

    @classmethod
    def of(cls, out: str | Path, name: str, count_key: str, error: type[Exception], missing: str) -> "Shards":
        """The shards of an output in progress, from its plan.json (`missing`: what to say without one)."""
        try:
            plan = json.loads((Path(out) / PLAN).read_text())
        except FileNotFoundError:
            raise error(f"{Path(out) / PLAN}: {missing}") from None
        s = cls(out, plan[count_key], plan["shard_size"], name, error)
        s.plan = plan
        return s

    def file(self, k: int) -> Path:
        return self.out / self.name.format(k)

    def marker(self, k: int) -> Path:
        return self.out / DONE.format(k)

    def done(self, k: int) -> bool:
        return self.marker(k).exists() and self.file(k).exists()

    def start(self, plan: dict, what: str) -> None:
        """Create the directory and pin `plan` (refusing a different one; `what` names the difference)."""
        self.out.mkdir(parents=True, exist_ok=True)
        manifest.check_plan(self.out / PLAN, plan, self.error, what)
        self.plan = plan

    def todo(self, worker: int = 0, workers: int = 1) -> list[int]:
        """This worker's shards not done yet; temp files a killed run left of them are removed."""
        mine = [k for k in range(worker, len(self.ranges), workers) if not self.done(k)]
        for k in mine:
            for t in self.out.glob(f".{self.name.format(k)}.*.tmp"):
                t.unlink(missing_ok=True)
        return mine

    def complete(self) -> bool:
        return all(self.done(k) for k in range(len(self.ranges)))

    def sha256(self, k: int) -> str:
        return manifest.file_hash(self.file(k))

    def mark(self, k: int, **body) -> Path:
        """Write shard k's done marker (after its file): its number and file name, then `body`."""
        return manifest.write_json(self.marker(k), {"shard": k, "file": self.file(k).name, **body})

    def read(self, complete: bool = True, stage: str = "") -> list[tuple[dict, Path]]:
        """(done marker, path) of the done shards in order; with complete, fail on a missing one."""
        missing = [k for k in range(len(self.ranges)) if not self.done(k)]
        if complete and missing:
            raise self.error(f"{self.out}: {len(missing)} of {len(self.ranges)} shards not done "
                             f"(first: {missing[:5]}); run the missing {stage} workers")
        return [(json.loads(self.marker(k).read_text()), self.file(k)) for k in range(len(self.ranges)) if k not in missing]
