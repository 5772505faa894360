"""The `carryon` command: run the pipeline, serve carry-ons, check a config.

    carryon run [CONFIG] [--set section.key=value ...] [--serve] [--stages a,b] [--verbose]
    carryon search [CONFIG] [--set ...]
    carryon serve [CONFIG] [--set ...]
    carryon validate [CONFIG] [--set ...]
    carryon eval [CONFIG] [--model NAME|base] [--alpha A ...] [--tasks a,b] [--limit N] [--set ...]
    carryon versions NAME [--config CONFIG] [--set ...]
    carryon rollback NAME [--to VERSION] [--config CONFIG] [--set ...]
    carryon hash-key [--tenant T] [--models 'a,a-*'] [--admin] [--max-concurrent-requests N] < key

The first four are the one pipeline (`carryon_ray/pipeline.py`) with its own list of stages;
`eval` scores the base, a carry-on and the carry-on at other α with lm_eval
(`carryon_ray/harness_run.py`); `versions` and `rollback` read and move a carry-on's pointer in the registry (`serve.registry`,
else RUN_DIR/carryons; `carryon_ray/registry.py`); `hash-key` prints the keys-file line of an
API key read from stdin (`carryon_ray/access.py`).

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
    command = commands.add_parser("eval", help="lm_eval tasks (default: GSM8K held out) on the base, "
                                  "a carry-on and the carry-on at other alpha, in this process")
    command.add_argument("config", nargs="?", help="pipeline YAML (default: configs/demo.yaml)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config value, e.g. --set run_dir=/tmp/run")
    command.add_argument("--model", default=None, metavar="NAME|base",
                         help="the carry-on to score (default: the config's name), or `base` alone")
    command.add_argument("--alpha", dest="alphas", action="append", type=float, default=[], metavar="A",
                         help="also score the carry-on at this alpha (repeatable)")
    command.add_argument("--tasks", default=",".join(harness_defaults()), metavar="A,B",
                         help="lm_eval tasks: gsm8k_heldout, gsm8k_heldout_chat, or ones in --task-dir")
    command.add_argument("--task-dir", default=None, metavar="DIR", help="a folder of more lm_eval task YAMLs")
    command.add_argument("--limit", type=int, default=None, metavar="N", help="the first N documents of each task")
    command.add_argument("--batch-size", type=int, default=8, metavar="N",
                         help="rows per forward and per decode batch")
    command.add_argument("--verbose", action="store_true", help="show lm_eval's own logs")
    for name, text in (("versions", "list a carry-on's versions with their held-out scores"),
                       ("rollback", "point a carry-on at its previous version (or --to VERSION)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("name", help="the carry-on (its model id)")
        command.add_argument("--config", default=None, help="pipeline YAML (default: configs/demo.yaml)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override a config value, e.g. --set serve.registry=s3://bucket/carryons")
        command.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
        if name == "rollback":
            command.add_argument("--to", default=None, metavar="VERSION",
                                 help="this version (default: the newest earlier one evaluation did not refuse)")
    command = commands.add_parser("hash-key", help="print the serve.keys_file line for an API key read from stdin")
    command.add_argument("--tenant", default="TENANT", help="the tenant label the line names")
    command.add_argument("--models", default=None, metavar="A,B-*",
                         help="models the key may use (names or * patterns; default: TENANT and TENANT-*)")
    command.add_argument("--admin", action="store_true", help="the key may use every model")
    command.add_argument("--max-concurrent-requests", type=int, default=None, metavar="N")
    command.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    return parser


def harness_defaults() -> tuple[str, ...]:
    return ("gsm8k_heldout",)


def eval_command(args: argparse.Namespace) -> None:
    """`carryon eval`: lm_eval on the config's carry-on (or --model), printed and in reports/."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("`carryon eval` needs lm_eval: pip install 'lm_eval[api]==0.4.13' (or -e '.[dev]')")
    from carryon_ray.harness_run import HarnessRequest, run_harness

    if not args.verbose:
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
    config = load_config(args.config, args.overrides)
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ValueError("--tasks names no task; e.g. --tasks gsm8k_heldout")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    request = HarnessRequest(model=args.model, alphas=args.alphas, tasks=tasks, limit=args.limit,
                             task_dir=args.task_dir, batch_size=args.batch_size)
    report, markdown = run_harness(config, request)
    print(markdown)
    print(f"results: {report['path']}")


def registry_command(args: argparse.Namespace) -> None:
    """`carryon versions` and `carryon rollback`, on the registry the config names."""
    from carryon_ray.openai_api import MODEL_ID
    from carryon_ray.registry import rollback, version_table
    from carryon_ray.stages.serve import registry_path

    if not MODEL_ID.fullmatch(args.name) or ".." in args.name:
        raise ValueError(f"{args.name!r} is not a carry-on name (letters, digits, '_', '.', '-')")
    config = load_config(args.config, args.overrides)
    carryon = registry_path(config.serve, config.run_dir) / args.name
    rows = version_table(carryon)
    if not rows:
        raise FileNotFoundError(f"{carryon} holds no versions; `carryon run` exports one")
    if args.command == "rollback":
        before, after = rollback(carryon, args.to)
        print(f"{args.name}: current version {before or 'none'} -> {after}")
        return
    print(f"{carryon}:")
    print("| version | current | nll_merged | nll_base | promoted | reason |")
    print("|---------|---------|------------|----------|----------|--------|")
    for row in rows:
        nll = [("-" if row[key] is None else f"{row[key]:.4f}") for key in ("nll_merged", "nll_base")]
        promoted = "-" if row["promoted"] is None else ("yes" if row["promoted"] else "no")
        print(f"| {row['version']} | {'*' if row['current'] else ''} | {nll[0]} | {nll[1]} | {promoted} "
              f"| {row['reason'] or '-'} |")


def hash_key_line(args: argparse.Namespace, key: str) -> str:
    """One `serve.keys_file` entry: the key's sha256, never the key (JSON is YAML)."""
    import json

    from carryon_ray.access import KeyEntry, hash_key

    if not key.strip():
        raise ValueError("no API key on stdin; pipe one in: carryon hash-key < key.txt")
    models = [] if args.admin else (args.models.split(",") if args.models else [args.tenant, f"{args.tenant}-*"])
    entry = KeyEntry(tenant=args.tenant, models=models, admin=args.admin,
                     max_concurrent_requests=args.max_concurrent_requests)
    fields = entry.model_dump(exclude_defaults=True, exclude={"tenant"})
    return f'"{hash_key(key)}": {json.dumps({"tenant": entry.tenant, **fields})}'


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
    for name, promotion in summary.get("promotion", {}).items():
        if not promotion["promoted"]:
            print(f"carry-on {name}@{promotion['version']} not promoted: {promotion['reason']}")
    if "deploy" in summary:
        deployed = summary["deploy"]
        model = deployed["model"] or "base"
        promotion = summary.get("promotion", {}).get(model)
        if promotion is not None and not promotion["promoted"] and promotion["current"] is None:
            model = "base"  # nothing of it is current: the carry-on answers 404
        print(f"serving on {deployed['endpoint']} (model \"{model}\"); try:\n"
              f"  curl {deployed['endpoint']}/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{model}\", \"prompt\": \"Question: 2+3?\\nAnswer:\", \"max_tokens\": 32}}'")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "hash-key":
            print(hash_key_line(args, sys.stdin.read()))
            return 0
        if args.command == "eval":
            eval_command(args)
            return 0
        if args.command in ("versions", "rollback"):
            registry_command(args)
            return 0
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
