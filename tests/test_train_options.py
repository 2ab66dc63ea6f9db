"""`loralab train` options beyond the basics: every LoraConfig field as a flag, Hugging Face Trainer's spellings
as aliases (flags and --config keys), YAML / TOML / JSON --config files and their errors."""

import pytest
import torch

from loralab.cli import build_parser
from loralab.train_cli import ALIASES, resolve
from loralab.train_job import TrainJob, lora_config


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def job_of(*argv) -> TrainJob:
    return resolve(parse("--data", "d.jsonl", *argv))


# ---- the adapter's options ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, field, expected", [
    (["--modules-to-save", "pooler, classifier"], "modules_to_save", ("classifier", "pooler")),
    (["--use-rslora"], "use_rslora", True),
    (["--init-lora-weights", "gaussian"], "init_lora_weights", "gaussian"),
    (["--init-lora-weights", "false"], "init_lora_weights", False),
    (["--init-lora-weights", "pissa"], "init_lora_weights", "pissa"),
    (["--lora-dropout", "0.1"], "lora_dropout", 0.1),
    (["--target-modules", "query,value", "--layers-to-transform", "0,2"], "layers_to_transform", (0, 2)),
    (["--exclude-modules", "output.dense"], "exclude_modules", ("output.dense",)),
    (["--bias", "lora_only"], "bias", "lora_only"),
    (["--rank-pattern", "query=4, value=2"], "rank_pattern", {"query": 4, "value": 2}),
    (["--alpha-pattern", "query=8"], "alpha_pattern", {"query": 8.0}),
    (["--target-modules", "query", "--layers-to-transform", "1", "--layers-pattern", "layer"], "layers_pattern",
     ("layer",)),
])
def test_each_adapter_flag_reaches_the_lora_config(argv, field, expected):
    config = lora_config(job_of(*argv), ["classifier"])
    value = getattr(config, field)
    assert (tuple(sorted(value)) if field == "modules_to_save" else value) == expected


def test_adapter_defaults_are_lora_configs():
    from loralab import LoraConfig
    job, ref = job_of(), LoraConfig()
    for name in ("use_rslora", "init_lora_weights", "bias", "exclude_modules", "layers_to_transform"):
        assert getattr(lora_config(job), name) == getattr(ref, name), name


@pytest.mark.parametrize("argv, fragment", [
    (["--init-lora-weights", "eva"], "expected true, false or one of gaussian, pissa"),
    (["--bias", "some"], "invalid choice: 'some'"),
    (["--layers-to-transform", "a,1"], "expected comma-separated layer indices like 0,1,5"),
    (["--quantize", "int8"], "invalid choice: 'int8'"),
    (["--rank-pattern", "query"], "expected name=number pairs like q_proj=8,v_proj=4"),
    (["--rank-pattern", "query=0"], "expected a positive integer, got 0"),
])
def test_bad_adapter_flags_say_what_is_valid(capsys, argv, fragment):
    from loralab.cli import main
    with pytest.raises(SystemExit):
        main(["train", *argv])
    assert fragment in capsys.readouterr().err


def test_layers_to_transform_with_all_linear_is_refused_when_the_job_is_made():
    with pytest.raises(ValueError, match="layers_to_transform=\\[1\\] cannot be combined with target_modules='all-linear'"):
        TrainJob(data="d.jsonl", layers_to_transform=[1])


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                                    num_attention_heads=4, vocab_size=64, num_labels=3))


@pytest.mark.parametrize("argv", [
    ["--target-modules", "query,value,dense", "--layers-to-transform", "0,2", "--exclude-modules", "output.dense"],
    ["--target-modules", "all-linear", "--exclude-modules", "key", "--modules-to-save", "pooler", "--bias", "all"],
    ["--target-modules", "query,key", "--use-rslora", "--bias", "lora_only", "--init-lora-weights", "gaussian"],
    ["--target-modules", "query,value", "--rank-pattern", "value=4", "--alpha-pattern", "query=64",
     "--layers-to-transform", "1", "--layers-pattern", "layer"],
])
def test_the_flags_adapt_what_peft_adapts_with_the_same_settings(argv):
    """The same option values through loralab and through PEFT's own LoraConfig: the same adapted modules, the
    same trainable parameters, the same scaling."""
    import peft
    from loralab import add_lora
    from loralab.inject import lora_layers
    config = lora_config(job_of(*argv), ["classifier"])
    ours = add_lora(_tiny_bert(), config)
    kwargs = {k: v for k, v in config.to_dict().items() if k in (
        "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "use_rslora", "bias",
        "modules_to_save", "init_lora_weights", "layers_pattern", "rank_pattern", "alpha_pattern")}
    theirs = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(**kwargs))
    theirs_layers = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                           if isinstance(m, peft.tuners.lora.LoraLayer))
    assert sorted(lora_layers(ours)) == theirs_layers and theirs_layers
    ours_scaling = {p: layer.adapters["default"].scaling for p, layer in lora_layers(ours).items()}
    theirs_scaling = {n.removeprefix("base_model.model."): m.scaling["default"] for n, m in theirs.named_modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours_scaling == pytest.approx(theirs_scaling)
    count = lambda model: sum(p.numel() for p in model.parameters() if p.requires_grad)  # noqa: E731
    assert count(ours) == count(theirs)
    ours_ranks = {p: layer.adapters["default"].r for p, layer in lora_layers(ours).items()}
    assert ours_ranks == {n.removeprefix("base_model.model."): m.r["default"] for n, m in theirs.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer)}


