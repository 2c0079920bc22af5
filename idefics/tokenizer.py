"""The checkpoint's tokenizer, read from `tokenizer.json` with the `tokenizers` library. Special tokens
(bos/eos/pad/unk and the IDEFICS additions) come from the checkpoint's files, never from hard-coded ids."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from .config import read_json

FAKE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"


def _token_text(value: Any) -> str | None:
    """Special tokens appear as plain strings or as AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Thin wrapper: encode/decode plus the special tokens a VLM needs."""

    def __init__(self, backend: RustTokenizer, special: dict[str, str | None],
                 additional_special_tokens: list[str] | None = None, chat_template: str | None = None) -> None:
        self.backend = backend
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.unk_token = special.get("unk_token")
        self.pad_token = special.get("pad_token") or self.unk_token
        self.additional_special_tokens = list(additional_special_tokens or [])
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        backend = RustTokenizer.from_file(str(path))
        config = read_json(folder / "tokenizer_config.json", required=False)
        special_map = read_json(folder / "special_tokens_map.json", required=False)
        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            special[name] = _token_text(special_map.get(name)) or _token_text(config.get(name))
        additional = [_token_text(t) for t in special_map.get("additional_special_tokens", [])]
        additional += [_token_text(t) for t in config.get("additional_special_tokens", []) or []]
        extra = config.get("extra_special_tokens") or []  # transformers 5 name
        additional += [_token_text(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        additional = list(dict.fromkeys(t for t in additional if t))
        return cls(backend, special, additional, config.get("chat_template"))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def require_id(self, token: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token (is this an IDEFICS tokenizer?)")
        return token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        pad = self.token_to_id(self.pad_token)
        return 0 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_end_of_utterance(self) -> bool:
        """True for instruct tokenizers: `<end_of_utterance>` is one of their additional special tokens."""
        return END_OF_UTTERANCE in self.additional_special_tokens

    @cached_property
    def longest_token(self) -> int:
        """Characters in the longest vocabulary entry: no token covers more text than this, so a text longer than
        n * longest_token cannot fit in n tokens (checked before tokenizing)."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        token = self.backend.id_to_token(token_id)
        added = self.backend.get_added_tokens_decoder().get(token_id)
        return bool(added is not None and added.special) or token in (self.bos_token, self.eos_token, self.pad_token)
