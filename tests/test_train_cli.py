"""`loralab train`: options, --config, errors, tiny end-to-end runs, and the bundled MiniLM job."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.cli import build_parser, main
from loralab.train_cli import resolve
from loralab.train_job import BUNDLED_EVAL, BUNDLED_TRAIN, TrainJob, bundled_model_dir

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
    if kind != "bert":  # a causal LM needs an end token: MiniLM's [SEP] plays it
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "[SEP]"}))
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
    assert len(fields(TrainJob)) >= 26
    for f in fields(TrainJob):
        assert "--" + f.name.replace("_", "-") in text
    assert "--config" in text and "bundled" in text


@pytest.mark.parametrize("argv, fragment", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lora-alfa", "8"], "unrecognized arguments: --lora-alfa 8 (did you mean --lora-alpha?)"),
    (["--r", "0"], "--r: expected a positive integer, got 0"),
    (["--lr", "fast"], "--lr/--learning-rate: expected a positive number such as 2e-4"),
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
    assert bundled.data == BUNDLED_TRAIN and bundled.eval_data == BUNDLED_EVAL
    assert bundled.target_modules == ("query", "key", "value", "dense") and bundled.model == bundled_model_dir()
    assert (bundled.lr, bundled.epochs, bundled.r) == (5e-4, 4, 16)        # the recipe, then the defaults
    config = tmp_path / "run.toml"
    config.write_text('data = "mine.jsonl"\nlora-alpha = 64\nepochs = 5\nbf16 = true\nlr = 1e-3\n')
    job = resolve(parse("--config", str(config), "--epochs", "2"))
    assert job.data == Path("mine.jsonl") and job.model == bundled_model_dir()
    assert (job.lora_alpha, job.epochs, job.bf16, job.lr, job.warmup_ratio) == (64.0, 2, True, 1e-3, 0.06)
    assert job.target_modules == "all-linear"                               # no recipe once data is given
    with pytest.raises(ValueError, match="--model was given without --data"):
        resolve(parse("--model", str(tmp_path)))


def test_the_job_is_checked_when_made_and_names_the_field():
    with pytest.raises(ValueError, match=r"r=0: expected a positive integer, got 0 \(option --r\)"):
        TrainJob(data="d.jsonl", r=0)
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 0.5\], got 0.9"):  # TrainConfig's check
        TrainJob(data="d.jsonl", warmup_ratio=0.9)
    with pytest.raises(ValueError, match="bf16 must be True or False, got 'yes'"):
        TrainJob(data="d.jsonl", bf16="yes")
    with pytest.raises(ValueError, match="data must be a path, got None"):
        TrainJob(data=None)
    job = TrainJob(data="d.jsonl", target_modules="q_proj, v_proj", out="runs/x")
    assert job.data == Path("d.jsonl") and job.out == Path("runs/x") and job.target_modules == ("q_proj", "v_proj")
    with pytest.raises(AttributeError):
        job.r = 4


def test_the_training_loop_settings_come_from_the_job():
    from loralab.train_job import lora_config, train_config
    from loralab.trainer import TrainConfig
    job = TrainJob(data="d.jsonl", epochs=7, lr=1e-3, grad_accum=2, no_progress=True, out="o", target_modules="q")
    loop = train_config(job)
    assert (loop.epochs, loop.lr, loop.grad_accum, loop.progress, loop.out_dir, loop.save_every) == \
        (7, 1e-3, 2, False, "o", 50)
    assert (loop.weight_decay, loop.max_grad_norm) == (TrainConfig.weight_decay, TrainConfig.max_grad_norm)
    default = TrainJob(data="d.jsonl", task="causal-lm")
    for name in ("epochs", "lr", "batch_size", "grad_accum", "warmup_ratio", "schedule", "loraplus_lr_ratio", "seed"):
        assert getattr(default, name) == getattr(TrainConfig(), name), name
    from loralab.train_job import TASK_DEFAULTS   # classify: lr and epochs measured on small data (BENCHMARKS.md)
    classify = TrainJob(data="d.jsonl")
    assert (classify.lr, classify.epochs) == (TASK_DEFAULTS["classify"]["lr"], TASK_DEFAULTS["classify"]["epochs"])
    assert train_config(classify).lr == classify.lr and TrainJob(data="d.jsonl", lr=3e-4, epochs=2).lr == 3e-4
    lora = lora_config(job, ["classifier"])
    assert (lora.r, lora.lora_alpha, list(lora.target_modules), list(lora.modules_to_save)) == \
        (16, 32.0, ["q"], ["classifier"])


@pytest.mark.parametrize("content, fragment", [
    ('{"epochz": 3}', "unknown option 'epochz' (did you mean 'epochs'?); valid options: model, data"),
    ('{"r": -1}', "r: expected a positive integer"),
    ('{"schedule": "step"}', "schedule='step'; choose one of"),
    ('{"bf16": "yes"}', "bf16: expected true or false"),
    ('{"r": 4,}', "not valid JSON"),
])
def test_config_file_errors(tmp_path, content, fragment):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        resolve(parse("--config", str(path)))


@pytest.mark.parametrize("name, content", [
    ("c.json", '{"target_modules": ["q_proj", " v_proj"]}'),
    ("c.toml", 'target-modules = ["q_proj", "v_proj"]\n'),
])
def test_config_file_target_modules_list(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert resolve(parse("--config", str(path))).target_modules == ("q_proj", "v_proj")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_merge_difference_is_the_real_output_gap_and_leaves_the_model_unmerged(device):
    from transformers import BertConfig, BertForSequenceClassification
    from loralab import LoraConfig, add_lora
    from loralab.dataset import TokenizedData
    from loralab.train_run import merge_difference
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, vocab_size=101, num_labels=3))
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    model.to(device).eval()
    data = TokenizedData([{"input_ids": list(range(5, 5 + n)), "labels": n % 3} for n in (3, 7, 4)])
    batch = {k: v.to(device) for k, v in data.collate(range(3)).items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
    diff = merge_difference(model, data)             # the data stays on the CPU; the model may not
    assert 0 <= diff < 1e-5
    with torch.no_grad():  # unmerged again: merged, the update would count twice
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-6)
    model.to(torch.bfloat16)   # merged into 16-bit weights the update is rounded: the gap shows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unmerging in 16 bits is lossy, and says so
        assert 0 < merge_difference(model, data) < 0.1


def test_run_json_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous run.json whole (and no temporary file); the earlier
    run in --out is continued (--resume), since without --resume or --overwrite it is refused."""
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
              "--target-modules", "query", "--skip-head-only", "--no-progress", "--resume"])
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
    assert all(a["rule"] != "lr_high" for a in result["advice"])


