"""Tiny tokenizers and corpora built on the spot (no hub downloads), shared by the data,
training and benchmark tests.

    tokenizer_dir = make_tokenizer(tmp_path)           # byte-level BPE + tokenizer_config.json
    prefix = make_corpus(tmp_path, tokenizer_dir)      # prepared .bin/.idx/.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from eurocore.data.example import EOS, train_tokenizer

# Multilingual text with the hard cases: accents, Cyrillic, Greek, CJK, emoji, blank lines.
TEXTS = [
    "Hyvää päivää! Tämä on suomenkielinen lause, jossa on ääkkösiä.",
    "Привет, мир! Это предложение на русском языке.",
    "Καλημέρα κόσμε· αυτή είναι μια ελληνική πρόταση.",
    "日本語の文です。这是一个中文句子。한국어 문장입니다.",
    "Emoji: 🎉🚀👩‍💻 and flags 🇪🇺🇫🇮.",
    "",
    "   ",
    "Ça va très bien, merci. Ñandú, Straße, Øresund, İstanbul.",
    "Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "The quick brown fox jumps over the lazy dog.\nA second line in the same document.",
]


def make_tokenizer(directory: Path, vocab_size: int = 500) -> Path:
    """A byte-level BPE tokenizer trained on TEXTS (any Unicode encodes), with ``</s>`` as
    its end-of-document token named in tokenizer_config.json; returns its directory
    (``directory/tokenizer``)."""
    return train_tokenizer(TEXTS * 10, Path(directory) / "tokenizer", vocab_size, EOS)


def documents(count: int, seed: int = 0) -> list[str]:
    """``count`` documents of 1 to 6 sentences from TEXTS, blank ones included."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(TEXTS) for _ in range(rng.randint(1, 6))) for _ in range(count)]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}, ensure_ascii=False) + "\n")
    return path


def make_corpus(directory: Path, tokenizer_dir: Path, name: str = "corpus",
                count: int = 200, seed: int = 0) -> str:
    """A prepared corpus of ``count`` documents; returns its prefix."""
    from eurocore.data.prepare import prepare

    source = write_jsonl(Path(directory) / f"{name}.jsonl", documents(count, seed))
    prefix = str(Path(directory) / "prepared" / name)
    prepare([str(source)], str(tokenizer_dir), prefix, progress=False)
    return prefix
