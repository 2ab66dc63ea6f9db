"""The inspect report folder: PNG plots, report.json and an index.html that shows them with the table and findings.

    spectra.png   σ₁ ≥ σ₂ ≥ … of ΔW per module, one panel per module name, one line per layer (log scale)
    energy.png    cumulative energy E(k) = Σ_{i≤k}σᵢ²/Σσᵢ² against k, same panels
    heatmap.png   ‖ΔW‖_F / ‖W0‖_F (‖ΔW‖_F without a base) by layer index × module name
    report.json   the inspect result (modules, findings, probe)
    index.html    everything above on one page

Plots need matplotlib (`pip install loralab[plot]`, Agg backend, imported only here); without it report.json
and index.html are still written.  Every file is written to a temporary name and renamed into place, and
index.html last, so a report that fails half way never leaves a page pointing at missing or partial files.
"""

from __future__ import annotations

import html
import io
import json
import math
from pathlib import Path

from .atomic import atomic_write_bytes

__all__ = ["write_report", "PLOTS"]

PLOTS = ("spectra.png", "energy.png", "heatmap.png")


def _grouped(report) -> tuple[list[str], list, dict]:
    """(module names in first-seen order, layer indices sorted (None last), {(layer, name): ModuleReport})."""
    names, cells = [], {}
    for m in report.modules:
        if m.name not in names:
            names.append(m.name)
        cells[(m.layer, m.name)] = m
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x is None, x if x is not None else 0))
    return names, layers, cells


def _panels(plt, count: int):
    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _curves(plt, report, kind: str) -> bytes:
    from matplotlib.ticker import MaxNLocator
    names, layers, cells = _grouped(report)
    fig, axes = _panels(plt, len(names))
    colors = plt.get_cmap("viridis")
    for ax, name in zip(axes, names):
        drawn = 0
        for i, layer in enumerate(layers):
            m = cells.get((layer, name))
            if m is None or not m.singular_values or max(m.singular_values) == 0:
                continue
            s = m.singular_values
            color = colors(i / max(len(layers) - 1, 1))
            label = f"layer {layer}" if layer is not None else None
            if kind == "spectra":
                ax.semilogy(range(1, len(s) + 1), [v if v > 0 else float("nan") for v in s], ".-", color=color,
                            label=label)
            else:
                total = sum(v * v for v in s)
                cumulative = [0.0]
                for v in s:
                    cumulative.append(cumulative[-1] + v * v / total)
                ax.plot(range(len(cumulative)), cumulative, ".-", color=color, label=label)
            drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "ΔW = 0 (or NaN/Inf)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(r"$\sigma_k$" if kind == "spectra" else "E(k)")
        if kind == "energy":
            ax.set_ylim(0, 1.02)
        if 1 < drawn <= 8:
            ax.legend(fontsize=7)
    key = f"   (colour: layer {layers[0]} dark → {layers[-1]} light)" if len(layers) > 8 else ""
    fig.suptitle(("singular values of ΔW" if kind == "spectra"
                  else "cumulative energy of ΔW:  E(k) = Σ_{i≤k} σ²_i / Σ σ²_i") + key)
    data = _png(fig)
    plt.close(fig)
    return data


def _heatmap(plt, report) -> bytes:
    import numpy as np
    from matplotlib.colors import LogNorm
    names, layers, cells = _grouped(report)
    field = "relative" if report.has_base else "delta_norm"
    grid = np.full((len(layers), len(names)), np.nan)
    for (layer, name), m in cells.items():
        value = getattr(m, field)
        if value is not None and math.isfinite(value):
            grid[layers.index(layer), names.index(name)] = value
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 0.35 * len(layers) + 2.2))
    finite = grid[np.isfinite(grid)]
    spread = finite.size and finite.min() > 0 and finite.max() > 5 * finite.min()
    norm = LogNorm(finite.min(), finite.max()) if spread else None  # one outlier must not flatten the rest
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma", norm=norm)
    fig.colorbar(image, ax=ax, label="‖ΔW‖ / ‖W0‖" if report.has_base else "‖ΔW‖_F")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), ["—" if x is None else str(x) for x in layers], fontsize=8)
    ax.set_ylabel("layer")
    if grid.size <= 160:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):  # dark text on the light end of the colour map
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7,
                        color="black" if image.norm(v) > 0.55 else "white")
    ax.set_title(("‖ΔW‖_F / ‖W0‖_F" if report.has_base else "‖ΔW‖_F") + " by layer × module")
    data = _png(fig)
    plt.close(fig)
    return data


