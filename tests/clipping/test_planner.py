"""The auto planner's choices: per layer the cheaper method by its cost model (or by the methods'
timings, on a CPU), explicit per-example gradients only within the memory budget (best saving per
byte first), a new plan for a larger batch. Timings are replaced by fixed values: no test here
depends on the clock."""

from __future__ import annotations

import torch
from torch import nn

from dpspeed.capture.records import Binding, Call
from dpspeed.clipping.methods import EXPLICIT, GHOST_BK
from dpspeed.clipping.planner import Planner
from dpspeed.layers.linear import LinearRule
from dpspeed.layers.rule import LayerRule


def _linear(name: str, d: int, p: int, batch: int, positions: int) -> tuple[Binding, list[Call]]:
    module = nn.Linear(d, p)
    binding = Binding(module, name, LinearRule(), {"weight": f"{name}.weight", "bias": f"{name}.bias"})
    return binding, [Call((torch.randn(batch, positions, d),), {}, [torch.randn(batch, positions, p)])]


def _plan(layers: dict, budget: int | None) -> Planner:
    planner = Planner(budget, timed=False)
    planner.prepare(dict(layers.values()))
    return planner


def _layers(batch: int = 8) -> dict:
    return {
        # long sequences through narrow layers: the T x T Grams cost more than the gradients
        "narrow": _linear("narrow", 4, 4, batch, 64),
        "narrower": _linear("narrower", 2, 2, batch, 64),
        # one position through a wide layer: the ghost norm is nearly free, gradients are large
        "wide": _linear("wide", 256, 256, batch, 1),
    }


def test_each_layer_gets_the_cheaper_method_without_a_budget_limit():
    layers = _layers()
    planner = _plan(layers, budget=None)
    assert planner(*layers["narrow"]) == EXPLICIT and planner(*layers["narrower"]) == EXPLICIT
    assert planner(*layers["wide"]) == GHOST_BK
    entries = {e.layer: e for e in planner.plan.values()}
    assert entries["narrow"].explicit_cost < entries["narrow"].ghost_cost
    assert entries["wide"].ghost_cost < entries["wide"].explicit_cost
    assert entries["narrow"].explicit_bytes == 8 * (4 * 4 + 4) * 4  # batch x parameters x float32


def test_explicit_gradients_stay_within_the_budget_best_saving_per_byte_first():
    layers = _layers()
    entries = {e.layer: e for e in _plan(layers, budget=None).plan.values()}
    saving = {n: (entries[n].ghost_cost - entries[n].explicit_cost) / entries[n].explicit_bytes for n in ("narrow", "narrower")}
    best, other = sorted(saving, key=saving.get, reverse=True)
    planner = _plan(layers, budget=entries[best].explicit_bytes)  # room for one of the two
    assert planner(*layers[best]) == EXPLICIT and planner(*layers[other]) == GHOST_BK
    nothing = _plan(layers, budget=0)
    assert all(nothing(*layer) == GHOST_BK for layer in layers.values())


def test_a_rule_without_ghost_norms_is_planned_explicit_at_no_budget_cost():
    binding = Binding(nn.Linear(3, 3), "custom", LayerRule(), {"weight": "custom.weight"})
    call = Call((torch.randn(4, 3),), {}, [torch.randn(4, 3)])
    planner = Planner(0, timed=False)
    planner.prepare({binding: [call]})
    assert planner(binding, [call]) == EXPLICIT and planner.plan[binding].explicit_bytes == 0


def test_a_larger_batch_makes_a_new_plan_and_a_smaller_one_keeps_it():
    small = _layers(batch=8)
    planner = _plan(small, budget=None)
    first = dict(planner.plan)
    planner.prepare({b: [Call((torch.randn(4, 64, 4),), {}, [torch.randn(4, 64, 4)])] for b, _ in [small["narrow"]]})
    assert planner.plan == first and planner.batch == 8
    large = {b: [Call((torch.randn(16, 64, 4),), {}, [torch.randn(16, 64, 4)])] for b, _ in [small["narrow"]]}
    planner.prepare(large)
    assert planner.batch == 16 and list(planner.plan) == [small["narrow"][0]]
    assert planner.plan[small["narrow"][0]].explicit_bytes == 16 * 20 * 4


def test_on_a_cpu_the_methods_are_timed_and_the_faster_taken(monkeypatch):
    """Each method's work is run and timed; the plan follows the times, whatever the model says."""
    from dpspeed.clipping import planner as planner_module

    ran = []

    def fake_time(run) -> float:
        run()  # the method really runs on the recorded call
        ran.append(run.__name__)
        return {"ghost": 2.0, "explicit": 1.0}[run.__name__]

    monkeypatch.setattr(planner_module, "_best_time", fake_time)
    layers = {"wide": _linear("wide", 256, 256, 8, 1)}  # the cost model would take ghost
    planner = Planner(None)
    planner.prepare(dict(layers.values()))
    entry = planner.plan[layers["wide"][0]]
    assert ran == ["ghost", "explicit"] and entry.timed
    assert planner(*layers["wide"]) == EXPLICIT and entry.ghost_cost == 2e9 / 8 and entry.explicit_cost == 1e9 / 8
