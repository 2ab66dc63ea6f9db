"""Runs of `loralab train`: the best evaluation, early stopping, --final, log.jsonl, curves.png, an earlier run
in --out, and the adapter directory as PEFT and `loralab predict` / `loralab eval` read it."""

import json
import sys

import pytest
import torch

from loralab.run_log import (BEST_DIR, RunLog, RunRecorder, best_so_far, plot_curves, prepare_out, read_log,
                             restore_best)
from loralab.train_job import TrainJob
from loralab.trainer import TrainConfig, train
from test_train import classify_data, tiny_bert_classifier


# ---- the best evaluation and early stopping, as pure functions of the evaluations -------------------------
def _evals(metric, values):
    return [{"step": 10 * (i + 1), metric: v} for i, v in enumerate(values)]


@pytest.mark.parametrize("metric, values, patience, best_step, best_value, since, stop", [
    ("loss", [1.0, 0.8, 0.9, 0.7], None, 40, 0.7, 0, False),
    ("loss", [1.0, 0.8, 0.8, 0.9], 2, 20, 0.8, 2, True),          # a tie is not an improvement
    ("loss", [1.0, 0.8, 0.8, 0.9], 3, 20, 0.8, 2, False),
    ("accuracy", [0.5, 0.7, 0.6, 0.7], 2, 20, 0.7, 2, True),      # higher is better
    ("accuracy", [0.5, 0.4, 0.6], 2, 30, 0.6, 0, False),          # patience counts evaluations in a row
    ("loss", [float("nan"), 2.0, float("nan")], 1, 20, 2.0, 1, True),   # NaN is never the best
    ("loss", [float("nan")], None, None, None, 1, False),
])
def test_best_so_far_table(metric, values, patience, best_step, best_value, since, stop):
    best = best_so_far(_evals(metric, values), metric, patience)
    assert (best.step, best.value, best.since, best.stop) == (best_step, best_value, since, stop)


