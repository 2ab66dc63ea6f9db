"""`loralab predict` / `loralab eval` end to end on adapters trained by `loralab train`, checked against PEFT
loading the adapter directory alone (no run.json, no loralab) and against the training run's own numbers."""

import contextlib
import io
import json
import math
import shutil

import pytest
import torch

from loralab.cli import main
from loralab.predict import load_trained
from loralab.train_job import BUNDLED_TRAIN
from test_train_cli import tiny_classifier_dir, write_travel_files


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run op by op: on a busy machine a second intra-op thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _main_json(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()[-3000:]
    return json.loads(out.getvalue()), err.getvalue()


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """Tiny BERT on 48 travel sentences, evaluated every 2 steps; the best held-out loss is early (step 2 of
    12) at this learning rate, so the adapter written (--final best) is not the last state."""
    tmp = tmp_path_factory.mktemp("classify")
    model_dir, data = tiny_classifier_dir(tmp / "model"), write_travel_files(tmp / "data", 48, 16)
    result, err = _main_json(["train", "--json", "--model", str(model_dir), "--data", str(data / "train.jsonl"),
                              "--eval-data", str(data / "eval.jsonl"), "--out", str(tmp / "out"), "--epochs", "2",
                              "--batch-size", "8", "--lr", "3e-2", "--r", "4", "--target-modules", "query,value",
                              "--skip-head-only", "--no-progress", "--eval-every", "2", "--metric-for-best", "loss"])
    adapter = tmp / "moved" / "adapter"          # the adapter directory alone, away from its run
    shutil.copytree(result["adapter_dir"], adapter)
    return {"result": result, "err": err, "model": model_dir, "data": data, "adapter": adapter, "out": tmp / "out"}


def test_train_states_the_best_evaluation_and_the_adapter_written(classify_run):
    result, err, out = classify_run["result"], classify_run["err"], classify_run["out"]
    history = json.loads((out / "run.json").read_text())["history"]
    evals = {e["step"]: e for e in history["evals"]}
    assert sorted(evals) == list(range(2, 13, 2)) and result["evaluations"] == 6
    assert result["best_step"] == min(evals, key=lambda s: evals[s]["loss"]) < 12   # precondition: best != last
    assert result["best_metric"] == evals[result["best_step"]]["loss"] and result["metric_for_best"] == "loss"
    assert (result["final"], result["final_step"], result["stopped_early"]) == ("best", result["best_step"], False)
    assert result["loss_after"] == pytest.approx(result["best_metric"], abs=1e-6)   # re-evaluated after restoring
    assert f"best held-out loss {result['best_metric']:.4f} at step {result['best_step']}" in err
    assert "the adapter written is the best one" in err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "step"] == list(range(1, 13))
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and result["curves_file"] == str(out / "curves.png")
    info = json.loads((classify_run["adapter"] / "loralab.json").read_text())
    assert info["labels"] == ["Cairo", "Lisbon", "Oslo", "Tokyo"] and info["num_labels"] == 4
    assert info["id2label"]["2"] == "Oslo" and info["label2id"]["Tokyo"] == 3 and info["task"] == "classify"
    assert (classify_run["adapter"] / "tokenizer.json").is_file()


