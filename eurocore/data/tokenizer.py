"""Hugging Face tokenizers from local files (the ``tokenizers`` library; no hub access).

    tokenizer = load_tokenizer("tok/")            # a directory with tokenizer.json, or the file
    info = tokenizer_info("tok/")                 # name, sha256, vocabulary size, EOS id
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# End-of-document tokens of common tokenizers, tried in order when the directory's
# tokenizer_config.json names none (Llama 2 / Mistral, GPT-2 / NeoX, Llama 3, Gemma).
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """The ``tokenizer.json`` of ``path`` (a directory holding one, or the file itself);
    ValueError naming ``tokenizer`` when there is none."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"tokenizer: {str(path)!r} is neither a tokenizer.json nor a "
                         f"directory holding one (Hugging Face's fast-tokenizer format)")
    return file


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The ``tokenizers.Tokenizer`` at ``path`` (see :func:`tokenizer_file`)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("tokenizer: needs the 'tokenizers' package (pip install "
                         "'eurocore[data]')") from None
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the library raises its own exception type
        raise ValueError(f"tokenizer: cannot load {str(file)!r}: {err}") from None


@dataclass(frozen=True)
class TokenizerInfo:
    """What a dataset records of the tokenizer that made it."""

    path: str
    name: str
    sha256: str
    vocab_size: int
    eos_id: int
    eos_token: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tokenizer_info(path: str | os.PathLike[str], eos_token: str | None = None, *,
                   need_eos: bool = True) -> TokenizerInfo:
    """The tokenizer's name (its directory or file name), the sha256 of its tokenizer.json,
    its vocabulary size (added tokens included) and its end-of-document token: ``eos_token``
    if given, else the ``eos_token`` of a tokenizer_config.json beside it, else the first
    of EOS_CANDIDATES it knows (``need_eos=False``: none is fine, the id is then -1).
    ValueError naming ``tokenizer`` or ``eos_token`` otherwise."""
    file = tokenizer_file(path)
    tokenizer = load_tokenizer(file)
    if eos_token is None:
        eos_token = _configured_eos(file.parent / "tokenizer_config.json")
    candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
    eos = next(((c, tokenizer.token_to_id(c)) for c in candidates
                if tokenizer.token_to_id(c) is not None), None)
    if eos is None and not need_eos:
        eos = ("", -1)
    if eos is None:
        raise ValueError(f"eos_token: {str(file)!r} has no end-of-document token among "
                         f"{list(candidates)}; name it with --eos-token")
    name = Path(path).name or file.parent.name
    return TokenizerInfo(str(path), name, hashlib.sha256(file.read_bytes()).hexdigest(),
                         tokenizer.get_vocab_size(with_added_tokens=True), eos[1], eos[0])


def _configured_eos(config: Path) -> str | None:
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError):
        return None
    if isinstance(value, dict):  # {"content": "</s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None
