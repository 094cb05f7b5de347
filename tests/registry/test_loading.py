"""load_into and load_optimizer_state: digests, schema and state-dict checks, optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.registry import IncompatibleModelError, Registry
from pipeline.storage.errors import IntegrityError

from tests.registry.helpers import TinyPolicy, feature_schema, publish, trained_policy
from tests.storage.conftest import Backend


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def assert_same_state(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_corrupt_shard_leaves_module_unchanged(backend: Backend) -> None:
    registry = Registry(backend.root, backend.storage_options)
    published = publish(registry, "policy", trained_policy(1))
    last_shard = sorted(published.manifest.shards)[-1]
    data = bytearray(backend.get(f"policy/1/{last_shard}"))
    data[-1] ^= 0xFF
    backend.fs.rm_file(backend.path(f"policy/1/{last_shard}"))
    backend.put(f"policy/1/{last_shard}", bytes(data))

    target = trained_policy(2)
    before = snapshot(target)
    expected_sha = published.manifest.shards[last_shard]["sha256"]
    with pytest.raises(IntegrityError) as caught:
        registry.resolve("policy", "1").load_into(target)

    message = str(caught.value)
    assert message.startswith(f"shard {last_shard} ({published.url}/{last_shard}) failed verification: expected sha256 {expected_sha}, actual ")
    assert_same_state(target, before)
    report = registry.resolve("policy", "1").verify()
    assert not report.ok
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"shard {last_shard} ")


def test_schema_mismatch_lists_differences(backend: Backend) -> None:
    registry = Registry(backend.root, backend.storage_options)
    publish(registry, "policy", trained_policy(1))
    other_schema = feature_schema(hero_fields=("hp", "armor"), moves=("north", "south", "west"))
    target = TinyPolicy(width=6)
    before = snapshot(target)

    with pytest.raises(IncompatibleModelError) as caught:
        registry.resolve("policy", "1").load_into(target, schema=other_schema)

    assert str(caught.value) == (
        f"cannot load version 1 of model 'policy' ({registry.url}/policy/1) into TinyPolicy:\n"
        "  the feature schema differs from the manifest's:\n"
        "    input 'hero': fields only in the checkpoint: ['mana']; fields only in the module: ['armor']\n"
        "    output 'move': fields only in the checkpoint: ['east']; fields only in the module: ['west']\n"
        "  7 tensors have another shape: 'body.weight' (checkpoint [8, 5], module [6, 5]), "
        "'body.bias' (checkpoint [8], module [6]), 'norm.weight' (checkpoint [8], module [6]), "
        "'norm.bias' (checkpoint [8], module [6]), 'norm.running_mean' (checkpoint [8], module [6]), "
        "'norm.running_var' (checkpoint [8], module [6]), 'head.weight' (checkpoint [3, 8], module [3, 6])\n"
        "Load a version whose schema and tensors match the module, or migrate the checkpoint to "
        "the module's schema first"
    )
    assert_same_state(target, before)


def test_state_dict_mismatch_lists_all(backend: Backend) -> None:
    registry = Registry(backend.root, backend.storage_options)
    publish(registry, "policy", trained_policy(1))

    class Renamed(TinyPolicy):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)
            del self.head
            self.output = nn.Linear(8, 3)

    target = Renamed()
    before = snapshot(target)
    with pytest.raises(IncompatibleModelError) as caught:
        registry.resolve("policy", "1").load_into(target)
    lines = str(caught.value).splitlines()
    assert lines[1:3] == [
        "  4 tensors of the module are missing from the checkpoint: ['extra.weight', 'extra.bias', 'output.weight', 'output.bias']",
        "  2 tensors of the checkpoint are not in the module: ['head.weight', 'head.bias']",
    ]
    assert_same_state(target, before)

    report = registry.resolve("policy", "1").load_into(target, strict=False)
    assert report.missing == ["extra.weight", "extra.bias", "output.weight", "output.bias"]
    assert report.unexpected == ["head.weight", "head.bias"]
    assert torch.equal(target.body.weight, trained_policy(1).body.weight)
    assert torch.equal(target.extra.weight, before["extra.weight"])


def test_optimizer_state_round_trip(tmp_path) -> None:
    registry = Registry(str(tmp_path))
    source = trained_policy(4)
    optimizer = torch.optim.Adam(source.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        output = source(torch.randn(4, 2), torch.randint(0, 5, (4, 1)))
        output.square().mean().backward()
        optimizer.step()
    published = publish(registry, "policy", source, optimizer=optimizer)
    assert published.manifest.optimizer_state is True
    assert "optimizer.state.body.weight.exp_avg" in published.manifest.optimizer_tensors

    target = TinyPolicy()
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    version = registry.resolve("policy", "1")
    version.load_into(target)
    names = [name for name, _ in target.named_parameters()]
    loaded = version.load_optimizer_state(target_optimizer, names)

    assert len(loaded) == 3 * len(names)
    for (name, parameter), (_, original) in zip(target.named_parameters(), source.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(target_optimizer.state[parameter][key], optimizer.state[original][key]), (name, key)

    batch = (torch.randn(4, 2), torch.randint(0, 5, (4, 1)))
    for module, opt in ((source, optimizer), (target, target_optimizer)):
        module.train()
        opt.zero_grad()
        module(*batch).square().mean().backward()
        opt.step()
    assert_same_state(target, snapshot(source))


def test_optimizer_state_bad_input(tmp_path) -> None:
    registry = Registry(str(tmp_path))
    publish(registry, "policy", trained_policy(0))
    module = TinyPolicy()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    names = [name for name, _ in module.named_parameters()]
    with pytest.raises(ValueError, match=r"^version 1 of model 'policy' \(.*\) has no optimizer state; it was published without one$"):
        registry.resolve("policy", "1").load_optimizer_state(optimizer, names)

    source = trained_policy(1)
    adam = torch.optim.Adam(source.parameters())
    source(torch.randn(2, 2), torch.zeros(2, 1, dtype=torch.long)).sum().backward()
    adam.step()
    publish(registry, "policy", source, optimizer=adam)
    version = registry.resolve("policy", "2")
    with pytest.raises(ValueError, match=r"^param_names has 3 entries, but the optimizer has 7 parameters"):
        version.load_optimizer_state(torch.optim.Adam(module.parameters()), names[:3])
    renamed = [f"model.{name}" for name in names]
    with pytest.raises(IncompatibleModelError, match=r"21 stored entries name no parameter in param_names"):
        version.load_optimizer_state(torch.optim.Adam(module.parameters()), renamed)
    fresh = torch.optim.Adam(module.parameters())
    assert version.load_optimizer_state(fresh, renamed, strict=False) == []
    assert len(fresh.state) == 0


def test_load_casts_to_module_dtype(tmp_path) -> None:
    registry = Registry(str(tmp_path))
    source = trained_policy(5)
    publish(registry, "policy", source, max_shard_bytes=10**6)
    target = trained_policy(6).to(torch.float64)
    target.head.to(torch.bfloat16)
    registry.resolve("policy", "1").load_into(target)
    assert torch.equal(target.body.weight, source.body.weight.to(torch.float64))
    assert target.body.weight.dtype == torch.float64
