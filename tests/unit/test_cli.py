"""One argument style for the command-line tools (rl.cli): key=value options, --switches, and a
clear error naming anything else."""
import pytest

from rl import evaluate, launch, plot, sft
from rl.cli import UsageError, parse_command_line

USAGE = "usage: tool a=... [b=...] [--go]"


def test_options_overrides_and_switches_are_told_apart():
    line = parse_command_line(
        ["a=1", "train.steps=3", "--go", "b=x=y", "train.steps=4"], USAGE, ("a", "b"), ("--go",),
        config_override=lambda key: "." in key,
    )
    assert line.options == {"a": "1", "b": "x=y"}  # only the first `=` splits
    assert line.overrides == ["train.steps=3", "train.steps=4"]  # in order: the later one wins when merged
    assert line.switches == {"--go"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a"], r"Argument `a` is not of the form key=value\.\nusage: tool"),
        (["=1"], r"Argument `=1` is not of the form key=value"),
        (["--stop"], r"Unknown switch `--stop`: its switches are --go; options are key=value\.\nusage"),
        (["c=1"], r"Unknown option `c`\. Options: a, b\.\nusage"),
        (["a=1", "a=2"], r"`a` is given twice \(a=1 and a=2\); give it once"),
    ],
)
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_command_line(argv, USAGE, ("a", "b"), ("--go",))


def test_launch_names_a_bad_switch_and_a_positional_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["recipe=grpo_smollm2", "--dryrun"])
    assert exit_info.value.code == 2
    assert "Unknown switch `--dryrun`: its switches are --print-config, --dry-run, --verbose" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.main(["grpo_smollm2"])
    assert "Argument `grpo_smollm2` is not of the form key=value" in capsys.readouterr().err


def test_sft_evaluate_and_plot_name_bad_arguments(capsys):
    assert sft.main(["sft_qwen"]) == 2
    assert "Argument `sft_qwen` is not of the form key=value" in capsys.readouterr().err
    assert evaluate.main(["model=x", "--k=4"]) == 2
    assert "Unknown switch `--k=4`: it takes no switches; options are key=value" in capsys.readouterr().err
    assert plot.main(["out=x.png"]) == 2
    assert "Missing `run=...`" in capsys.readouterr().err
