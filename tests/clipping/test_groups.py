"""Clipping styles split the trainable parameters into groups, each with its threshold."""

from __future__ import annotations

import math

import pytest

from dpspeed.clipping.groups import make_grouping, make_groups

NAMES = ["embed.weight", "blocks.0.fc.weight", "blocks.0.fc.bias", "blocks.1.fc.weight", "head.weight", "head.bias", "cls"]


def test_named_styles():
    assert make_groups("all-layer", NAMES) == [NAMES]
    assert make_groups("param-wise", NAMES) == [[n] for n in NAMES]
    assert make_groups("layer-wise", NAMES) == [["embed.weight"], ["blocks.0.fc.weight", "blocks.0.fc.bias"],
                                                ["blocks.1.fc.weight"], ["head.weight", "head.bias"], ["cls"]]


@pytest.mark.parametrize("m,sizes", [(1, [5]), (2, [3, 2]), (3, [2, 2, 1]), (5, [1, 1, 1, 1, 1])])
def test_m_uniform_groups_of_consecutive_layers(m, sizes):
    groups = make_groups(m, NAMES)
    layers = make_groups("layer-wise", NAMES)
    assert [sum(1 for layer in layers if layer[0] in g) for g in groups] == sizes
    assert sum(groups, []) == NAMES  # consecutive, in order, each parameter once


def test_custom_groups_are_checked():
    assert make_groups([NAMES[:2], NAMES[2:]], NAMES) == [NAMES[:2], NAMES[2:]]
    for style, match in [([NAMES, ["cls"]], "exactly one"), ([NAMES[:-1]], "no clipping group"),
                         ([NAMES + ["nope"]], "not a trainable"), ([NAMES, []], "empty")]:
        with pytest.raises(ValueError, match=match):
            make_groups(style, NAMES)
    with pytest.raises(ValueError, match="layers"):
        make_groups(6, NAMES)
    with pytest.raises(TypeError):
        make_groups(True, NAMES)


def test_one_threshold_is_split_so_the_whole_gradient_stays_within_it():
    grouping = make_grouping("layer-wise", NAMES, 2.0)
    assert grouping.thresholds == [2.0 / math.sqrt(5)] * 5
    assert math.isclose(grouping.total_threshold, 2.0)
    assert grouping.group_of["head.bias"] == 3
    explicit = make_grouping([NAMES[:2], NAMES[2:]], NAMES, [3.0, 4.0])
    assert explicit.thresholds == [3.0, 4.0] and math.isclose(explicit.total_threshold, 5.0)
    with pytest.raises(ValueError, match="thresholds"):
        make_grouping("all-layer", NAMES, [1.0, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        make_grouping("all-layer", NAMES, 0.0)


def test_the_groups_holding_some_parameters():
    grouping = make_grouping("layer-wise", NAMES, 1.0)
    part = grouping.holding({"head.bias", "cls"})
    assert part.groups == [["head.weight", "head.bias"], ["cls"]]
    assert part.thresholds == [grouping.thresholds[3], grouping.thresholds[4]]
