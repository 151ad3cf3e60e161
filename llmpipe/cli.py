"""The `llmpipe` command.

    llmpipe compose [key=value ...]   compose conf/ into params.yaml (what `dvc exp run -S` does)

Run `llmpipe --help` or `llmpipe COMMAND --help` for the rest.
"""

from __future__ import annotations

import argparse
import sys

from llmpipe.errors import PipelineError


def cmd_compose(args: argparse.Namespace) -> None:
    from llmpipe.config_compose import compose, write_params

    params = compose(args.overrides, args.config_dir)
    write_params(params, args.output)
    print(f"wrote {args.output} from {args.config_dir}/" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpipe", description=__doc__.split("\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)

    compose = commands.add_parser("compose", help="compose conf/ into params.yaml")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=local_files tokenizer.vocab_size=2048")
    compose.add_argument("--config-dir", default="conf")
    compose.add_argument("--output", default="params.yaml")
    compose.set_defaults(handler=cmd_compose)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
