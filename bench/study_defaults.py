"""Which `loralab train` defaults do not underfit small classification data?  A grid on three small tasks.

Each run is what `loralab train --data T_train.jsonl --eval-data T_heldout.jsonl` does on the bundled
MiniLM-L6 (the general defaults: LoRA r=16, alpha 32 on all-linear, batch 16, warmup 6%, cosine decay), with
lr x epochs x LoRA+ ratio from the grid; the head-only baseline is the comparison the tool prints (only the
classifier head trains, lr 1e-2, the same epochs).  One seed per cell unless --seeds says more.

    python bench/study_defaults.py                       # the whole grid: lr {2e-4,1e-3,2e-3} x epochs {3,8,15}
                                                         #   x ratio {1,16} on the 3 tasks (long: about 3 h here)
    python bench/study_defaults.py --cells 1e-3:3:1 --seeds 0,1    # chosen cells (lr:epochs:ratio), 2 seeds
    python bench/study_defaults.py --table-only          # the table of the runs recorded so far

BENCHMARKS.md ("Defaults for small classification data") lists the subset that was run and its commands.
Writes a JSON line per run to --out (default runs/study_defaults.jsonl, appended) and prints the table
(markdown) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loralab.train_job import DATA_DIR, TrainJob  # noqa: E402
from loralab.train_run import run_train_job  # noqa: E402

TASKS = ("reviews", "questions", "support")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def run_one(task: str, lr: float, epochs: int, ratio: float, seed: int, head_only: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        job = TrainJob(data=DATA_DIR / f"study_{task}_train.jsonl", eval_data=DATA_DIR / f"study_{task}_heldout.jsonl",
                       lr=lr, epochs=epochs, loraplus_lr_ratio=ratio, seed=seed, out=out, save_every=None,
                       skip_head_only=not head_only, no_progress=True)
        t0 = time.perf_counter()
        result = run_train_job(job, say=lambda *a: None)
    return {"task": task, "lr": lr, "epochs": epochs, "ratio": ratio, "seed": seed,
            "accuracy": result["accuracy_after"], "head_only": result["accuracy_head_only"],
            "seconds": time.perf_counter() - t0}


def table(rows: list[dict]) -> str:
    """Markdown: one row per (lr, epochs, ratio), held-out accuracy per task (mean over seeds) with its margin
    over the head-only baseline of the same epochs (mean over its seeds), the smallest margin, wall-clock
    seconds per run."""
    head = {}
    for r in rows:
        if r["head_only"] is not None:
            head.setdefault((r["task"], r["epochs"]), []).append(r["head_only"])
    cells = {}
    for r in rows:
        cells.setdefault((r["lr"], r["epochs"], r["ratio"]), {}).setdefault(r["task"], []).append(r)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines = ["| lr | epochs | LoRA+ ratio | seeds | " + " | ".join(TASKS) + " | min margin over head-only | s / run |",
             "| --- | --- | --- | --- | " + " | ".join("---:" for _ in TASKS) + " | ---: | ---: |"]
    for (lr, epochs, ratio), by_task in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        accs, margins, secs, seeds = [], [], [], set()
        for task in TASKS:
            runs = by_task.get(task)
            if not runs:
                accs.append("–")
                continue
            acc = mean([r["accuracy"] for r in runs])
            base = head.get((task, epochs))
            accs.append(f"{acc:.3f}" + (f" ({acc - mean(base):+.3f})" if base else ""))
            if base:
                margins.append(acc - mean(base))
            secs += [r["seconds"] for r in runs]
            seeds |= {r["seed"] for r in runs}
        margin = f"{min(margins):+.3f}" if len(margins) == len(TASKS) else "–"
        lines.append(f"| {lr:g} | {epochs} | {ratio:g} | {len(seeds)} | " + " | ".join(accs)
                     + f" | {margin} | {mean(secs):.0f} |")
    for epochs in sorted({e for _, e in head}):
        lines.append(f"| head only (lr 1e-2) | {epochs} | – | | "
                     + " | ".join(f"{mean(head[(t, epochs)]):.3f}" if (t, epochs) in head else "–" for t in TASKS)
                     + " | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=_floats, default=[2e-4, 1e-3, 2e-3])
    p.add_argument("--epochs", type=_ints, default=[3, 8, 15])
    p.add_argument("--ratio", type=_floats, default=[1.0, 16.0])
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--tasks", type=lambda t: t.split(","), default=list(TASKS))
    p.add_argument("--skip", type=lambda t: {(float(c.split(":")[0]), int(c.split(":")[1])) for c in t.split(",")},
                   default=set(), help="lr:epochs cells to leave out, e.g. 2e-4:15")
    p.add_argument("--cells", type=lambda t: [(float(c.split(":")[0]), int(c.split(":")[1]), float(c.split(":")[2]))
                                              for c in t.split(",")], default=None,
                   help="lr:epochs:ratio cells to run instead of the grid, e.g. 1e-3:8:16,2e-3:3:1")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "study_defaults.jsonl")
    p.add_argument("--table-only", action="store_true", help="print the table of the runs in --out")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch
    torch.set_num_threads(args.threads)
    if not args.table_only:
        cells = args.cells or [(lr, e, ratio) for e in args.epochs for lr in args.lr for ratio in args.ratio
                               if (lr, e) not in args.skip]
        for seed in args.seeds:
            for epochs in sorted({e for _, e, _ in cells}):  # the cheap cells first: a cut-short study has them
                for task in args.tasks:
                    first = True
                    for lr, _, ratio in [c for c in cells if c[1] == epochs]:
                        row = run_one(task, lr, epochs, ratio, seed, head_only=first)
                        first = False
                        print(json.dumps(row), file=sys.stderr, flush=True)
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
