import subprocess
import sys

import pytest
from click.testing import CliRunner

from dspark.cli import main


def test_import_and_help_stay_light():
    code = ("import sys, dspark, dspark.cli, dspark.config; "
            "print(any(m in sys.modules for m in ('torch', 'deepspeed', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", [[], ["prepare"], ["cache", "build"], ["cache", "inspect"], ["cache", "verify"],
                                     ["train"], ["eval"], ["calibrate"], ["export"], ["demo"], ["serve"],
                                     ["data", "fetch-prompts"]])
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "dspark " in result.output and ("Example" in result.output or "Quick start" in result.output)


def test_recipes_lists_shipped_recipes():
    result = CliRunner().invoke(main, ["recipes"])
    assert "smollm2_dspark" in result.output.split()
