"""The command line of ``eurocore train``, generated from TrainConfig's fields
(``eurocore.train.config.field_specs``): each field's flag, type, default and help are
stated once, on the field.

Flags override a ``--config`` file, which overrides the defaults: a flag's value reaches
the config only when the flag is given (its argparse default is "absent").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from eurocore.train.config import FieldSpec, TrainConfig, field_specs, load_config

# bool | None fields on the command line: auto is None (the field's help says what it means)
_TRISTATE = {"auto": None, "on": True, "off": False}


class ConfigParser(argparse.ArgumentParser):
    """The parser of the run's options; ``option_of`` maps a field (and the model fields an
    option sets) to the flag a user types, so an error naming a field (``lr: ...``) can name
    the option (``--lr: ...``)."""

    option_of: dict[str, str]


def build_parser(prog: str, description: str) -> ConfigParser:
    """``--config FILE`` and one option per TrainConfig field (see the module docstring)."""
    parser = ConfigParser(prog=prog, description=description,
                          argument_default=argparse.SUPPRESS)
    parser.option_of = {}
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="a TOML run configuration (configs/ has examples; a run's "
                             "output directory holds its resolved config.toml); flags "
                             "override its values")
    groups = {}
    for spec in field_specs():
        if not spec.cli:
            continue
        group = groups.get(spec.section) or groups.setdefault(
            spec.section, parser.add_argument_group(f"[{spec.section}]"))
        group.add_argument(*spec.flags, dest=spec.name, **_argument(spec))
        parser.option_of[spec.name] = spec.flags[0]
    parser.option_of.setdefault("model_overrides", parser.option_of["num_layers"])
    return parser


def _argument(spec: FieldSpec) -> dict[str, Any]:
    """argparse keywords for one field; values stay strings where the field's own check
    says more than argparse would (lists of ints)."""
    default = "" if spec.default is None else f" (default {_shown(spec.default)})"
    if spec.kind == "bool" and not spec.optional:
        return {"action": argparse.BooleanOptionalAction,
                "help": f"{spec.help} (default {'on' if spec.default else 'off'})"}
    if spec.kind == "bool":
        return {"choices": tuple(_TRISTATE), "help": f"{spec.help} (default auto)"}
    kwargs: dict[str, Any] = {"help": spec.help + default, "metavar": spec.metavar}
    if spec.kind in ("int", "float"):
        kwargs["type"] = int if spec.kind == "int" else float
    elif spec.kind == "strs":
        kwargs["nargs"] = "+"
    if spec.choices:
        kwargs["choices"] = spec.choices
    return kwargs


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_config(parser: ConfigParser, argv: Sequence[str] | None) -> TrainConfig:
    """The TrainConfig of ``argv``: the ``--config`` file (if any), then the flags given.

    Raises:
        ValueError: a value the field cannot take, naming the field (TrainConfig's checks),
            or the file and key (a config file's).
    """
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    specs = {spec.name: spec for spec in field_specs()}
    overrides = {name: _value(specs[name], value) for name, value in args.items()}
    return load_config(path, overrides)


def _value(spec: FieldSpec, value: Any) -> Any:
    if spec.kind == "bool" and spec.optional:
        return _TRISTATE[value]
    if spec.kind == "ints":
        try:
            return tuple(int(n) for n in value.split(","))
        except ValueError:
            raise ValueError(f"{spec.name}: expected comma-separated ints like 3,4,4,3, got "
                             f"{value!r}") from None
    if spec.kind == "strs":
        return tuple(value)
    return value
