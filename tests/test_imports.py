"""Light imports: the core loads no training, file, serving or CLI code (and no transformers / safetensors)."""

import subprocess
import sys

CORE = ["loralab.config", "loralab.base", "loralab.functional", "loralab.layer", "loralab.inject",
        "loralab.routing", "loralab.merging"]
HEAVY = ["loralab.trainer", "loralab.train", "loralab.train_job", "loralab.train_run", "loralab.dataset", "loralab.save",
         "loralab.load", "loralab.adapter_file", "loralab.cli", "loralab.serve", "fastapi", "uvicorn", "transformers",
         "safetensors"]


def test_the_core_imports_nothing_of_training_files_or_the_cli():
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_top_level_names_resolve_on_first_use():
    import loralab
    assert set(loralab.__all__) >= {"LoraConfig", "add_lora", "save_adapter", "load_adapter", "train", "merge",
                                    "adapter_rows", "read_adapter", "FrozenBase"}
    assert callable(loralab.train) and callable(loralab.merge) and loralab.LoraConfig.__name__ == "LoraConfig"