def test_best_so_far_needs_the_metric_in_the_evaluations():
    with pytest.raises(ValueError, match="has no 'accuracy'"):
        best_so_far(_evals("loss", [1.0]), "accuracy")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"early_stopping_patience": 2}, "early_stopping_patience needs eval_every"),
    ({"task": "causal-lm", "metric_for_best": "accuracy"}, "needs task 'classify'"),
    ({"metric_for_best": "f1"}, "metric_for_best='f1' is not supported"),
    ({"final": "middle"}, "final='middle' is not supported"),
    ({"resume": True, "overwrite": True}, "pass one of them"),
])
def test_job_checks_of_the_run_options(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainJob(data="d.jsonl", **kwargs)
    assert TrainJob(data="d.jsonl").best_metric == "accuracy"
    assert TrainJob(data="d.jsonl", task="causal-lm").best_metric == "loss"


# ---- the training loop with the run's hooks ----------------------------------------------------------------
class Snapshots(RunRecorder):
    """A RunRecorder that also keeps the trainable state at every evaluation (the reference for 'best')."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states = {}

    def on_eval(self, record, model, history):
        self.states[record["step"]] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return super().on_eval(record, model, history)


def _noisy_run(tmp_path, recorder, **overrides):
    """Tiny BERT, 48 learnable training examples, held-out examples whose labels are shuffled: the held-out
    loss soon stops improving, so early stopping has something to do."""
    model = tiny_bert_classifier()
    held = [{**e, "labels": (e["labels"] + 1) % 3} for e in classify_data(12, seed=3)]
    config = TrainConfig(epochs=4, batch_size=8, lr=2e-2, eval_every=2, save_every=2, keep_checkpoints=50,
                         out_dir=str(tmp_path), progress=False, **overrides)
    history = train(model, classify_data(48), held, config, on_step=recorder.on_step, on_eval=recorder.on_eval)
    return model, history


def test_early_stopping_stops_after_patience_and_keeps_the_best_state(tmp_path):
    recorder = Snapshots(tmp_path, "loss", patience=2)
    model, history = _noisy_run(tmp_path, recorder)
    best = best_so_far(history.evals, "loss", 2)
    assert history.stopped_early and best.stop and best.since == 2
    stop = history.evals[-1]["step"]
    assert stop < history.total_steps == 24 and len(history.steps) == stop       # no step after the stop
    assert [e["step"] for e in history.evals] == list(range(2, stop + 1, 2))
    assert best.step == stop - 4 and best.value == min(e["loss"] for e in history.evals)
    # the kept best state is the model at the best evaluation, not the last one
    last = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    kept = restore_best(tmp_path / BEST_DIR, model)
    assert kept == {"step": best.step, "metric": "loss", "value": best.value}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), recorder.states[best.step][name], rtol=0, atol=0)
    assert any(not torch.equal(last[n], recorder.states[best.step][n]) for n in last)
    # log.jsonl: every step once, every evaluation with its "best" mark, in order
    log = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "step"] == list(range(1, stop + 1))
    assert [r["step"] for r in log if r["kind"] == "eval" and r["best"]][-1] == best.step
    steps = [r for r in log if r["kind"] == "step"]
    assert all(r["tokens_per_s"] > r["examples_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert [r["loss"] for r in steps] == [r["loss"] for r in history.steps]


def test_a_killed_and_resumed_run_stops_where_the_uninterrupted_one_did(tmp_path):
    full = Snapshots(tmp_path / "full", "loss", patience=2)
    _, history = _noisy_run(tmp_path / "full", full)
    stop = history.evals[-1]["step"]

    class Killed(Exception):
        pass

    class KilledAt(RunRecorder):
        def on_step(self, record, hist):
            super().on_step(record, hist)
            if record["step"] == stop - 1:      # after the checkpoint at stop - 2, one step into the next
                raise Killed

    with pytest.raises(Killed):
        _noisy_run(tmp_path / "resumed", KilledAt(tmp_path / "resumed", "loss", patience=2))
    model, resumed = _noisy_run(tmp_path / "resumed", RunRecorder(tmp_path / "resumed", "loss", patience=2),
                                resume=True)
    assert resumed.resumed_from == stop - 2 and resumed.stopped_early
    assert [e["step"] for e in resumed.evals] == [e["step"] for e in history.evals]
    assert [e["loss"] for e in resumed.evals] == [e["loss"] for e in history.evals]
    log = read_log(tmp_path / "resumed" / "log.jsonl")               # the repeated step is logged once
    assert [r["step"] for r in log if r["kind"] == "step"] == list(range(1, stop + 1))
    assert [r["step"] for r in log] == [r["step"] for r in read_log(tmp_path / "full" / "log.jsonl")]
    best = best_so_far(history.evals, "loss").step
    restore_best(tmp_path / "resumed" / BEST_DIR, model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), full.states[best][name])
    # resuming a run that had stopped early trains no further
    again = _noisy_run(tmp_path / "resumed", RunRecorder(tmp_path / "resumed", "loss", patience=2), resume=True)[1]
    assert again.stopped_early and len(again.steps) == stop and again.evals[-1]["step"] == stop


def test_run_log_drops_what_a_resumed_run_repeats_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RunLog(path)
    for step in (1, 2, 3):
        log.append({"kind": "step", "step": step})
    log.append({"kind": "eval", "step": 3})
    with open(path, "a") as f:
        f.write('{"kind": "step", "st')                              # a write cut short by a crash
    assert [r["step"] for r in read_log(path)] == [1, 2, 3, 3]
    again = RunLog(path)                                             # resumed from the checkpoint at step 2
    again.append({"kind": "step", "step": 3, "again": True})
    assert read_log(path) == [{"kind": "step", "step": 1}, {"kind": "step", "step": 2},
                              {"kind": "step", "step": 3, "again": True}]


def test_curves_png_and_a_note_without_matplotlib(tmp_path, monkeypatch):
    records = [{"kind": "step", "step": s, "loss": 1 / s} for s in range(1, 9)] + \
              [{"kind": "eval", "step": s, "loss": 1 / s, "accuracy": s / 10, "best": s == 8} for s in (4, 8)]
    assert plot_curves(records, tmp_path / "curves.png", "accuracy") is None
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]    # written atomically: no temporary left
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # as if it were not installed
    note = plot_curves(records, tmp_path / "other.png")
    assert "matplotlib is not installed" in note and not (tmp_path / "other.png").exists()


def test_an_earlier_run_in_out_is_refused_kept_resumed_or_replaced(tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds an earlier run \(adapter, run.json\); pass --resume to continue "
                                         r"it, --overwrite to replace it, or another --out"):
        prepare_out(out)
    assert (out / "run.json").is_file() and (out / "adapter").is_dir()
    assert prepare_out(out, resume=True) == [] and (out / "run.json").is_file()
    assert prepare_out(out, overwrite=True) == ["adapter", "run.json"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]     # only the run's own files go
    assert prepare_out(tmp_path / "new") == [] and prepare_out(out) == []
    (out / "curves.png").write_bytes(b"png")
    assert prepare_out(out, overwrite=True, remove=False) == ["curves.png"] and (out / "curves.png").is_file()


def test_train_refuses_an_earlier_run_before_loading_anything(tmp_path, capsys):
    from loralab.cli import main
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "log.jsonl").write_text('{"kind": "step", "step": 1}\n')
    argv = ["train", "--json", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "none.jsonl"),
            "--out", str(out)]
    assert main(argv) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert "holds an earlier run (checkpoints, log.jsonl)" in error and "--overwrite" in error
    assert (out / "log.jsonl").read_text() == '{"kind": "step", "step": 1}\n'          # nothing deleted
    assert main([*argv, "--overwrite"]) == 2                                    # no data: nothing replaced
    assert "none.jsonl" in json.loads(capsys.readouterr().out)["error"] and (out / "log.jsonl").is_file()


@pytest.fixture
def one_thread():
    """A tiny model on a busy machine: a second intra-op thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_final_last_writes_the_last_state_and_says_so(tmp_path, capsys, one_thread):
    from loralab.cli import main
    from loralab.predict import evaluate_file
    from test_train_cli import tiny_classifier_dir, write_travel_files
    model_dir, data = tiny_classifier_dir(tmp_path / "model"), write_travel_files(tmp_path / "data", 48, 16)
    argv = ["train", "--json", "--model", str(model_dir), "--data", str(data / "train.jsonl"), "--eval-data",
            str(data / "eval.jsonl"), "--out", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "8",
            "--lr", "3e-2", "--r", "4", "--target-modules", "query,value", "--skip-head-only", "--no-progress",
            "--eval-every", "2", "--metric-for-best", "loss", "--final", "best"]
    assert main(argv) == 0                                     # an earlier run (--final best), then the rerun:
    assert (tmp_path / "out" / BEST_DIR).is_dir()
    assert main(argv[:-1] + ["last"]) == 2                     # refused ...
    assert "holds an earlier run" in capsys.readouterr().err
    code = main(argv[:-1] + ["last", "--overwrite"])            # ... or replaced
    captured = capsys.readouterr()
    assert "--overwrite: removed the earlier run" in captured.err
    assert code == 0, captured.err
    result = json.loads(captured.out)
    history = json.loads((tmp_path / "out" / "run.json").read_text())["history"]
    assert result["best_step"] < 6 and (result["final"], result["final_step"]) == ("last", 6)   # best != last
    assert "the adapter written is the last one, step 6" in captured.err
    assert not (tmp_path / "out" / BEST_DIR).exists()      # replaced: --final last keeps no best state
    assert result["loss_after"] == history["evals"][-1]["loss"]
    assert json.loads((tmp_path / "out" / "adapter" / "loralab.json").read_text())["step"] == 6
    metrics = evaluate_file(result["adapter_dir"], data / "eval.jsonl", progress=False, say=lambda *a: None)
    assert metrics["loss"] == pytest.approx(history["evals"][-1]["loss"], abs=1e-6)


def test_the_best_state_is_restored_only_if_it_is_the_best_steps(tmp_path):
    """A kept best state of another step (a resumed run that did not repeat the killed run's steps exactly,
    as on a GPU) is not passed off as the best: the last state is written and the output says why."""
    from loralab.run_log import save_best
    from loralab.train_run import _final_adapter
    from loralab.trainer import History
    model = tiny_bert_classifier()
    job = TrainJob(data="d.jsonl", metric_for_best="loss", eval_every=2)
    history = History(evals=[{"step": 2, "loss": 0.4}, {"step": 4, "loss": 0.5}, {"step": 6, "loss": 0.6}],
                      total_steps=6)
    said = []
    save_best(tmp_path / BEST_DIR, model, 4, "loss", 0.5)
    best, final, restored = _final_adapter(job, model, history, tmp_path, said.append)
    assert (best.step, final, restored) == (2, "last", False) and "holds step 4, not the best step 2" in said[-1]
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_best(tmp_path / BEST_DIR, model, 2, "loss", 0.4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert _final_adapter(job, model, history, tmp_path, said.append)[1:] == ("best", True)
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert "the adapter written is the best one, step 2 (--final last would write step 6)" in said[-1]
