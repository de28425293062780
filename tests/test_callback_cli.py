"""WiSEFTCallback configured from a YAML file through LightningCLI (jsonargparse)."""

from __future__ import annotations

import json

import torch
from lightning.pytorch.cli import LightningCLI

from callback_toy import ToyModule, toy_problems
from wise_callback import WiSEFTCallback
from wise_callback.demo.model import char_tokenizer


def test_lightning_cli_builds_the_callback_from_yaml(tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in toy_problems(3)))
    char_tokenizer().save_pretrained(tmp_path / "tokenizer")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: wise_callback.WiSEFTCallback
      init_args:
        problems: {problems}
        tokenizer: {tmp_path / "tokenizer"}
        grader: wise_callback.grading.exact_match
        snapshot_at: 2
        eval_every_n_steps: 3
        num_samples: 4
        ks: [1, 4]
        alphas: [0.5]
        final_alpha: best
        select_metric: maj@4
        max_new_tokens: 3
        sampling:
          top_p: 0.9
        snapshotting:
          dtype: bfloat16
        sample_logging:
          progress: false
model:
  lr: 0.003
"""
    )
    cli = LightningCLI(ToyModule, args=["fit", "--config", str(config)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, WiSEFTCallback)]
    assert callback.select_metric == "maj@4" and callback.config.ks == (1, 4)
    assert callback.config.sampling.top_p == 0.9 and not callback.sample_logging.progress
    assert callback.snapshot is not None
    assert {t.dtype for t in callback.snapshot.tensors.values()} == {torch.bfloat16}
    # the default schedule: the current weights at step 3, the grid for the final choice at 4
    assert [(r["step"], r["alpha"]) for r in callback.history] == [
        (2, 0.0), (3, 1.0), (4, 0.5), (4, 1.0),
    ]  # fmt: skip
    assert callback.chosen_alpha in (0.5, 1.0)
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == callback.history
