"""`liger-fx report` and `liger_fx.report`: the JSON schema and the table for every built-in family, encoders, a
near miss with its reason, graph-break counting, --fail-under and bad-input exit codes.

One `--all` run (in-process, about a minute with a warm Inductor cache) is shared by the module. Counts of families
still being written (rope, swiglu, the losses) are not hard-coded: they are checked against structure (replaced <=
candidates, one miss per unreplaced candidate) and against the backend's own counters.
"""

import contextlib
import io
import json
import sys

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import liger_fx
from liger_fx.cli import _exit_code, main
from liger_fx.config import LigerConfig
from liger_fx.models import MINI_CONFIGS, build, load_config, mini_model, resolve
from tests.helpers import MOE_SPLIT_BY_TRANSFORMERS, moe_traces_whole

report_module = sys.modules["liger_fx.report"]  # `liger_fx.report` is the function
FLAGS = LigerConfig.flag_names()


@pytest.fixture(scope="module")
def all_run(tmp_path_factory):
    """`liger-fx report --all --out FILE --fail-under 0` once: rc, stdout (table), stderr, the JSON document, the
    ModelReport objects (with their graph records) and the replacements the backend counted meanwhile."""
    out = tmp_path_factory.mktemp("report") / "all.json"
    reports = []
    real_run = report_module.run_model

    def recording_run(*args, **kwargs):
        rep = real_run(*args, **kwargs)
        reports.append(rep)
        return rep

    before = dict(counters["liger_fx"])
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(report_module, "run_model", recording_run)
        rc = main(["report", "--all", "--out", str(out), "--fail-under", "0"])
    counted = {k: counters["liger_fx"][k] - before.get(k, 0) for k in FLAGS}
    return dict(rc=rc, table=stdout.getvalue(), stderr=stderr.getvalue(), doc=json.loads(out.read_text()),
                reports=reports, counted=counted)


def _check_schema(entry: dict) -> None:
    assert set(entry) == {"model", "model_type", "graph_breaks", "patterns", "causal_sdpa", "grouped_sdpa",
                          "fused_projections", "swiglu_linear", "seconds", "fallbacks"}
    assert isinstance(entry["seconds"], float) and entry["seconds"] > 0
    assert entry["fallbacks"] == [] or all(isinstance(f, str) and f for f in entry["fallbacks"])
    assert isinstance(entry["model"], str) and isinstance(entry["model_type"], str)
    # masks SDPA was told are causal (option causal_sdpa): transformers 5.17 builds them, 5.24 already skips them
    assert isinstance(entry["causal_sdpa"], int) and entry["causal_sdpa"] >= 0
    assert isinstance(entry["grouped_sdpa"], int) and entry["grouped_sdpa"] >= 0
    assert isinstance(entry["fused_projections"], int) and entry["fused_projections"] >= 0
    assert isinstance(entry["swiglu_linear"], int) and entry["swiglu_linear"] >= 0
    assert isinstance(entry["graph_breaks"], int) and entry["graph_breaks"] >= 0
    assert list(entry["patterns"]) == list(FLAGS)  # every flag, in the config's order, even at 0/0
    for flag, p in entry["patterns"].items():
        assert set(p) == {"replaced", "candidates", "misses"}, flag
        assert isinstance(p["replaced"], int) and isinstance(p["candidates"], int)
        assert 0 <= p["replaced"] <= p["candidates"], (entry["model"], flag, p)
        assert len(p["misses"]) == p["candidates"] - p["replaced"], (entry["model"], flag, p)
        for m in p["misses"]:
            assert set(m) == {"where", "reason"} and m["where"] and m["reason"], m


