"""Set-propagation rules on small models whose maps are known by construction."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps.interaction import InteractionMap
from pipeline.maps.propagate import UnsupportedOpError, set_map
from pipeline.schema import FeatureSchema, InputSpec, OutputSpec


def _schema(outputs=(("out", ("o0", "o1")),), vocab=("a", "b", "c")):
    return FeatureSchema(
        (
            InputSpec("hero", "continuous", (3,), ("hp", "mana", "gold")),
            InputSpec("units", "continuous", (4, 2), ("x", "y")),
            InputSpec("kind", "categorical", (4,), vocabulary="kinds"),
        ),
        {"kinds": vocab},
        tuple(OutputSpec(n, f) for n, f in outputs),
    )


def _names(imap: InteractionMap, set_id: int) -> set[str]:
    return {a.name if a.kind != "category" else f"#{a.name}" for a in imap.atoms_of(set_id)}


def _inputs(imap, name):
    param = imap.params[name]
    full = param.dense_inputs()
    return [[_names(imap, int(i)) for i in row] for row in full.reshape(full.shape[0], -1).tolist()] if full.dim() else _names(imap, int(full))


def _outputs(imap, name):
    param = imap.params[name]
    return {a.name for i in param.outputs.unique().tolist() for a in imap.atoms_of(i)}


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        self.hero = nn.Linear(3, 4)
        self.units = nn.Linear(2, 4)
        self.kind = nn.Embedding(5, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, hero, units, kind):
        h = torch.tanh(self.hero(hero))
        u = torch.relu(self.units(units) + self.kind(kind)).amax(dim=1)
        return {"out": self.head(torch.cat([h, u], dim=-1))}


def test_first_layer_columns_belong_to_fields():
    imap = set_map(TwoTowers(), _schema())
    rows = _inputs(imap, "hero.weight")
    assert all(row == [{"hp"}, {"mana"}, {"gold"}] for row in rows)
    assert all(row == [{"x"}, {"y"}] for row in _inputs(imap, "units.weight"))


def test_bias_records_element_it_is_added_to():
    imap = set_map(TwoTowers(), _schema())
    assert all(s == {"hp", "mana", "gold"} for s in _inputs(imap, "hero.bias")[0])
    assert all(s == {"x", "y"} for s in _inputs(imap, "units.bias")[0])


def test_embedding_rows_belong_to_categories():
    imap = set_map(TwoTowers(), _schema())
    rows = _inputs(imap, "kind.weight")
    assert [row[0] for row in rows] == [{"#a"}, {"#b"}, {"#c"}, set(), set()]


def test_dense_mixing_carries_all_upstream_atoms():
    imap = set_map(TwoTowers(), _schema())
    everything = {"hp", "mana", "gold", "x", "y", "#a", "#b", "#c"}
    rows = _inputs(imap, "head.weight")
    assert rows[0][:4] == [{"hp", "mana", "gold"}] * 4
    assert rows[0][4:] == [{"x", "y", "#a", "#b", "#c"}] * 4
    assert all(s == everything for s in _inputs(imap, "head.bias")[0])


def test_outputs_flow_back_per_field():
    imap = set_map(TwoTowers(), _schema())
    head = imap.params["head.weight"].dense_outputs()
    assert {a.name for a in imap.atoms_of(int(head[0, 0]))} == {"o0"}
    assert {a.name for a in imap.atoms_of(int(head[1, 5]))} == {"o1"}
    assert _outputs(imap, "hero.weight") == {"o0", "o1"}
    rows = imap.params["kind.weight"].dense_outputs()
    assert imap.atoms_of(int(rows[4, 0])) == []


def test_map_ignores_weight_values():
    model = TwoTowers()
    with torch.no_grad():
        model.hero.weight[:, 1] = 0
    imap = set_map(model, _schema())
    assert _inputs(imap, "hero.weight")[0][1] == {"mana"}


def test_meta_module_gives_same_map():
    from pipeline.maps.compare import diff_maps

    with torch.device("meta"):
        meta = TwoTowers()
    assert diff_maps(set_map(meta, _schema()), set_map(TwoTowers(), _schema())) == []


class Recurrent(nn.Module):
    def __init__(self, cell: str):
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell](4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, hero, units, kind):
        out, _ = self.rnn(self.enc(hero).unsqueeze(1))
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_state_reaches_fixed_point(cell):
    imap = set_map(Recurrent(cell), _schema())
    hidden = _inputs(imap, "rnn.weight_hh_l0")
    assert all(s == {"hp", "mana", "gold"} for row in hidden for s in row)
    assert _outputs(imap, "rnn.weight_hh_l0") == {"o0", "o1"}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.units = nn.Linear(2, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, hero, units, kind):
        u = self.units(units)
        a, _ = self.attn(u, u, u)
        return self.head(F.scaled_dot_product_attention(a, a, a).mean(1))


def test_attention_maps_in_projection_rows():
    imap = set_map(Attention(), _schema())
    rows = _inputs(imap, "attn.in_proj_weight")
    assert len(rows) == 12
    assert all(s == {"x", "y"} for row in rows for s in row)
    assert _outputs(imap, "attn.out_proj.weight") == {"o0", "o1"}


class PartialHeads(nn.Module):
    """Two heads read different slices of one trunk output."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.left = nn.Linear(2, 2)
        self.right = nn.Linear(2, 1)

    def forward(self, hero, units, kind):
        t = self.trunk(hero)
        first, second = t.split(2, dim=-1)
        return {"a": self.left(first), "b": self.right(second)}


