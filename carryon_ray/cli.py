"""The `carryon` command: run the pipeline, serve carry-ons, check a config.

    carryon run [CONFIG] [--set section.key=value ...]
    carryon serve [CONFIG] [--set ...]
    carryon search [CONFIG] [--set ...]
    carryon validate [CONFIG] [--set ...]

Without CONFIG the embedded default `configs/demo.yaml` is used. User errors print one clear
message and exit with status 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from carryon_ray.config import PipelineConfig, load_config

logger = logging.getLogger("carryon_ray")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carryon", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "embed -> train -> evaluate -> export"),
        ("serve", "serve the base and the exported carry-ons over OpenAI-compatible HTTP"),
        ("search", "embed (or reuse), then a Ray Tune search over carry-on shapes; export the best"),
        ("validate", "check a config and print it resolved"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("config", nargs="?", help="pipeline YAML (default: configs/demo.yaml)")
        command.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
            help="override a config value, e.g. --set train.max_steps=50 --set run_dir=/tmp/run",
        )
    return parser


def run_pipeline(config: PipelineConfig) -> dict:
    from carryon_ray.pipeline import Pipeline, summary_table

    summary = Pipeline(config).run()
    print(summary_table(summary))
    print(f"summary: {Path(config.run_dir).resolve() / 'reports' / 'summary.json'}")
    return summary


def serve(config: PipelineConfig) -> None:
    from carryon_ray.pipeline import ensure_ray
    from carryon_ray.stages.serve import registry_path, run_server

    registry = registry_path(config)
    if not registry.is_dir():
        raise FileNotFoundError(
            f"carry-on registry {registry} does not exist; run `carryon run` first or set serve.registry"
        )
    ensure_ray()
    print(f"serving on http://{config.serve.host}:{config.serve.port}/v1 (registry {registry}); Ctrl-C stops")
    run_server(config, registry, blocking=True)


def search(config: PipelineConfig) -> dict:
    from carryon_ray.pipeline import ensure_ray, preflight
    from carryon_ray.stages.embed import read_manifest, run_embed
    from carryon_ray.stages.placement import role_resources
    from carryon_ray.stages.search import check_search, run_search, search_table

    check_search(config)  # the search space against the config, before any work
    preflight(config)
    run_dir = Path(config.run_dir).expanduser().resolve()
    ensure_ray()
    run_embed(config, run_dir, resources=role_resources(config.embed.resources))
    manifest, layout = read_manifest(run_dir)
    report = run_search(config, run_dir, manifest, layout, resources=role_resources(config.train.resources))
    print(search_table(report))
    print(f"trials: {run_dir / 'reports' / 'search.md'}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        if args.command == "validate":
            print(config.model_dump_json(indent=2))
        elif args.command == "run":
            run_pipeline(config)
        elif args.command == "search":
            search(config)
        else:
            serve(config)
    except Exception as error:
        cause = getattr(error, "cause", None) or error  # a Ray task error carries the user's error
        if not isinstance(cause, (ValueError, FileNotFoundError)):
            raise
        print(f"carryon: error: {cause}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carryon: interrupted; what was written so far is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
