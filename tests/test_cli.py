"""The command line a first user meets: ``--version``, and options between the positionals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import run_cli


def test_version_prints_the_installed_package_version():
    installed = metadata.version("nvfp4-ray")
    done = subprocess.run([sys.executable, "-m", "nvfp4_ray.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"nvfp4-ray {installed}"
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")) as handle:  # no tomllib on 3.10
        assert re.search(r'^version = "([^"]+)"', handle.read(), re.MULTILINE).group(1) == installed


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "SRC", "--calibration", "C.parquet", "DEST"],
        ["quantize", "--calibration", "C.parquet", "SRC", "DEST"],
        ["quantize", "SRC", "DEST", "--calibration", "C.parquet"],
        ["quantize", "SRC", "--ignore", "lm_head", "re:.*gate", "--calibration", "C.parquet", "DEST", "--exact"],
    ],
)
def test_options_may_sit_anywhere_among_the_positionals(argv):
    from nvfp4_ray.cli import build_parser

    _, commands = build_parser()
    args = commands["quantize"].parse_intermixed_args(argv[1:])
    assert (args.source, args.dest, args.calibration) == ("SRC", "DEST", "C.parquet")
    if "--ignore" in argv:
        assert args.ignore == ["lm_head", "re:.*gate"] and args.exact is True


@pytest.mark.usefixtures("ray_instance")  # the job joins the session's instance, if one is up
def test_a_command_with_an_option_between_its_positionals_runs(tmp_path):
    """Through main(): DEST after an option is DEST, not an unrecognized argument; the job
    then reports the missing SOURCE as it would for any order."""
    dest = str(tmp_path / "dest")
    code, stdout, stderr = run_cli("quantize", str(tmp_path / "nope"), "--calibration", "c.parquet", dest)
    assert code == 2 and "unrecognized arguments" not in stderr, stderr
    assert "does not exist" in json.loads(stdout.strip().splitlines()[-1])["error"]
    assert not os.path.exists(dest)
    code, stdout, _ = run_cli("export", str(tmp_path / "nope"), str(tmp_path / "target"))
    assert code == 2 and json.loads(stdout.strip().splitlines()[-1])["error"].endswith("does not exist")


def test_unknown_options_and_commands_are_still_refused():
    for argv in (["quantize", "SRC", "DEST", "--no-such-option"], ["no-such-command"], []):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(*argv)
        assert exit_info.value.code == 2
