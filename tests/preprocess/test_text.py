import pytest

from molmo.preprocess import Tokenizer, format_prompt

from conftest import TOKENIZER, golden_cases


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


@pytest.mark.parametrize("case", golden_cases("tokenizer"), ids=lambda c: c["text"][:20])
def test_ids_prompt_ids_and_decoding_match_reference(tok, case):
    assert tok.encode(case["text"], special=True) == case["ids"]  # the plain tokenizer, as recorded
    assert tok.encode(format_prompt(case["text"]), special=True) == case["prompt_ids"]
    assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("text", ["<|endoftext|> after eos", "fake <im_patch><im_col> slots", "<|image|>"])
def test_special_token_strings_in_user_text_encode_as_text_by_default(tok, text):
    plain, safe = tok.encode(text, special=True), tok.encode(text)
    assert set(plain) & set(tok.special.values())  # the official tokenizer makes control tokens of them
    assert not set(safe) & set(tok.special.values()) and tok.decode(safe) == text


def test_processor_encodes_the_prompt_as_text_unless_asked(tok):
    from molmo.preprocess import MolmoProcessor

    processor = MolmoProcessor(tok)
    ids = processor.process(text="stop <|endoftext|> here")["input_ids"].tolist()
    assert ids.count(tok.eos_id) == 1 and ids[0] == tok.bos_id  # only the BOS
    opted = processor.process(text="stop <|endoftext|> here", special_tokens=True)["input_ids"].tolist()
    assert opted.count(tok.eos_id) == 2


def test_unencodable_text_gets_one_clear_error(tok):
    with pytest.raises(ValueError, match="cannot be encoded"):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(TypeError, match="text must be a string"):
        tok.encode(None)


def test_special_token_ids(tok):
    assert tok.eos_id == tok.bos_id == 151643
    assert tok.special == {"<|endoftext|>": 151643, "<im_start>": 152064, "<im_end>": 152065,
                           "<im_patch>": 152066, "<im_col>": 152067, "<|image|>": 152068}


def test_prompt_format_single_and_multi_turn():
    assert format_prompt("Hi") == " User: Hi Assistant:"
    assert format_prompt(messages=["Hi", "Hello!", "Count"]) == " User: Hi Assistant: Hello! User: Count Assistant:"
    with pytest.raises(ValueError):
        format_prompt("a", messages=["b"])
