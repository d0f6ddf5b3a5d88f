"""What the measurements of a results.json say: best points, relative throughput, precision
speed-ups and the recommended setup. Used by the bench and by `dpspeed report` alike."""

from __future__ import annotations

from .setups import NON_PRIVATE


#: repeats whose interquartile range exceeds this fraction of their median are distrusted
SPREAD_LIMIT = 0.25
#: a DP setup measured faster than non-private training by more than this (at the same batch) is
#: distrusted: it does strictly more work, so one of the two measurements was disturbed
FASTER_LIMIT = 1.02


def doubts(row: dict, non_private: dict | None) -> list[str]:
    """Why a throughput row cannot be trusted (empty: it can)."""
    reasons = []
    if row.get("spread", 0.0) > SPREAD_LIMIT:
        reasons.append(f"its repeats spread by {row['spread']:.0%} of their median")
    if non_private is not None and row["per_second"] > FASTER_LIMIT * non_private["per_second"]:
        reasons.append(f"DP measured {row['per_second'] / non_private['per_second']:.2f}x as fast as non-private "
                       "training at the same batch")
    return reasons


def best_points(results: dict) -> dict[tuple[str, str, str], dict]:
    """(model, precision, setup) -> the trusted throughput row with the most examples per second
    (a row the bench flagged as `suspect` is left out)."""
    best: dict[tuple[str, str, str], dict] = {}
    for row in results.get("throughput", []):
        if row.get("suspect"):
            continue
        key = (row["model"], row["precision"], row["setup"])
        if key not in best or row["per_second"] > best[key]["per_second"]:
            best[key] = row
    return best


def relative_throughput(results: dict) -> dict[tuple[str, str, str], float]:
    """Each setup at its best physical batch over non-private at its best, same model and precision."""
    best = best_points(results)
    out = {}
    for (model, precision, setup), row in best.items():
        base = best.get((model, precision, NON_PRIVATE))
        if base is not None:
            out[(model, precision, setup)] = row["per_second"] / base["per_second"]
    return out


def precision_speedup(results: dict) -> dict[tuple[str, str, str], float]:
    """Each setup's best throughput in a precision over its best in fp32."""
    best = best_points(results)
    return {(m, p, s): row["per_second"] / best[(m, "fp32", s)]["per_second"]
            for (m, p, s), row in best.items() if (m, "fp32", s) in best}


def is_dpspeed_mode(setup: str) -> bool:
    return setup != NON_PRIVATE and not setup.startswith(("opacus-", "jax-"))


def recommend(results: dict, model: str) -> dict | None:
    """The dpspeed mode, precision and physical batch with the highest measured throughput (all of
    which fitted in memory), with its cost relative to non-private training."""
    best = best_points(results)
    relative = relative_throughput(results)
    candidates = [(key, row) for key, row in best.items() if key[0] == model and is_dpspeed_mode(key[2])]
    if not candidates:
        return None
    (_, precision, mode), row = max(candidates, key=lambda item: item[1]["per_second"])
    fp32_base = best.get((model, "fp32", NON_PRIVATE))
    choice = {
        "model": model, "mode": mode, "style": "all-layer", "precision": precision, "batch": row["batch"],
        "per_second": row["per_second"], "relative_to_non_private": relative.get((model, precision, mode)),
        "relative_to_fp32_non_private": row["per_second"] / fp32_base["per_second"] if fp32_base else None,
    }
    memory = {m["style"]: m for m in results.get("memory", []) if m["model"] == model}
    if "all-layer" in memory and "layer-wise" in memory:
        saved = 1 - memory["layer-wise"]["measured_bytes"] / memory["all-layer"]["measured_bytes"]
        choice["layer_wise_memory_saving"] = saved
    return choice
