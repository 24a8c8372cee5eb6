"""``python -m eurocore.data`` / ``eurocore data``: data tools.

    eurocore data prepare --input corpus/*.jsonl.zst --tokenizer tok/ --output-prefix data/web
    eurocore data example DIR    # a small multilingual corpus and its tokenizer, to try it
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None, prog: str = "python -m eurocore.data") -> int:
    """Runs a data sub-command; returns 0, or 2 after a one-line message naming what is
    wrong (an option, a file and line)."""
    from eurocore.data import example, prepare

    parser = argparse.ArgumentParser(prog=prog, description="eurocore's data tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    prepare.add_arguments(sub.add_parser(
        "prepare", help="tokenize text files into a Megatron indexed dataset (.bin/.idx)",
        description=prepare.__doc__.split("\n\n")[0]))
    example_parser = sub.add_parser(
        "example", help="write a small multilingual corpus and a tokenizer trained on it",
        description=example.__doc__.split("\n\n")[0])
    example_parser.add_argument("directory", help="where corpus/ and tokenizer/ go")
    example_parser.add_argument("--documents", type=int, default=2000,
                                help="documents per language (default 2000)")
    args = parser.parse_args(argv)
    try:
        if args.command == "example":
            if args.documents < 1:
                raise ValueError(f"--documents: expected an int >= 1, got {args.documents}")
            written = example.write_example(args.directory, args.documents)
            for what, path in written.items():
                print(f"{what:9s} {path}")
            return 0
        return prepare.run(args)
    except ValueError as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
