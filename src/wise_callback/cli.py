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


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="about 1 minute instead of about 5")
    parser.add_argument("--seed", type=int, default=0, help="data split and sampling seed")
    parser.add_argument("--out", default="wiseft_demo", metavar="DIR", help="output folder")
    parser.add_argument("--sampler", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no table")


def _demo(args: argparse.Namespace) -> int:
    from wise_callback.demo.run import run_demo

    run_demo(
        args.out, quick=args.quick, seed=args.seed, sampler=args.sampler, progress=not args.quiet
    )
    if not args.quiet:
        print(f"wrote {args.out}/history.jsonl, summary.json and report.png")
    return 0


GRADERS = {
    "exact": "exact_match",
    "numeric": "numeric_match",
    "math": "math_verify_match",
}


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--early", required=True, metavar="DIR", help="early SFT checkpoint")
    parser.add_argument("--latest", required=True, metavar="DIR", help="latest checkpoint")
    parser.add_argument(
        "--problems", required=True, metavar="FILE", help='JSONL lines {"prompt", "answer"}'
    )
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="weights on LATEST"
    )
    parser.add_argument("--sampler", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--grader", choices=sorted(GRADERS), default="math")
    parser.add_argument("--num-samples", type=int, default=16, help="completions per problem")
    parser.add_argument("--ks", type=int, nargs="+", help="default: 1, 2, 4, ... num-samples")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="FILE", help="write the records as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval(args: argparse.Namespace) -> int:
    import json

    from wise_callback import grading
    from wise_callback.evaluate import EvalConfig
    from wise_callback.files import write_text_atomically
    from wise_callback.offline import evaluate_checkpoints
    from wise_callback.problems import load_problems
    from wise_callback.report import format_table
    from wise_callback.sampling import SamplingConfig

    config = EvalConfig(
        num_samples=args.num_samples,
        ks=tuple(args.ks) if args.ks else None,
        sampling=SamplingConfig(
            temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed
        ),
    )
    evaluation = evaluate_checkpoints(
        args.early,
        args.latest,
        load_problems(args.problems),
        getattr(grading, GRADERS[args.grader]),
        config,
        alphas=args.alphas,
        sampler=args.sampler,
        progress=not args.quiet,
    )
    records = evaluation.records()
    print(format_table(records))
    if args.out:
        text = json.dumps({"records": records, "timings": evaluation.timings}, indent=2)
        write_text_atomically(args.out, text + "\n")
    return 0


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a folder with history.jsonl (or the file)")
    parser.add_argument("--out", metavar="PNG", help="default: DIR/report.png")


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wise_callback.report import format_table, plot_history, read_history

    records = read_history(args.dir)
    folder = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
    out = plot_history(records, args.out or folder / "report.png")
    print(format_table(records))
    print(f"wrote {out}")
    return 0


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "SFT a tiny model on a toy reasoning task: watch Pass@k collapse and WiSE-FT recover it",
        _demo_arguments,
        _demo,
    ),
    "eval": Command(
        "sample, grade and score an alpha grid between two saved checkpoints",
        _eval_arguments,
        _eval,
    ),
    "plot": Command(
        "redraw report.png and the table from a run's history.jsonl",
        _plot_arguments,
        _plot,
    ),
    "merge": Command(
        "merge two Hugging Face checkpoint folders into theta(alpha), streamed tensor by tensor "
        "(two PEFT LoRA adapter folders: the exact interpolated adapter, rank 2r)",
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


def _show_our_log_messages() -> None:
    """Print wise_callback's INFO messages plainly, on our logger alone: a root handler would
    print Lightning's messages a second time (Lightning has its own handler)."""
    logger = logging.getLogger("wise_callback")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run `wise-ft`; user errors (bad paths, mismatched checkpoints, bad alpha) exit with 2 and
    one clear line instead of a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _show_our_log_messages()
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.exit(2, f"wise-ft {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"wise-ft {args.command}: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
