"""The command line of ``eurocore train``, generated from TrainConfig's fields
(``eurocore.train.config.field_specs``): each field's flag, type, default and help are
stated once, on the field.

Flags override a ``--config`` file, which overrides the defaults: a flag's value reaches
the config only when the flag is given (its argparse default is "absent").

A few flags say what the command does with the config rather than what the run is
(``--dry-run``, ``--world-size``, ``--device-memory-gib``): :class:`CommandOptions`, stated
once in COMMAND_OPTIONS and read by a parser of their own, so the config's parser keeps
exactly one option per field; ``--help`` shows both.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eurocore.train.config import FieldSpec, TrainConfig, field_specs, load_config
from eurocore.utils.checks import check_int, check_number

# bool | None fields on the command line: auto is None (the field's help says what it means)
_TRISTATE = {"auto": None, "on": True, "off": False}


@dataclass(frozen=True)
class CommandOptions:
    """What the command does with the run's config (not part of the run: never in a config
    file nor in a run's config.toml).

    Attributes:
        dry_run: resolve the config and the layout, print the parameters and the estimated
            memory per rank, and exit: no GPU is used and no process group is made.
        world_size: the processes the dry run plans for (default: the launcher's, else the
            SLURM job's tasks, else 1).
        device_memory_gib: the memory of one GPU the dry run compares against (default:
            the visible GPU's, if any).
    """

    dry_run: bool = False
    world_size: int | None = None
    device_memory_gib: float | None = None

    def __post_init__(self) -> None:
        if self.world_size is not None:
            check_int("world_size", self.world_size, minimum=1)
        if self.device_memory_gib is not None:
            check_number("device_memory_gib", self.device_memory_gib, minimum=0.0,
                         inclusive=False)
        if not self.dry_run:
            for name in ("world_size", "device_memory_gib"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only for --dry-run (a run takes its world "
                                     f"size from its launcher and its memory from its GPU)")


# CommandOptions' flags: (field, flag, argparse keywords); the help is stated here once.
COMMAND_OPTIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("dry_run", "--dry-run", {
        "action": "store_true",
        "help": "resolve the config and the layout, print the parameters and estimated memory "
                "per rank (weights, gradients, optimizer state, activations) against the "
                "device memory, and exit without using a GPU or making a process group "
                "(exit status 2 when the estimate exceeds the device memory)"}),
    ("world_size", "--world-size", {
        "type": int, "metavar": "N",
        "help": "with --dry-run: the number of processes to plan for (default: the "
                "launcher's, else SLURM_NTASKS in a batch script, else 1)"}),
    ("device_memory_gib", "--device-memory-gib", {
        "type": float, "metavar": "GIB",
        "help": "with --dry-run: one GPU's memory in GiB (default: the visible GPU's; e.g. 64 "
                "for an MI250X GCD)"}),
)


class ConfigParser(argparse.ArgumentParser):
    """The parser of the run's options; ``option_of`` maps a field (and the model fields an
    option sets, and CommandOptions' fields) to the flag a user types, so an error naming a
    field (``lr: ...``) can name the option (``--lr: ...``). ``command_parser`` reads the
    command's own flags (COMMAND_OPTIONS) first; the help lists them after the fields'."""

    option_of: dict[str, str]
    command_parser: argparse.ArgumentParser | None = None

    def format_help(self) -> str:
        text = super().format_help()
        if self.command_parser is None:
            return text
        formatter = self.command_parser._get_formatter()
        for group in self.command_parser._action_groups:
            if group._group_actions:
                formatter.start_section(group.title)
                formatter.add_arguments(group._group_actions)
                formatter.end_section()
        return text + "\n" + formatter.format_help()


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
    parser.command_parser = argparse.ArgumentParser(
        prog=prog, add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    command = parser.command_parser.add_argument_group(
        "command (what to do with the config; not part of it)")
    for name, flag, kwargs in COMMAND_OPTIONS:
        command.add_argument(flag, dest=name, **kwargs)
        parser.option_of[name] = flag
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
    """The TrainConfig of ``argv``: the ``--config`` file (if any), then the flags given
    (:func:`parse_command` without the command's own options).

    Raises:
        ValueError: a value the field cannot take, naming the field (TrainConfig's checks),
            or the file and key (a config file's).
    """
    return parse_command(parser, argv)[0]


def parse_command(parser: ConfigParser, argv: Sequence[str] | None
                  ) -> tuple[TrainConfig, CommandOptions]:
    """The TrainConfig of ``argv`` (the ``--config`` file, then the flags given) and its
    :class:`CommandOptions`.

    Raises:
        ValueError: naming the field (TrainConfig's and CommandOptions' checks), or the
            config file and key.
    """
    command, argv = (parser.command_parser.parse_known_args(argv)
                     if parser.command_parser is not None else (argparse.Namespace(), argv))
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    command = CommandOptions(**vars(command))
    specs = {spec.name: spec for spec in field_specs()}
    overrides = {name: _value(specs[name], value) for name, value in args.items()}
    return load_config(path, overrides), command


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
