"""The `wise-ft` command.

Each subcommand is one entry in `COMMANDS`: a help line, a function that adds its arguments, and a
function that runs it. Runners import their implementation lazily, so `wise-ft --help` and
`wise-ft merge` never pay for importing Lightning or vLLM.

Bad input is refused before any work with one line on stderr and exit code 2: argparse's own
errors, and whatever a runner's `checking_input()` block (its up-front checks) raises.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, NoReturn


class InputError(Exception):
    """Input a command refuses: printed as one line, exit code 2."""


@contextmanager
def checking_input() -> Iterator[None]:
    """Turn what our input checks raise (ValueError, TypeError, OSError: a bad value, a wrong
    type, a missing or unreadable file) into an `InputError`. Only around checks: a TypeError
    raised by the work itself is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, TypeError, OSError) as err:
        raise InputError(str(err)) from err


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")

    def refuse_unknown(self, extras: list[str]) -> None:
        """Name arguments this (sub)command does not have, and the option meant, if any: with
        `allow_abbrev=False`, `eval --alpha 2` is refused here instead of becoming `--alphas`."""
        if not extras:
            return
        message = f"unrecognized arguments: {' '.join(extras)}"
        flags = [f for action in self._actions for f in action.option_strings]
        unknown = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
        close = [m for e in unknown for m in difflib.get_close_matches(e, flags, n=1, cutoff=0.8)]
        self.error(message + (f" (did you mean {', '.join(close)}?)" if close else ""))


def weight_on_latest(text: str) -> float:
    """An alpha from the command line: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number in [0, 1] (the weight on LATEST)"
        )
    return value


def check_output_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """A file path we may write: not a folder, in an existing folder we can write in."""
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"{flag} {out} is a folder; give a file path")
    folder = out.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out}: no permission to write in {folder}")
    return out


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


GRADER_NAMES = ("auto", "boxed", "exact", "gsm8k", "math", "numeric")
"""`--grader` choices: wise_callback.grading.GRADERS by name, or "auto" (per problem layout)."""


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--early", required=True, metavar="DIR", help="early SFT checkpoint")
    parser.add_argument("--latest", required=True, metavar="DIR", help="latest checkpoint")
    parser.add_argument(
        "--problems",
        required=True,
        metavar="FILE",
        help="JSONL / JSON / parquet: ours, GSM8K, MATH, AIME or verl layout",
    )
    parser.add_argument(
        "--alphas",
        type=weight_on_latest,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="weights on LATEST, each in [0, 1]",
    )
    parser.add_argument("--sampler", choices=("hf", "vllm"), default="hf")
    parser.add_argument(
        "--grader",
        choices=GRADER_NAMES,
        default="math",
        help="auto: by each problem's layout (GSM8K: gsm8k, MATH/AIME: boxed, ours: math)",
    )
    parser.add_argument("--num-samples", type=int, default=16, help="completions per problem")
    parser.add_argument("--ks", type=int, nargs="+", help="default: 1, 2, 4, ... num-samples")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="FILE", help="write the records as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _eval(args: argparse.Namespace) -> int:
    with checking_input():  # the output first: before any import or work
        out = check_output_file(args.out) if args.out else None

    import json

    from wise_callback import grading
    from wise_callback.evaluate import EvalConfig
    from wise_callback.files import write_text_atomically
    from wise_callback.merge import read_checkpoints
    from wise_callback.offline import evaluate_checkpoints
    from wise_callback.problems import load_problems
    from wise_callback.report import format_table
    from wise_callback.sampling import SamplingConfig

    with checking_input():  # the inputs, before the models are loaded
        problems = load_problems(args.problems)
        config = EvalConfig(
            num_samples=args.num_samples,
            ks=tuple(args.ks) if args.ks else None,
            sampling=SamplingConfig(
                temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed
            ),
        )
        read_checkpoints(args.early, args.latest, allow_pickle=True)  # headers, names, shapes
    evaluation = evaluate_checkpoints(
        args.early,
        args.latest,
        problems,
        grading.AUTO if args.grader == grading.AUTO else grading.GRADERS[args.grader],
        config,
        alphas=args.alphas,
        sampler=args.sampler,
        progress=not args.quiet,
    )
    records = evaluation.records()
    print(format_table(records))
    if out:
        text = json.dumps({"records": records, "timings": evaluation.timings}, indent=2)
        write_text_atomically(out, text + "\n")
    return 0


def _plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a folder with history.jsonl (or the file)")
    parser.add_argument("--out", metavar="PNG", help="default: DIR/report.png")


def _plot(args: argparse.Namespace) -> int:
    from wise_callback.report import format_table, plot_history, read_history

    with checking_input():
        records = read_history(args.dir)
        folder = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
        out = check_output_file(args.out or folder / "report.png")
    out = plot_history(records, out)
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
    parser = OneLineParser(
        prog="wise-ft", description="WiSE-FT against diversity collapse in SFT.", allow_abbrev=False
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name, help=command.help, description=command.help, allow_abbrev=False
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run, parser=sub)
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
    one clear line instead of a traceback. ValueError and the missing/existing-file errors are
    our library's refusals of a bad value wherever they arise; other exceptions are bugs and keep
    their traceback."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    args.parser.refuse_unknown(extras)
    _show_our_log_messages()
    try:
        return args.run(args)
    except (InputError, ValueError, FileNotFoundError, FileExistsError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        parser.exit(2, f"wise-ft {args.command}: error: {message}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"wise-ft {args.command}: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
