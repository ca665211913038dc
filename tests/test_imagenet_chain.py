"""The imagenet tier's own Snakemake rules end to end on stand-ins built here: official-layout fake
ILSVRC2012 tarballs (their MD5s in params), a random sd-vae-architecture VAE and torch-fidelity's
Inception with random weights, both saved locally. acquire -> encode -> refstats -> train (a few
steps of a tiny DiT) -> sample (VAE decode) -> Inception FID -> a table with a finite value per row."""
import csv
import json
import math

import pytest
import yaml

from data_fakes import WNIDS, fake_ilsvrc, random_inception, tiny_vae
from meanflow import config
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
    params["tables"]["rows"] = {"c": ["ratio_0", {"row": "ratio_0-2nfe", "experiment": "ratio_0", "nfe": 2}]}
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
    assert [r["row"] for r in rows] == ["ratio_0", "ratio_0-2nfe"] and [r["NFE"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["our FID"])) and float(r["our FID"]) >= 0 for r in rows)
    run = chain / cfg.run_dir
    for k in (1, 2):
        m = json.loads((run / f"metrics_nfe{k}.json").read_text())
        assert m["metric"] == "fid" and m["count"] == 12 and m["sample_labels"] == "random"
    assert "Sample labels: random" in (chain / "results" / "imagenet" / "tables" / "table_c.md").read_text()
    plan = json.loads((run / "samples_nfe2" / "plan.json").read_text())
    assert plan["times"] == [1.0, 0.5, 0.0] and plan["vae"] is not None
