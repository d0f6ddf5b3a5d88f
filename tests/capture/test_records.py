"""Records compare by identity: they hold tensors, which a value comparison would compare element
by element (`call in calls` crashed the one-pass modes on a module called twice)."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from dpspeed.capture import records
from dpspeed.capture.records import Binding, Call, OpUse
from dpspeed.layers.rule import LayerRule


def test_every_record_type_compares_by_identity():
    types = [cls for _, cls in inspect.getmembers(records, inspect.isclass)
             if dataclasses.is_dataclass(cls) and cls.__module__ == records.__name__]
    assert {c.__name__ for c in types} >= {"Call", "OpUse", "Binding", "TapSpec"}
    for cls in types:
        assert cls.__eq__ is object.__eq__, f"{cls.__name__} compares by value"
        assert cls.__hash__ is object.__hash__, f"{cls.__name__} is not hashable by identity"


def test_equal_contents_are_different_records():
    def call() -> Call:
        return Call((torch.ones(3, 2),), {}, [torch.ones(3, 2)])

    a, b = call(), call()
    assert a != b and a == a
    assert a in [b, a] and b not in [a]  # no tensor comparison, no "ambiguous truth value"
    use = OpUse((), {}, leaves=[torch.ones(2)])
    assert use not in [OpUse((), {}, leaves=[torch.ones(2)])]
    layer = nn.Linear(2, 2)
    binding = Binding(layer, "layer", LayerRule(), {"weight": "layer.weight"})
    assert {binding: 1}[binding] == 1 and binding != Binding(layer, "layer", LayerRule(), {"weight": "layer.weight"})


def test_a_call_knows_its_batch_and_lets_go_of_its_tensors():
    call = Call((torch.ones(5, 3),), {"mask": torch.ones(5)}, [None, torch.ones(5, 2)], shared={"gram": 1})
    assert call.has_grads and call.batch_size == 5
    call.release()
    assert call.args == () and call.kwargs == {} and call.shared == {} and not call.has_grads
