"""2D checkerboard demo: MeanFlow vs Flow Matching at 1 and 2 NFE (sliced Wasserstein distance).

    python -m stages.toy --out demo/toy [--steps 1000]
Writes swd.json and samples.png under --out."""
import argparse
import json

from meanflow import toy
from stages import debug_flag, guard


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.toy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/toy", help="output directory")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default from meanflow.toy)")
    debug_flag(ap)
    args = ap.parse_args(argv)
    with guard(ap):
        print(json.dumps(toy.demo(args.out, steps=args.steps), indent=2))


if __name__ == "__main__":
    main()
