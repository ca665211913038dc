"""Full-size rehearsal of every network of the imagenet and cifar10 tiers on the CPU
(meanflow/rehearsal.py): two training steps at batch 2 with the configured jvp path (fp32, and
bf16 autocast against it), checkpoint, resume equal to the uninterrupted run, 1- and 2-NFE samples
through a full-size random sd-vae to 256x256, the FID stage's Inception on them; peak RSS at two
batch sizes against meanflow.costs' memory model. One process per network; prints one table.

    python bench/fullsize.py [--only MF-B/4 iMF-B/2 ...] [--work DIR] [--json FILE]

The XL/2 networks need about 14 GiB of memory at batch 2 (the second batch of the memory check is
sized to 80% of what is free) and 35 GB of disk (their checkpoints: 11 GB each); the work directory
is emptied as it goes. Each network runs in its own process (peak RSS is per
process) with glibc's mmap threshold fixed so freed tensors leave RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30


def one(tier: str, experiment: str, work: Path, out: Path, batch: int, big: int | None):
    import logging
    from meanflow import rehearsal
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = rehearsal.stand_ins(work / "stand-ins")
    res = rehearsal.rehearse(tier, experiment, s, work / "runs", batch=batch, big=big)
    out.write_text(json.dumps(res))


def table(results: list[dict]) -> str:
    err = lambda r, k: (r[k]["model"] - r[k]["peak"]) / r[k]["peak"]  # noqa: E731
    lines = ["| network | params (M) | checkpoint (GB) | s/step fp32 (bf16), batch 2 | peak RSS batch 2 (GiB): "
             "measured / model | peak RSS batch B: B, measured / model | model error | bf16 vs fp32: squared error rel, 1 - gradient cos "
             "| resume bitwise | sample stage s/img (1 and 2 NFE, decode) | FID stage s/img (2 per NFE: its fixed costs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, b, f = r["small"], r["big"], r["bf16"]
        lines.append(
            f"| {r['network']} ({r['jvp_api']}) | {r['params'] / 1e6:.1f} | {r['checkpoint_bytes'] / 1e9:.2f} | "
            f"{s['s_per_step']:.1f} ({f['s_per_step']:.1f}) | {s['peak'] / GIB:.2f} / {s['model'] / GIB:.2f} | "
            f"{b['batch']}: {b['peak'] / GIB:.2f} / {b['model'] / GIB:.2f} | {err(r, 'small'):+.1%}, {err(r, 'big'):+.1%} | "
            f"{f['loss_rel']:.1e}, {1 - f['grad_cos']:.1e} | {'yes' if all(r['resume_equal'].values()) else r['resume_equal']} | "
            f"{r['sample_s_per_image']:.1f} | {r['fid_s_per_image']:.2f} |")
    return "\n".join(lines)


def main():
    from meanflow.rehearsal import NETWORKS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="experiments (or network names) to run; default: every network")
    ap.add_argument("--batch", type=int, default=2, help="the rehearsal's training batch")
    ap.add_argument("--big", type=int, default=None, help="the second batch of the memory check (default: where activations outweigh gradients)")
    ap.add_argument("--work", default=None, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--one", nargs=3, metavar=("TIER", "EXPERIMENT", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a.one[0], a.one[1], Path(a.work), Path(a.one[2]), a.batch, a.big)
    from meanflow import config
    params = config.load_params()
    names = {}   # an experiment or its network's name -> (tier, experiment)
    for tier, exp in NETWORKS:
        names[exp] = names[config.resolve(params, tier, exp).model.name] = (tier, exp)
    unknown = [n for n in a.only or () if n not in names]
    if unknown:
        ap.error(f"--only: unknown network {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
    todo = [n for n in NETWORKS if not a.only or n in {names[k] for k in a.only}]
    tmp = tempfile.TemporaryDirectory(prefix="fullsize-") if a.work is None else None
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    results = []
    try:
        for tier, exp in todo:
            out = work / f"{tier}-{exp.replace('/', '-')}.json"
            cmd = [sys.executable, __file__, "--one", tier, exp, str(out), "--work", str(work), "--batch", str(a.batch)]
            if a.big:
                cmd += ["--big", str(a.big)]
            print(f"{tier}/{exp} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, env=env, check=True, cwd=work)   # cwd: DVCLive finds no DVC repository there
            results.append(json.loads(out.read_text()))
    finally:
        if tmp:
            tmp.cleanup()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
