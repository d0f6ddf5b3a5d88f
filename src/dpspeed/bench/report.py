"""report.md (and the plots) from a results.json, and the comparison of two result folders."""

from __future__ import annotations

import json
from pathlib import Path

from .results import best_points, precision_speedup, recommend, relative_throughput

MiB = 2**20


def load(folder: str | Path) -> dict:
    path = Path(folder) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no results.json in {folder}: run `dpspeed bench --out {folder}` first")
    return json.loads(path.read_text())


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        if v is None:
            return "–"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]]


def _unit(results: dict) -> str:
    units = {info["unit"] for info in results.get("models", {}).values()}
    return units.pop() if len(units) == 1 else "examples"


def _recommendation(results: dict, model: str, unit: str) -> list[str]:
    choice = recommend(results, model)
    if choice is None:
        return []
    text = (f"**Recommended for {model}:** `clipping_mode=\"{choice['mode']}\"`, all-layer clipping, {choice['precision']}, "
            f"physical batch {choice['batch']}: {choice['per_second']:.1f} {unit}/s")
    if choice["relative_to_non_private"] is not None:
        text += f", {choice['relative_to_non_private']:.2f}× non-private's throughput in {choice['precision']}"
    if choice.get("relative_to_fp32_non_private") is not None and choice["precision"] != "fp32":
        text += f" ({choice['relative_to_fp32_non_private']:.2f}× non-private fp32)"
    text += "."
    if choice.get("layer_wise_memory_saving") is not None:
        text += (f" Layer-wise clipping lowers the peak memory of a step by {100 * choice['layer_wise_memory_saving']:.0f}% "
                 "if a larger batch is needed (it is a different clipping, usually a little less accurate).")
    return [text, ""]