def _block(table: str, model: str) -> list[str]:
    """The table lines of one model: its first row starts with its name, continuation rows with a space."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == model)
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    return lines[start:end]


def test_json_has_the_schema_for_every_family(all_run):
    assert all_run["rc"] == 0, all_run["stderr"]
    doc = all_run["doc"]
    assert set(doc) == {"models", "errors", "skipped"}
    assert doc["errors"] == [] and doc["skipped"] == []  # every built-in mini model runs
    assert [e["model"] for e in doc["models"]] == sorted(MINI_CONFIGS)
    for entry in doc["models"]:
        _check_schema(entry)
        assert entry["model_type"] == entry["model"]
    by_model = {e["model"]: e for e in doc["models"]}
    # the option pass, counted per graph: the mini Llama's grouped-query q/k/v (4 heads over 2) of both its layers
    # are one matmul each; Phi-3's packed qkv_proj has no siblings
    assert by_model["llama"]["fused_projections"] >= 2 and by_model["phi3"]["fused_projections"] == 0


def test_json_agrees_with_the_backends_counters_and_records(all_run):
    doc, reports = all_run["doc"], all_run["reports"]
    for flag in FLAGS:
        assert sum(e["patterns"][flag]["replaced"] for e in doc["models"]) == all_run["counted"][flag], flag
    for rep, entry in zip(reports, doc["models"]):
        assert rep.records, f"{rep.model}: no graph was compiled"
        assert not rep.fallbacks and not rep.error, (rep.fallbacks, rep.error)
        misses = sum(len(r.misses) for r in rep.records)
        assert misses == sum(len(p["misses"]) for p in entry["patterns"].values())


def test_rms_norm_candidates_are_the_models_norm_modules(all_run):
    """Independent of the matcher: one candidate per RMSNorm module (each runs once per forward), all fused."""
    for entry in all_run["doc"]["models"]:
        model = mini_model(entry["model"])
        norms = sum(1 for m in model.modules() if type(m).__name__.endswith("RMSNorm"))
        if entry["model"] == "mixtral" and not moe_traces_whole(torch.float32):  # norms outside the cut graphs
            assert 1 <= entry["patterns"]["rms_norm"]["candidates"] <= norms, MOE_SPLIT_BY_TRANSFORMERS
            norms = entry["patterns"]["rms_norm"]["candidates"]
        assert entry["patterns"]["rms_norm"]["candidates"] == norms, entry["model"]
        assert entry["patterns"]["rms_norm"]["replaced"] == norms, entry["patterns"]["rms_norm"]["misses"]


def test_table_has_a_row_per_model_and_pattern_and_a_summary(all_run):
    table, doc = all_run["table"], all_run["doc"]
    header = table.splitlines()[0].split()
    assert header[0] == "model" and "pattern" in header and "replaced" in header
    for entry in doc["models"]:
        block = "\n".join(_block(table, entry["model"]))
        for flag, p in entry["patterns"].items():
            if p["candidates"]:
                assert f"{flag} " in block and f"{p['replaced']}/{p['candidates']}" in block, (flag, block)
                flat = " ".join(block.split())  # the misses cell wraps at 90 columns
                for m in p["misses"]:
                    assert " ".join(m["reason"].split())[:30] in flat, (m, block)
            else:
                assert f" {flag} " not in block, block
    replaced = sum(p["replaced"] for e in doc["models"] for p in e["patterns"].values())
    total = sum(p["candidates"] for e in doc["models"] for p in e["patterns"].values())
    breaks = sum(e["graph_breaks"] for e in doc["models"])
    last = table.splitlines()[-1]
    assert f"{len(MINI_CONFIGS)} model(s)" in last and f"replaced {replaced}/{total}" in last
    assert f"{breaks} graph break(s)" in last


def test_progress_lines_on_stderr(all_run):
    n = len(MINI_CONFIGS)
    for i, name in enumerate(sorted(MINI_CONFIGS), 1):
        assert f"[{i}/{n}] {name}: compiling one train step" in all_run["stderr"]
    assert "Traceback" not in all_run["stderr"]


@pytest.mark.parametrize("encoder", ["bert", "roberta"])
def test_encoders_fuse_only_their_masked_lm_loss(all_run, encoder):
    """LayerNorm, absolute positions, a GELU MLP: nothing for rms_norm/rope/swiglu/geglu. Their masked-LM head +
    cross-entropy is a linear feeding a cross-entropy like any lm_head (every such loss is a site, not only causal-LM
    ones), so it is the one site, fused; the model compiles whole."""
    (entry,) = [e for e in all_run["doc"]["models"] if e["model"] == encoder]
    assert entry["patterns"], entry
    for flag, p in entry["patterns"].items():
        expected = 1 if flag == "fused_linear_cross_entropy" else 0
        assert p == {"replaced": expected, "candidates": expected, "misses": []}, (flag, p)
    assert entry["graph_breaks"] == 0
    (rep,) = [r for r in all_run["reports"] if r.model == encoder]
    assert rep.records and all(r.fallback is None for r in rep.records)
    assert rep.totals() == (1, 1)


def test_model_without_candidates_gets_a_clean_row():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x))).pow(2).mean()

    rep = report_module.run_model(Mlp(), (torch.randn(4, 16),), mode="train")
    assert rep.records and rep.totals() == (0, 0) and not rep.fallbacks
    assert all(p["candidates"] == 0 for p in rep.to_dict()["patterns"].values())
    (row, summary) = report_module.table([rep]).splitlines()[2:]
    assert row.split()[0] == "Mlp" and "no applicable patterns" in row and "0/0" in row
    assert "replaced 0/0 candidates (n/a)" in summary


def test_fail_under_boundary(all_run):
    reports = all_run["reports"]
    done, total = report_module.coverage(reports)
    pct = 100.0 * done / total
    assert _exit_code(reports, None) == 0
    assert _exit_code(reports, pct) == 0  # at the threshold passes
    if done < total:
        assert _exit_code(reports, min(100.0, pct + 0.01)) == 1
    assert _exit_code(reports, 100.0) == (0 if done == total else 1)


# --------------------------------------------------------------------------------------------------------------
# A near miss in a hand-written model, through the Python API.


class WrongAxisNorm(nn.Module):
    """An RMSNorm that reduces over the sequence (dim 1), not the hidden dim: an anchor the pattern must refuse."""

    def __init__(self, n=32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.proj = nn.Linear(n, n)

    def forward(self, x):
        h = self.proj(x)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + 1e-6))


def test_near_miss_has_its_reason_and_numerics_match_eager():
    torch.manual_seed(0)
    m = WrongAxisNorm()
    x = torch.randn(3, 7, 32)
    assert m.proj.weight.grad is None

    rep = liger_fx.report(m, x, mode="train")
    _check_schema(rep)
    assert rep["model"] == rep["model_type"] == "WrongAxisNorm" and rep["graph_breaks"] == 0
    norm = rep["patterns"]["rms_norm"]
    assert (norm["replaced"], norm["candidates"]) == (0, 1)
    (miss,) = norm["misses"]
    assert "reduces dims [-2]" in miss["reason"], miss
    assert m.training and m.proj.weight.grad is None  # the report leaves the model as it found it

    ref = m(x)
    ref_grads = torch.autograd.grad(ref.sum(), list(m.parameters()))
    out = torch.compile(m, backend="liger")(x)
    grads = torch.autograd.grad(out.sum(), list(m.parameters()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_inference_mode_and_flag_off_reason():
    """Under no_grad, with the flag off: the well-formed norm is a candidate whose reason names the flag."""

    class Norm(nn.Module):
        def __init__(self, n=32):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    m = Norm().eval()
    x = torch.randn(2, 5, 32)
    on = liger_fx.report(m, x)
    assert on["patterns"]["rms_norm"] == {"replaced": 1, "candidates": 1, "misses": []}
    off = liger_fx.report(m, x, options={"rms_norm": False})
    (miss,) = off["patterns"]["rms_norm"]["misses"]
    assert off["patterns"]["rms_norm"]["replaced"] == 0 and "flag 'rms_norm' is off" in miss["reason"]
    assert not m.training


def test_graph_breaks_are_counted():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            x = self.lin(x).relu()
            torch._dynamo.graph_break()
            x = self.lin(x).sin()
            torch._dynamo.graph_break()
            return self.lin(x)

    rep = liger_fx.report(Broken(), torch.randn(4, 8), mode="train")
    assert rep["graph_breaks"] == 2
    assert len(liger_fx.get_records()) == 3  # three graphs, each through the backend


# --------------------------------------------------------------------------------------------------------------
# The CLI on real runs and on bad input.


def test_fail_under_exit_code_with_a_flag_off(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["report", "llama", "--flags", "rms_norm=false", "--fail-under", "100", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "below --fail-under 100%" in captured.err
    (entry,) = json.loads(out.read_text())["models"]
    norm = entry["patterns"]["rms_norm"]
    assert norm["replaced"] == 0 and norm["candidates"] == 5
    assert all("flag 'rms_norm' is off" in m["reason"] for m in norm["misses"])
    assert "5x flag 'rms_norm' is off" in captured.out  # the table groups misses of one cause


def test_pretrained_dir_at_reduced_size_in_inference(tmp_path, capsys):
    """A full-size config of a family without a built-in config (OLMo-2: q/k norms over the full width) read from
    a directory and built small, run under --mode infer."""
    from transformers import AutoConfig

    AutoConfig.for_model("olmo2").save_pretrained(tmp_path)
    config = load_config(str(tmp_path))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 128)
    assert main(["report", str(tmp_path), "--mode", "infer", "--json", "--fail-under", "0"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["models"]
    _check_schema(entry)
    norms = sum(1 for m in build(config).modules() if type(m).__name__.endswith("RMSNorm"))
    assert entry["model_type"] == "olmo2" and entry["patterns"]["rms_norm"]["candidates"] == norms > 0


def test_layer_pattern_survives_reduction(tmp_path):
    """Gemma3 has 5 sliding-window layers to 1 full: the 2 layers kept are one of each, not the first two."""
    from transformers import AutoConfig

    AutoConfig.for_model("gemma3_text").save_pretrained(tmp_path)
    config = load_config(str(tmp_path))
    assert config.layer_types == ["sliding_attention", "full_attention"]


def test_config_json_reduction_keeps_structure(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("mixtral").to_json_file(tmp_path / "config.json")  # 32 heads, 8 KV heads, 8 experts
    model_type, config = resolve(str(tmp_path / "config.json"))
    assert model_type == "mixtral"
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_local_experts) == (4, 1, 4)
    assert config.num_experts_per_tok == 2 and config.hidden_size == 64


def _bad_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    return str(p)


def _no_model_type(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 64}))
    return str(p)


def _unknown_model_type(tmp_path):
    p = tmp_path / "unknown.json"
    p.write_text(json.dumps({"model_type": "no_such_model_type"}))
    return str(p)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["report", "lama"], "unknown model 'lama'"),
        (["report", "/no/such/dir/config.json"], "unknown model '/no/such/dir/config.json'"),
        (["report", "{tmp}"], "no config.json in"),
        (["report", "{bad_json}"], "not a readable JSON config"),
        (["report", "{no_model_type}"], "no 'model_type' key"),
        (["report", "{unknown_model_type}"], "'no_such_model_type' cannot be built"),
        (["report", "llama", "--flags", "rms_nrom=false"], "unknown flag 'rms_nrom'"),
        (["report", "llama", "--flags", "rope=maybe"], "expected key=true|false"),
        (["report", "llama", "--mode", "eval"], "invalid choice: 'eval'"),
        (["report", "llama", "--fail-under", "abc"], "not a number"),
        (["report"], "at least one MODEL"),
        (["reprot", "llama"], "invalid choice: 'reprot'"),
        (["report", "no_such_pkg.model:build"], "no module named 'no_such_pkg'"),
        (["report", "tests.factories:nope"], "'tests.factories' has no attribute 'nope'"),
        (["report", "tests.factories:NOT_A_FUNCTION"], "'NOT_A_FUNCTION' is an int, not a function"),
        (["report", "tests.factories:wrong_type"], "wrong_type() returned a dict; expected a torch.nn.Module"),
        (["report", "tests.factories:wrong_inputs"], "the inputs must be a tuple of arguments, a dict"),
        (["report", "tests.factories:plain_module_only"], "returned a Decoder without example inputs"),
        (["report", "tests.factories:raises"], "calling raises() raised RuntimeError: no weights here"),
        (["report", "llama", "--compiler", "tvm"], "invalid choice: 'tvm'"),
        (["report", "--transformers-all", "--shard", "5/3"], "expected K/N with 0 <= K < N, got '5/3'"),
        (["report", "llama", "--shard", "0/3"], "--shard splits --transformers-all"),
    ],
    ids=["name", "path", "dir-without-config", "bad-json", "no-model-type", "unknown-model-type", "flag",
         "flag-value", "mode", "fail-under", "no-model", "command", "factory-module", "factory-attribute",
         "factory-not-callable", "factory-returns-dict", "factory-bad-inputs", "factory-no-inputs",
         "factory-raises", "compiler", "shard", "shard-without-sweep"],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"tmp": str(tmp_path / "empty"), "bad_json": _bad_json(tmp_path), "no_model_type": _no_model_type(tmp_path),
             "unknown_model_type": _unknown_model_type(tmp_path)}
    argv = [a.format(**paths) if a.startswith("{") else a for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("liger-fx: error:"), captured.err
    assert message in lines[0], lines[0]
    assert not liger_fx.get_records()  # rejected before anything compiled


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "liger-fx"]
    assert ep.value == "liger_fx.cli:main"


# --------------------------------------------------------------------------------------------------------------
# A user's own code: `liger-fx report package.module:factory`


def test_report_on_a_factory_of_plain_pytorch_code(tmp_path, capsys):
    """The table on stdout and the JSON in --out, as for a built-in model: a plain-PyTorch decoder's norms and MLPs
    fused, and its label-smoothed loss a near miss that says why."""
    out = tmp_path / "factory.json"
    assert main(["report", "tests.factories:decoder", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    (entry,) = json.loads(out.read_text())["models"]
    _check_schema(entry)
    assert entry["model"] == "tests.factories:decoder" and entry["model_type"] == "Decoder"
    p = entry["patterns"]
    assert p["rms_norm"] == {"replaced": 3, "candidates": 3, "misses": []}
    assert p["swiglu"] == {"replaced": 2, "candidates": 2, "misses": []}
    (miss,) = p["fused_linear_cross_entropy"]["misses"]
    assert "label_smoothing=0.1" in miss["reason"]
    block = _block(table, "tests.factories:decoder")
    assert any("rms_norm" in line and "3/3" in line for line in block)
    assert any("label_smoothing=0.1" in line for line in block)


@pytest.mark.parametrize("name, n_args, kwargs", [
    ("decoder", 0, {"tokens", "labels"}),
    ("decoder_args", 2, set()),
    ("decoder_args_kwargs", 1, {"labels"}),
    ("mlp_tensor", 1, set()),
    ("hf_llama", 0, {"input_ids", "labels"}),  # a transformers model alone gets token ids and labels
])
def test_factory_return_forms(name, n_args, kwargs):
    from liger_fx.cli import load_factory

    model, args, kw = load_factory(f"tests.factories:{name}")
    assert isinstance(model, nn.Module) and len(args) == n_args and set(kw) == kwargs
    assert all(isinstance(a, torch.Tensor) for a in [*args, *kw.values()])