def test_peft_loads_the_adapter_directory_alone_with_the_same_logits(classify_run):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    adapter = classify_run["adapter"]
    info = json.loads((adapter / "loralab.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(adapter)                 # the tokenizer travels with the adapter
    base = AutoModelForSequenceClassification.from_pretrained(
        classify_run["model"], num_labels=info["num_labels"], id2label={int(k): v for k, v in info["id2label"].items()},
        label2id=info["label2id"])
    reference = peft.PeftModel.from_pretrained(base, adapter).eval()
    ours, _, _ = load_trained(adapter, classify_run["model"])
    texts = ["I fly from Oslo to Cairo tomorrow.", "Back to Lisbon after a week in Tokyo."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got = reference(**batch).logits, ours(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.01 and reference.config.id2label[3] == "Tokyo"


def test_predict_classify_end_to_end(classify_run):
    data = classify_run["data"] / "eval.jsonl"
    out, err = _main_json(["predict", "--json", "--adapter", str(classify_run["adapter"]), "--model",
                           str(classify_run["model"]), "--data", str(data), "--batch-size", "5"])
    preds = out["predictions"]
    assert len(preds) == 16 and out["task"] == "classify"
    for p in preds:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    truth = [json.loads(line)["label"] for line in data.read_text().splitlines()]
    assert [p["true"] for p in preds] == truth
    assert out["accuracy"] == pytest.approx(classify_run["result"]["accuracy_after"])   # the run's own number
    assert "predict: 100%" in err and "accuracy" in err                                 # bar and text: stderr


def test_eval_classify_end_to_end_gives_the_training_metrics(classify_run):
    out, err = _main_json(["eval", "--json", "--adapter", str(classify_run["adapter"]),     # --model: recorded
                           "--data", str(classify_run["data"] / "eval.jsonl"), "--batch-size", "3"])
    run = classify_run["result"]
    assert out["examples"] == 16 and out["model"] == str(classify_run["model"])
    assert out["loss"] == pytest.approx(run["loss_after"], abs=1e-6)
    assert out["accuracy"] == pytest.approx(run["accuracy_after"])
    assert "eval: 100%" in err


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("causal")
    model_dir = tiny_classifier_dir(tmp / "model", kind="llama")
    rows = [{"prompt": f"where to? {r['text']} answer:", "completion": f" {r['label'].lower()}"}
            for r in map(json.loads, BUNDLED_TRAIN.read_text().splitlines()[:32])]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    (tmp / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[24:]))
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[24:27]))
    result, err = _main_json(["train", "--json", "--model", str(model_dir), "--data", str(tmp / "train.jsonl"),
                              "--eval-data", str(tmp / "eval.jsonl"), "--task", "causal-lm", "--out",
                              str(tmp / "out"), "--epochs", "2", "--lr", "5e-3", "--batch-size", "8",
                              "--target-modules", "q_proj,v_proj", "--no-progress", "--eval-every", "3"])
    return {"result": result, "model": model_dir, "dir": tmp}


def test_predict_causal_lm_greedy_matches_peft_generate(causal_run):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tmp, adapter = causal_run["dir"], causal_run["result"]["adapter_dir"]
    out, err = _main_json(["predict", "--json", "--adapter", adapter, "--data", str(tmp / "prompts.jsonl"),
                           "--max-new-tokens", "6"])
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(causal_run["model"]), adapter)
    reference.eval()
    for p in out["predictions"]:
        ids = torch.tensor([[tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None)
                            + tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            new = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=0)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        assert p["completion"] == tokenizer.decode(new) and p["tokens"] == len(new)
    assert len(out["predictions"]) == 3 and "->" in err and "predict: 100%" in err
    assert sum(p["tokens"] for p in out["predictions"]) > 0


def test_predict_causal_lm_sampling_is_seeded(causal_run):
    tmp, adapter = causal_run["dir"], causal_run["result"]["adapter_dir"]
    runs = [_main_json(["predict", "--json", "--adapter", adapter, "--data", str(tmp / "prompts.jsonl"),
                        "--temperature", "2", "--seed", str(seed), "--max-new-tokens", "6", "--no-progress"])[0]
            ["predictions"]
            for seed in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_eval_causal_lm_end_to_end_loss_and_perplexity(causal_run):
    tmp, run = causal_run["dir"], causal_run["result"]
    out, _ = _main_json(["eval", "--json", "--adapter", run["adapter_dir"], "--data", str(tmp / "eval.jsonl"),
                         "--batch-size", "3"])
    assert out["loss"] == pytest.approx(run["loss_after"], rel=1e-5)      # batching does not change the mean
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"])) and "accuracy" not in out
    assert run["metric_for_best"] == "loss" and run["final"] == "best"
    evals = [json.loads(line) for line in open(run["log_file"]) if '"eval"' in line]
    assert [e["step"] for e in evals] == [3, 6] and all(e["perplexity"] == pytest.approx(math.exp(e["loss"]))
                                                        for e in evals)


def test_errors_name_the_fix(tmp_path, capsys):
    assert main(["predict", "--json", "--adapter", str(tmp_path / "none"), "--data", "x.jsonl"]) == 2
    assert "adapter directory" in json.loads(capsys.readouterr().out)["error"]
    with pytest.raises(SystemExit):
        main(["predict", "--adapter", str(tmp_path), "--data", "x.jsonl", "--temperature", "-1"])
    assert "--temperature: expected a number >= 0" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    assert main(["eval", "--adapter", str(tmp_path), "--data", "x.jsonl"]) == 2     # PEFT's own save: no labels
    assert "no class names" in capsys.readouterr().err