def _plots(report) -> dict[str, bytes] | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return {"spectra.png": _curves(plt, report, "spectra"), "energy.png": _curves(plt, report, "energy"),
            "heatmap.png": _heatmap(plt, report)}


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _page(report, findings, probe, title: str, plots: bool) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(m.path)}</td><td>{m.shape[0]}×{m.shape[1]}</td><td>{m.r}</td><td>{m.scaling:.3g}</td>"
        f"<td>{_fmt(m.delta_norm, '.3e') if m.finite else 'NaN/Inf'}</td><td>{_fmt(m.relative, '.2e')}</td>"
        f"<td>{_fmt(m.energy.get(1) if m.energy else None, '.3f')}</td><td>{_fmt(m.effective_rank, '.2f')}</td>"
        f"<td>{_fmt(m.stable_rank, '.2f')}</td><td>{_fmt(m.rank_99, 'd')}</td>"
        f"<td>{m.stats['B']['max_abs']:.3g}</td></tr>" for m in report.modules)
    items = "\n".join(f"<li class='{f.severity}'><b>{f.severity}</b>{' · ' + e(f.module) if f.module else ''}: "
                      f"{e(f.message)}</li>" for f in findings) or "<li class='ok'>no problems found</li>"
    figures = ("\n".join(f"<figure><img src='{name}' alt='{name}'><figcaption>{name}</figcaption></figure>"
                         for name in PLOTS) if plots else
               "<p class='warning'>Plots need matplotlib: <code>pip install loralab[plot]</code></p>")
    probe_text = f"<p>{e(probe.summary())}</p>" if probe is not None else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loralab inspect: {e(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }} td, th {{ padding: 2px 8px; border-bottom: 1px solid #ddd; }}
td:not(:first-child) {{ text-align: right; font-variant-numeric: tabular-nums; }}
li.error {{ color: #b00020; }} li.warning {{ color: #8a5a00; }} li.info, li.ok {{ color: #2b5d2b; }}
img {{ max-width: 100%; border: 1px solid #eee; }} figure {{ margin: 1em 0; }}
</style></head><body>
<h1>Adapter {e(title)}</h1>
<p>{len(report.modules)} modules; ΔW = s·B·A, spectra from the factors (QR of A and B, SVD of the r×r core).</p>
<h2>Doctor</h2><ul>{items}</ul>{probe_text}
<h2>Modules</h2>
<table><tr><th>module</th><th>out×in</th><th>r</th><th>scale</th><th>‖ΔW‖_F</th><th>‖ΔW‖/‖W0‖</th><th>E(1)</th>
<th>eff. rank</th><th>stable rank</th><th>rank 99%</th><th>max|B|</th></tr>
{rows}
</table>
<h2>Plots</h2>{figures}
</body></html>
"""


def write_report(report, findings, directory, *, probe=None, title: str = "adapter", say=None) -> dict:
    """Write the report folder for an InspectReport and its findings; returns {"dir", "files", "plots"}."""
    say = say or (lambda *a: None)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--report {out} exists and is not a directory; choose a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report)
    if plots is None:
        say("plots need matplotlib: pip install loralab[plot] (writing report.json and index.html without them)")
    data = {**report.to_dict(), "findings": [f.to_dict() for f in findings],
            "probe": None if probe is None else probe.to_dict()}
    files = dict(plots or {})
    files["report.json"] = (json.dumps(data, indent=1, default=str) + "\n").encode()
    files["index.html"] = _page(report, findings, probe, title, plots is not None).encode()  # written last
    for name, blob in files.items():
        atomic_write_bytes(out / name, blob)
    say(f"wrote {out / 'index.html'} ({', '.join(n for n in files if n != 'index.html')})")
    return {"dir": str(out), "files": list(files), "plots": plots is not None}
