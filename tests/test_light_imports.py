"""The command line imports only what the command it runs needs: `loralab spirals` and `loralab energy` run with
torch and matplotlib absent (the NumPy reference is all they use), and spirals without matplotlib prints its
numbers and says how to get the plot.

torch and matplotlib are hidden for real, in a fresh interpreter: an import hook at the front of sys.meta_path
refuses them as if they were not installed (no stub package stands in for them).  `loralab.cli` is imported
two ways: as usual (through loralab/__init__.py), and through a stand-in package object that has loralab's
directory as its path but does not run __init__.py, which checks the path cli -> cli_args -> reference alone.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "loralab"
HIDDEN = ("torch", "matplotlib", "transformers")
HEAVY = ("torch", "matplotlib", "transformers", "safetensors", "loralab.trainer", "loralab.train_job", "loralab.train_run",
         "loralab.train_cli", "loralab.checkpoint", "loralab.dataset", "loralab.hf", "loralab.layer",
         "loralab.inject", "loralab.files", "loralab.save", "loralab.load", "loralab.adapter_file", "loralab.merge",
         "loralab.merging")

SCRIPT = textwrap.dedent('''
    import contextlib, io, json, sys, types

    class Hide:
        """Refuse the named top-level packages, as if they were not installed."""
        def __init__(self, names):
            self.names = set(names)

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    mode, package_dir, hidden, heavy, out = sys.argv[1:6]
    sys.meta_path.insert(0, Hide(hidden.split(",")))
    try:
        import torch
        raise SystemExit("torch is not hidden")
    except ModuleNotFoundError:
        pass
    if mode == "stand-in":  # loralab as a bare package: its modules, not its __init__.py
        package = types.ModuleType("loralab")
        package.__path__ = [package_dir]
        sys.modules["loralab"] = package
    from loralab.cli import main
    assert main.__module__ == "loralab.cli" and sys.modules["loralab.cli"].__file__.startswith(package_dir)

    results = {}
    for argv in (["spirals", "--pretrain-steps", "60", "--adapt-steps", "30", "--out", out], ["energy"]):
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            code = main(argv)
        results[argv[0]] = {"code": code, "text": text.getvalue()}
    results["loaded"] = sorted(m for m in heavy.split(",") if m in sys.modules)
    print(json.dumps(results))
''')


@pytest.mark.parametrize("mode", ["stand-in", "package"])
def test_spirals_and_energy_run_without_torch_or_matplotlib(tmp_path, mode):
    """mode "package" needs loralab/__init__.py to import torch lazily, as the command line does."""
    script = tmp_path / "light.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), mode, str(PACKAGE_DIR), ",".join(HIDDEN), ",".join(HEAVY),
                           str(tmp_path / "spirals")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)})  # this checkout's loralab
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    spirals, energy = results["spirals"], results["energy"]
    assert spirals["code"] == 0 and energy["code"] == 0
    assert "held-out accuracy" in spirals["text"] and "LoRA r=4" in spirals["text"]   # the numbers
    assert "the figure needs matplotlib, which is not installed: pip install loralab[plot]" in spirals["text"]
    assert not (tmp_path / "spirals" / "spirals.png").exists()
    assert "Σσ² energy" in energy["text"] and "61.17%" in energy["text"]
    assert results["loaded"] == []
