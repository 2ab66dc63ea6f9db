"""The `loralab` command: --json contract, errors, and the demo end to end."""

import json
import subprocess
import sys

from loralab.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_end_to_end_json_on_stdout_human_on_stderr():
    proc = _run("demo", "--json", "--steps", "150")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object
    assert "trainable params:" in proc.stderr
    assert result["lora_mse_shifted"] < 0.25 * result["base_mse_shifted"]
    assert result["merge_max_abs_diff"] < 1e-5
    assert result["lora_modules_after_unload"] == 0
    assert 0 < result["trainable_params"] < result["total_params"]


def test_bad_value_is_a_clear_error(capsys):
    code = main(["demo", "--json", "--r", "0"])
    captured = capsys.readouterr()
    assert code == 2
    assert "r must be a positive integer" in json.loads(captured.out)["error"]
    assert "loralab demo: error:" in captured.err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
