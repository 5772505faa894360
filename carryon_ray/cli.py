"""The `carryon` command: run the pipeline, serve carry-ons, check a config.

    carryon run [CONFIG] [--set section.key=value ...] [--serve] [--stages a,b] [--verbose]
    carryon search [CONFIG] [--set ...]
    carryon serve [CONFIG] [--set ...]
    carryon validate [CONFIG] [--set ...]

Each command is the one pipeline (`carryon_ray/pipeline.py`) with its own list of stages.

Without CONFIG the embedded default `configs/demo.yaml` is used. User errors print one clear
message and exit with status 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from carryon_ray.config import PipelineConfig, load_config

logger = logging.getLogger("carryon_ray")


COMMANDS = {
    # command: (help, the stage list it runs)
    "run": ("embed -> train -> export -> evaluate (--serve: then deploy and keep serving)",
            ["embed", "train", "export", "evaluate"]),
    "search": ("embed (or reuse) -> Ray Tune search over carry-on shapes -> export the best -> evaluate",
               ["embed", "search", "export", "evaluate"]),
    "serve": ("deploy the base and the exported carry-ons over OpenAI-compatible HTTP until Ctrl-C",
              ["deploy"]),
    "validate": ("check a config and print it resolved", []),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carryon", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (text, _) in COMMANDS.items():
        command = commands.add_parser(name, help=text)
        command.add_argument("config", nargs="?", help="pipeline YAML (default: configs/demo.yaml)")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override a config value, e.g. --set train.max_steps=50 --set run_dir=/tmp/run",
        )
        command.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress")
        if name == "run":
            command.add_argument("--serve", action="store_true",
                                 help="deploy when the pipeline ends and keep serving until Ctrl-C")
            command.add_argument("--stages", default=None, metavar="A,B,...",
                                 help="run these stages instead (e.g. embed,train,export); "
                                 "default: the config's `stages`")
    return parser


def stage_list(args: argparse.Namespace, config: PipelineConfig) -> list[str]:
    """The stages a command runs: `run` follows the config (or --stages), the others are fixed."""
    if args.command != "run":
        return COMMANDS[args.command][1]
    stages = args.stages.split(",") if args.stages else list(config.stages)
    if args.serve and "deploy" not in stages:
        stages.append("deploy")
    return stages


def run_stages(config: PipelineConfig, stages: list[str], *, verbose: bool = False) -> dict:
    from carryon_ray.pipeline import Pipeline, summary_table

    summary = Pipeline(config, verbose=verbose).run(stages)
    print(summary_table(summary))
    if "search" in summary:
        print(f"trials: {summary['run_dir']}/reports/search.md")
    print(f"summary: {summary['run_dir']}/reports/summary.json")
    if "deploy" in summary:
        deployed = summary["deploy"]
        model = deployed["model"] or "base"
        print(f"serving on {deployed['endpoint']} (model \"{model}\"); try:\n"
              f"  curl {deployed['endpoint']}/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{model}\", \"prompt\": \"Question: 2+3?\\nAnswer:\", \"max_tokens\": 32}}'")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        config = load_config(args.config, args.overrides)
        if args.command == "validate":
            from carryon_ray.pipeline import redacted

            print(redacted(config).model_dump_json(indent=2))
            return 0
        stages = stage_list(args, config)
        run_stages(config, stages, verbose=args.verbose)
        if "deploy" in stages and (args.command == "serve" or args.serve):
            from carryon_ray.stages.serve import serve_until_interrupted

            print("Ctrl-C stops serving")
            serve_until_interrupted()
    except Exception as error:
        cause = getattr(error, "cause", None) or error  # a Ray task error carries the user's error
        if isinstance(cause, (ValueError, FileNotFoundError)):
            print(f"carryon: error: {cause}", file=sys.stderr)
            return 2
        if isinstance(cause, OSError):  # the store itself: credentials, bucket, network
            print(f"carryon: error: storage: {cause}; check the path or URI, the credentials "
                  "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and AWS_ENDPOINT_URL for an "
                  "S3-compatible server", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("carryon: interrupted; what was written so far is kept, and the same command "
              "continues from there", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
