"""Faults and bad inputs across the stage CLIs, table-driven: each case damages a copy of one small
prepared project (digits data, a trained tiny run, its samples, two result sets), runs the stage as
a subprocess and asserts the exit code, that stderr has no traceback and names the culprit, and
that nothing outside the stage's output directory changed (and no temp file is left anywhere).
Recovered faults (a damaged checkpoint, a deleted or damaged shard) also assert the outputs are
bitwise those of the undamaged project."""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from data_fakes import data_cfg, jpeg_bytes
from meanflow import config
from meanflow.training.checkpoint import checkpoints
from meanflow.training.loop import EXIT_INTERRUPTED
from meanflow.data import acquire

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "MEANFLOW_DEBUG": "", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
STEPS, CKPT = 12, 4


def params(w: Path, **over) -> dict:
    """Paths relative to the project (the stages run in it), so a copy has the same run ids."""
    tier = {"data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                     "vae": None, "flip": False, "root": "data", "device": "cpu", "workers": 0},
            "model": {"name": "custom", "depth": 1, "hidden": 32, "heads": 2, "patch": 4},
            "train": {"steps": STEPS, "batch": 16, "lr": 0.001, "ema": 0.9, "ckpt_every": CKPT, "keep_ckpts": 3,
                      "keep_ckpts_done": 3, "log_every": 4, "device": "cpu", "runs_root": "runs"},
            "sample": {"n": 20, "shard_size": 7, "batch": 10, "nfe": [1], "grid": 0, "device": "cpu"}}
    return {"tier": "t", "tiers": {"t": config.deep_merge(tier, over)}}


def write(w: Path, **over) -> Path:
    (w / "params.yaml").write_text(yaml.safe_dump(params(w, **over)))
    return w / "params.yaml"


