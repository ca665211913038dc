"""Resumable sharded outputs (the encode and sample stages). A directory holds plan.json (what
the shards are made of; a different plan refuses to mix), shard files and, written after each,
its done marker `shard-NNNNN.json` (with the file's sha256): a shard is done when both exist and the
file still has the marker's hash, and is skipped on a rerun. `check()` runs on every call of a
stage, manifest or not: a shard deleted or damaged since (or a marker that is not JSON) loses its
marker, the now stale manifest is removed, and the shard is remade. Shard k covers items
[k * size, (k + 1) * size); worker w of W does shards w, w + W, ...; whoever finds every shard
done merges (writes the manifest)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from . import manifest

PLAN, MANIFEST, DONE = "plan.json", "manifest.json", "shard-{:05d}.json"
log = logging.getLogger(__name__)


def worker_of(shard: int = 0, num_shards: int = 1, error: type[Exception] = ValueError,
              flags: str = "--shard {} of --num-shards {}") -> tuple[int, int]:
    """(worker, workers): job `shard` of `num_shards` times torchrun's RANK of WORLD_SIZE."""
    from .launch import torchrun_env
    rank, world = torchrun_env(error)[:2]
    if not 0 <= shard < num_shards:
        raise error(f"{flags.format(shard, num_shards)}: want 0 <= shard < num_shards")
    return shard * world + rank, num_shards * world


def digest(hashes) -> str:
    """One hash of a set of shards: sha256 over their sha256s, in order."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def main_rank() -> bool:
    from .launch import torchrun_env
    return torchrun_env().rank == 0


class Shards:
    """The shards of `out`: `count` items in shards of `size`, files named `name` ("shard-{:05d}.npz")."""

    def __init__(self, out: str | Path, count: int, size: int, name: str, error: type[Exception] = RuntimeError):
        self.out, self.name, self.error = Path(out), name, error
        self.ranges = [(k * size, min((k + 1) * size, count)) for k in range(math.ceil(count / size))]
        self._verified = {}  # k -> (size, mtime) of the file whose hash matched its marker

    @classmethod
    def of(cls, out: str | Path, name: str, count_key: str, error: type[Exception], missing: str) -> "Shards":
        """The shards of an output in progress, from its plan.json (`missing`: what to say without one)."""
        try:
            plan = json.loads((Path(out) / PLAN).read_text())
            count, size = plan[count_key], plan["shard_size"]
        except FileNotFoundError:
            raise error(f"{Path(out) / PLAN}: {missing}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise error(f"{Path(out) / PLAN}: damaged ({type(e).__name__}: {e}); delete {out} to start over") from None
        s = cls(out, count, size, name, error)
        s.plan = plan
        return s

    def file(self, k: int) -> Path:
        return self.out / self.name.format(k)

    def marker(self, k: int) -> Path:
        return self.out / DONE.format(k)

    def done(self, k: int) -> bool:
        """Marker and file present, and the file's sha256 is the marker's (hashed once per file version)."""
        f, m = self.file(k), self.marker(k)
        try:
            st = f.stat()
            want = json.loads(m.read_text()).get("sha256")
        except (OSError, ValueError, AttributeError):
            return False
        key = (st.st_size, st.st_mtime_ns)
        if self._verified.get(k) != key:
            if want is not None and manifest.file_hash(f) != want:
                return False
            self._verified[k] = key
        return True

    def check(self) -> list[int]:
        """Verify every shard that has a marker; a damaged or missing one loses its marker (so it is
        remade) and the manifest, now stale, is removed. Returns the shards dropped, each named in a
        warning. Shards without a marker may be another worker's in progress: left alone."""
        bad = self.damaged()
        for k in bad:
            log.warning("%s: missing or damaged (not the hash its marker %s recorded); it will be remade",
                        self.file(k), self.marker(k).name)
            self.marker(k).unlink(missing_ok=True)
            self.file(k).unlink(missing_ok=True)
        if bad:
            (self.out / MANIFEST).unlink(missing_ok=True)
        return bad

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

    def damaged(self) -> list[int]:
        """Shards whose marker exists but whose file is missing or not the hash the marker recorded."""
        return [k for k in range(len(self.ranges)) if self.marker(k).exists() and not self.done(k)]

    def sha256(self, k: int) -> str:
        return manifest.file_hash(self.file(k))

    def mark(self, k: int, **body) -> Path:
        """Write shard k's done marker (after its file): its number and file name, then `body`."""
        if "sha256" in body:  # just hashed by the writer
            st = self.file(k).stat()
            self._verified[k] = (st.st_size, st.st_mtime_ns)
        return manifest.write_json(self.marker(k), {"shard": k, "file": self.file(k).name, **body})

    def read(self, complete: bool = True, stage: str = "") -> list[tuple[dict, Path]]:
        """(done marker, path) of the done shards in order; with complete, fail on a missing one."""
        missing = [k for k in range(len(self.ranges)) if not self.done(k)]
        if complete and missing:
            raise self.error(f"{self.out}: {len(missing)} of {len(self.ranges)} shards not done "
                             f"(first: {missing[:5]}); run the missing {stage} workers")
        return [(json.loads(self.marker(k).read_text()), self.file(k)) for k in range(len(self.ranges)) if k not in missing]
