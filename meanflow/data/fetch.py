"""Getting archives: local path or URL, resumable HTTP download (Range), checksum checks and tar
extraction that cannot escape its target (tarfile's "data" filter)."""
from __future__ import annotations

import gzip
import http.client
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from ..manifest import file_hash

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad or missing input data; the message names the file, key or value."""


def is_url(src: str | os.PathLike) -> bool:
    return str(src).startswith(("http://", "https://"))


def join(src: str, name: str) -> str:
    """A file inside a directory or under a base URL."""
    return src.rstrip("/") + "/" + name if is_url(src) else str(Path(src) / name)


def check_md5(path: Path, expected: str | None) -> str:
    """The file's MD5; raises if it differs from `expected` (None: nothing known, only logged)."""
    log.info("%s: verifying MD5 (%.1f GB)", path, Path(path).stat().st_size / 1e9)
    got = file_hash(path, "md5")
    if expected is None:
        log.warning("%s: no MD5 known, not verified (md5 %s)", path, got)
    elif got != expected.lower():
        raise DataError(f"{path}: MD5 mismatch: got {got}, expected {expected}; the file is corrupt, "
                        "incomplete or not the official archive (nothing was extracted)")
    return got


def download(url: str, dest: Path, chunk: int = 1 << 20, timeout: float = 60) -> Path:
    """Download `url` to `dest`, resuming a previous `dest.part` with an HTTP Range request."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part file is complete
            os.replace(part, dest)
            return dest
        raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DataError(f"{url}: cannot download ({e.reason})") from None
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                          desc=dest.name, mininterval=1) as bar:
            try:
                while block := resp.read(chunk):
                    f.write(block)
                    bar.update(len(block))
            except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
                raise DataError(f"{url}: download interrupted ({type(e).__name__}); rerun to resume") from None
    got = part.stat().st_size
    if total is not None and got != total:
        raise DataError(f"{url}: download incomplete ({got} of {total} bytes); rerun to resume")
    os.replace(part, dest)
    return dest


def local(src: str, cache: Path, key: str) -> Path:
    """`src` (a path or URL) as a local file: a URL is downloaded once into `cache` (an unfinished
    download resumed); a missing path raises DataError naming `key` (the params key that gave it)."""
    if is_url(src):
        path = Path(cache) / Path(src).name
        if not path.exists():
            download(src, path)
        return path
    path = Path(src)
    if not path.is_file():
        raise DataError(f"{path}: no such file (from {key})")
    return path


def fetch(src: str, name: str, cache: Path, md5: str | None) -> tuple[Path, str]:
    """`src/name` (a directory or base URL) as a local, checksum-verified file and its MD5.
    Downloads go to `cache`; a finished one is reused, an unfinished one resumed."""
    path = local(join(src, name), cache, f"data.source_path = {src!r}")
    return path, check_md5(path, md5)


def open_tar(path: Path, mode: str = "r:*") -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None


def extract(tar: tarfile.TarFile, dest: Path, name: str, members=None) -> None:
    """extractall with the "data" filter: absolute paths, '..', links out of `dest` and device
    files are refused. A truncated or corrupt archive raises DataError naming it."""
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError("safe tar extraction needs Python >= 3.11.4 (tarfile extraction filters)")
    Path(dest).mkdir(parents=True, exist_ok=True)  # even for an empty archive
    try:
        tar.extractall(dest, members=members, filter="data")
    except tarfile.FilterError as e:
        raise DataError(f"{name}: unsafe member refused ({e})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncation surfaces as any of these
        raise DataError(f"{name}: truncated or corrupt tar archive ({type(e).__name__}: {e})") from None


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