def cli(mod: str, *args, cwd=ROOT, timeout=300, env=None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{mod}", *map(str, args)], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """data/ (digits acquired and encoded), runs/ (a trained run with 3 checkpoints and its samples)."""
    w = tmp_path_factory.mktemp("project")
    p = write(w)
    acquire(data_cfg(w / "data", dataset="digits", resolution=8, channels=1, input_size=8, num_classes=10,
                     vae=None, splits=["train"]))
    for mod in ("encode", "train", "sample"):
        r = cli(mod, "--params", p, *(["--no-progress"] if mod != "encode" else []), cwd=w)
        assert r.returncode == 0, r.stderr
    run = config.load(p).run_dir   # relative: runs/t/<run id>
    assert [s for s, _ in checkpoints(w / run)] == [4, 8, 12]
    # the digits feature net and its reference statistics, and the run's metric (the fid cases)
    for mod in ("features", "fid"):
        r = cli(mod, "--params", write(w, sample=DIGITS), *(["--no-progress"] if mod == "fid" else []), cwd=w)
        assert r.returncode == 0, r.stderr
    write(w)
    # every output readable by the group as the other files are (safetensors creates 0600)
    umask = os.umask(0)
    os.umask(umask)
    weights = [w / run / "ema.safetensors", w / "data/t/feature_net.safetensors",
               *(w / run / "checkpoints").glob("step-*/*")]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in weights} == {f.name: oct(0o666 & ~umask) for f in weights}
    return w, run


def result_set(root: Path, fid="6.10") -> Path:
    t = root / "results" / "t" / "tables"
    t.mkdir(parents=True)
    (t / "table_2.csv").write_text("row,setting,paper FID,our FID,NFE,paper epochs,our steps,run\n"
                                   f"MF-B/4,x,3.43,{fid},1,,10,dit-abc\n")
    run = root / "runs" / "t" / "dit-abc"
    run.mkdir(parents=True)
    (run / "train_manifest.json").write_text(json.dumps({"tier": "t", "params_hash": "abc", "run_id": "dit-abc"}))
    (root / "params.yaml").write_text("tier: t\n")
    return root


DIGITS = {"features": "digits"}


def snapshot(w: Path) -> dict:
    return {str(p.relative_to(w)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(w.rglob("*")) if p.is_file() or p.is_symlink() and p.exists()}


# --------------------------------------------------------------------------- the faults
# Each: setup(w, run) -> (argv, output dir relative to w or None); expected exit code; what stderr
# must name. `run` is the trained run's directory relative to w.
def ckpt(w, run, step=12):
    return w / run / "checkpoints" / f"step-{step:08d}"


def redo_training(w, run):
    """Make the finished run resumable again: drop its final outputs, keep its checkpoints."""
    for f in ("ema.safetensors", "train_manifest.json"):
        (w / run / f).unlink()
    shutil.rmtree(w / run / "samples_nfe1")


def truncate(f: Path, keep=0.5):
    f.write_bytes(f.read_bytes()[:int(f.stat().st_size * keep)])


def p_(w, **over):
    return write(w, **over)


def damaged_ckpt(damage):
    def setup(w, run):
        redo_training(w, run)
        damage(w, run)
        return ["train", "--params", p_(w), "--no-progress"], run
    return setup


def sample_case(damage, **over):
    def setup(w, run):
        damage(w, run)
        return ["sample", "--params", p_(w, **over), "--no-progress"], run / "samples_nfe1"
    return setup


def with_params(mod, **over):
    return lambda w, run: ([mod, "--params", p_(w, **over)], None)


def params_text(text: bytes, mod="train"):
    def setup(w, run):
        (w / "bad.yaml").write_bytes(text)
        return [mod, "--params", w / "bad.yaml"], None
    return setup


def folder(make, **over):
    """Folder acquisition of an ImageFolder tree src/ (2 classes x 2 images) after make(src)."""
    def setup(w, run):
        src = w / "src"
        for c, wn in enumerate(("n01", "n02")):
            (src / "train" / wn).mkdir(parents=True)
            for k in range(2):
                (src / "train" / wn / f"{wn}_{k}.JPEG").write_bytes(jpeg_bytes(12, 12, c * 10 + k))
        make(w, src)
        over_data = {"dataset": "imagenet", "source": "folder", "source_path": str(src), "resolution": 8,
                     "splits": ["train"], "root": "imagenet", **over}
        return ["acquire", "--params", p_(w, data=over_data)], Path("imagenet")
    return setup


def compare_case(damage_a, out="r.md"):
    def setup(w, run):
        a, b = result_set(w / "a"), result_set(w / "b")
        damage_a(w, a)
        return ["compare", a, b, "--out", w / out], None
    return setup


def csv_(text: bytes):
    return lambda w, a: (a / "results/t/tables/table_2.csv").write_bytes(text)


def fid_case(damage, **over):
    """The fid stage of the trained run (digits features) after damage(w, run), its metric deleted."""
    def setup(w, run):
        (w / run / "metrics_nfe1.json").unlink()
        damage(w, run)
        return ["fid", "--params", p_(w, **{"sample": DIGITS, **over}), "--no-progress"], None
    return setup


def other_weights(w, run):
    """The run's EMA file replaced by other weights (another training's, say) in the same layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(w / run / "ema.safetensors", "pt") as f:
        t, meta = {k: f.get_tensor(k) + 0.01 for k in f.keys()}, f.metadata()
    save_file(t, str(w / run / "ema.safetensors"), meta)


