"""``python -m training --config FILE [--stage train|evaluate|all]``: see :mod:`training.job`."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    ap.add_argument("--config", required=True, help="YAML or JSON file with the TrainJob fields")
    ap.add_argument("--stage", choices=["train", "evaluate", "all"], default="all")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from training.job import TrainJob, run

    try:
        job = TrainJob.from_file(args.config)
    except (OSError, TypeError, ValueError) as e:
        print(f"bad training config {args.config}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(run(job, args.stage), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