def test_train_warns_once_on_settings_far_from_the_usual_recipe(tmp_path, capsys):
    model_dir, data_dir = tiny_classifier_dir(tmp_path / "model"), write_travel_files(tmp_path / "data", 32)
    code = main(["train", "--json", "--model", str(model_dir), "--data", str(data_dir / "train.jsonl"),
                 "--eval-data", str(data_dir / "eval.jsonl"), "--out", str(tmp_path / "out"), "--epochs", "1",
                 "--batch-size", "8", "--lr", "5e-2", "--r", "8", "--lora-alpha", "128",
                 "--target-modules", "query,value", "--no-progress", "--skip-head-only"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rules = [a["rule"] for a in json.loads(captured.out)["advice"]]
    assert "lr_high" in rules and "alpha_ratio" in rules
    assert captured.err.count("warning: lr=0.05 is far above") == 1        # one line, not one per layer
    assert "fix: use --lora-alpha 8 or 16" in captured.err


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
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's loralab
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "train", "--json", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["accuracy_before"] < 0.4                        # a new head: chance is 0.25
    assert result["accuracy_after"] >= 0.8
    assert result["accuracy_after"] >= result["accuracy_head_only"] + 0.15  # what LoRA adds over the head
    assert result["total_params"] > 22_000_000 and 0 < result["trainable_params"] < 0.05 * result["total_params"]
    assert result["factors_before"]["B_max_abs"] == 0.0 and result["merge_max_abs_diff"] < 1e-3
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
    for text in ("trainable params:", "B starts at exactly zero", "held-out before training",
                 "held-out after training", "head only", "merged vs unmerged", "wrote", "best held-out accuracy"):
        assert text in proc.stderr, text
    # the run's record, and the adapter directory used on its own by `loralab eval`
    assert (result["final"], result["best_step"], result["evaluations"]) == ("best", 80, 1)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 81 and log[-1]["kind"] == "eval" and log[-1]["accuracy"] == result["accuracy_after"]
    assert (tmp_path / "run" / "curves.png").is_file()
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "eval", "--json", "--adapter", result["adapter_dir"],
                           "--data", str(BUNDLED_EVAL)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(proc.stdout)
    assert evaluated["accuracy"] == result["accuracy_after"] and evaluated["examples"] == 124
    assert abs(evaluated["loss"] - result["loss_after"]) < 1e-5
