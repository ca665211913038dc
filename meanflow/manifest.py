"""Small manifests carried by every output directory: inputs' hashes, params hash, environment, time.
Also the atomic-write helpers every stage uses (write a temp file, then os.replace)."""
from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def file_hash(path: str | Path, algo: str = "sha256", chunk: int = 1 << 22) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_T0 = time.perf_counter()   # about when the stage process started (its first meanflow import)

KEY_PACKAGES = ("torch", "torchvision", "numpy", "diffusers", "timm", "torch-fidelity", "safetensors",
                "snakemake", "snakemake-executor-plugin-slurm", "dvc", "dvclive")


@functools.cache  # installed packages do not change under a running process; metadata reads cost ms
def _package_versions() -> dict:
    from importlib import metadata
    out = {}
    for name in KEY_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(cwd: str | Path | None = None) -> dict:
    """The source tree's commit and whether it had uncommitted changes (None outside a git tree)."""
    import subprocess
    cwd = str(cwd or Path(__file__).resolve().parent.parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"commit": None, "dirty": None}
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                            capture_output=True, text=True, timeout=30)
        return {"commit": rev.stdout.strip(), "dirty": bool(st.stdout.strip()) if st.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def environment() -> dict:
    """Where an output was made: host, Python, platform, accelerator (model, count, CUDA/cuDNN),
    key package versions, the git commit, and the SLURM job when there is one."""
    import torch   # here, not at the top: a stage that only copies (meanflow.reuse) never loads torch
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
           "platform": platform.platform(), "host": platform.node(), "cpus": os.cpu_count(),
           "threads": torch.get_num_threads()}   # the stage's section `threads` (stages.use_threads)
    env["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env["gpu"] = torch.cuda.get_device_name(0) if env["gpu_count"] else None
    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if env["gpu_count"]:
        names = {torch.cuda.get_device_name(i) for i in range(env["gpu_count"])}
        if len(names) > 1:
            env["gpus"] = sorted(names)
    env["packages"] = dict(_package_versions())
    env["git"] = git_commit()
    slurm = {k: os.environ[v] for k, v in (("job_id", "SLURM_JOB_ID"), ("nodes", "SLURM_JOB_NUM_NODES"),
                                           ("cluster", "SLURM_CLUSTER_NAME"), ("partition", "SLURM_JOB_PARTITION"))
             if v in os.environ}
    if slurm:
        env["slurm"] = slurm
    from .launch import torchrun_env
    tr = torchrun_env()   # stages.job checked it before the work
    for k, v in (("WORLD_SIZE", tr.world), ("LOCAL_WORLD_SIZE", tr.local_world)):
        if k in os.environ:
            env[k.lower()] = v
    return env


def stamp(cfg=None, **extra) -> dict:
    """The common manifest fields (time, environment, the process's wall time so far), then the stage's own."""
    out = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "env": environment(),
           "wall_seconds": round(time.perf_counter() - _T0, 3)}
    if cfg is not None:
        out.update(tier=cfg.tier, experiment=cfg.experiment, params_hash=cfg.params_hash)
    out.update(extra)
    return out


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def readable(path: str | Path) -> Path:
    """Give a file the mode every other output has (0666 less the umask: 0644 by default);
    safetensors creates its files 0600, which a cluster group sharing results could not read."""
    os.chmod(path, 0o666 & ~_UMASK)
    return Path(path)


@contextlib.contextmanager
def writing(path: str | Path):
    """Any failure while writing `path` becomes an OSError naming it, with the free space of its file
    system: torch.save on a full disk says only "unexpected pos", safetensors' errors are not
    OSErrors, and a plain write's OSError carries no file name."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, f"{e.strerror}{_free(path)}", str(path)) from e
    except Exception as e:  # noqa: BLE001 - torch's and safetensors' write errors
        first = (str(e).splitlines() or [""])[0][:200]
        raise OSError(errno.EIO, f"write failed ({type(e).__name__}: {first}){_free(path)}", str(path)) from e


def _free(path) -> str:
    d = Path(path).parent
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return f"; {shutil.disk_usage(d).free / 2**20:.1f} MiB free on its file system"
    except OSError:
        return ""


def load_error(e: BaseException) -> str:
    """One line for a failed load: torch's weights-only refusal is many lines and suggests
    weights_only=False, which would run the file's pickled code; keep only what it refused."""
    text = str(e)
    refused = re.search(r"GLOBAL ([\w.]+)|Unsupported operand \d+", text)
    if refused or "Weights only load failed" in text:
        what = f"it pickles {refused.group(1)}" if refused and refused.group(1) else refused.group(0) if refused else \
            "pickled objects"
        return f"refused by weights-only loading: {what}, not only tensors; none of its code was run"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


def tmp_path(path: Path) -> Path:
    # Same directory, so os.replace is an atomic rename; pid keeps concurrent writers apart.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:   # strict JSON: a NaN or infinity is an error here, not a record other readers reject
        text = json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n"
    except ValueError as e:
        raise ValueError(f"{path}: not written: {e} (a NaN or infinity among its values)") from None
    tmp = tmp_path(path)
    try:
        with writing(path):
            tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no temp file
    return path


def check_plan(path: str | Path, plan: dict, error: type[Exception], what: str) -> None:
    """Resume guard of a sharded output: write `plan` to `path` the first time; later, refuse (with
    `error`, naming the keys) if the plan differs, since shards made under another plan must not mix.
    `what` says what the plan pins down, e.g. "other inputs or settings"."""
    path = Path(path)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise error(f"{path}: damaged ({e}); delete {path.parent} to start over") from None
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff:
            raise error(f"{path}: this output was started with {what} ({', '.join(diff)}); "
                        f"delete {path.parent} to start over")
    else:
        write_json(path, plan)


def save_npy(path: str | Path, arr: np.ndarray) -> Path:
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
