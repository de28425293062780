"""What every sampler shares: the `Sampler` protocol, its config and result types, prompt checks.

A sampler turns P prompts into n completions each. Prompts are strings (tokenized here with the
tokenizer's defaults, so both samplers see the same ids) or token-id lists; chat templates are the
caller's business. Every check runs before any generation starts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. `temperature=0` is greedy; `top_k` 0 or None and `top_p` 1 switch those off.

    `stop` strings end a completion (EOS always does). `logprobs=True` fills `Completion.logprob`
    with the summed log-probabilities of the generated tokens under the model's raw distribution
    (before temperature, top-k and top-p), as vLLM reports them by default.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    max_new_tokens: int = 64
    stop: Sequence[str] = ()
    seed: int = 0
    logprobs: bool = False

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0 or None = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            raise TypeError(f"stop must be a sequence of strings, not the string {self.stop!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    `text` excludes the prompt, special tokens and the stop string (and anything after it).
    `token_ids` are the generated ids up to and including the one that finished the completion
    (the EOS token, or the token that completed a stop string). `finish_reason` is "stop" for EOS
    or a stop string and "length" when `max_new_tokens` ran out (the truncation rate).
    """

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    logprob: float | None = None


@runtime_checkable
class Sampler(Protocol):
    """Samples n completions per prompt with the weights last given to `load_weights`."""

    def sample(
        self, prompts: Sequence[str] | Sequence[list[int]], n: int, config: SamplingConfig
    ) -> list[list[Completion]]:
        """For each prompt, `n` completions, in prompt order."""
        ...

    def load_weights(self, module: torch.nn.Module) -> None:
        """Generate from now on with `module`'s current weights (inside `interpolated`, the
        interpolant)."""
        ...


def prompt_token_ids(
    prompts: Sequence[str] | Sequence[Sequence[int]], tokenizer, vocab_size: int
) -> list[list[int]]:
    """The prompts as token-id lists, checked: non-empty, ids in [0, vocab_size)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings or token-id lists, got {prompts!r:.80}")
    ids = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            prompt = tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        prompt = list(prompt)
        if not prompt:
            raise ValueError(f"prompt {index} is empty: a prompt needs at least one token")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
            raise ValueError(
                f"prompt {index} has token ids outside the vocabulary [0, {vocab_size}): "
                f"{[t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab_size)][:5]}"
            )
        ids.append(prompt)
    return ids


def check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (completions per prompt) must be an int >= 1, got {n!r}")


def prompt_seed(seed: int, token_ids: Sequence[int]) -> int:
    """A per-prompt seed from the config seed and the prompt itself.

    Seeding each prompt on its own makes its samples independent of which other prompts share
    its batch or its process; mixing in the prompt keeps different prompts' random streams apart.
    31 bits, so vLLM's `seed + sample_index` stays a valid seed.
    """
    digest = hashlib.blake2b(
        torch.tensor([seed, *token_ids], dtype=torch.int64).numpy().tobytes(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") % (2**31 - 2**16)


def cut_at_stop(text: str, stop: Sequence[str]) -> str | None:
    """`text` up to the earliest stop string, or None when none occurs."""
    hits = [index for index in (text.find(s) for s in stop) if index >= 0]
    return text[: min(hits)] if hits else None
