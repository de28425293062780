"""`HFSampler`: n completions per prompt from the training model itself, with transformers.

Why not `model.generate(num_return_sequences=n)`: it copies each prompt n times *before* the
prefill, so a 1024-token prompt is prefilled n times. Here each batch of prompts is prefilled once
(left-padded, last-position logits only) into a `StaticCache` sized for the whole completion, then
the cache and the last logits are repeated n times (`repeat_interleave` on the batch) and decoding
writes into it in place on the B*n rows, dropping finished rows in bulk (a drop copies the cache).
No prompt token is processed twice. Needs transformers' layered caches (5.x; tested on 5.19).

Determinism: each prompt draws from its own `torch.Generator`, seeded from `config.seed` and the
prompt's token ids, and only for its unfinished rows. So a prompt's samples depend on the seed,
the prompt and the weights, not on the other prompts, their order, the token budget or the number
of processes. What can still differ is floating point: another batch shape (more padding, more
rows) or another BLAS path changes logits in the last bits, which can rarely flip a sampled token.

FSDP2: a `fully_shard`-ed model all-gathers its parameters in every forward, so all ranks must run
the same number of forwards. Ranks then step in lockstep: one all-reduce per decoding step decides
whether any rank still has live rows, finished rows are kept (not dropped), and a rank with fewer
batches runs throw-away one-token batches. Each rank samples its own prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import StaticCache

from wise_callback.sampling.base import (
    Completion,
    SamplingConfig,
    check_n,
    cut_at_stop,
    prompt_seed,
    prompt_token_ids,
)
from wise_callback.sharding import is_collective


class HFSampler:
    """Samples with the training model itself (no second copy) in eval mode under
    `torch.inference_mode()`; the previous train/eval mode of every submodule is restored after.

    `token_budget` bounds the KV-cache positions of one batch, prompts * n * (longest prompt +
    max_new_tokens), preallocated when the batch starts; a prompt that alone exceeds it runs in a
    batch of its own. Memory: budget * layers * 2 * kv_heads * head_dim * bytes per value, e.g.
    65536 positions of a 1.5B Qwen2.5 in bf16 take 3.7 GB. More prompts per batch make decoding
    much cheaper per token (a decoding step costs about the same for 16 rows as for 64).
    `progress` shows a tqdm bar over prompts (rank 0 only).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer, *, token_budget: int = 65536, progress: bool = True
    ) -> None:
        if not callable(getattr(model, "get_input_embeddings", None)):
            raise TypeError(
                f"HFSampler needs a transformers causal LM, got {type(model).__name__} "
                "(no get_input_embeddings)"
            )
        if not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget must be an int >= 1, got {token_budget!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.token_budget = token_budget
        self.progress = progress
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        if not self.eos_token_ids:
            raise ValueError(
                "neither the model's generation_config nor the tokenizer has an EOS id"
            )

    def load_weights(self, module: torch.nn.Module) -> None:
        """Nothing to copy: HFSampler generates with the live model, so its current weights (the
        interpolant inside `interpolated(...)`) are always used. Checks that `module` is, or
        contains, that model."""
        first = next(self.model.parameters())
        if not any(p is first for p in module.parameters()):
            raise ValueError(
                f"HFSampler generates with the model it was built with; {type(module).__name__} "
                "neither is nor contains it"
            )

    def sample(
        self, prompts: Sequence[str] | Sequence[list[int]], n: int, config: SamplingConfig
    ) -> list[list[Completion]]:
        """n completions per prompt, in prompt order (see the module docstring on determinism)."""
        check_n(n)
        vocab_size = self.model.get_input_embeddings().num_embeddings
        ids = prompt_token_ids(prompts, self.tokenizer, vocab_size)
        batches = self._batches(ids, n, config.max_new_tokens)
        lockstep = is_collective(self.model)
        if lockstep:
            count = torch.tensor([len(batches)])
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            batches += [[]] * (int(count) - len(batches))
        results: list[list[Completion]] = [[] for _ in ids]
        modes = {module: module.training for module in self.model.modules()}
        show = self.progress and (not dist.is_initialized() or dist.get_rank() == 0)
        try:
            self.model.eval()
            with (
                torch.inference_mode(),
                tqdm(total=len(ids), desc="sampling", disable=not show) as bar,
            ):
                for batch in batches:
                    prompts_ids = [ids[i] for i in batch]
                    completions = self._generate(prompts_ids, n, config, lockstep)
                    for index, prompt_completions in zip(batch, completions, strict=True):
                        results[index] = prompt_completions
                    bar.update(len(batch))
        finally:
            for module, training in modes.items():
                module.training = training
        return results

    def _batches(self, ids: list[list[int]], n: int, max_new_tokens: int) -> list[list[int]]:
        """Prompt indices grouped by length (less padding) under the token budget."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        batches: list[list[int]] = []
        for index in order:
            if batches:
                rows = (len(batches[-1]) + 1) * n
                if rows * (len(ids[index]) + max_new_tokens) <= self.token_budget:
                    batches[-1].append(index)
                    continue
            batches.append([index])
        return batches

    def _generate(
        self, prompts: list[list[int]], n: int, config: SamplingConfig, lockstep: bool
    ) -> list[list[Completion]]:
        """One batch: prefill once, repeat the cache n times, decode. An empty batch (lockstep
        only) runs a throw-away one-token prompt so that this rank joins every forward."""
        dummy = not prompts
        if dummy:
            prompts, n = [[self.eos_token_ids[0]]], 1
        device = self.model.get_input_embeddings().weight.device
        length = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=device)
        starts = torch.tensor([length - len(p) for p in prompts], device=device)
        mask = (torch.arange(length, device=device)[None] >= starts[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        # Preallocated for the whole completion: a growing cache re-copies itself every step.
        cache = StaticCache(config=self.model.config, max_cache_len=length + config.max_new_tokens)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        _map_rows(cache, lambda t: t.repeat_interleave(n, dim=0))
        logits = out.logits[:, -1].float().repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        position = positions[:, -1].repeat_interleave(n, 0)

        generators = [torch.Generator(device=device) for _ in prompts]
        for generator, prompt in zip(generators, prompts, strict=True):
            generator.manual_seed(prompt_seed(config.seed, prompt))
        rows = len(prompts) * n
        live = torch.arange(rows, device=device)  # original row of each row still in the batch
        done = torch.full((rows,), dummy, dtype=torch.bool)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprob = torch.zeros(rows, dtype=torch.float64)
        for step in range(config.max_new_tokens):
            live_done = done[live.cpu()]
            next_ids = _pick(logits, live, live_done, n, generators, config)
            if config.logprobs:
                chosen = torch.log_softmax(logits, -1).gather(1, next_ids[:, None])[:, 0]
                logprob.index_add_(0, live.cpu(), chosen.double().cpu().masked_fill(live_done, 0))
            for row, token, finished in zip(
                live.tolist(), next_ids.tolist(), live_done.tolist(), strict=True
            ):
                if finished:
                    continue
                tokens[row].append(token)
                if token in self.eos_token_ids or self._hits_stop(tokens[row], config.stop):
                    done[row] = True
            if step == config.max_new_tokens - 1 or not self._any_live(done, lockstep):
                break
            if not lockstep:  # FSDP ranks step on with finished rows (their tokens unused)
                keep = (~done[live.cpu()]).nonzero()[:, 0].to(device)
                # Dropping finished rows copies the cache: do it once a quarter of them are done.
                if len(keep) <= 0.75 * len(live):
                    _map_rows(cache, lambda t, keep=keep: t[keep])
                    live, next_ids, mask, position = (
                        t[keep] for t in (live, next_ids, mask, position)
                    )
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            position = position + 1
            out = self.model(
                input_ids=next_ids[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
        if dummy:
            return []
        return [
            [
                self._completion(tokens[p * n + s], config, float(logprob[p * n + s]))
                for s in range(n)
            ]
            for p in range(len(prompts))
        ]

    def _any_live(self, done: torch.Tensor, lockstep: bool) -> bool:
        live = torch.tensor([int((~done).sum())])
        if lockstep:
            dist.all_reduce(live, op=dist.ReduceOp.SUM)
        return bool(live)

    def _hits_stop(self, tokens: list[int], stop: tuple[str, ...]) -> bool:
        """Whether the text of the last few tokens contains a stop string; decoding a window
        (a token is at least one character) keeps this O(1) per step."""
        if not stop:
            return False
        window = tokens[-(max(map(len, stop)) + 4) :]
        return (
            cut_at_stop(self.tokenizer.decode(window, skip_special_tokens=True), stop) is not None
        )

    def _completion(self, tokens: list[int], config: SamplingConfig, logprob: float) -> Completion:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = cut_at_stop(text, config.stop)
        stopped = cut is not None or (bool(tokens) and tokens[-1] in self.eos_token_ids)
        return Completion(
            text=text if cut is None else cut,
            token_ids=tokens,
            finish_reason="stop" if stopped else "length",
            logprob=logprob if config.logprobs else None,
        )


def _pick(
    logits: torch.Tensor,
    live: torch.Tensor,
    live_done: torch.Tensor,
    n: int,
    generators: list[torch.Generator],
    config: SamplingConfig,
) -> torch.Tensor:
    """Next token of every row. Sampling draws from each prompt's own generator for its
    unfinished rows only, so the draws do not depend on other prompts or on lockstep."""
    if config.greedy:
        return logits.argmax(-1)
    scores = logits if config.temperature == 1 else logits / config.temperature
    cdf = torch.softmax(_truncate(scores, config), dim=-1).cumsum(-1)
    next_ids = torch.zeros(len(cdf), dtype=torch.long, device=cdf.device)  # finished rows: unused
    prompt_of_row = live // n
    for prompt, generator in enumerate(generators):
        rows = ((prompt_of_row == prompt) & ~live_done.to(live.device)).nonzero()[:, 0]
        if len(rows):  # inverse CDF: one uniform per row (multinomial draws one per token)
            group = cdf[rows]
            u = torch.rand(len(rows), 1, generator=generator, device=cdf.device)
            picked = torch.searchsorted(group, u * group[:, -1:], right=True)
            next_ids[rows] = picked[:, 0].clamp(max=cdf.shape[-1] - 1)
    return next_ids


def _truncate(scores: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering; filtered tokens get -inf, the best one always stays."""
    if config.top_k and config.top_k < scores.shape[-1]:
        kth = scores.topk(config.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > config.top_p  # mass before this token already > top_p
        scores = scores.scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return scores


def _map_rows(cache: StaticCache, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply `rows` (repeat or select along the batch) to every layer's keys and values, in
    place of `batch_repeat_interleave` / `batch_select_indices`, which static layers lack."""
    for layer in cache.layers:
        layer.keys, layer.values = rows(layer.keys), rows(layer.values)
        layer.batch_size = layer.keys.shape[0]


def _eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """EOS ids from the generation config (int or list) and the tokenizer, as vLLM uses them."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    for token in [configured] if isinstance(configured, int) else configured or []:
        ids.append(int(token))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return list(dict.fromkeys(ids))
