"""The one argument style of the command-line tools (rl.launch, rl.evaluate, rl.sft, rl.compare,
rl.plot, rewards.check): every option is `key=value`, the same form as a config override (`train.steps=5`), and
the few switches that take no value are `--name` (`--dry-run`). A list is comma-separated
(`benchmarks=gsm8k,math500`, `runs=A,B`). -h / --help prints the tool's usage."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class UsageError(ValueError):
    """The command line is malformed: the message names the argument and shows the usage."""


@dataclass
class CommandLine:
    options: dict[str, str] = field(default_factory=dict)  # the tool's own keys
    overrides: list[str] = field(default_factory=list)  # `key=value` config overrides, in order
    switches: set[str] = field(default_factory=set)  # the `--name` switches given


def tool_arguments(argv: list[str] | None, usage: str) -> list[str] | None:
    """A tool's arguments (sys.argv's when None); None once -h or --help has printed the usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(usage)
        return None
    return argv


def parse_command_line(
    argv: list[str],
    usage: str,
    keys: Iterable[str],
    switches: Iterable[str] = (),
    config_override: Callable[[str], bool] | None = None,
) -> CommandLine:
    """Split argv into the tool's options (`keys`, each at most once), config overrides (keys for
    which `config_override(key)` holds; the config loader checks them and names a wrong one; a
    later one wins, as in a recipe override) and switches; a UsageError names anything else."""
    keys, switches = tuple(keys), tuple(switches)
    line = CommandLine()
    for arg in argv:
        if arg.startswith("--"):
            if arg not in switches:
                known = f"its switches are {', '.join(switches)}" if switches else "it takes no switches"
                raise UsageError(f"Unknown switch `{arg}`: {known}; options are key=value.\n{usage}")
            line.switches.add(arg)
            continue
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise UsageError(f"Argument `{arg}` is not of the form key=value.\n{usage}")
        if key in keys:
            if key in line.options:
                raise UsageError(f"`{key}` is given twice ({key}={line.options[key]} and {arg}); give it once.")
            line.options[key] = value
        elif config_override is not None and config_override(key):
            line.overrides.append(arg)
        else:
            also = ", or a config key such as rollout.kv_cache_gb=2" if config_override is not None else ""
            raise UsageError(f"Unknown option `{key}`. Options: {', '.join(keys)}{also}.\n{usage}")
    return line


def require(line: CommandLine, key: str, usage: str) -> str:
    """The value of a mandatory option."""
    if not line.options.get(key):
        raise UsageError(f"Missing `{key}=...`.\n{usage}")
    return line.options[key]
