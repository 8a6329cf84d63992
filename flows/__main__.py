"""``python -m flows <stage>`` runs one pipeline stage as a Prefect flow run (the command of each DVC
stage); ``python -m flows flow <name>`` runs a grouped flow directly.

Without ``PREFECT_API_URL`` Prefect starts a temporary local server per process (prefect.toml raises its
start-up timeout for small machines); set ``PREFECT_API_URL`` to report to a running server instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from flows.tasks import STAGES

FLOWS = ("preprocess", "tune", "train", "pipeline")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=[*STAGES, "flow"], help="a stage, or 'flow' for a grouped flow")
    parser.add_argument("flow_name", nargs="?", choices=FLOWS, help="with 'flow': which flow")
    parser.add_argument("--workers", type=int, default=None, help="tune: parallel worker processes")
    parser.add_argument("--dataset", default=None, help="pipeline: data.dataset for this run")
    parser.add_argument("--profile", default=None, help="pipeline: profile for this run")
    parser.add_argument("--force", action="store_true", help="pipeline: re-run every stage")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if (args.target == "flow") != (args.flow_name is not None):
        parser.error("give a flow name after 'flow' (and only there)")
    # The domain package logs progress through `pipeline.*`; prefect.toml forwards it to the run log.
    logging.getLogger("pipeline").setLevel(logging.INFO)

    from flows import stages

    if args.target != "flow":
        result = stages.run_stage_cli(args.target, workers=args.workers)
    elif args.flow_name == "pipeline":
        from flows.pipeline import pipeline

        result = pipeline(dataset=args.dataset, profile=args.profile, force=args.force)
    elif args.flow_name == "tune":
        result = stages.tune(workers=args.workers)
    else:
        result = getattr(stages, args.flow_name)()
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
