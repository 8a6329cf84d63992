"""``python -m flows <stage>`` (each DVC stage's command) runs one stage as a Prefect flow run;
``python -m flows flow pipeline|tune`` runs the deployment flows by hand."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

FLOWS = ("pipeline", "tune")
REMOVED_FLOWS = ("preprocess", "train")
# The port of the project's one local server (make's PREFECT_PORT), when PREFECT_API_URL is not set.
PORT_ENV = "KUZUSHIJI_PREFECT_PORT"
FIRST_RUN_NOTE = (
    "flows: first `dvc exp run` in this clone (no dvc.lock yet): the 'No file hash info found' warnings above, "
    "one per output, are expected: nothing has been produced yet."
)


@contextlib.contextmanager
def shared_prefect_api() -> Iterator[None]:
    """Without PREFECT_API_URL, report to the project's one local server (launcher.server: started if none
    answers, reused otherwise), as `make run` does, instead of a temporary server per stage process."""
    from launcher.server import DEFAULT_PORT, ServerError, configured_api_url, ensure_server

    if configured_api_url() is not None:
        yield
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        api = ensure_server(int(os.environ.get(PORT_ENV) or DEFAULT_PORT))
    except ServerError as exc:
        raise SystemExit(f"flows: {exc}") from None
    print(api.describe(), file=sys.stderr)
    os.environ["PREFECT_API_URL"] = api.url  # for the processes this one starts (tune workers, dvc)
    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        yield


def _note_first_experiment() -> None:
    """DVC's checkout at the start of a first `dvc exp run` warns once per output; say once that it is fine."""
    if os.environ.get("DVC_EXP_NAME") and os.environ.get("DVC_STAGE") and not Path("dvc.lock").exists():
        print(FIRST_RUN_NOTE, file=sys.stderr)


def _assignments(pairs: Sequence[str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: write KEY=VALUE")
        values[key] = yaml.safe_load(value)
    return values


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
    parser.add_argument("--set", dest="set_params", action="append", default=[], metavar="KEY=VALUE",
                        help="pipeline: one more -S for dvc exp run (repeatable)")
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
    if args.target == "download":
        _note_first_experiment()

    with shared_prefect_api():
        from flows import stages

        if args.target != "flow":
            result = stages.run_stage_cli(args.target, workers=args.workers)
        elif args.flow_name == "pipeline":
            from flows.dvc_pipeline import pipeline

            # From a terminal (make run): DVC writes to it directly, progress bars included.
            result = pipeline(dataset=args.dataset, profile=args.profile, set_params=_assignments(args.set_params),
                              force=args.force, stream_to_log=False)
            print("\n".join(result["summary"]))
            return 0
        else:
            result = stages.tune(workers=args.workers)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
