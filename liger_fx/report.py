"""Pattern coverage: which norms, rotaries, MLPs and losses of a model run fused, and why the others do not.

    liger_fx.report(model, input_ids=ids, labels=ids)      # one model, any nn.Module
    liger-fx report llama gemma2 --json                    # the CLI (liger_fx/cli.py) on built-in mini models

The model is compiled with the liger backend and run once (a training step, or a forward under no_grad), and the
rewrite record of every graph it produced (`rewrite.get_records()`) is folded into one entry per model:

    {"model": str, "model_type": str, "graph_breaks": int,
     "patterns": {"<flag>": {"replaced": int, "candidates": int, "misses": [{"where": str, "reason": str}]}}}

with every flag of `LigerConfig.flag_names()`, 0/0 where a model has no candidate. Candidates come from each
family's anchors (an rsqrt of a mean of squares, a rotate-half, ...), independent of the matcher: a candidate that
was not replaced is a near miss and keeps its module path and reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters

from . import rewrite
from .config import LigerConfig

MODES = ("train", "infer")


@dataclass
class ModelReport:
    """One model's coverage; `to_dict()` is the documented JSON entry. The rest feeds the table."""

    model: str
    model_type: str
    mode: str
    graph_breaks: int = 0
    records: list[rewrite.GraphRecord] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    """Set when the compiled step raised, or its loss differs from eager's (CLI only; the Python API lets the
    exception through)."""
    skipped: str | None = None
    """Set by the transformers sweep for a family it cannot run: why (cannot be built from its default config at
    the reduced size, or its eager step already fails there). Nothing was compiled."""
    loss: float | None = None
    """The compiled training step's loss (mode "train")."""

    @property
    def fallbacks(self) -> list[str]:
        return [f"graph {r.index}: {r.fallback}" for r in self.records if r.fallback]

    def patterns(self) -> dict[str, dict]:
        out = {flag: {"replaced": 0, "candidates": 0, "misses": []} for flag in LigerConfig.flag_names()}
        for rec in self.records:
            for r in rec.replaced:
                entry = out.setdefault(r.flag, {"replaced": 0, "candidates": 0, "misses": []})
                entry["replaced"] += 1
                entry["candidates"] += 1
            for m in rec.misses:
                entry = out.setdefault(m.flag, {"replaced": 0, "candidates": 0, "misses": []})
                entry["candidates"] += 1
                entry["misses"].append({"where": m.where, "reason": m.reason})
        return out

    def totals(self) -> tuple[int, int]:
        pats = self.patterns().values()
        return sum(p["replaced"] for p in pats), sum(p["candidates"] for p in pats)

    def to_dict(self) -> dict:
        return {"model": self.model, "model_type": self.model_type, "graph_breaks": self.graph_breaks,
                "seconds": round(self.seconds, 2), "fallbacks": self.fallbacks,
                "patterns": self.patterns(), "causal_sdpa": sum(len(r.causal_sdpa) for r in self.records),
                "grouped_sdpa": sum(len(r.grouped_sdpa) for r in self.records),
                "fused_projections": sum(len(r.fused_projections) for r in self.records),
                "swiglu_linear": sum(len(r.swiglu_linear) for r in self.records)}


# --------------------------------------------------------------------------------------------------------------
# Running one model.


def example_batch(model, batch: int = 2, seq: int = 16, seed: int = 1) -> dict:
    """Token ids and labels for a transformers LM: next-token labels for decoders, masked-LM labels for encoders
    (about 15% of positions carry a label, the rest -100, at least one labelled)."""
    from .models import is_encoder

    config = model.config
    vocab = getattr(config.get_text_config(), "vocab_size", None) or config.vocab_size  # a multimodal model's
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if not is_encoder(model.config):
        return {"input_ids": ids, "labels": ids.clone()}
    masked = torch.rand(batch, seq, generator=g) < 0.15
    masked[0, 0] = True
    return {"input_ids": ids, "labels": torch.where(masked, ids, torch.full_like(ids, -100))}


