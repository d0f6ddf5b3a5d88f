"""PNG plots of a results.json, one file per kind of measurement, one panel per model and precision."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import precision_speedup, relative_throughput  # noqa: E402

MiB = 2**20


def _panels(keys: list[tuple], title) -> tuple:
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.set_title(title(key))
    return fig, axes[0]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_model_and_precision(rows: list[dict]) -> list[tuple[tuple[str, str], list[dict]]]:
    """The rows of each (model, precision), one panel each."""
    keys = sorted({(r["model"], r["precision"]) for r in rows})
    return [(key, [r for r in rows if (r["model"], r["precision"]) == key]) for key in keys]


def _grouped_bars(ax, setups: list[str], series: dict[str, dict[str, float]]) -> None:
    """One group of bars per setup, one bar per series (precision) in each group."""
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(setups))], [values.get(s, 0) for s in setups], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(setups))], setups, rotation=45, ha="right")
    ax.legend()


def throughput_vs_batch(results: dict, unit: str, out: Path) -> Path | None:
    panels = _per_model_and_precision(results.get("throughput", []))
    if not panels:
        return None
    fig, axes = _panels([key for key, _ in panels], lambda k: f"{k[0]} ({k[1]})")
    for ax, (_, mine) in zip(axes, panels):
        for setup in dict.fromkeys(r["setup"] for r in mine):
            line = sorted((r for r in mine if r["setup"] == setup), key=lambda r: r["batch"])
            xs = [r["batch"] for r in line]
            ax.plot(xs, [r["per_second"] for r in line], marker="o", label=setup)
            ax.fill_between(xs, [r["per_second_q1"] for r in line], [r["per_second_q3"] for r in line], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("physical batch size")
        ax.set_ylabel(f"{unit}/s (median, quartiles shaded)")
        ax.legend(fontsize=7)
    return _save(fig, out / "throughput_vs_batch.png")


def largest_batch(results: dict, out: Path) -> Path | None:
    rows = [r for r in results.get("largest_batch", []) if "error" not in r]
    keys = sorted({(r["model"],) for r in rows})
    if not keys:
        return None
    fig, axes = _panels(keys, lambda k: k[0])
    for ax, (model,) in zip(axes, keys):
        mine = [r for r in rows if r["model"] == model]
        series = {p: {r["setup"]: r["largest"] for r in mine if r["precision"] == p}
                  for p in dict.fromkeys(r["precision"] for r in mine)}
        _grouped_bars(ax, list(dict.fromkeys(r["setup"] for r in mine)), series)
        ax.set_ylabel("largest physical batch (≥ where the search hit its limit)")
    return _save(fig, out / "largest_batch.png")


def relative(results: dict, out: Path) -> Path | None:
    """Relative throughput per setup; over model sizes (by parameter count) when there are several."""
    rel = relative_throughput(results)
    if not rel:
        return None
    sizes = {m: info["parameters"] for m, info in results.get("models", {}).items()}
    precisions = sorted({p for _, p, _ in rel})
    fig, axes = _panels([(p,) for p in precisions], lambda k: f"relative throughput ({k[0]})")
    for ax, precision in zip(axes, precisions):
        setups = list(dict.fromkeys(s for _, p, s in rel if p == precision))
        models = sorted({m for m, p, _ in rel if p == precision}, key=lambda m: sizes.get(m, 0))
        for setup in setups:
            points = [(sizes.get(m, 0) / 1e6, rel[(m, precision, setup)]) for m in models if (m, precision, setup) in rel]
            ax.plot(*zip(*points), marker="o", label=setup)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("model parameters (millions)")
        ax.set_ylabel("throughput / non-private's (each at its best batch)")
        ax.legend(fontsize=7)
    return _save(fig, out / "relative_throughput.png")


def precision(results: dict, out: Path) -> Path | None:
    speed = {k: v for k, v in precision_speedup(results).items() if k[1] != "fp32"}
    models = sorted({m for m, _, _ in speed})
    if not models:
        return None
    fig, axes = _panels([(m,) for m in models], lambda k: f"{k[0]}: speed-up over fp32")
    for ax, model in zip(axes, models):
        series = {p: {s: v for (m, q, s), v in speed.items() if m == model and q == p}
                  for p in sorted({p for m, p, _ in speed if m == model})}
        _grouped_bars(ax, list(dict.fromkeys(s for m, _, s in speed if m == model)), series)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel("best throughput / best in fp32")
    return _save(fig, out / "precision_speedup.png")


def breakdown(results: dict, out: Path) -> Path | None:
    panels = _per_model_and_precision(results.get("breakdown", []))
    if not panels:
        return None
    fig, axes = _panels([key for key, _ in panels], lambda k: f"{k[0]} ({k[1]}): one step at the best batch")
    for ax, (_, mine) in zip(axes, panels):
        parts = list(dict.fromkeys(p for r in mine for p in r["parts"]))
        left = [0.0] * len(mine)
        for part in parts:
            values = [1e3 * r["parts"].get(part, 0.0) / r["batch"] for r in mine]
            ax.barh(range(len(mine)), values, left=left, label=part)
            left = [a + b for a, b in zip(left, values)]
        ax.set_yticks(range(len(mine)), [f"{r['setup']} (b={r['batch']})" for r in mine])
        ax.set_xlabel("milliseconds per example")
        ax.legend(fontsize=7)
    return _save(fig, out / "breakdown.png")


def memory(results: dict, out: Path) -> Path | None:
    rows = results.get("memory", [])
    models = sorted({r["model"] for r in rows})
    if not models:
        return None
    fig, axes = _panels([(m,) for m in models], lambda k: f"{k[0]}: peak memory of one step")
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        labels = [r["style"] for r in mine]
        ax.bar([i - 0.2 for i in range(len(mine))], [r["measured_bytes"] / MiB for r in mine], 0.4, label="measured")
        ax.bar([i + 0.2 for i in range(len(mine))], [(r["fact_6_1_bytes"] or 0) / MiB for r in mine], 0.4,
               label="Fact 6.1 (kept activations and output gradients)")
        ax.set_xticks(range(len(mine)), labels)
        ax.set_ylabel(f"MiB above the memory before the step (batch {mine[0]['batch']})")
        ax.legend(fontsize=7)
    return _save(fig, out / "memory.png")


def scaling(results: dict, out: Path) -> Path | None:
    rows = results.get("scaling", {}).get("throughput", [])
    if not rows:
        return None
    fig, axes = _panels([("scaling",)], lambda k: "throughput over processes")
    ax = axes[0]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        line = sorted((r for r in rows if r["setup"] == setup), key=lambda r: r["processes"])
        xs = [r["processes"] for r in line]
        ax.plot(xs, [r["per_second"] for r in line], marker="o", label=setup)
        ax.plot(xs, [line[0]["per_second"] * n for n in xs], linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("processes")
    ax.set_ylabel("examples/s (dashed: linear)")
    ax.legend()
    return _save(fig, out / "scaling.png")


def all_plots(results: dict, out: Path, unit: str = "examples") -> list[Path]:
    made = [throughput_vs_batch(results, unit, out), largest_batch(results, out), relative(results, out),
            precision(results, out), breakdown(results, out), memory(results, out), scaling(results, out)]
    return [p for p in made if p is not None]