def digits_refstats(mu=None, sigma=None, raw: bytes | None = None):
    """Replace the digits reference statistics, updating the sha256 their manifest records (so
    only the content check can catch it)."""
    def damage(w, run):
        import numpy as np
        f = w / "data/t/refstats_digits.npz"
        with np.load(f) as z:
            m, s = z["mu"], z["sigma"]
        if raw is not None:
            f.write_bytes(raw)
        else:
            np.savez(f, mu=mu(m) if mu else m, sigma=sigma(s) if sigma else s)
        meta = json.loads(f.with_suffix(".json").read_text())
        meta["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
        f.with_suffix(".json").write_text(json.dumps(meta))
    return damage


def nan_at_0(a):
    a = a.copy()
    a.flat[0] = float("nan")
    return a


def adm_nan(w, run):
    import numpy as np
    np.savez(w / "adm.npz", mu=np.zeros(4), sigma=nan_at_0(np.eye(4)))
    return ["refstats", "--params", p_(w, data={"refstats_source": "adm", "refstats_npz": str(w / "adm.npz")})], None


def alias_bomb(levels: int = 10) -> str:
    lines = ["tier: t", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines + ["tiers: {t: {}}"]) + "\n"


def tier_named(name: str, mod: str = "acquire"):
    def setup(w, run):
        (w / "esc.yaml").write_text(yaml.safe_dump({"tier": name, "tiers": {name: params(w)["tiers"]["t"]}}))
        return [mod, "--params", w / "esc.yaml"], None
    return setup


class Holder:
    """Another process's lock on the run directory: this test process holds it (POSIX locks are per
    process, so the stage's subprocess sees it held)."""

    def __init__(self, run_dir):
        from meanflow.training.lock import RunLock
        self.lock = RunLock(run_dir).acquire()

    def release(self):
        self.lock.release()


def locked(w, run):
    redo_training(w, run)
    return ["train", "--params", p_(w), "--no-progress"], None, {"hold": Holder(w / run)}


def killed_leftovers(w, run):
    """What a SIGKILL during the final EMA write and during a checkpoint write leaves."""
    redo_training(w, run)
    (w / run / f".ema.safetensors.{99999}.tmp").write_bytes(b"partial")
    (w / run / "checkpoints/.tmp-step-00000012-99999").mkdir()
    (w / run / "checkpoints/.tmp-step-00000012-99999/model.safetensors").write_bytes(b"partial")
    return ["train", "--params", p_(w), "--no-progress"], run


def write_limit(w: Path, run: Path, name: str) -> int:
    """A file-size limit (RLIMIT_FSIZE) one byte under that checkpoint file's size: writing it
    fails as on a full disk, and the smaller files written before it still fit."""
    return (w / run / "checkpoints/step-00000012" / name).stat().st_size - 1


def ckpt_write_fails(w, run):
    redo_training(w, run)
    limit = write_limit(w, run, "state.pt")
    assert limit > (w / run / "checkpoints/step-00000012/model.safetensors").stat().st_size
    shutil.rmtree(w / run / "checkpoints")   # trains from step 0, so writes the checkpoint of step 4
    return ["train", "--params", p_(w), "--no-progress"], run, {"fsize": limit}


def ema_write_fails(w, run):
    redo_training(w, run)   # resumes at the last step: only the final EMA and manifest are written
    return ["train", "--params", p_(w), "--no-progress"], run, {"fsize": write_limit(w, run, "ema.safetensors")}


class Payload:
    """A pickle that would run a shell command when unpickled (touch PWNED)."""

    def __reduce__(self):
        return os.system, ("touch PWNED",)


def pickled_weights(w, run):
    torch.save({"w": torch.zeros(2), "x": Payload()}, w / "evil.pth")
    return ["refstats", "--params", p_(w, data={"inception_weights": str(w / "evil.pth")})], None


HEADER = b"row,setting,paper FID,our FID,NFE,paper epochs,our steps,run\n"
EMPTY = lambda w, run: None  # noqa: E731

CASES = {
    # params.yaml (any stage; config time, before any job)
    "lr_nan": (with_params("train", train={"lr": float("nan")}), 1, "train.lr = nan: not a finite number"),
    "ema_inf": (with_params("sample", train={"ema": float("inf")}), 1, "train.ema = inf: not a finite number"),
    "t_end_-inf": (with_params("fid", meanflow={"t_end": float("-inf")}), 1, "meanflow.t_end = -inf"),
    "params_not_utf8": (params_text(b"tier: t\n# \xff\xfe caf\xe9\n"), 1, "bad.yaml: not UTF-8"),
    "params_is_dir": (lambda w, run: (["train", "--params", w / "data"], None), 1, "is a directory"),
    "params_missing": (lambda w, run: (["encode", "--params", w / "nope.yaml"], None), 1, "nope.yaml: no such"),
    "params_bad_yaml": (params_text(b"tier: [t\n"), 1, "bad.yaml: not valid YAML"),
    "params_not_mapping": (params_text(b"- 1\n- 2\n", "acquire"), 1, "bad.yaml: invalid parameters"),
    "hidden_vs_heads": (with_params("train", model={"hidden": 30, "heads": 4}), 1,
                        "model.hidden = 30 is not divisible by model.heads = 4"),
    "input_vs_patch": (with_params("sample", model={"patch": 3}), 1, "data.input_size = 8 is not divisible by the patch size 3"),
    "named_model_patch": (with_params("train", model={"name": "MF-B/4"}, data={"input_size": 6, "resolution": 6}), 1,
                          "patch size 4 (model.name = 'MF-B/4')"),
    "resolution_vs_vae": (with_params("encode", data={"vae": "stabilityai/sd-vae-ft-ema", "resolution": 20, "channels": 4}),
                          1, "data.resolution = 20 is not data.input_size = 8 times a VAE downsampling factor"),
    "schema_negative_steps": (with_params("train", train={"steps": -1}), 1, "train.steps"),
    "unknown_tier": (lambda w, run: (["refstats", "--params", p_(w), "--tier", "zz"], None), 1, "tier 'zz' not in tiers"),
    # checkpoints (recovered: resume from the newest intact one, bitwise as uninterrupted)
    "ckpt_model_truncated": (damaged_ckpt(lambda w, run: truncate(ckpt(w, run) / "model.safetensors")), 0,
                             "step-00000012 is damaged: model.safetensors"),
    "ckpt_ema_empty": (damaged_ckpt(lambda w, run: (ckpt(w, run) / "ema.safetensors").write_bytes(b"")), 0,
                       "step-00000012 is damaged: ema.safetensors"),
    "ckpt_state_truncated": (damaged_ckpt(lambda w, run: truncate(ckpt(w, run) / "state.pt", 0.3)), 0,
                             "step-00000012 is damaged: state.pt"),
    "ckpt_state_foreign": (damaged_ckpt(lambda w, run: torch.save({"step": 3, "x": torch.zeros(2)}, ckpt(w, run) / "state.pt")),
                           0, "step-00000012 is damaged: state.pt"),
    "ckpt_two_damaged_no_hashes": (damaged_ckpt(lambda w, run: [((ckpt(w, run, s) / "hashes.json").unlink(),
                                                                  truncate(ckpt(w, run, s) / "state.pt"))
                                                                 for s in (8, 12)]), 0,
                                   "step-00000008 is damaged: does not load"),
    "ckpt_none_intact": (damaged_ckpt(lambda w, run: [truncate(ckpt(w, run, s) / "model.safetensors") for s in (4, 8, 12)]),
                         1, "no intact checkpoint to resume from"),
    # the sample stage: plan and shards checked on every call
    "ema_truncated_at_sampling": (sample_case(lambda w, run: (shutil.rmtree(w / run / "samples_nfe1"),
                                                              truncate(w / run / "ema.safetensors"))),
                                  1, "ema.safetensors: damaged weights file"),
    "shard_deleted_after_manifest": (sample_case(lambda w, run: (w / run / "samples_nfe1/shard-00001.npz").unlink()),
                                     0, "shard-00001.npz: missing or damaged"),
    "shard_corrupted_after_manifest": (sample_case(lambda w, run: truncate(w / run / "samples_nfe1/shard-00002.npz")),
                                       0, "shard-00002.npz: missing or damaged"),
    "sample_seed_changed": (sample_case(EMPTY, sample={"seed": 7}), 1, "(seed); delete"),
    "sample_n_changed": (sample_case(EMPTY, sample={"n": 30}), 1, "(n); delete"),
    "sample_plan_garbage": (sample_case(lambda w, run: (w / run / "samples_nfe1/plan.json").write_text("{oops")),
                            1, "plan.json: damaged"),
    "store_shard_deleted_after_manifest": (lambda w, run: ((w / "data/t/store/shard-00000.npy").unlink(),
                                                           (["encode", "--params", p_(w)], Path("data/t/store")))[1],
                                           0, "shard-00000.npy: missing or damaged"),
    # other stages' inputs (the generic guard: one line naming the file)
    "store_manifest_garbage": (lambda w, run: ((w / "data/t/store/manifest.json").write_bytes(b"\x00\xffnot json"),
                                               (["train", "--params", p_(w, train={"seed": 5})], None))[1],
                               1, "store/manifest.json"),
    "raw_index_not_utf8": (lambda w, run: ((w / "data/t/raw/index.json").write_bytes(b"{\"a\": \"\xff\"}"),
                                           (["refstats", "--params", p_(w, data={"fid_extractor": "inception-v3-compat",
                                                                                 "inception_weights": None})], None))[1],
                           1, "index.json"),
    "refstats_offline_no_inception": (lambda w, run: (["refstats", "--params",
                                                       p_(w, data={"fid_extractor": "inception-v3-compat"})], None),
                                      1, "set data.inception_weights"),
    "inception_weights_missing": (lambda w, run: (["refstats", "--params", p_(w, data={"inception_weights": str(w / "no.pth")})],
                                                  None), 1, "no.pth"),
    # folder acquisition
    "folder_symlink_outside": (folder(lambda w, src: (src / "train/n01/x.JPEG").symlink_to(w / "params.yaml")), 1,
                               "x.JPEG: a link to"),
    "folder_zero_byte": (folder(lambda w, src: (src / "train/n02/z.JPEG").write_bytes(b"")), 1, "z.JPEG: zero bytes"),
    "folder_undecodable": (folder(lambda w, src: (src / "train/n02/u.JPEG").write_bytes(b"\x00garbage" * 40)), 1,
                           "u.JPEG: not a readable image"),
    "folder_empty_class": (folder(lambda w, src: (src / "train/n03").mkdir()), 1, "without usable images: n03"),
    "folder_tab_in_name": (folder(lambda w, src: (src / "train/n01/a\tb.JPEG").write_bytes(jpeg_bytes(12, 12, 3))),
                           1, "tabs or newlines"),
    "folder_skip_lists": (folder(lambda w, src: (src / "train/n02/z.JPEG").write_bytes(b""), skip_corrupt=True), 0, "z.JPEG"),
    # compare and export
    "compare_csv_not_utf8": (compare_case(csv_(HEADER + b"MF-B/4,x\xff,3.43,6.1,1,,10,r\n")), 2, "table_2.csv is not UTF-8"),
    "compare_csv_missing_column": (compare_case(csv_(b"row,NFE\nMF-B/4,1\n")), 2, "lacks the column(s) 'our FID'"),
    "compare_csv_short_row": (compare_case(csv_(HEADER + b"MF-B/4,x,3.43\n")), 2, "table_2.csv line 2"),
    "compare_csv_fid_not_number": (compare_case(csv_(HEADER + b"MF-B/4,x,3.43,six,1,,10,r\n")), 2, "our FID = 'six'"),
    "compare_manifest_not_utf8": (compare_case(lambda w, a: (a / "runs/t/dit-abc/train_manifest.json").write_bytes(b"\xff{}")),
                                  2, "train_manifest.json is not UTF-8"),
    "compare_manifest_bad_json": (compare_case(lambda w, a: (a / "runs/t/dit-abc/train_manifest.json").write_text("{")),
                                  2, "train_manifest.json is not readable"),
    "compare_params_not_utf8": (compare_case(lambda w, a: (a / "params.yaml").write_bytes(b"tier: \xff\n")), 2,
                                "params.yaml is not UTF-8"),
    "compare_out_is_dir": (compare_case(EMPTY, out="a"), 2, "is a directory"),
    "compare_bundle_garbage": (lambda w, run: ((w / "x.tar.gz").write_bytes(b"not a tar"),
                                               (["compare", w / "x.tar.gz", result_set(w / "b"), "--out", w / "r.md"],
                                                None))[1], 2, "x.tar.gz: not a readable bundle"),
    "export_out_is_dir": (lambda w, run: (["export", "--tier", "t", "--root", result_set(w / "a"), "--out", w / "a"], None),
                          2, "is a directory"),
    # a metric labelled with its run: the samples must be of this run id and of its weights
    "fid_samples_of_other_run": (fid_case(EMPTY, train={"lr": 0.002}), 1, "samples of run"),
    "fid_samples_of_other_weights": (fid_case(other_weights), 1, "samples of weights sha256"),
    # never a NaN as a result: reference statistics checked (shape, finite) wherever they are read
    "refstats_mu_nan": (fid_case(digits_refstats(mu=nan_at_0)), 1, "refstats_digits.npz: mu has 1 non-finite value"),
    "refstats_sigma_wrong_shape": (fid_case(digits_refstats(sigma=lambda s: s[:3, :3])), 1,
                                   "sigma (3, 3) are not the statistics of one feature space"),
    "refstats_npz_garbage": (fid_case(digits_refstats(raw=b"PK\x03\x04 not a zip")), 1,
                             "refstats_digits.npz: not readable reference statistics"),
    "adm_import_sigma_nan": (adm_nan, 1, "adm.npz: sigma has 1 non-finite value"),
    # hostile files: a YAML alias bomb is refused at once; a tier name cannot leave the roots
    "params_alias_bomb": (params_text(alias_bomb().encode()), 1, "bad.yaml: refused: its aliases expand to 1.23e+10 nodes"),
    "compare_params_alias_bomb": (compare_case(lambda w, a: (a / "params.yaml").write_text(alias_bomb())), 2,
                                  "params.yaml is not readable (YAMLRefused: refused: its aliases expand"),
    "tier_name_traversal": (tier_named("../../esc"), 1, "'../../esc' does not match"),
    "tier_name_traversal_train": (tier_named("../../esc", "train"), 1, "'../../esc' does not match"),
    "tier_cli_traversal": (lambda w, run: (["encode", "--params", p_(w), "--tier", "../../esc"], None), 1,
                           "tier '../../esc' not in tiers"),
    "steps_1e30": (with_params("train", train={"steps": 1e30}), 1, "train.steps: 1e+30 is not of type 'integer'"),
    # one process per run directory; a bad launch environment fails before the work
    "run_locked": (locked, 1, "in use by PID"),
    "local_world_size_abc": (lambda w, run: (redo_training(w, run), ["train", "--params", p_(w), "--no-progress"], None,
                                             {"env": {"LOCAL_WORLD_SIZE": "abc"}})[1:], 1,
                             "environment: LOCAL_WORLD_SIZE = 'abc' is not an integer"),
    "rank_beyond_world": (lambda w, run: (["sample", "--params", p_(w)], None, {"env": {"RANK": "2", "WORLD_SIZE": "2"}}),
                          1, "RANK = 2 does not fit WORLD_SIZE = 2"),
    # temp files: a killed run's are removed by the next (under its lock); a failed write leaves none
    "killed_write_leftovers": (killed_leftovers, 0, ".ema.safetensors.99999.tmp"),
    "ckpt_write_fails": (ckpt_write_fails, 1, "step-00000004/state.pt: OSError: write failed"),
    "ema_write_fails": (ema_write_fails, 1, "ema.safetensors: OSError: write failed"),
    # a pickled payload in a weights file: refused in one line, never run, weights_only=False never suggested
    "weights_pickle_refused": (pickled_weights, 1,
                               "refused by weights-only loading: it pickles posix.system, not only tensors"),
    "export_params_not_utf8": (lambda w, run: (((result_set(w / "a") / "params.yaml").write_bytes(b"\xfe\xff")),
                                               ["export", "--tier", "t", "--root", w / "a", "--out", w / "o.tgz"], None)[1:],
                               2, "params.yaml: not readable YAML"),
}


def fresh(project, w: Path) -> Path:
    src, run = project
    shutil.copytree(src, w, dirs_exist_ok=True, symlinks=True)
    return run


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, project, tmp_path):
    setup, code, culprit = CASES[name]
    w = tmp_path / "w"
    run = fresh(project, w)
    argv, out, *extra = setup(w, run)
    extra = extra[0] if extra else {}
    out = w / out if out is not None else None
    before = snapshot(w)
    limit = extra.get("fsize")
    try:
        r = cli(*argv, cwd=w, env={"TORCH_HOME": str(tmp_path / "torch-home"), **extra.get("env", {})},  # no Inception cached
                preexec=(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None)
        after = snapshot(w)
    finally:
        if "hold" in extra:
            extra["hold"].release()
    print(f"{name}: exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:400]}")   # -rP: the closing note's table
    assert r.returncode == code, f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    assert culprit in r.stderr, f"{name}: {culprit!r} not in\n{r.stderr[-3000:]}"
    assert "weights_only=False" not in r.stderr   # never advised: it runs the file's pickled code
    if code:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, r.stderr
        tail = r.stderr.rstrip().splitlines()
        tail = tail[tail.index(errors[0]) + 1:]   # only the indented list of a schema error may follow
        assert all(ln.startswith("  ") for ln in tail), f"{name}: the error is not one last line\n{r.stderr}"
    outside = lambda snap: {k: v for k, v in snap.items()  # noqa: E731
                            if out is None or not (w / k).is_relative_to(out)}
    assert outside(after) == outside(before), f"{name}: files outside {out} changed"
    assert not [k for k in after if k.endswith(".tmp") or "/.tmp-" in k], f"{name}: temp files left"
    ref = project[0]
    if name.startswith("ckpt_") and code == 0:   # resumed from an older intact checkpoint: bitwise equal
        for f in ("ema.safetensors", "checkpoints/step-00000012/model.safetensors"):
            assert (w / run / f).read_bytes() == (ref / run / f).read_bytes(), f
        assert list((w / run / "checkpoints").glob("*.damaged"))
    if name == "killed_write_leftovers":   # the run finished as if never killed
        assert (w / run / "ema.safetensors").read_bytes() == (ref / run / "ema.safetensors").read_bytes()
    if name.startswith(("shard_", "store_shard")):                 # the shard remade, identically
        d = "data/t/store" if name.startswith("store") else run / "samples_nfe1"
        for f in (ref / d).glob("shard-*.np*"):
            assert (w / d / f.name).read_bytes() == f.read_bytes(), f.name


def test_enough_cases():
    assert len(CASES) >= 30


def training(project, tmp_path, steps: int):
    """The project's run trained anew to `steps` by a background `stages.train`, returned once its
    first checkpoint exists: (project copy, run directory, params file, the process)."""
    w = tmp_path / "w"
    run = fresh(project, w)
    redo_training(w, run)
    shutil.rmtree(w / run / "checkpoints")
    params = p_(w, train={"steps": steps})
    rd = w / config.load(params).run_dir
    p = subprocess.Popen([sys.executable, "-m", "stages.train", "--params", params, "--no-progress"],
                         cwd=w, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not checkpoints(rd) and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.01)
    return w, rd, params, p


def test_sigint_checkpoints_and_exits_130(project, tmp_path):
    _, rd, _, p = training(project, tmp_path, 400)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED == 130, err
    assert "Traceback" not in err and "interrupted: checkpoint of step" in err
    step = int(err.split("interrupted: checkpoint of step ")[1].split()[0])
    assert checkpoints(rd)[-1][0] == step < 400 and not (rd / "ema.safetensors").exists()


def test_second_trainer_of_a_run_is_refused_while_the_first_goes_on(project, tmp_path):
    """Two `stages.train` of one run at once: the second exits 1 naming the first's PID and host and
    touches nothing; the first goes on, its metrics log has each step once, in order, and no temp
    directory is left."""
    import platform
    w, rd, params, first = training(project, tmp_path, 100_000)   # still training when the second has started
    mine = lambda k: "dvclive" in k or "checkpoints" in k or k.endswith(".lock")  # noqa: E731 - the first run's
    before = {k: v for k, v in snapshot(w).items() if not mine(k)}
    second = cli("train", "--params", params, "--no-progress", cwd=w)
    assert first.poll() is None, "the first run ended before the second started"
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"in use by PID {first.pid} on {platform.node()}" in second.stderr, second.stderr
    assert {k: v for k, v in snapshot(w).items() if not mine(k)} == before
    assert first.returncode == EXIT_INTERRUPTED, err
    steps = [int(ln.split("\t")[0]) for ln in (rd / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps, steps
    assert not list(rd.rglob(".tmp-*")) and not (rd / ".lock").exists()


@pytest.mark.parametrize("delay", [0.15, 0.4, 1.0])
def test_ctrl_c_while_a_stage_imports_is_one_line(delay, tmp_path):
    """Ctrl-C in a stage's first second (it is importing torch, jsonschema, ...): exit 130 and one
    line, no traceback through the import machinery."""
    p = subprocess.Popen([sys.executable, "-m", "stages.train", "--params", write(tmp_path)], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err


def test_run_id_hashes_what_shapes_the_weights():
    """The same configuration under two data roots (or two clusters) is one run; a number in either
    spelling of its type is one run; site keys hashed at their default keep the ids named before."""
    base = params(Path("."))["tiers"]["t"]
    cfg = config.build(base, "t")
    moved = config.build(config.deep_merge(base, {"data": {"root": "/b/data", "source_path": "/mnt/x",
                                                           "inception_weights": "/w/pt_inception.pth"}}), "t")
    assert moved.run_id == cfg.run_id and moved.params_hash != cfg.params_hash   # params hash: everything, paths too
    assert moved.previous_run_id != moved.run_id and cfg.previous_run_id == cfg.run_id
    spelled = config.build(config.deep_merge(base, {"train": {"steps": float(STEPS), "lr": 1}, "sample": {"nfe": [1.0]}}), "t")
    assert spelled.train.steps == STEPS and type(spelled.train.steps) is int and spelled.sample.nfe == (1,)
    assert spelled.run_id == config.build(config.deep_merge(base, {"train": {"lr": 1.0}}), "t").run_id != cfg.run_id
    for bad in (1e30, 2.5, True):
        with pytest.raises(config.ConfigError, match="train.steps"):
            config.build(config.deep_merge(base, {"train": {"steps": bad}}), "t")
    with pytest.raises(config.ConfigError, match="tier '../x'"):
        config.build(base, "../x")


def test_threads_come_from_params_whatever_the_launcher_set(project, tmp_path):
    """A stage's torch threads are its section's `threads` key, set by the stage itself: the same
    under Snakemake (which exports OMP_NUM_THREADS = the job's threads), DVC (which exports nothing)
    and by hand; recorded in the manifests."""
    w = tmp_path / "w"
    fresh(project, w)
    env = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for threads, outside in ((1, {"OMP_NUM_THREADS": "2"}), (2, {})):
        params = p_(w, train={"threads": threads}, sample={"threads": threads})
        for mod in ("train", "sample"):
            r = subprocess.run([sys.executable, "-m", f"stages.{mod}", "--params", params, "--steps", str(13 + threads),
                                "--no-progress"], cwd=w, env={**env, **outside}, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
        rd = w / config.load(params).run_dir.parent / config.build(
            config.deep_merge(params_of(params), {"train": {"steps": 13 + threads}}), "t").run_id
        assert json.loads((rd / "train_manifest.json").read_text())["env"]["threads"] == threads
        shards = json.loads((rd / "samples_nfe1/manifest.json").read_text())["shards"]
        assert {s["threads"] for s in shards} == {threads}


def params_of(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())["tiers"]["t"]
