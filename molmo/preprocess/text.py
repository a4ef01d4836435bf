"""The Qwen2 tokenizer with Molmo's tokens, and the prompt format."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
EOS = "<|endoftext|>"


class Tokenizer:
    """Encode/decode with `tokenizer.json`; EOS `<|endoftext|>` doubles as BOS and padding.

    Text is encoded as text: `<|endoftext|>` or `<im_patch>` typed in a prompt become ordinary
    tokens, so user text can neither end the prompt nor fake image slots. `special=True` gives the
    plain tokenizer's behaviour (the official processor's), where such strings are control tokens.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found")
        self.tok = _HFTokenizer.from_file(str(path))  # special-token strings -> control tokens
        self.text_tok = _HFTokenizer.from_file(str(path))
        self.text_tok.encode_special_tokens = True  # special-token strings -> their text's tokens
        self.special = {}
        for name in (EOS, *IMAGE_TOKENS):
            i = self.tok.token_to_id(name)
            if i is None:
                raise ValueError(f"{path}: tokenizer has no {name} token")
            self.special[name] = i
        self.eos_id = self.bos_id = self.special[EOS]

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text` (no BOS added); with special=True, special-token strings in it are
        encoded as those tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        try:
            return (self.tok if special else self.text_tok).encode(text, add_special_tokens=False).ids
        except (TypeError, ValueError, UnicodeError) as e:  # e.g. a lone surrogate
            raise ValueError(f"text cannot be encoded ({e}): {text[:40]!r}") from None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def format_prompt(text: str | None = None, messages: list[str] | None = None) -> str:
    """`" User: {text} Assistant:"`; with `messages` (user, assistant, user, ...) every turn in order.

    A conversation ending on a user turn is left open for the assistant's answer.
    """
    if messages is None:
        messages = [text or ""]
    elif text is not None:
        raise ValueError("pass either text or messages, not both")
    out = []
    for k, m in enumerate(messages):
        out.append(f" User: {m} Assistant:" if k % 2 == 0 else f" {m}")
    return "".join(out)
