"""ImageNet-1k (ILSVRC2012) acquisition from (a) the official tarballs at a path or base URL,
(b) the gated Hugging Face dataset at a pinned revision, or (c) an extracted ImageFolder or Kaggle
CLS-LOC tree. Labels are positions in the sorted wnid list (ImageFolder order); validation labels
come from the devkit (tars), LOC_val_solution.csv (Kaggle) or the file names (Hugging Face).

Extracted trees are built under raw/.partial/ (a finished class or archive is kept there, so a
rerun resumes) and renamed to raw/train, raw/val when complete; index.json is written last."""
from __future__ import annotations

import csv
import logging
import os
import re
import tarfile
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from .. import layout
from . import raw as rawmod
from .fetch import DataError, extract, fetch, is_url, open_tar, rmtree

log = logging.getLogger(__name__)
TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
WNID = re.compile(r"^n\d{8}$")


def _image_exts() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return IMG_EXTENSIONS


def acquire(cfg, raw: Path) -> Path:
    d = cfg.data
    source = d.source
    if source == "auto":
        if d.source_path is None:
            raise DataError("data.source_path is not set: give the directory or base URL of the ILSVRC2012 "
                            "tarballs, or an extracted ImageFolder/Kaggle tree; or set data.source: hf")
        p = Path(d.source_path)
        if is_url(d.source_path) or (p / DEVKIT).exists():
            source = "tars"
        elif (p / "train").is_dir() or _kaggle(p)[0] is not None:
            source = "folder"
        else:
            raise DataError(f"data.source_path = {d.source_path!r}: holds neither {DEVKIT} nor a train/ "
                            "folder nor a Kaggle ILSVRC/Data/CLS-LOC tree")
    if source in ("tars", "folder") and d.source_path is None:
        raise DataError(f"data.source = {source}: data.source_path must be set")
    return {"tars": from_tars, "hf": from_hf, "folder": from_folder}[source](cfg, raw)


# --------------------------------------------------------------------------- helpers
@contextmanager
def _tar_errors(name):
    try:
        yield
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{name}: truncated or corrupt tar archive ({type(e).__name__}: {e})") from None


def _check_end(tar: tarfile.TarFile, path: Path) -> None:
    """tarfile stops quietly at a header cut short, so check for the end-of-archive zero blocks."""
    with open(path, "rb") as f:
        f.seek(tar.offset)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise DataError(f"{path}: truncated tar archive (no end-of-archive marker after byte {tar.offset})")


