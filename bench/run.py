"""Run the benchmarks and record them in BENCHMARKS.md.

    python bench/run.py              # every bench/bench_*.py
    python bench/run.py inference    # only bench/bench_inference.py (its section is replaced in place)

Each bench module has `main() -> str` returning a Markdown section (figures and ratios against the peer
measured in the same run).  The file keeps one section per benchmark between markers, each with the
command that produced it, so re-running one benchmark leaves the others' figures as they were.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nMeasured on CPU (2 threads) on the development machine. Absolute times drift "
          "between runs, so each benchmark reports ratios against its peer measured in the same run.\n")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(text: str) -> dict[str, str]:
    return dict(re.findall(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->\n", text, flags=re.S))


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    torch.set_num_threads(2)
    sections = _sections(OUT.read_text()) if OUT.exists() else {}
    for name in names:
        print(f"== bench {name}", file=sys.stderr, flush=True)
        start = time.time()
        body = _load(name).main()
        stamp = (f"\n_Command: `python bench/run.py {name}` — {time.strftime('%Y-%m-%d')}, torch "
                 f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
                 f"{time.time() - start:.0f} s._\n\n")
        sections[name] = body.rstrip() + "\n" + stamp
        text = HEADER + "".join(f"\n<!-- bench:{k} -->\n{v}<!-- /bench:{k} -->\n" for k, v in sorted(sections.items()))
        tmp = OUT.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, OUT)  # atomic: a crash never leaves a half-written file
        print(body, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
