"""``python -m flows <stage>`` (each DVC stage's command) runs one stage as a Prefect flow run;
``python -m flows flow pipeline|tune`` runs the deployment flows by hand."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

FLOWS = ("pipeline", "tune")
REMOVED_FLOWS = ("preprocess", "train")
SHARED_SERVER_HINT = (
    "flows: PREFECT_API_URL is not set, so this process starts Prefect's temporary server and stops it "
    "at exit. To send every stage to one server instead: `make prefect-ui`, then `export "
    "PREFECT_API_URL=http://127.0.0.1:4200/api` (`make run` does both by itself)."
)


def _hint_without_api_url() -> None:
    from launcher.server import configured_api_url

    if configured_api_url() is None:
        print(SHARED_SERVER_HINT, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from flows.tasks import STAGES

    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=[*STAGES, "flow"],
                        help="a stage, or 'flow' for the pipeline/tune flows")
    parser.add_argument("flow_name", nargs="?", help="with 'flow': pipeline | tune")
    parser.add_argument("--workers", type=int, default=None, help="tune: parallel worker processes")
    parser.add_argument("--dataset", default=None, help="pipeline: data.dataset for this run")
    parser.add_argument("--profile", default=None, help="pipeline: profile for this run")
    parser.add_argument("--force", action="store_true", help="pipeline: re-run every stage")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if (args.target == "flow") != (args.flow_name is not None):
        parser.error("give a flow name after 'flow' (and only there)")
    if args.flow_name in REMOVED_FLOWS:
        parser.error(f"there is no '{args.flow_name}' flow: the order of the stages lives in dvc.yaml only. "
                     f"Run `dvc repro <stage>` (it runs what that stage needs), or one stage at a time with "
                     f"`python -m flows <stage>` ({', '.join(STAGES)})")
    if args.flow_name is not None and args.flow_name not in FLOWS:
        parser.error(f"unknown flow {args.flow_name!r}; flows: {', '.join(FLOWS)}")
    # The domain package logs progress through `pipeline.*`; prefect.toml forwards it to the run log.
    logging.getLogger("pipeline").setLevel(logging.INFO)
    _hint_without_api_url()

    from flows import stages

    if args.target != "flow":
        result = stages.run_stage_cli(args.target, workers=args.workers)
    elif args.flow_name == "pipeline":
        from flows.dvc_pipeline import pipeline

        result = pipeline(dataset=args.dataset, profile=args.profile, force=args.force)
    else:
        result = stages.tune(workers=args.workers)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