# ---- Hugging Face Trainer's spellings -------------------------------------------------------------------
HF = [("--learning-rate", "1e-3", "lr", 1e-3), ("--num-train-epochs", "7", "epochs", 7),
      ("--per-device-train-batch-size", "4", "batch_size", 4), ("--gradient-accumulation-steps", "3", "grad_accum", 3),
      ("--output-dir", "runs/hf", "out", __import__("pathlib").Path("runs/hf")), ("--warmup-ratio", "0.1", "warmup_ratio", 0.1),
      ("--lr-scheduler-type", "linear", "schedule", "linear"),
      ("--lr-scheduler-type", "constant_with_warmup", "schedule", "constant")]   # our constant warms up too


@pytest.mark.parametrize("flag, text, field, expected", HF)
def test_hugging_face_trainer_flags_are_aliases(flag, text, field, expected):
    assert getattr(job_of(flag, text), field) == expected


@pytest.mark.parametrize("flag, text, field, expected", HF)
def test_hugging_face_trainer_keys_in_a_config_file(tmp_path, flag, text, field, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: d.jsonl\n{flag[2:].replace('-', '_')}: {text}\n")
    assert getattr(resolve(parse("--config", str(path))), field) == expected


def test_aliases_cover_the_trainer_names_and_a_key_given_twice_is_an_error(tmp_path):
    assert {"learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
            "output_dir", "lr_scheduler_type"} <= set(ALIASES)
    path = tmp_path / "c.json"
    path.write_text('{"lr": 1e-3, "learning_rate": 2e-3}')
    with pytest.raises(ValueError, match="'learning_rate' and 'lr' are the same option; keep one"):
        resolve(parse("--config", str(path)))


# ---- config files ---------------------------------------------------------------------------------------
def test_yaml_config_file(tmp_path):
    path = tmp_path / "run.yml"
    path.write_text("data: mine.jsonl\nlora-alpha: 64\nlearning_rate: 2e-4\ntarget_modules: [query, value]\n"
                    "bf16: true\nuse_rslora: yes\ninit_lora_weights: false\nlayers_to_transform: [0, 1]\n"
                    "rank_pattern: {query: 4}\n")
    job = resolve(parse("--config", str(path), "--epochs", "2"))
    assert (job.lora_alpha, job.lr, job.target_modules, job.bf16, job.use_rslora, job.epochs) == \
        (64.0, 2e-4, ("query", "value"), True, True, 2)
    assert job.init_lora_weights is False and job.layers_to_transform == (0, 1) and job.rank_pattern == {"query": 4}


@pytest.mark.parametrize("name, content, fragment", [
    ("c.yaml", "lr: 1e-3\nepochs: [3\nr: 4\n", r"c.yaml, line 3, column 2: not valid YAML"),
    ("c.yaml", "- lr\n- 3\n", "expected a mapping of option names to values"),
    ("c.toml", 'lr = 1e-3\nepochs = \n', r"not valid TOML .*line 2"),
    ("c.json", '{"lr": 1e-3,\n "r": 4,\n}', r"c.json, line 3, column 1: not valid JSON"),
    ("c.yaml", "epochz: 3\n", "unknown option 'epochz' \\(did you mean 'epochs'\\?\\)"),
])
def test_bad_config_files_name_the_format_and_line(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=fragment):
        resolve(parse("--config", str(path)))


# ---- QLoRA ----------------------------------------------------------------------------------------------
def test_quantize_nf4_trains_adapters_over_a_4_bit_base(tmp_path, capsys):
    """--quantize nf4 on a tiny BERT: the adapted layers' bases are NF4, the head stays dense and trains, the
    loss on the training examples drops, and the saved adapter gives the trained outputs on the dequantized base."""
    import json
    from pathlib import Path
    from loralab.cli import main
    from test_train_cli import tiny_classifier_dir, write_travel_files
    model_dir, data = tiny_classifier_dir(tmp_path / "model"), write_travel_files(tmp_path / "data", 32)
    code = main(["train", "--json", "--model", str(model_dir), "--data", str(data / "train.jsonl"), "--eval-data",
                 str(data / "train.jsonl"), "--out", str(tmp_path / "out"), "--quantize", "nf4", "--epochs", "4",
                 "--batch-size", "8", "--lr", "3e-3", "--target-modules", "query,value", "--skip-head-only",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert "over a NF4 base" in captured.err
    assert result["loss_after"] < result["loss_before"]
    assert result["merge_max_abs_diff"] < 1e-4          # unmerged over NF4 == merged into dequant(NF4)
    saved = json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["query", "value"] and saved["modules_to_save"] == ["classifier"]


def test_quantize_nf4_puts_every_adapted_base_in_4_bits():
    from loralab import add_lora
    from loralab.inject import lora_layers
    job = job_of("--quantize", "nf4", "--target-modules", "query,key,value,dense")
    model = add_lora(_tiny_bert(), lora_config(job, ["classifier"]), quantize=job.quantize)
    bases = [layer.base_layer for layer in lora_layers(model).values()]
    assert len(bases) == 3 * 6 + 1 and all  # 6 per layer, and the pooler's dense;(isinstance(b, NF4Linear) for b in bases)
    assert type(model.classifier.in_use()) is torch.nn.Linear


# ---- target names -------------------------------------------------------------------------------------
def test_a_target_that_matches_nothing_lists_the_short_names_before_the_paths():
    from loralab import LoraConfig, add_lora
    with pytest.raises(ValueError) as info:
        add_lora(_tiny_bert(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    text = str(info.value)
    assert "short names in this model (linear layers: query, key, value, dense, classifier; embedding layers: " \
           "word_embeddings, position_embeddings, token_type_embeddings)" in text
    assert text.index("query, key, value, dense") < text.index("bert.encoder.layer.0.attention.self.query")


def _readme_first_train_example() -> list[str]:
    """The first command of the README's "Your own data" block, continuation lines joined, as argv."""
    import shlex
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text[text.index("```bash\n", text.index("Your own data")) + 8:]
    command = block[:block.index("```")].split("\n")
    first = []
    for line in command:
        first.append(line.rstrip("\\ "))
        if not line.endswith("\\"):
            break
    argv = shlex.split(" ".join(first).split("#")[0])
    assert argv[:2] == ["loralab", "train"]
    return argv[2:]


def test_the_readmes_first_train_example_runs_on_the_bundled_model(tmp_path, monkeypatch, capsys):
    """As written (its train.jsonl a few bundled examples), cut to 2 steps: the names it gives exist in MiniLM."""
    import json
    from loralab.cli import main
    from loralab.train_job import BUNDLED_TRAIN
    argv = _readme_first_train_example()
    assert "--model" not in argv and "--target-modules" in argv
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(BUNDLED_TRAIN.read_text().splitlines(True)[:40]))
    code = main(["train", *argv, "--json", "--max-steps", "2", "--skip-head-only", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    targets = argv[argv.index("--target-modules") + 1].split(",")
    assert result["steps"] == 2 and result["model"].endswith("model")
    saved = json.loads((tmp_path / "runs" / "mine" / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(targets)


# ---- the defaults on small data -----------------------------------------------------------------------
def test_the_classify_defaults_beat_the_head_only_baseline_on_small_data(tmp_path, capsys):
    """`loralab train --data F --eval-data G` with every other option at its default, on the bundled MiniLM and
    the hardest of the defaults study's tasks (200 product reviews, 3 classes; BENCHMARKS.md): the adapter beats
    the head-only comparison the tool prints, by a clear margin."""
    import json
    from loralab.cli import main
    from pathlib import Path
    from loralab.train_job import DATA_DIR, TASK_DEFAULTS
    code = main(["train", "--json", "--data", str(DATA_DIR / "study_reviews_train.jsonl"), "--eval-data",
                 str(DATA_DIR / "study_reviews_heldout.jsonl"), "--out", str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    job = json.loads(Path(result["run_file"]).read_text())["job"]
    assert (job["lr"], job["epochs"], job["target_modules"]) == (TASK_DEFAULTS["classify"]["lr"],
                                                                  TASK_DEFAULTS["classify"]["epochs"], "all-linear")
    assert result["accuracy_after"] >= result["accuracy_head_only"] + 0.1, (result["accuracy_after"],
                                                                            result["accuracy_head_only"])
