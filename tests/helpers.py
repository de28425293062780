"""Small helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import torch


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too, as a snapshot holds them), copied."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same names, and every tensor equal bit for bit."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """What transformers' own generate does with the model, one unpadded prompt at a time."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, top_k=None
        )
    return out[0, len(ids) :].tolist()


def kill_when_printed(command: list[str], marker: str, timeout: float = 300) -> int:
    """Start `command` in its own session, SIGKILL the whole session (every rank, like a lost
    node) as soon as it prints a line holding `marker`; its return code."""
    import os
    import signal
    import subprocess

    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:
        if marker in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    return process.wait(timeout=timeout)


EVERY = {"grid_every": 1, "halving": None}
"""The 0.1 schedule: every alpha in full at every evaluation (the tests whose subject is not the
schedule read the grid at every step; test_schedule.py and test_halving.py test the default)."""
