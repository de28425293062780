"""The shared tiny model and character tokenizer round-trip through disk like real HF assets."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from wise_callback.demo.model import char_tokenizer, tiny_llama


def test_char_tokenizer_round_trips_text_and_disk(tmp_path):
    tokenizer = char_tokenizer()
    text = "23+45-17+08=68;51;59\nthe answer is \\boxed{7}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.decode(ids) == text
    assert reloaded.padding_side == "left"


def test_tiny_llama_is_seeded_and_saves(tmp_path):
    tokenizer = char_tokenizer()
    first = tiny_llama(len(tokenizer), seed=3, tokenizer=tokenizer)
    second = tiny_llama(len(tokenizer), seed=3, tokenizer=tokenizer)
    second_state = second.state_dict()
    for name, tensor in first.state_dict().items():
        assert second_state[name].equal(tensor), name
    assert first.config.head_dim >= 32
    first.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in first.state_dict().items():
        assert reloaded.state_dict()[name].equal(tensor), name