def build(results: dict, out: Path) -> Path:
    """Write the plots and report.md into `out`; return the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    unit = _unit(results)
    try:
        from . import plots
    except ImportError as err:
        raise ValueError(f"the report's plots need matplotlib ({err}): pip install 'dpspeed[bench]'") from err
    made = {p.name for p in plots.all_plots(results, out, unit)}
    env = results.get("environment", {})
    lines = ["# dpspeed bench", ""]
    if results.get("interrupted"):
        lines += ["**Interrupted:** this report shows what was measured before the run was stopped.", ""]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines += [f"Device: **{env.get('device', '?')}** ({env.get('threads', '?')} CPU threads); {versions}.",
              f"Command: `{env.get('command', '?')}`; seed {results.get('seed')}; {env.get('date', '')}.", "",
              "Throughput is per physical batch (forward, backward, clipping and accumulation; noise and the update "
              "come once per logical batch and are in the breakdown), on inputs already on the device, warm-up "
              "excluded, median of the repeats.", ""]
    for model in results.get("models", {}):
        lines += _recommendation(results, model, unit)

    best, rel = best_points(results), relative_throughput(results)
    speed = precision_speedup(results)
    largest = {(r["model"], r["precision"], r["setup"]): r for r in results.get("largest_batch", [])}
    e2e = {(r["model"], r["precision"], r["setup"]): r for r in results.get("end_to_end", [])}
    lines += ["## Throughput at the best physical batch", ""]
    rows = []
    for key, row in best.items():
        lb = largest.get(key, {})
        size = f"≥{lb['largest']}" if lb.get("at_limit") else lb.get("largest")
        base_largest = largest.get((key[0], key[1], "non-private"), {}).get("largest")
        rows.append([*key, row["batch"], row["per_second"], rel.get(key), speed.get(key), size,
                     lb["largest"] / base_largest if base_largest and lb.get("largest") else None,
                     e2e.get(key, {}).get("per_second")])
    lines += _table(["model", "precision", "setup", "best batch", f"{unit}/s", "× non-private", "× own fp32",
                     "largest batch", "largest × non-private's", f"end-to-end {unit}/s"], rows)
    suspect = [r for r in results.get("throughput", []) if r.get("suspect")]
    if suspect:
        lines += ["", "**Distrusted measurements** (measured twice, left out of the table and the recommendation; "
                  "re-run on a quiet machine):", ""]
        lines += [f"- {r['model']}, {r['precision']}, {r['setup']}, batch {r['batch']}: {r['suspect']}" for r in suspect]
    for name, title in [("throughput_vs_batch.png", "Throughput over physical batch size"),
                        ("largest_batch.png", "Largest physical batch"), ("relative_throughput.png", "Relative throughput"),
                        ("precision_speedup.png", "Precision")]:
        if name in made:
            lines += ["", f"### {title}", "", f"![{title}]({name})"]

    if results.get("breakdown"):
        lines += ["", "## Where the time goes", "",
                  "One step whose physical batch is also the last of its logical batch, in ms, parts timed with "
                  "device synchronisation (exclusive: a part inside another is not counted twice), next to "
                  "uninstrumented steps; *sum* is the median over runs of each run's total. *bookkeeping* is the rest of the optimizer step (for Opacus, all of its "
                  "clipping, which it does not mark in parts).", ""]
        rows = [[r["model"], r["precision"], r["setup"], r["batch"],
                 ", ".join(f"{k} {1e3 * v:.2f}" for k, v in r["parts"].items()),
                 1e3 * r["parts_sum"], 1e3 * r["step_seconds"]] for r in results["breakdown"]]
        lines += _table(["model", "precision", "setup", "batch", "parts (ms)", "sum (ms)", "step (ms)"], rows)
        if "breakdown.png" in made:
            lines += ["", "![Breakdown](breakdown.png)"]

    compiled = [r for r in results.get("throughput", []) if r.get("compile_seconds") is not None]
    if compiled:
        lines += ["", "## JAX: compilation apart from the steps", "",
                  "Seconds XLA took to compile each physical batch size's step (once per size: Poisson batches are "
                  "padded to it and masked), beside the step it then takes (seed Fig. A.1).", ""]
        rows = [[r["model"], r["precision"], r["setup"], r["batch"], r["compile_seconds"],
                 1e3 * r["seconds_median"]] for r in compiled]
        lines += _table(["model", "precision", "setup", "batch", "compile (s)", "step (ms)"], rows)

    if results.get("memory"):
        lines += ["", "## Memory per clipping style", "",
                  "Peak memory of one whole step above the memory held before it, and the largest memory peak that "
                  "Fact 6.1 of Bu et al. (group-wise clipping) predicts from the kept activations and output "
                  "gradients alone (other saved activations are not in it).", ""]
        rows = [[r["model"], r["setup"], r["style"], r["batch"], r["measured_bytes"] / MiB,
                 r["fact_6_1_bytes"] / MiB if r["fact_6_1_bytes"] is not None else None] for r in results["memory"]]
        lines += _table(["model", "mode", "style", "batch", "measured MiB", "Fact 6.1 MiB"], rows)
        if "memory.png" in made:
            lines += ["", "![Memory](memory.png)"]

    scaling = results.get("scaling")
    if scaling:
        lines += ["", "## Scaling over processes", "",
                  f"Backend {scaling.get('backend')}; Amdahl's law fitted to the speed-ups over one process.", ""]
        rows = [[r["setup"], r["processes"], r["per_second"], r["efficiency"], 1e3 * r["step_seconds"],
                 1e3 * r["all_reduce_seconds"]] for r in scaling["throughput"]]
        lines += _table(["setup", "processes", f"{unit}/s", "efficiency", "logical step (ms)",
                         "all-reduce (ms; DDP's overlaps the backward)"], rows)
        lines += [""] + [f"- {s}: parallel fraction p = {p:.4f}" for s, p in scaling.get("parallel_fraction", {}).items()]
        if scaling.get("modeled"):
            lines += ["", f"Modelled efficiency at scale: the measured compute of one logical batch on one process, and a "
                      f"ring all-reduce of the {scaling['gradient_bytes'] / MiB:.3g} MiB gradient at "
                      f"{scaling['modeled'][0]['bandwidth'] / 1e9:g} GB/s per link, not overlapped (Sinha et al. measured "
                      "69% for Opacus and 53% non-private at 80 V100s).", ""]
            rows = [[r["setup"], r["processes"], r["efficiency"]] for r in scaling["modeled"]]
            lines += _table(["setup", "processes", "modelled efficiency"], rows)
        if "scaling.png" in made:
            lines += ["", "![Scaling](scaling.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def compare(a: dict, b: dict, names: tuple[str, str], out: Path) -> Path:
    """A table of each setup's best throughput and relative throughput in two result sets."""
    out.mkdir(parents=True, exist_ok=True)
    best_a, best_b = best_points(a), best_points(b)
    rel_a, rel_b = relative_throughput(a), relative_throughput(b)
    rows = []
    for key in [k for k in best_a if k in best_b]:
        ra, rb = best_a[key]["per_second"], best_b[key]["per_second"]
        rows.append([*key, ra, rb, rb / ra, rel_a.get(key), rel_b.get(key)])
    lines = ["# dpspeed bench: comparison", "",
             f"A: `{names[0]}` on {a.get('environment', {}).get('device', '?')}; "
             f"B: `{names[1]}` on {b.get('environment', {}).get('device', '?')}.", ""]
    lines += _table(["model", "precision", "setup", "A /s", "B /s", "B ÷ A", "A × non-private", "B × non-private"], rows)
    only = sorted(set(best_a) ^ set(best_b))
    if only:
        lines += ["", "Measured in one of the two only: " + "; ".join(" ".join(k) for k in only)]
    path = out / "comparison.md"
    path.write_text("\n".join(lines) + "\n")
    return path
