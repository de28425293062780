"""Shared test setup: one torch thread (faster for tiny models on 2 cores), tiny assets."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from wise_callback.demo.model import char_tokenizer, tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh seeded 2-layer Llama (head_dim 32, so vLLM's CPU kernels accept it)."""
    return tiny_llama(len(tokenizer), seed=0, tokenizer=tokenizer)
