"""The set method and the gradient method give the same interaction map, element by element.

The two methods share no propagation code (see pipeline.maps.gradient), so agreement on
random models is evidence that both implement the same semantics.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from pipeline.maps.compare import MapDifference, diff_maps
from pipeline.maps.gradient import gradient_map
from pipeline.models.spec import load_spec
from tests.maps.generator import Structure, build_model, structures

SPECS = ["five_small.yaml", "bert_tiny.yaml"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run on one intra-op thread: these models are tiny, and extra threads only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _set_map(module, schema):
    from pipeline.maps.propagate import set_map

    return set_map(module, schema)


def _failure(structure: Structure, differences: list[MapDifference]) -> str:
    lines = ["set map (left) and gradient map (right) differ", "model:", structure.describe(), "differences:"]
    lines += [f"  {difference}" for difference in differences]
    return "\n".join(lines)


# CI (CI=true) replays the same 200 examples on every run, so a red build always points
# at a change; local runs draw new examples and keep searching.
@settings(
    max_examples=200,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(structures())
def test_maps_agree_on_generated_models(structure):
    module, schema = build_model(structure)

    differences = diff_maps(_set_map(module, schema), gradient_map(module, schema))

    assert differences == [], _failure(structure, differences)


@pytest.mark.parametrize("spec", SPECS)
def test_maps_agree_on_example_models(spec):
    module, schema = load_spec(f"pipeline/examples/specs/{spec}").build()

    differences = diff_maps(_set_map(module, schema), gradient_map(module, schema))

    assert differences == [], "\n".join(str(d) for d in differences)
