"""``eurocore data example DIR``: a small multilingual corpus and a tokenizer trained on it,
to try the whole path (prepare, train) on a machine without data or hub access.

    DIR/corpus/en.jsonl, de.jsonl.gz, fi.jsonl.zst, fr.txt (one document per line)
    DIR/tokenizer/tokenizer.json, tokenizer_config.json   (byte-level BPE, EOS "</s>")

The text comes from a small grammar per language (subjects, verbs, objects, places and
times), so it has structure a model learns within a few hundred steps: the loss falls well
below the uniform log(vocab). It is made from a seed: the same files every time.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterable
from pathlib import Path

EOS = "</s>"

# language -> (subjects, verbs, objects, places, times); a sentence is
# "<subject> <verb> <object> <place> <time>." with the first letter capitalised.
GRAMMARS: dict[str, tuple[tuple[str, ...], ...]] = {
    "en": (("the farmer", "my sister", "a young engineer", "the old captain", "our teacher"),
           ("reads", "builds", "paints", "repairs", "finds"),
           ("a small boat", "the red house", "an old map", "three letters", "the bridge"),
           ("in Helsinki", "near the river", "at the harbour", "in the forest", "in Lisbon"),
           ("every morning", "in winter", "before dinner", "on Sundays", "at night")),
    "de": (("der Bauer", "meine Schwester", "eine junge Ingenieurin", "der alte Kapitän",
            "unser Lehrer"),
           ("liest", "baut", "malt", "repariert", "findet"),
           ("ein kleines Boot", "das rote Haus", "eine alte Karte", "drei Briefe",
            "die Brücke"),
           ("in München", "am Fluss", "im Hafen", "im Wald", "in Zürich"),
           ("jeden Morgen", "im Winter", "vor dem Abendessen", "sonntags", "in der Nacht")),
    "fi": (("maanviljelijä", "siskoni", "nuori insinööri", "vanha kapteeni", "opettajamme"),
           ("lukee", "rakentaa", "maalaa", "korjaa", "löytää"),
           ("pienen veneen", "punaisen talon", "vanhan kartan", "kolme kirjettä", "sillan"),
           ("Helsingissä", "joen lähellä", "satamassa", "metsässä", "Turussa"),
           ("joka aamu", "talvella", "ennen päivällistä", "sunnuntaisin", "yöllä")),
    "fr": (("le fermier", "ma sœur", "une jeune ingénieure", "le vieux capitaine",
            "notre professeur"),
           ("lit", "construit", "peint", "répare", "trouve"),
           ("un petit bateau", "la maison rouge", "une vieille carte", "trois lettres",
            "le pont"),
           ("à Marseille", "près de la rivière", "au port", "dans la forêt", "à Bruxelles"),
           ("chaque matin", "en hiver", "avant le dîner", "le dimanche", "la nuit")),
}
# How each language's file is written: a JSON Lines file plain, gzip'd, zstd'd, and text.
FILES = {"en": "en.jsonl", "de": "de.jsonl.gz", "fi": "fi.jsonl.zst", "fr": "fr.txt"}


def sentence(language: str, rng: random.Random) -> str:
    words = " ".join(rng.choice(part) for part in GRAMMARS[language])
    return words[0].upper() + words[1:] + "."


def documents(language: str, count: int, seed: int = 0) -> list[str]:
    """``count`` documents of 1 to 8 sentences."""
    rng = random.Random(f"{language}-{seed}")
    return [" ".join(sentence(language, rng) for _ in range(rng.randint(1, 8)))
            for _ in range(count)]


def train_tokenizer(texts: Iterable[str], directory: str | Path, vocab_size: int = 1000,
                    eos: str = EOS) -> Path:
    """A byte-level BPE tokenizer (any Unicode text encodes) trained on ``texts``, with
    ``eos`` as its end-of-document token named in tokenizer_config.json; returns
    ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}) + "\n")
    return directory


def write_example(directory: str | Path, documents_per_language: int = 2000,
                  seed: int = 0) -> dict[str, Path]:
    """Writes the corpus and the tokenizer under ``directory``; returns their paths
    ({language: file, "tokenizer": directory})."""
    directory = Path(directory)
    corpus = directory / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    every_text: list[str] = []
    for language, name in FILES.items():
        texts = documents(language, documents_per_language, seed)
        every_text += texts
        path = corpus / name
        lines = (texts if name.endswith(".txt")
                 else [json.dumps({"text": t, "lang": language}, ensure_ascii=False)
                       for t in texts])
        data = ("\n".join(lines) + "\n").encode()
        if name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        elif name.endswith(".zst"):
            import zstandard

            data = zstandard.ZstdCompressor().compress(data)
        path.write_bytes(data)
        written[language] = path
    written["tokenizer"] = train_tokenizer(every_text, directory / "tokenizer")
    return written
