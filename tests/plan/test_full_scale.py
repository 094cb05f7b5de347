"""Planning the full-scale Five-like policy: the OpenAI Five LSTM surgery from 2048 to 4096.

Both models are built on the meta device and nothing is applied, so the test needs no
weight memory. It checks the index maps of the LSTM and its consumers.
"""

from __future__ import annotations

import time

import pytest

from pipeline.models.spec import ModelSpec
from pipeline.plan.build import ModelSide, build_plan
from pipeline.plan.model import count_elements

WIDTH_OLD, WIDTH_NEW = 2048, 4096


@pytest.fixture(scope="module")
def full_plan():
    old = ModelSide.from_spec(ModelSpec("pipeline.examples.five:build", {"size": "full", "lstm_width": WIDTH_OLD}))
    new = ModelSide.from_spec(ModelSpec("pipeline.examples.five:build", {"size": "full"}))
    started = time.perf_counter()
    plan = build_plan(old, new)
    return plan, time.perf_counter() - started


def _gate_index(old: int, new: int) -> list[int]:
    out = []
    for gate in range(4):
        out += list(range(gate * old, (gate + 1) * old)) + [-1] * (new - old)
    return out


def test_full_plan_is_fast_and_exact(full_plan):
    plan, seconds = full_plan
    assert plan.exact
    # Planning works on reduced maps; measured at about 0.2 s on 2 cores.
    assert seconds < 10
    total = sum(pp.numel() for pp in plan.params if pp.tied_to is None)
    assert total == 158_358_581


def test_full_lstm_index_maps(full_plan):
    plan, _ = full_plan
    ih = plan.param("lstm.weight_ih_l0")
    assert ih.shape == (4 * WIDTH_NEW, 4096)
    assert ih.axes[0].blocks == 4
    assert ih.axes[0].index() == _gate_index(WIDTH_OLD, WIDTH_NEW)
    assert ih.axes[1].index() == list(range(4096))
    assert len(ih.axes[0].runs) == 8

    hh = plan.param("lstm.weight_hh_l0")
    assert hh.axes[1].index() == list(range(WIDTH_OLD)) + [-1] * (WIDTH_NEW - WIDTH_OLD)
    regions = {(r.situation, r.rule): r.count() for r in hh.regions}
    assert regions[("new_unit_out", "zero")] == 4 * WIDTH_OLD * (WIDTH_NEW - WIDTH_OLD)
    assert regions[("new_unit", "uniform")] == 4 * (WIDTH_NEW - WIDTH_OLD) * WIDTH_NEW
    bound = dict(next(r for r in hh.regions if r.rule == "uniform").params)["bound"]
    assert bound == pytest.approx(1 / WIDTH_NEW**0.5)

    counts = count_elements(hh)
    assert counts.copied + counts.gathered == 4 * WIDTH_OLD * WIDTH_OLD


def test_full_heads_read_new_units_as_zero(full_plan):
    plan, _ = full_plan
    for name in ("heads.action_type.weight", "heads.delay.weight", "heads.target_unit.weight", "heads.value.weight"):
        pp = plan.param(name)
        assert pp.axes[1].index() == list(range(WIDTH_OLD)) + [-1] * (WIDTH_NEW - WIDTH_OLD), name
        assert [(r.situation, r.rule) for r in pp.regions] == [("new_unit_out", "zero")], name
    trunk = plan.param("trunk.0.weight")
    assert trunk.axes[1].runs == ((0, 0, 3840),)
    assert trunk.regions == ()
