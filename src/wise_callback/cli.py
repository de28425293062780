"""The `wise-ft` command.

Each subcommand is one entry in `COMMANDS`: a help line, a function that adds its arguments, and a
function that runs it. Runners import their implementation lazily, so `wise-ft --help` and
`wise-ft merge` never pay for importing Lightning or vLLM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("early_dir", metavar="EARLY_DIR", help="early SFT checkpoint folder")
    parser.add_argument("latest_dir", metavar="LATEST_DIR", help="latest checkpoint folder")
    parser.add_argument(
        "--alpha",
        type=float,
        required=True,
        help="weight on LATEST: theta = (1 - alpha) * early + alpha * latest, in [0, 1]",
    )
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled .bin weights (loaded with torch.load(weights_only=True))",
    )
    parser.add_argument(
        "--allow-extrapolation", action="store_true", help="accept alpha outside [0, 1]"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _merge(args: argparse.Namespace) -> int:
    from wise_callback.merge import merge_checkpoints

    out = merge_checkpoints(
        args.early_dir,
        args.latest_dir,
        args.out,
        args.alpha,
        force=args.force,
        allow_pickle=args.allow_pickle,
        allow_extrapolation=args.allow_extrapolation,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(f"wrote {out}")
    return 0


COMMANDS: dict[str, Command] = {
    "merge": Command(
        "merge two Hugging Face checkpoint folders into theta(alpha), streamed tensor by tensor",
        _merge_arguments,
        _merge,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wise-ft", description="WiSE-FT against diversity collapse in SFT."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `wise-ft`; user errors (bad paths, mismatched checkpoints, bad alpha) exit with 2 and
    one clear line instead of a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("wise_callback").setLevel(logging.INFO)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"wise-ft {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"wise-ft {args.command}: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
