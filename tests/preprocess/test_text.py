import pytest

from molmo.preprocess import Tokenizer, format_prompt

from conftest import TOKENIZER, golden_cases


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


@pytest.mark.parametrize("case", golden_cases("tokenizer"), ids=lambda c: c["text"][:20])
def test_ids_prompt_ids_and_decoding_match_reference(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.encode(format_prompt(case["text"])) == case["prompt_ids"]
    assert tok.decode(case["ids"]) == case["decoded"]


def test_special_token_ids(tok):
    assert tok.eos_id == tok.bos_id == 151643
    assert tok.special == {"<|endoftext|>": 151643, "<im_start>": 152064, "<im_end>": 152065,
                           "<im_patch>": 152066, "<im_col>": 152067, "<|image|>": 152068}


def test_prompt_format_single_and_multi_turn():
    assert format_prompt("Hi") == " User: Hi Assistant:"
    assert format_prompt(messages=["Hi", "Hello!", "Count"]) == " User: Hi Assistant: Hello! User: Count Assistant:"
    with pytest.raises(ValueError):
        format_prompt("a", messages=["b"])
