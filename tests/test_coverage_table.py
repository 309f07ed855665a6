"""The README's coverage table is generated (bench/coverage_table.py) from a saved `liger-fx report --all --json`,
never typed by hand. No report is run here (it takes minutes on CI's 2 cores): the saved JSON is rendered."""

from __future__ import annotations

import json

import pytest

from bench import coverage_table as ct


def test_readme_table_is_what_the_saved_report_renders():
    with open(ct.JSON) as f:
        doc = json.load(f)
    with open(ct.README) as f:
        readme = f.read()
    assert ct.readme_block(readme) == ct.render(doc), (
        "README.md's coverage table is not what bench/coverage.json renders: regenerate both with "
        "`python -m bench.coverage_table` (runs the report), or `--from-json bench/coverage.json` to re-render only")
    # the saved document is a report's: every built-in family, every flag
    from liger_fx.config import LigerConfig
    from liger_fx.models import MINI_CONFIGS

    assert sorted(m["model"] for m in doc["models"]) == sorted(MINI_CONFIGS)
    assert all(list(m["patterns"]) == list(LigerConfig.flag_names()) for m in doc["models"])


def _pat(replaced, candidates, misses=()):
    return {"replaced": replaced, "candidates": candidates, "misses": [{"where": w, "reason": r} for w, r in misses]}


def test_render_cells_misses_and_totals():
    doc = {"models": [
        {"model": "llama", "model_type": "llama", "graph_breaks": 1, "causal_sdpa": 0,
         "patterns": {"rms_norm": _pat(3, 5, [("model.layers.0.input_layernorm", "eps is a graph input"),
                                             ("model.layers.1.input_layernorm", "eps is a graph input")]),
                      "rope": _pat(4, 4), "swiglu": _pat(0, 0),
                      "fused_linear_cross_entropy": _pat(0, 1, [("lm_head", "flag off | see --flags")])}},
        {"model": "./ckpt", "model_type": "bert", "graph_breaks": 0, "causal_sdpa": 0,
         "patterns": {"rms_norm": _pat(0, 0), "rope": _pat(0, 0), "swiglu": _pat(0, 0),
                      "fused_linear_cross_entropy": _pat(0, 0)}},
    ], "generated": {"command": ["report", "--all"], "mode": "train", "torch": "2.13.0", "transformers": "5.24.0"}}
    lines = ct.render(doc).splitlines()
    assert lines[0] == ("| model | `rms_norm` | `rope` | `swiglu` | `fused_linear_cross_entropy` | graph breaks | "
                        "near misses |")
    assert lines[2] == ("| llama | 3/5 | 4/4 | - | 0/1 | 1 | rms_norm: 2x eps is a graph input "
                        "(model.layers.0.input_layernorm, model.layers.1.input_layernorm)<br>"
                        "fused_linear_cross_entropy: lm_head: flag off \\| see --flags |")
    assert lines[3] == "| ./ckpt (bert) | - | - | - | - | 0 | no applicable patterns |"
    assert lines[4] == "| all (2) | 3/5 | 4/4 | 0/0 | 0/1 | 1 | 3 near miss(es) |"
    assert lines[6].startswith("Replaced/candidates per pattern, `-` where a model has none: 7/10 (70.0%).")
    assert "torch 2.13.0, transformers 5.24.0" in lines[6]


def test_replace_block_is_idempotent_and_needs_its_markers():
    text = f"intro\n{ct.BEGIN}\nold table\n{ct.END}\nrest\n"
    once = ct.replace_block(text, "| new |\n")
    assert once == f"intro\n{ct.BEGIN}\n| new |\n{ct.END}\nrest\n"
    assert ct.replace_block(once, "| new |\n") == once and ct.readme_block(once) == "| new |\n"
    with pytest.raises(ValueError, match="coverage:begin"):
        ct.replace_block("no markers here", "x")


def test_main_rerenders_a_saved_report(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{ct.BEGIN}\nstale\n{ct.END}\n")
    assert ct.main(["--from-json", ct.JSON, "--readme", str(readme)]) == 0
    with open(ct.JSON) as f:
        assert ct.readme_block(readme.read_text()) == ct.render(json.load(f))
