"""Driver for `ray job submit`: run the carry-on pipeline from a YAML definition.

The config's `stages` say what runs; with `deploy` among them the job ends and its Serve
application keeps answering on the cluster.

    ray job submit --working-dir . -- python pipelines/carryon.py --config configs/demo.yaml \
        --set run_dir=$PWD/runs/demo --set 'stages=[embed,train,export,evaluate,deploy]'
    python pipelines/carryon.py --config configs/demo.yaml --set train.max_steps=50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a --working-dir upload has no install

from carryon_ray.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="pipeline YAML (default: configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    argv = ["run"] + ([args.config] if args.config else [])
    for item in args.overrides:
        argv += ["--set", item]
    sys.exit(main(argv))
