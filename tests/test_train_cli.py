"""`loralab train`: options, --config, errors, tiny end-to-end runs, and the bundled MiniLM job."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.cli import build_parser, main
from loralab.train_cli import OPTIONS, resolve
from loralab.train_job import BUNDLED_EVAL, BUNDLED_TRAIN, bundled_model_dir

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_classifier_dir(path: Path, kind: str = "bert") -> Path:
    """A small randomly initialised model saved like a real one, with MiniLM's tokenizer files."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=30522,
                                             max_position_embeddings=128, pad_token_id=0))
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_dir() / name, path / name)
    return path


def write_travel_files(path: Path, n_train: int, n_eval: int = 12) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.jsonl").write_text("".join(BUNDLED_TRAIN.read_text().splitlines(True)[:n_train]))
    (path / "eval.jsonl").write_text("".join(BUNDLED_EVAL.read_text().splitlines(True)[:n_eval]))
    return path


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in OPTIONS:
        assert "--" + name.replace("_", "-") in text
    assert "--config" in text and "bundled" in text


@pytest.mark.parametrize("argv, fragment", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lora-alfa", "8"], "unrecognized arguments: --lora-alfa 8 (did you mean --lora-alpha?)"),
    (["--r", "0"], "--r: expected a positive integer, got 0"),
    (["--lr", "fast"], "--lr: expected a positive number such as 2e-4"),
    (["--task", "translate"], "invalid choice: 'translate'"),
    (["--lora-dropout", "1.5"], "expected a number in [0, 1)"),
])
def test_bad_options_say_what_is_valid(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "usage: loralab train" in err  # the usage line lists the valid options


def test_defaults_bundled_recipe_config_file_and_flag_precedence(tmp_path):
    bundled = resolve(parse())
    assert bundled["bundled"] and bundled["data"] == BUNDLED_TRAIN and bundled["eval_data"] == BUNDLED_EVAL
    assert bundled["target_modules"] == "query,key,value,dense" and bundled["model"] == bundled_model_dir()
    config = tmp_path / "run.toml"
    config.write_text('data = "mine.jsonl"\nlora-alpha = 64\nepochs = 5\nbf16 = true\n')
    opts = resolve(parse("--config", str(config), "--epochs", "2"))
    assert not opts["bundled"] and opts["data"] == Path("mine.jsonl")
    assert (opts["lora_alpha"], opts["epochs"], opts["bf16"], opts["lr"]) == (64.0, 2, True, 2e-4)
    assert opts["target_modules"] == "all-linear"


@pytest.mark.parametrize("content, fragment", [
    ('{"epochz": 3}', "unknown option 'epochz'; valid options: model, data"),
    ('{"r": -1}', "r: expected a positive integer"),
    ('{"schedule": "step"}', "schedule='step'; choose one of"),
    ('{"bf16": "yes"}', "bf16: expected true or false"),
    ('{"r": 4,}', "not valid JSON"),
])
def test_config_file_errors(tmp_path, content, fragment):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        resolve(parse("--config", str(path)))


@pytest.mark.parametrize("name, content", [
    ("c.json", '{"target_modules": ["q_proj", " v_proj"]}'),
    ("c.toml", 'target-modules = ["q_proj", "v_proj"]\n'),
])
def test_config_file_target_modules_list(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert resolve(parse("--config", str(path)))["target_modules"] == "q_proj,v_proj"


def test_merge_check_sends_the_batch_to_the_model_device(monkeypatch):
    """The meta device stands in for an accelerator: the probe's parameters live there, the data does not."""
    from types import SimpleNamespace
    from loralab import train_job
    from loralab.dataset import TokenizedData
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(2, device="meta"))

        def forward(self, input_ids, attention_mask):
            seen.append((input_ids.device.type, attention_mask.device.type))
            return SimpleNamespace(logits=torch.zeros(len(input_ids), 2))

    monkeypatch.setattr(train_job, "merge", lambda model: None)
    monkeypatch.setattr(train_job, "unmerge", lambda model: None)
    data = TokenizedData([{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [4], "labels": 1}])
    assert train_job._merge_check(Probe(), data) == 0.0
    assert seen == [("meta", "meta")] * 2


def test_run_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous run.json whole (and no temporary file)."""
    model_dir, data_dir = tiny_classifier_dir(tmp_path / "model"), write_travel_files(tmp_path / "data", 8, 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"previous": true}\n')
    real_write_text = Path.write_text

    def torn(self, text, *args, **kwargs):
        if "run.json" in self.name:
            real_write_text(self, text[:10])
            raise OSError("disk full")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="disk full"):
        main(["train", "--model", str(model_dir), "--data", str(data_dir / "train.jsonl"), "--eval-data",
              str(data_dir / "eval.jsonl"), "--out", str(out), "--epochs", "1", "--batch-size", "4", "--r", "2",
              "--target-modules", "query", "--skip-head-only", "--no-progress"])
    assert json.loads((out / "run.json").read_text()) == {"previous": True}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_missing_data_and_model_errors(tmp_path, capsys):
    assert main(["train", "--json", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    out = json.loads(capsys.readouterr().out)
    assert "none.jsonl" in out["error"] and "not found" in out["error"]
    assert main(["train", "--model", str(tmp_path)]) == 2
    assert "--model was given without --data" in capsys.readouterr().err


def test_tiny_classify_end_to_end(tmp_path, capsys):
    model_dir, data_dir = tiny_classifier_dir(tmp_path / "model"), write_travel_files(tmp_path / "data", 32)
    code = main(["train", "--json", "--model", str(model_dir), "--data", str(data_dir / "train.jsonl"),
                 "--eval-data", str(data_dir / "eval.jsonl"), "--out", str(tmp_path / "out"), "--epochs", "2",
                 "--batch-size", "8", "--lr", "1e-3", "--target-modules", "query,key,value,dense", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    for key in ("accuracy_before", "accuracy_after", "accuracy_head_only", "trainable_params", "total_params"):
        assert isinstance(result[key], (int, float)), key
    assert result["labels"] == ["Cairo", "Lisbon", "Oslo", "Tokyo"] and result["steps"] == 8
    assert result["factors_before"]["B_max_abs"] == 0.0 < result["factors_after"]["B_max_abs"]
    assert result["merge_max_abs_diff"] < 1e-4
    adapter = Path(result["adapter_dir"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"] and config["r"] == 16
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in tensors
    assert json.loads(Path(result["run_file"]).read_text())["history"]["total_steps"] == 8
    assert "trainable params:" in captured.err and "held-out, head only" in captured.err


def test_tiny_causal_lm_end_to_end_with_held_out_split(tmp_path, capsys):
    model_dir = tiny_classifier_dir(tmp_path / "model", kind="llama")
    rows = [{"prompt": f"where to? {r['text']} answer:", "completion": f" {r['label'].lower()}"}
            for r in map(json.loads, BUNDLED_TRAIN.read_text().splitlines()[:40])]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["train", "--json", "--model", str(model_dir), "--data", str(data), "--task", "causal-lm",
                 "--out", str(tmp_path / "out"), "--epochs", "3", "--lr", "5e-3", "--batch-size", "4",
                 "--target-modules", "q_proj,v_proj", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert "holding out 4 of 40 examples" in captured.err
    assert result["loss_after"] < result["loss_before"]
    assert result["accuracy_head_only"] is None and result["accuracy_before"] is None
    assert json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_the_bundled_job_end_to_end(tmp_path):
    """`loralab train` with no arguments: the real pretrained MiniLM on the bundled dataset."""
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--json", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["accuracy_before"] < 0.4                        # a new head: chance is 0.25
    assert result["accuracy_after"] >= 0.8
    assert result["accuracy_after"] >= result["accuracy_head_only"] + 0.15  # what LoRA adds over the head
    assert result["total_params"] > 22_000_000 and 0 < result["trainable_params"] < 0.05 * result["total_params"]
    assert result["factors_before"]["B_max_abs"] == 0.0 and result["merge_max_abs_diff"] < 1e-3
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
    for text in ("trainable params:", "B starts at exactly zero", "held-out before training",
                 "held-out after training", "head only", "merged vs unmerged", "wrote"):
        assert text in proc.stderr, text
