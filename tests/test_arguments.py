"""Every argument of the callbacks is checked in the constructor, before any training, with an
error that names it (wrong values and wrong types alike)."""

from __future__ import annotations

import pytest

from callback_toy import toy_problems
from wise_callback import WiSEFTCallback
from wise_callback.demo.model import char_tokenizer
from wise_callback.grading import exact_match
from wise_callback.options import EvalOptions, SamplingOptions, SnapshotOptions

BAD = [
    # wrong values
    (dict(problems=[]), ValueError, "problems is empty"),
    (dict(problems=[{"prompt": "1+1="}]), ValueError, r"lacks \['answer'\]"),
    (dict(alphas=(0.5, 1.5)), ValueError, r"outside \[0, 1\]"),
    (dict(alphas=(float("nan"),)), ValueError, "finite"),
    (dict(ks=(1, 32)), ValueError, "k=32 .* larger than num_samples=16"),
    (dict(select_metric="pass@64"), ValueError, "select_metric='pass@64' is not among"),
    (dict(select_metric="var_rho"), ValueError, "larger is better"),
    (dict(snapshot_at=1.5), ValueError, "fraction of the planned steps"),
    (dict(snapshot_at=0), ValueError, "step >= 1"),
    (dict(eval_every_n_steps=0), ValueError, "eval_every_n_steps must be >= 1"),
    (dict(final_alpha="worst"), ValueError, "final_alpha must be a float, 'best' or None"),
    (dict(final_alpha=2.0), ValueError, r"outside \[0, 1\]"),
    (dict(sampler="sglang"), ValueError, "sampler must be one of"),
    (dict(collapse={"on_collapse": "panic"}), ValueError, "collapse.on_collapse must be one of"),
    (dict(collapse={"min_drop": -0.1}), ValueError, "collapse.min_drop must be >= 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(problems="/nonexistent/problems.jsonl"), FileNotFoundError, "problems file not found"),
    (dict(snapshotting={"dtype": "int8"}), ValueError, "snapshotting.dtype must be a floating"),
    (dict(alphas=(0.5, 0.501)), ValueError, "collide"),
    (dict(grader="wise_callback.grading.no_such_grader"), ValueError, "grader: cannot import"),
    (dict(sampling={"sampler_kwargs": {"bogus": 1}}), ValueError, r"sampler options \['bogus'\]"),
    (dict(sampler_options={"bogus": 1}), ValueError, r"sampler options \['bogus'\]"),
    (dict(evaluation={"max_problems": 0}), ValueError, "evaluation.max_problems must be >= 1"),
    (dict(num_examples_to_log=-1), ValueError, "sample_logging.num_examples_to_log must be >= 0"),
    (dict(evaluation={"time_budget_s": 0.0}), ValueError, "evaluation.time_budget_s must be > 0"),
    (dict(evaluation={"time_budget_s": float("inf")}), ValueError, "time_budget_s must be finite"),
    (dict(evaluation={"halving": 0.0}), ValueError, "evaluation.halving must be > 0"),
    (dict(evaluation={"halving": 1.5}), ValueError, "evaluation.halving must be <= 1.0"),
    (dict(evaluation={"halving": "half"}), TypeError, "evaluation.halving must be a number"),
    (dict(evaluation={"grid_every": 0}), ValueError, "evaluation.grid_every must be >= 1"),
    (dict(tokenizer=char_tokenizer(), apply_chat_template=True), ValueError, "no chat_template"),
    (dict(problems={}), ValueError, "empty mapping"),
    # wrong types
    (dict(print_samples=1.5), TypeError, "sample_logging.print_samples must be an int"),
    (dict(save_generations=3), TypeError, "save_generations must be a bool or a folder"),
    (dict(evaluation=EvalOptions), TypeError, "evaluation must be a EvalOptions or a dict"),
    (dict(grade_workers=1.5), TypeError, "evaluation.grade_workers must be an int"),
    (dict(evaluation={"grade_workers": 1.5}), TypeError, "evaluation.grade_workers must be an int"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(alphas=0.5), TypeError, "alphas must be a list or tuple"),
    (dict(ks=4), TypeError, "ks must be a list or tuple"),
    (dict(problems=None), TypeError, "problems must be"),
    (dict(tokenizer=42), TypeError, "tokenizer must be None, a tokenizer"),
    (dict(num_samples="16"), TypeError, "num_samples must be an int"),
    (dict(max_new_tokens=6.5), TypeError, "max_new_tokens must be an int"),
    (dict(grader=42), TypeError, "grader must be a callable"),
    (dict(sampler=object()), TypeError, "sampler must be 'hf', 'vllm' or a Sampler"),
    (dict(save_merged_to=3), TypeError, "save_merged_to must be a folder path"),
    (dict(sampling={"top_k": 2.5}), TypeError, "sampling.top_k must be an int"),
    (dict(sampling={"stop": "\n"}), TypeError, "sampling.stop must be a list of strings"),
    (
        dict(sampling={"temperature": 1.0}),
        TypeError,
        r"sampling has no option\(s\) \['temperature'\]",
    ),
    (dict(sample_logging={"progress": "no"}), TypeError, "sample_logging.progress must be True"),
    (dict(model_attr=3), TypeError, "model_attr must be an attribute path or a callable"),
    (dict(no_such_option=1), TypeError, r"unexpected keyword argument\(s\) \['no_such_option'\]"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_a_bad_argument_fails_in_the_constructor_naming_it(kwargs, error, match):
    arguments = dict(problems=toy_problems(), grader=exact_match)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        WiSEFTCallback(**arguments)


def test_option_groups_take_dataclasses_or_dicts_and_flat_names_still_work():
    grouped = WiSEFTCallback(
        toy_problems(),
        sampling=SamplingOptions(top_p=0.9, seed=3),
        snapshotting={"dtype": "bfloat16"},
    )
    with pytest.warns(FutureWarning, match=r"top_p -> sampling\.top_p"):
        flat = WiSEFTCallback(toy_problems(), top_p=0.9, seed=3, snapshot_dtype="bfloat16")
    for callback in (grouped, flat):
        assert callback.sampling == SamplingOptions(top_p=0.9, seed=3)
        assert callback.snapshotting == SnapshotOptions(dtype="bfloat16")
        assert callback.config.sampling.top_p == 0.9 and callback.config.sampling.seed == 3