def _scan(split_dir: Path, classes: list[str], rel_to: Path | None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) for every image under split_dir/<wnid>/, in ImageFolder order; empty classes."""
    exts, items, empty = _image_exts(), [], []
    for label, wnid in enumerate(classes):
        d = split_dir / wnid
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.name.lower().endswith(exts)) if d.is_dir() else []
        if not files:
            empty.append(wnid)
        items += [(str(p.relative_to(rel_to)) if rel_to else str(p), label) for p in files]  # else: absolute
    if empty:
        log.warning("%s: %d classes have no images: %s", split_dir, len(empty), " ".join(empty[:10]))
    return items, empty


def _scan_all(raw: Path, classes: list[str], splits) -> tuple[dict, dict]:
    """Scan extracted raw/<split>/<wnid>/ trees (paths relative to raw/)."""
    items, empty = {}, {}
    for s in splits:
        items[s], empty[s] = _scan(raw / s, classes, raw)
    return items, empty


def _finish(cfg, raw: Path, source: str, classes: list[str], items: dict, empty: dict, **extra) -> Path:
    splits = {}
    for name, its in items.items():
        if not its:
            raise DataError(f"split {name}: no images found ({source})")
        splits[name] = rawmod.write_files_split(raw, name, its)
    return rawmod.write_index(raw, cfg, source, classes, splits, empty_classes=empty, **extra)


# --------------------------------------------------------------------------- (a) official tarballs
def devkit(path: Path, work: Path) -> tuple[dict[int, str], list[int]]:
    """ILSVRC2012_ID -> wnid for the 1000 leaf synsets (meta.mat), and the validation ground truth
    (ILSVRC2012_IDs, one per val image in file-number order)."""
    from scipy.io import loadmat
    rmtree(work)
    with open_tar(path) as tar, _tar_errors(path):
        extract(tar, work, str(path))
    try:
        root = next(work.glob("*/data/meta.mat")).parent
        synsets = loadmat(root / "meta.mat", squeeze_me=True)["synsets"]
        truth = [int(x) for x in (root / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    except (StopIteration, FileNotFoundError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not an ILSVRC2012 devkit (needs */data/meta.mat and "
                        f"*/data/ILSVRC2012_validation_ground_truth.txt; {type(e).__name__}: {e})") from None
    finally:
        rmtree(work)
    leaves = [s for s in synsets if int(s["num_children"]) == 0]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}, truth


def _extract_train(path: Path, dest: Path, classes: set[str]) -> None:
    """The train tar holds one tar per class; each becomes dest/<wnid>/ (kept on rerun)."""
    dest.mkdir(parents=True, exist_ok=True)
    with open_tar(path, "r:") as outer, _tar_errors(path):
        for m in tqdm(outer, desc="train classes", unit="class", mininterval=1):
            wnid = m.name.removesuffix(".tar")
            if not (m.isfile() and m.name.endswith(".tar") and wnid in classes):
                raise DataError(f"{path}: unexpected member {m.name!r} (want <wnid>.tar for a devkit class)")
            if (dest / wnid).is_dir():
                continue
            tmp = dest / f".{wnid}.tmp"
            rmtree(tmp)
            with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as inner:
                extract(inner, tmp, f"{path}:{m.name}")
            os.replace(tmp, dest / wnid)
        _check_end(outer, path)


def _extract_val(path: Path, dest: Path, idx_to_wnid: dict[int, str], truth: list[int]) -> None:
    """The val tar is flat (ILSVRC2012_val_%08d.JPEG); sort it into dest/<wnid>/ by the devkit."""
    tmp = dest.with_name(dest.name + ".tmp")
    rmtree(tmp)
    with open_tar(path, "r:") as tar, _tar_errors(path):
        extract(tar, tmp, str(path))
        tar.getmembers()
        _check_end(tar, path)
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    if len(files) != len(truth):
        raise DataError(f"{path}: {len(files)} images, but the devkit's ground truth lists {len(truth)}")
    for f in files:
        m = re.fullmatch(r"ILSVRC2012_val_(\d{8})\.\w+", f.name)
        if not m or not 1 <= int(m.group(1)) <= len(truth):
            raise DataError(f"{path}: unexpected member {f.name!r}")
        wnid = idx_to_wnid[truth[int(m.group(1)) - 1]]
        (tmp / wnid).mkdir(exist_ok=True)
        os.replace(f, tmp / wnid / f.name)
    os.replace(tmp, dest)


def from_tars(cfg, raw: Path) -> Path:
    d = cfg.data
    names = [DEVKIT] + [{"train": TRAIN_TAR, "val": VAL_TAR}[s] for s in d.splits]
    # Every checksum is verified before anything is extracted.
    files, md5s = {}, {}
    for n in names:
        files[n], md5s[n] = fetch(d.source_path, n, layout.data(cfg).downloads, d.md5.get(n))
    idx_to_wnid, truth = devkit(files[DEVKIT], raw / ".devkit.tmp")
    classes = sorted(idx_to_wnid.values())
    partial = raw / ".partial"
    for s in d.splits:
        if not (raw / s).is_dir():
            if s == "train":
                _extract_train(files[TRAIN_TAR], partial / "train", set(classes))
            else:
                _extract_val(files[VAL_TAR], partial / "val", idx_to_wnid, truth)
            os.replace(partial / s, raw / s)
    rmtree(partial)
    return _finish(cfg, raw, "ilsvrc2012-tars", classes, *_scan_all(raw, classes, d.splits), inputs=md5s)


# --------------------------------------------------------------------------- (b) Hugging Face
def _hf_download(cfg, local_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    d = cfg.data
    try:
        return Path(snapshot_download(repo_id=d.hf_repo, repo_type="dataset", revision=d.hf_revision,
                                      allow_patterns=["data/train_images_*.tar.gz", "data/val_images.tar.gz"],
                                      local_dir=local_dir, token=os.environ.get("HF_TOKEN") or None))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        # The message names the error type only: the exception text may carry request headers.
        raise DataError(f"{d.hf_repo}@{d.hf_revision}: download failed ({type(e).__name__}); the dataset is gated: "
                        "set HF_TOKEN for an account that accepted its terms") from None


def _extract_hf(archives: list[Path], dest: Path) -> None:
    """HF tarballs are flat, named <stem>_<wnid>.JPEG; sort them into dest/<wnid>/."""
    dest.mkdir(parents=True, exist_ok=True)
    for a in archives:
        done = dest / f".done-{a.name}"
        if done.exists():
            continue
        tmp = dest / f".{a.name}.tmp"
        rmtree(tmp)
        with open_tar(a, "r:gz") as tar, _tar_errors(a):
            extract(tar, tmp, str(a))
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            wnid = f.stem.rsplit("_", 1)[-1]
            if not WNID.match(wnid):
                raise DataError(f"{a}: member {f.name!r} does not end in _<wnid>")
            (dest / wnid).mkdir(exist_ok=True)
            os.replace(f, dest / wnid / f.name)
        rmtree(tmp)
        done.touch()
    for m in dest.glob(".done-*"):
        m.unlink()


def from_hf(cfg, raw: Path) -> Path:
    d = cfg.data
    local = _hf_download(cfg, layout.data(cfg).downloads / "hf")
    archives = {"train": sorted((local / "data").glob("train_images_*.tar.gz")),
                "val": sorted((local / "data").glob("val_images.tar.gz"))}
    for s in d.splits:
        if not archives[s]:
            raise DataError(f"{d.hf_repo}@{d.hf_revision}: no data/{s}_images*.tar.gz in {local}; this revision's "
                            "layout is not supported (pin one with the tar.gz files)")
    partial = raw / ".partial"
    for s in d.splits:
        if not (raw / s).is_dir():
            _extract_hf(archives[s], partial / s)
            os.replace(partial / s, raw / s)
    rmtree(partial)
    classes = sorted(p.name for p in (raw / "train").iterdir() if p.is_dir())
    stray = sorted({p.name for p in (raw / "val").iterdir() if p.is_dir()} - set(classes)) if "val" in d.splits else []
    if stray:
        raise DataError(f"{raw / 'val'}: classes missing from train: {' '.join(stray[:10])}")
    return _finish(cfg, raw, f"hf:{d.hf_repo}@{d.hf_revision}", classes, *_scan_all(raw, classes, d.splits),
                   inputs={a.name: a.stat().st_size for s in d.splits for a in archives[s]})


# --------------------------------------------------------------------------- (c) extracted trees
def _kaggle(root: Path) -> tuple[Path | None, Path | None]:
    """Kaggle's layout: <root>/ILSVRC/Data/CLS-LOC/{train,val} and <root>/LOC_val_solution.csv."""
    for cls_loc, top in ((root / "ILSVRC" / "Data" / "CLS-LOC", root), (root, root.parent.parent.parent)):
        if cls_loc.name == "CLS-LOC" and (cls_loc / "train").is_dir():
            sol = top / "LOC_val_solution.csv"
            return cls_loc, sol if sol.exists() else None
    return None, None


