"""Reports (table, JSON, HTML, PNG) and the ``surgery plan*`` commands."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pipeline.cli.main import main
from pipeline.plan import parse_options, plan_specs
from pipeline.plan.report import blocks, format_table, html_report, png_report, summarise_plan
from tests.plan.helpers import five, train

NEW_CONFIG = {"size": "small", "lstm_width": 40, "global_fields": ["game_time", "roshan_alive", "tower_count"]}


@pytest.fixture(scope="module")
def plan():
    return plan_specs(five(), five(**{k: v for k, v in NEW_CONFIG.items() if k != "size"}), parse_options({"constants": {"globals/is_day": 1.0}}))


def test_summary_counts(plan):
    summary = summarise_plan(plan)
    rows = {row["name"]: row for row in summary["params"]}
    hh = rows["lstm.weight_hh_l0"]
    assert hh["elements"] == 160 * 40
    assert hh["copied"] == 32 * 32
    assert hh["gathered"] == 3 * 32 * 32
    assert hh["initialised"] == {"uniform": 32 * 40, "zero": 128 * 8}
    assert rows["encoders.globals.0.weight"]["dropped"] == 8
    assert rows["encoders.globals.0.bias"]["action"] == "copy+fold"
    assert summary["transferred"] == sum(r["copied"] + r["gathered"] for r in summary["params"])
    assert 0 < summary["transferred_share"] < 1
    assert summary["sha256"] == plan.sha256()


def test_table_lists_every_parameter(plan):
    table = format_table(summarise_plan(plan))
    for pp in plan.params:
        assert pp.name in table
    assert re.search(r"\d+ of \d+ elements transferred \(\d+\.\d\d%\)", table)
    assert "plan exact" in table


def test_blocks_cover_each_parameter(plan):
    for pp in plan.params:
        area = sum(w * h for _, _, w, h, _ in blocks(pp))
        assert area == pytest.approx(1.0), pp.name
    keys = {key for *_, key in blocks(plan.param("lstm.weight_hh_l0"))}
    assert keys == {"copy", "gather", "uniform", "zero"}
    assert {key for *_, key in blocks(plan.param("encoders.globals.0.bias"))} == {"fold"}


def test_html_is_self_contained(plan):
    page = html_report(plan)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg ") == len(plan.params)
    for pp in plan.params:
        assert pp.name in page
    assert "<script" not in page
    assert "<link" not in page
    assert "src=" not in page
    assert "url(" not in page


def test_png_is_written(plan, tmp_path):
    path = tmp_path / "plan.png"
    png_report(plan, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 300
    assert image.shape[1] > 600


def _write_specs(tmp_path):
    old = tmp_path / "old.yaml"
    new = tmp_path / "new.yaml"
    old.write_text(yaml.safe_dump({"factory": "pipeline.examples.five:build", "config": {"size": "small"}}))
    new.write_text(yaml.safe_dump({"factory": "pipeline.examples.five:build", "config": NEW_CONFIG}))
    options = tmp_path / "options.yaml"
    options.write_text("constants: {globals/is_day: 1.0}\n")
    return old, new, options


def test_plan_command_writes_reports(tmp_path, capsys):
    old, new, options = _write_specs(tmp_path)
    out, page, image = tmp_path / "plan.json", tmp_path / "plan.html", tmp_path / "plan.png"
    status = main(["plan", str(old), str(new), "--options", str(options), "--json", "--out", str(out), "--html", str(page), "--png", str(image)])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["exact"] is True
    assert len(summary["params"]) == 32
    assert json.loads(out.read_text())["format"] == "surgery-plan/1"
    assert "<svg" in page.read_text()
    assert image.read_bytes()[:4] == b"\x89PNG"


def test_apply_and_verify_commands(tmp_path, capsys):
    old, new, options = _write_specs(tmp_path)
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(old), str(new), "--options", str(options), "--out", str(plan_path)]) == 0
    capsys.readouterr()

    torch.manual_seed(0)
    module, schema = five().build()
    train(module, schema, steps=2)
    old_ckpt, new_ckpt = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(old_ckpt))

    assert main(["plan-apply", str(plan_path), str(old_ckpt), str(new_ckpt)]) == 0
    assert load_file(str(new_ckpt))["lstm.weight_hh_l0"].shape == (160, 40)
    capsys.readouterr()

    assert main(["plan-verify", str(plan_path), str(old_ckpt), str(new_ckpt), "--json", "--batch", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True
    assert report["max_rel"] <= 1e-6

    broken = load_file(str(new_ckpt))
    broken["heads.value.bias"] = broken["heads.value.bias"] + 1.0
    save_file(broken, str(new_ckpt))
    assert main(["plan-verify", str(plan_path), str(old_ckpt), str(new_ckpt)]) == 1
    assert "value/value" in capsys.readouterr().out


def test_plan_diff_command(tmp_path, capsys):
    old, new, options = _write_specs(tmp_path)
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["plan", str(old), str(new), "--options", str(options), "--out", str(first)]) == 0
    options.write_text("constants: {globals/is_day: 1.0}\nseed: 3\n")
    assert main(["plan", str(old), str(new), "--options", str(options), "--out", str(second)]) == 0
    capsys.readouterr()
    assert main(["plan-diff", str(first), str(first)]) == 0
    assert "plans are equal" in capsys.readouterr().out
    assert main(["plan-diff", str(first), str(second)]) == 1
    assert "seed: 0 -> 3" in capsys.readouterr().out


def test_plan_command_reports_bad_options(tmp_path, capsys):
    old, new, options = _write_specs(tmp_path)
    options.write_text("rename: {atoms: {'field:globals/is_day': 'field:globals/daylight'}}\n")
    assert main(["plan", str(old), str(new), "--options", str(options)]) == 2
    error = capsys.readouterr().err
    assert "rename.atoms['field:globals/is_day']" in error
    assert "field:globals/daylight" in error
    assert main(["plan-apply", str(tmp_path / "none.json"), str(old), str(tmp_path / "x")]) == 2
    assert "cannot read plan" in capsys.readouterr().err
