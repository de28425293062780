"""Bad input to the real `wise-ft` command: one line on stderr naming what is wrong, exit code 2,
no traceback, nothing written, and no work done first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wise_callback.cli import main
from wise_callback.demo.model import tiny_llama


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer):
    """Two real checkpoints, a good problems file and the malformed inputs the tests refuse."""
    root = tmp_path_factory.mktemp("inputs")
    for seed, name in enumerate(("early", "latest")):
        model = tiny_llama(len(tokenizer), seed=seed, tokenizer=tokenizer)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    good = {"prompt": "1+1=", "answer": "2"}
    (root / "problems.jsonl").write_text(json.dumps(good) + "\n")
    (root / "array.jsonl").write_text(json.dumps(good) + "\n" + json.dumps([1, 2]) + "\n")
    (root / "number.jsonl").write_text("7\n")
    (root / "a-folder").mkdir()
    return root


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refusal(cwd: Path, *args: str) -> str:
    """Run the real command in `cwd`; check it refused in one line and wrote nothing there."""
    before = files_under(cwd)
    command = [sys.executable, "-m", "wise_callback.cli", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert files_under(cwd) == before
    return result.stderr


def eval_args(
    *extra: str, problems: str = "problems.jsonl", early: str = "early", latest: str = "latest"
) -> list[str]:
    common = ["eval", "--early", early, "--latest", latest, "--problems", problems]
    return [*common, "--num-samples", "2", "--max-new-tokens", "2", "--grader", "exact", *extra]


def refused_in_process(capsys, argv: list[str]) -> str:
    """`main(argv)` (the command's own code, without a process start): exit 2, one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


# The real command, in a process of its own, for one refusal of each kind (a process start costs
# seconds here); the variants of each kind go through `main` in this process.


def test_eval_refuses_a_problems_line_that_is_not_an_object(inputs, capsys):
    err = refusal(inputs, *eval_args(problems="array.jsonl"))
    assert "array.jsonl, line 2: a JSON list, not an object" in err
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(inputs)
        err = refused_in_process(capsys, eval_args(problems="number.jsonl"))
    assert "number.jsonl, line 1: a JSON int, not an object" in err


def test_eval_refuses_an_unwritable_out_before_anything_else(inputs, capsys):
    # EARLY does not exist either: the refusal names the output, so that was checked first.
    args = eval_args("--out", "a-folder", early="nowhere")
    assert "--out a-folder is a folder; give a file path" in refusal(inputs, *args)
    args = eval_args("--out", str(inputs / "no" / "such" / "x.json"), early="nowhere")
    err = refused_in_process(capsys, args)
    assert f"the folder {inputs / 'no' / 'such'} does not exist" in err


def test_eval_refuses_alphas_outside_0_1_by_its_flag(inputs):
    err = refusal(inputs, *eval_args("--alphas", "0.5", "2"))
    assert "--alphas" in err and "'2' is not a number in [0, 1]" in err
    assert "extrapolation" not in err  # eval has no such flag to point at


def test_abbreviated_flags_are_not_taken_for_others(inputs):
    err = refusal(inputs, *eval_args("--alpha", "0.5"))
    assert "unrecognized arguments: --alpha 0.5" in err and "did you mean --alphas?" in err


def test_merge_refuses_an_output_inside_equal_to_or_around_an_input(inputs, capsys):
    merge = ["merge", "early", "latest", "--alpha", "0.5", "--force", "--out"]
    err = refusal(inputs, *merge, "latest/merged")
    assert "output folder latest/merged lies inside the input folder latest" in err
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(inputs)
        err = refused_in_process(capsys, [*merge, "latest"])
        assert "output folder latest is the input folder latest" in err
        err = refused_in_process(capsys, [*merge, "."])
        assert "output folder . holds the input early" in err
    assert not (inputs / "latest" / "merged").exists()


def test_malformed_header_is_refused_by_the_real_command(inputs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in (inputs / "latest").iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    weights = bad / "model.safetensors"
    weights.write_bytes((2).to_bytes(8, "little") + b"[]")  # a header that is a JSON array
    merge = ["merge", str(inputs / "early"), str(bad), "--alpha", "0.5", "--out", "o"]
    assert f"{weights} is not a safetensors file" in refusal(tmp_path, *merge)


def header_cases(data: bytes) -> dict[str, tuple[bytes, str]]:
    """Malformed copies of a safetensors file, and what the refusal must say."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(n for n in header if n != "__metadata__")

    def with_entry(entry: object) -> bytes:
        encoded = json.dumps({**header, name: entry}).encode()
        return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]

    entry = header[name]
    return {
        "empty": (b"", "bad header size"),
        "truncated-header": (data[: 8 + length // 2], "bad header size"),
        "length-beyond-file": (
            (10 * len(data)).to_bytes(8, "little") + data[8:],
            "bad header size",
        ),
        "bad-json": (data[:8] + b"{" * length + data[8 + length :], "unreadable header"),
        "not-an-object": ((2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
        "entry-not-an-object": (with_entry([1]), f"entry of tensor {name} is not an object"),
        "no-shape": (with_entry({"dtype": "F32"}), f"tensor {name} needs a shape"),
        "text-offsets": (
            with_entry({**entry, "data_offsets": ["a", 3]}),
            "data_offsets=['a', 3]",
        ),
        "list-dtype": (with_entry({**entry, "dtype": ["F32"]}), "unsupported dtype ['F32']"),
        "truncated-data": (data[:-100], "is truncated or corrupt: tensor"),
    }


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_every_malformed_header_is_one_line_naming_the_file(inputs, tmp_path, capsys, command):
    data = (inputs / "latest" / "model.safetensors").read_bytes()
    for case, (content, named) in header_cases(data).items():
        bad = tmp_path / case
        bad.mkdir()
        (bad / "config.json").write_bytes((inputs / "latest" / "config.json").read_bytes())
        (bad / "model.safetensors").write_bytes(content)
        if command == "merge":
            argv = ["merge", str(inputs / "early"), str(bad), "--alpha", "0.5"]
            argv += ["--out", str(tmp_path / "out"), "--quiet"]
        else:
            problems, early = str(inputs / "problems.jsonl"), str(inputs / "early")
            argv = eval_args("--quiet", problems=problems, early=early, latest=str(bad))
        err = refused_in_process(capsys, argv)
        assert named in err and str(bad / "model.safetensors") in err, (case, err)
    assert not (tmp_path / "out").exists()


def test_a_bug_after_the_checks_keeps_its_traceback(inputs, monkeypatch):
    """Only the up-front checks become one-line refusals: a TypeError raised by the work itself
    (here injected into the evaluation) reaches the user whole, not as a tidy 'error:' line."""

    def broken(*args, **kwargs):
        raise TypeError("a bug in the evaluation")

    monkeypatch.setattr("wise_callback.offline.evaluate_checkpoints", broken)
    monkeypatch.chdir(inputs)
    with pytest.raises(TypeError, match="a bug in the evaluation"):
        main(eval_args("--quiet"))