def _bad_image(p: Path, root: Path) -> str | None:
    """Why an indexed-in-place file cannot be used: a symlink out of the source tree (the index
    would reach outside it), an empty file, or a file PIL cannot identify as an image (header only)."""
    from PIL import Image, UnidentifiedImageError
    if not p.resolve().is_relative_to(root):
        return f"a link to {p.resolve()}, outside {root}"
    try:
        if p.stat().st_size == 0:
            return "zero bytes"
        with Image.open(p) as im:
            im.size
    except (OSError, UnidentifiedImageError, ValueError) as e:
        return f"not a readable image ({type(e).__name__})"
    return None


def _vet(items: list[tuple[str, int]], root: Path, skip: bool, split: str) -> tuple[list, list]:
    """Drop (skip) or refuse bad files of a split (see _bad_image); (kept items, skipped 'path: why')."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:  # header reads: I/O bound
        why = list(pool.map(lambda it: _bad_image(Path(it[0]), root), items))
    bad = [f"{it[0]}: {w}" for it, w in zip(items, why) if w]
    if bad and not skip:
        raise DataError(f"{root} ({split}): {len(bad)} unusable file(s), first: {'; '.join(bad[:3])}; remove them "
                        "or set data.skip_corrupt: true to skip and list them in the index")
    if bad:
        log.warning("%s (%s): skipping %d unusable file(s), listed in the index: %s", root, split, len(bad), bad[:3])
    return [it for it, w in zip(items, why) if not w], bad


def from_folder(cfg, raw: Path) -> Path:
    """Index an extracted ImageFolder or Kaggle tree in place (absolute paths; nothing copied).
    Symlinks out of the tree, zero-byte and unidentifiable files, and empty class folders are
    refused; with data.skip_corrupt they are skipped and listed in the index (skipped,
    empty_classes; an empty class keeps its label slot)."""
    d = cfg.data
    root = Path(d.source_path).resolve()
    cls_loc, solution = _kaggle(root)
    base = cls_loc or root
    if not (base / "train").is_dir():
        raise DataError(f"{base / 'train'}: no such folder")
    classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{base / 'train'}: no class folders")
    items, empty, skipped = {}, {}, {}
    for s in d.splits:
        if s == "val" and cls_loc is not None:  # flat val/, labels in LOC_val_solution.csv
            items[s] = _kaggle_val(solution, base / "val", classes)
            empty[s] = sorted(set(classes) - {classes[lb] for _, lb in items[s]})
        else:
            if not (base / s).is_dir() or not any(p.is_dir() for p in (base / s).iterdir()):
                raise DataError(f"{base / s}: want one folder per wnid (ImageFolder layout)")
            stray = sorted({p.name for p in (base / s).iterdir() if p.is_dir()} - set(classes))
            if stray:
                raise DataError(f"{base / s}: classes missing from train: {' '.join(stray[:10])}")
            items[s], empty[s] = _scan(base / s, classes, None)
        items[s], skipped[s] = _vet(items[s], root, d.skip_corrupt, s)
        if s != "val" or cls_loc is None:  # an ImageFolder class left without images
            empty[s] = sorted(set(classes) - {classes[lb] for _, lb in items[s]})
        if empty[s] and not d.skip_corrupt:
            raise DataError(f"{base / s}: class folder(s) without usable images: {' '.join(empty[s][:10])}; "
                            "add images, or set data.skip_corrupt: true to keep their label slots empty")
    return _finish(cfg, raw, "kaggle-cls-loc" if cls_loc else "imagefolder", classes, items, empty,
                   inputs={"root": str(root)}, skipped={k: v for k, v in skipped.items() if v})


def _kaggle_val(sol: Path | None, val: Path, classes: list[str]) -> list[tuple[str, int]]:
    if sol is None:
        raise DataError(f"{val}: Kaggle layout, but no LOC_val_solution.csv beside ILSVRC/ for the val labels")
    label = {w: i for i, w in enumerate(classes)}
    items = []
    with open(sol, newline="") as f:
        for row in csv.DictReader(f):
            wnid = row["PredictionString"].split()[0]
            if wnid not in label:
                raise DataError(f"{sol}: {row['ImageId']}: wnid {wnid} is not a train class")
            path = val / f"{row['ImageId']}.JPEG"
            if not path.exists():
                raise DataError(f"{path}: listed in {sol.name} but missing")
            items.append((str(path), label[wnid]))
    return sorted(items, key=lambda it: (it[1], it[0]))
