"""A DVC experiment that changes the set of runs (tables rows, train.replicates, a new experiment),
so dvc.yaml itself (plain `dvc exp run -S` suffices for any other value: docs/versioning.md):
    python workflow/scripts/exp.py -S 'tiers.tiny.train.replicates=5' [-S ...] [--queue] [-n NAME] [--tier tiny]
applies the -S overrides to params.yaml with DVC's own code (dvc.utils.hydra.apply_overrides, the
path `dvc exp run -S` takes), regenerates dvc.yaml (the stages of the new set of runs), then runs `dvc exp run [--queue] tables-<tier>`, which records both files with the
experiment. With --queue the workspace's params.yaml and dvc.yaml are put back afterwards (the queued
experiment keeps its own copies); run it with `dvc queue start`."""
import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python workflow/scripts/exp.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-S", "--set-param", action="append", default=[], dest="set", metavar="KEY=VALUE")
    p.add_argument("--queue", action="store_true")
    p.add_argument("-n", "--name")
    p.add_argument("--tier", help="default: params.yaml's tier")
    args = p.parse_args(argv)
    from dvc.utils.hydra import apply_overrides
    from meanflow import config
    params, dvcyaml = ROOT / "params.yaml", ROOT / "dvc.yaml"
    before = params.read_text(), dvcyaml.read_text()
    if args.set:
        apply_overrides(str(params), args.set)
    try:
        tier = args.tier or config.load_params(params)["tier"]
        listed = [k[len("tables-"):] for k in yaml.safe_load(before[1])["stages"] if k.startswith("tables-")]
        subprocess.run([sys.executable, str(ROOT / "workflow/scripts/dvcgen.py"), "--tiers", ",".join(listed or [tier])],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)   # the tiers dvc.yaml lists now
    except (config.ConfigError, subprocess.CalledProcessError) as e:
        params.write_text(before[0]), dvcyaml.write_text(before[1])
        p.exit(1, f"error: {e}\n")
    cmd = ["dvc", "exp", "run", *(["--queue"] if args.queue else []), *(["-n", args.name] if args.name else []),
           f"tables-{tier}"]
    try:
        rc = subprocess.run(cmd, cwd=ROOT).returncode
    finally:
        if args.queue:
            params.write_text(before[0]), dvcyaml.write_text(before[1])
    sys.exit(rc)


if __name__ == "__main__":
    main()