def _loss(out) -> torch.Tensor:
    """The model's own loss (HF `out.loss`), else a stand-in that reaches every output needing a gradient."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        raise ValueError("mode 'train' needs a loss: the model's output has no `loss` and no tensor requiring grad")
    return sum(t.float().sum() for t in leaves)


def eager_step(model, args=(), kwargs=None, *, mode: str = "train") -> float | None:
    """One eager step as `run_model` runs it compiled: the loss in train mode (gradients cleared after), None in
    infer mode. Raises what the model raises."""
    kwargs = kwargs or {}
    was_training = model.training
    try:
        if mode == "train":
            model.train()
            loss = _loss(model(*args, **kwargs))
            loss.backward()
            return float(loss.detach())
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
        return None
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def run_model(model, args=(), kwargs=None, *, options=None, mode: str = "train", name: str | None = None
              ) -> ModelReport:
    """Compile `model` with the liger backend, run one step, and collect its record.

    Dynamo is reset before and after, as `torch._dynamo.explain` does: a model compiled earlier in the process
    would otherwise hit its cached code (no new graphs, an empty report) or count against the recompile limit.
    The model's training flag and existing `.grad`s are restored."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    model = getattr(model, "_orig_mod", model)  # an already compiled model: report on what it wraps
    options = dict(options or {})
    LigerConfig.from_options(options)  # a bad flag fails here with its name, before any compile
    kwargs = kwargs or {}
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    out = ModelReport(name or model_type, model_type, mode)

    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    was_training = model.training
    torch._dynamo.reset()
    first, breaks = len(rewrite.RECORDS), sum(counters["graph_break"].values())
    start = time.perf_counter()
    try:
        compiled = torch.compile(model, backend="liger", options=options)
        if mode == "train":
            model.train()
            for p in params:
                p.grad = None
            loss = _loss(compiled(*args, **kwargs))
            loss.backward()
            out.loss = float(loss.detach())
        else:
            model.eval()
            with torch.no_grad():
                compiled(*args, **kwargs)
    finally:
        out.seconds = time.perf_counter() - start
        # Dynamo counts a break each time it splits a frame (keyed by reason). Graphs minus one, as
        # `torch._dynamo.explain` counts, misses breaks in frames that then produced no graph.
        out.graph_breaks = sum(counters["graph_break"].values()) - breaks
        out.records = rewrite.get_records()[first:]
        model.train(was_training)
        for p, g in zip(params, saved_grads):
            p.grad = g
        torch._dynamo.reset()
    return out


def report(model, *example_args, options: dict | None = None, mode: str | None = None, **example_kwargs) -> dict:
    """Coverage of one model: compile it with `backend="liger"`, run it once on the example inputs, and return
    the JSON entry documented above.

    `options` are the liger flags (as in `torch.compile(..., options=...)`); `mode` is "train" (one forward and
    backward, the loss being `out.loss` or the sum of the outputs) or "infer" (forward under no_grad); by default
    it follows `model.training`. These two keyword names are taken by the report, not passed to the model."""
    if mode is None:
        mode = "train" if model.training else "infer"
    return run_model(model, example_args, example_kwargs, options=options, mode=mode).to_dict()


# --------------------------------------------------------------------------------------------------------------
# The table.


def coverage(reports: list[ModelReport]) -> tuple[int, int]:
    """(replaced, candidates) over every model and pattern."""
    totals = [r.totals() for r in reports]
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


def _sites(wheres: list[str]) -> str:
    wheres = list(dict.fromkeys(wheres))  # q and k rotations share one attention module path
    return ", ".join(wheres) if len(wheres) <= 2 else f"{wheres[0]}, {wheres[1]}, +{len(wheres) - 2} more"


def _misses_cell(misses: list[dict]) -> str:
    """Near misses grouped by reason, each with where it happened: 16 misses of one cause read as one line."""
    by_reason: dict[str, list[str]] = {}
    for m in misses:
        by_reason.setdefault(m["reason"], []).append(m["where"])
    return "\n".join(
        f"{wheres[0]}: {reason}" if len(wheres) == 1 else f"{len(wheres)}x {reason} ({_sites(wheres)})"
        for reason, wheres in by_reason.items()
    )


def table(reports: list[ModelReport]) -> str:
    """One row per model x pattern with candidates (a clean 'no applicable patterns' row for a model with none),
    then a summary line with the total coverage and graph breaks."""
    from tabulate import tabulate

    rows = []
    for rep in reports:
        label = rep.model if rep.model == rep.model_type else f"{rep.model} ({rep.model_type})"
        first = [label, rep.graph_breaks]
        if rep.skipped:
            rows.append([*first, "-", "-", f"skipped: {rep.skipped}"])
            continue
        if rep.error:
            rows.append([*first, "-", "-", f"error: {rep.error}"])
            continue
        pats = {f: p for f, p in rep.patterns().items() if p["candidates"]}
        for note in rep.fallbacks:
            rows.append([*first, "-", "-", f"rewrite failed, compiled with plain Inductor: {note}"])
            first = ["", ""]
        if not pats and not rep.fallbacks:
            rows.append([*first, "-", "0/0", "no applicable patterns"])
        for flag, p in pats.items():
            rows.append([*first, flag, f"{p['replaced']}/{p['candidates']}", _misses_cell(p["misses"])])
            first = ["", ""]
    text = tabulate(rows, headers=["model", "graph breaks", "pattern", "replaced", "near misses"],
                    maxcolwidths=[None, None, None, None, 90])
    return text + "\n" + summary(reports)


def summary(reports: list[ModelReport]) -> str:
    skipped = sum(1 for r in reports if r.skipped)
    ran = [r for r in reports if not r.skipped]
    done, total = coverage(ran)
    pct = f"{100.0 * done / total:.1f}%" if total else "n/a"
    misses = total - done
    breaks = sum(r.graph_breaks for r in ran)
    failed = sum(1 for r in ran if r.error or r.fallbacks)
    modes = ", ".join(sorted({r.mode for r in reports}))
    text = (f"{len(ran)} model(s) ({modes}): replaced {done}/{total} candidates ({pct}), "
            f"{misses} near miss(es), {breaks} graph break(s)")
    text += f", {failed} model(s) failed or fell back" if failed else ""
    return text + (f"; {skipped} skipped (see the rows above for why)" if skipped else "")
