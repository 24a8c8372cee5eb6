"""``python -m eurocore.data`` / ``eurocore data``: data tools.

    eurocore data prepare --input corpus/*.jsonl.zst --tokenizer tok/ --output-prefix data/web
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None, prog: str = "python -m eurocore.data") -> int:
    """Runs a data sub-command; returns 0, or 2 after a one-line message naming what is
    wrong (an option, a file and line)."""
    from eurocore.data import prepare

    parser = argparse.ArgumentParser(prog=prog, description="eurocore's data tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    prepare.add_arguments(sub.add_parser(
        "prepare", help="tokenize text files into a Megatron indexed dataset (.bin/.idx)",
        description=prepare.__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return prepare.run(args)
    except ValueError as err:
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
