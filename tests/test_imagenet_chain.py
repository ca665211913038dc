"""The imagenet tier's own Snakemake rules end to end on stand-ins built here: official-layout fake
ILSVRC2012 tarballs (their MD5s in params), a random sd-vae-architecture VAE and torch-fidelity's
Inception with random weights, both saved locally. acquire -> encode -> refstats -> train (a few
steps of a tiny DiT) -> sample (VAE decode) -> Inception FID -> a table with a finite value per row.
Three FID protocols side by side in one table: the tier's (random labels, statistics computed from
the training set: refstats.npz), iMF-style rows scored against an "ADM" npz (refstats-adm.npz, made
by the refstats_other rule) and against a user npz (sample.reference_npz)."""
import csv
import json
import math

import numpy as np

import pytest
import yaml

from data_fakes import WNIDS, fake_ilsvrc, tiny_vae
from meanflow import config
from meanflow.rehearsal import random_inception
from project_copy import copy_repo, smk


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet_chain")
    md5s = fake_ilsvrc(tmp / "src", per_class=4, val_per_class=1)
    vae, incep = tiny_vae(tmp / "vae"), random_inception(tmp / "inception.pth")
    (tmp / "repo").mkdir()
    repo = copy_repo(tmp / "repo")
    params = config.load_params()
    params["tiers"]["imagenet"] = config.deep_merge(params["tiers"]["imagenet"], {  # the tier's own keys stay
        "data": {"dataset": "imagenet", "resolution": 64, "channels": 4, "input_size": 8, "num_classes": len(WNIDS),
                 "source": "tars", "source_path": str(tmp / "src"), "md5": md5s, "vae": str(vae),
                 "refstats_source": "compute", "inception_weights": str(incep), "workers": 0, "device": "cpu",
                 "shard_size": 8, "encode_batch": 4, "refstats_batch": 8},
        "model": {"name": "custom", "depth": 1, "hidden": 32, "heads": 2, "patch": 2},
        "train": {"steps": 3, "batch": 4, "device": "cpu", "ckpt_every": 3, "log_every": 1},
        "sample": {"n": 12, "shard_size": 6, "batch": 6, "grid": 4, "device": "cpu", "fid_batch": 6}})
    # the same run scored under two more protocols (its training is copied, meanflow.reuse)
    rng = np.random.default_rng(0)
    for name, mu in (("adm.npz", rng.normal(size=2048)), ("user.npz", rng.normal(size=2048) * 2)):
        np.savez(tmp / name, mu=mu, sigma=np.eye(2048))
    params["tiers"]["imagenet"]["data"]["refstats_npz"] = str(tmp / "adm.npz")
    params["experiments"]["ratio_0_adm"] = {"meanflow": {"ratio": 0.0}, "sample": {"labels": "balanced", "reference": "adm"}}
    params["experiments"]["ratio_0_user"] = {"meanflow": {"ratio": 0.0},
                                             "sample": {"labels": "balanced", "reference": "npz", "reference_npz": str(tmp / "user.npz")}}
    params["tables"]["rows"] = {"c": ["ratio_0", {"row": "ratio_0-2nfe", "experiment": "ratio_0", "nfe": 2},
                                     "ratio_0_adm", "ratio_0_user"]}
    params["tables"]["tiers"] = {"imagenet": ["c"]}
    (repo / "ci_params.yaml").write_text(yaml.safe_dump(params))
    smk(repo, "--cores", "2", "--config", "tier=imagenet", "params=ci_params.yaml")
    return repo


@pytest.mark.slow
def test_chain_builds_a_table_with_a_finite_fid_per_row(chain):
    cfg = config.resolve(yaml.safe_load((chain / "ci_params.yaml").read_text()), "imagenet", "ratio_0")
    assert cfg.data.flip is False and cfg.sample.labels == "random"  # the tier's defaults
    with open(chain / "results" / "imagenet" / "tables" / "table_c.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["ratio_0", "ratio_0-2nfe", "ratio_0_adm", "ratio_0_user"]
    assert [r["NFE"] for r in rows] == ["1", "2", "1", "1"]
    assert all(math.isfinite(float(r["our FID"])) and float(r["our FID"]) >= 0 for r in rows)
    run = chain / cfg.run_dir
    for k in (1, 2):
        m = json.loads((run / f"metrics_nfe{k}.json").read_text())
        assert m["metric"] == "fid" and m["count"] == 12 and m["sample_labels"] == "random"
    assert m["protocol"]["name"] == "labels random, reference compute"
    plan = json.loads((run / "samples_nfe2" / "plan.json").read_text())
    assert plan["times"] == [1.0, 0.5, 0.0] and plan["vae"] is not None


@pytest.mark.slow
def test_rows_keep_their_fid_protocol(chain):
    """Each row's labels and reference statistics reach its metrics file, the CSV's protocol column
    and the table's note; the same samples' features give a different FID against each reference."""
    params = yaml.safe_load((chain / "ci_params.yaml").read_text())
    with open(chain / "results" / "imagenet" / "tables" / "table_c.csv") as f:
        proto = {r["row"]: r["protocol"] for r in csv.DictReader(f)}
    user = chain.parent / "user.npz"
    from meanflow import manifest
    want = {"ratio_0": "labels random, reference compute", "ratio_0_adm": "labels balanced, reference adm",
            "ratio_0_user": f"labels balanced, reference npz {manifest.file_hash(user)[:12]}"}
    assert {k: proto[k] for k in want} == want
    fids = {}
    for row in ("ratio_0_adm", "ratio_0_user"):
        cfg = config.resolve(params, "imagenet", row)
        m = json.loads((chain / cfg.run_dir / "metrics_nfe1.json").read_text())
        assert m["sample_labels"] == "balanced" and m["protocol"]["name"] == want[row]
        ref = chain / "data" / "imagenet" / "refstats-adm.npz" if row == "ratio_0_adm" else user
        assert m["reference"]["path"].endswith(ref.name) and m["reference"]["sha256"] == manifest.file_hash(ref)
        labels = np.concatenate([np.load(p)["arr_1"] for p in sorted((chain / cfg.run_dir / "samples_nfe1").glob("shard-*.npz"))])
        assert np.bincount(labels).tolist() == [3, 3, 3, 3]   # balanced: 12 samples, 4 classes
        fids[row] = m["value"]
    assert fids["ratio_0_adm"] != fids["ratio_0_user"]
    # the ADM statistics were imported by the refstats_other rule, beside the tier's own
    adm = np.load(chain / "data" / "imagenet" / "refstats-adm.npz")
    assert np.array_equal(adm["mu"], np.load(chain.parent / "adm.npz")["mu"])
    assert json.loads((chain / "data" / "imagenet" / "refstats-adm.json").read_text())["source"] == "adm"
    note = (chain / "results" / "imagenet" / "tables" / "table_c.md").read_text()
    assert "FID protocol: labels balanced, reference adm; labels balanced, reference npz" in note
    assert "labels random, reference compute (sample.labels, sample.reference) - rows scored differently are not comparable." in note