def test_split_keeps_output_fields_apart():
    imap = set_map(PartialHeads(), _schema(outputs=(("a", ("a0", "a1")), ("b", ("b0",)))))
    trunk = imap.params["trunk.weight"].dense_outputs()
    assert {a.name for a in imap.atoms_of(int(trunk[0, 0]))} == {"a0", "a1"}
    assert {a.name for a in imap.atoms_of(int(trunk[3, 0]))} == {"b0"}


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.kind = nn.Embedding(3, 4)
        self.out = nn.Linear(4, 3, bias=False)
        self.out.weight = self.kind.weight

    def forward(self, hero, units, kind):
        return self.out(self.kind(kind).mean(1))


def test_tied_parameters_union_their_uses():
    imap = set_map(Tied(), _schema(outputs=(("out", ("a", "b", "c")),)))
    assert imap.tied == {"out.weight": "kind.weight"}
    rows = _inputs(imap, "kind.weight")
    assert rows[0][0] == {"#a", "#b", "#c"}
    assert rows[1][0] == {"#a", "#b", "#c"}


class Convolutional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, hero, units, kind):
        x = self.norm(self.conv(units.transpose(1, 2)))
        return self.head(x.amax(-1))


def test_conv_taps_record_their_input_channel():
    imap = set_map(Convolutional(), _schema())
    weight = imap.params["conv.weight"].dense_inputs()
    assert {a.name for a in imap.atoms_of(int(weight[0, 0, 2]))} == {"x"}
    assert {a.name for a in imap.atoms_of(int(weight[3, 1, 0]))} == {"y"}
    assert all(s == {"x", "y"} for s in _inputs(imap, "norm.weight")[0])


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3)

    def forward(self, hero, units, kind):
        q, _ = torch.linalg.qr(self.enc(hero).unsqueeze(-1) * hero.unsqueeze(-2))
        return q.sum(-1)[:, :2]


def test_unsupported_op_names_op_and_module():
    with pytest.raises(UnsupportedOpError, match=r"aten\.linalg_qr.*module '<root>'"):
        set_map(Unsupported(), _schema())


def test_map_file_round_trip(tmp_path):
    from pipeline.maps.compare import diff_maps

    imap = set_map(TwoTowers(), _schema())
    path = tmp_path / "m.map.safetensors"
    imap.save(path)
    loaded = InteractionMap.load(path)
    assert diff_maps(imap, loaded) == []
    assert loaded.schema == imap.schema


def test_map_diff_reports_difference(tmp_path):
    from pipeline.maps.compare import diff_maps

    a = set_map(TwoTowers(), _schema())
    b = set_map(TwoTowers(), _schema())
    b.params["hero.weight"].inputs = b.params["hero.weight"].inputs.flip(-1)
    differences = diff_maps(a, b)
    assert [d.param for d in differences] == ["hero.weight"]
    assert differences[0].elements == 8


SPEC = """
factory: tests.maps.test_set_rules:build_unsupported
config: {}
"""


def build_unsupported():
    return Unsupported(), _schema()


def test_cli_unsupported_op_exits_nonzero(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "map", str(spec)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "aten.linalg_qr" in result.stderr
    assert "'<root>'" in result.stderr
