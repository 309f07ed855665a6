"""`liger-fx report`: pattern coverage of models, as a table or JSON, with a CI guard.

    liger-fx report --all                                # every built-in mini family, table on stdout
    liger-fx report llama ./my-model/config.json --json  # built-in model types, config.json files, pretrained dirs
    liger-fx report ./ckpt --flags rope=false --mode infer --fail-under 90
    liger-fx report my_pkg.model:build                   # your own code: a factory of a module (and its inputs)
    liger-fx report --transformers-all --compiler aot_eager   # every decoder family of the installed transformers

Exit codes: 0 done; 1 a rewrite fell back to plain Inductor, a model failed to run (or, in the transformers sweep,
its loss differs from eager), or coverage is below --fail-under; 2 bad input (unknown model, bad path, bad flag, a
factory that cannot be imported or returns something else), said in one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import time
from typing import Callable

from .config import LigerConfig
from .sweep import COMPILERS, FamilyJob, Skip, compiler, losses_close, one_line, plain_failure

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class UsageError(Exception):
    """Bad input: reported in one line with exit code 2, never a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block and exit; we want one line
        raise UsageError(message)


def parse_flags(text: str) -> dict[str, bool]:
    """`rope=false,cross_entropy=on` -> {"rope": False, "cross_entropy": True}, validated by LigerConfig."""
    flags = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip().lower()
        if not sep or value not in _TRUE | _FALSE:
            raise UsageError(f"--flags: expected key=true|false, got {item!r}")
        flags[key] = value in _TRUE
    try:
        LigerConfig.from_options(flags)
    except ValueError as e:
        raise UsageError(str(e).removeprefix("liger_fx: ")) from None
    return flags


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {value:g}")
    return value


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n)):
        raise argparse.ArgumentTypeError(f"expected K/N with 0 <= K < N, got {text!r}")
    return int(k), int(n)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="liger-fx", description="liger-fx tools")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    rep = sub.add_parser("report", help="which patterns of a model run fused, and why the others do not",
                         description="Compile each model with the liger backend on CPU (reference ops, random "
                                     "weights, reduced size), run one step, and report replaced/candidates per "
                                     "pattern with the near misses' module paths and reasons.")
    rep.add_argument("models", nargs="*", metavar="MODEL",
                     help="a built-in model type (see --all), any model type of the installed transformers, a "
                          "config.json path, a pretrained directory, or PACKAGE.MODULE:FACTORY, a function of no "
                          "arguments returning a module, (module, inputs) or (module, args, kwargs); inputs are a "
                          "tuple of positional arguments, a dict of keyword arguments or one tensor")
    rep.add_argument("--all", action="store_true", help="every built-in mini model family")
    rep.add_argument("--transformers-all", action="store_true",
                     help="every decoder family the installed transformers registers for AutoModelForCausalLM, "
                          "from its default config at reduced size; a family that cannot be built or run eagerly "
                          "there is listed as skipped, with why; a compiled loss that differs from eager fails")
    rep.add_argument("--shard", type=_shard, metavar="K/N",
                     help="with --transformers-all: only the K-th of N equal parts of its families (K from 0), to "
                          "spread the sweep over processes")
    rep.add_argument("--compiler", choices=COMPILERS, default="inductor",
                     help="what compiles the rewritten graph: inductor (default), or aot_eager: AOTAutograd's "
                          "trace of forward and backward (where a fused op's fake or autograd formula fails) "
                          "without Inductor's codegen, several times faster on CPU")
    rep.add_argument("--flags", default="", metavar="K=V,...", help="liger flags, e.g. rope=false,cross_entropy=true")
    rep.add_argument("--mode", choices=("train", "infer"), default="train",
                     help="one training step (default) or a forward under no_grad")
    rep.add_argument("--json", action="store_true", help="print JSON instead of the table")
    rep.add_argument("--out", metavar="PATH", help="also write the JSON to PATH")
    rep.add_argument("--fail-under", type=_percent, metavar="PCT",
                     help="exit 1 when replaced/candidates over all patterns is below PCT")
    return parser


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _resolve_all(specs: list[str]) -> list[tuple[str, object, tuple, dict]]:
    """(name, model, args, kwargs) for each spec, all built before any compile so that bad input fails fast
    (building is ~0.1 s a model; compiling is ~10 s)."""
    from .models import build, resolve
    from .report import example_batch

    out = []
    for spec in specs:
        if _FACTORY.match(spec) and not os.path.exists(spec):
            out.append((spec, *load_factory(spec)))
            continue
        try:
            model_type, config = resolve(spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
        except Exception as e:  # a transformers type whose default config does not survive the reduction
            raise UsageError(f"{spec}: no config at the reduced size ({one_line(e)})") from None
        try:
            model = build(config)
        except Exception as e:
            raise UsageError(f"{spec}: cannot build a {model_type!r} model from its config ({one_line(e)})") from None
        out.append((spec, model, (), example_batch(model)))
    return out


def load_factory(spec: str) -> tuple[object, tuple, dict]:
    """`package.module:function` -> (module, args, kwargs) from calling the function with no arguments. It may
    return a module (a transformers model then gets token ids and labels, as the built-in ones do), (module, inputs)
    with inputs a tuple/list of positional arguments, a dict of keyword arguments or one tensor, or (module, args,
    kwargs). Each way this can go wrong is a UsageError naming the spec."""
    import torch

    from .report import example_batch

    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's package is where they run the command
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the spec's own module, not one it imports
            raise UsageError(f"{spec}: no module named {e.name!r} (run from the directory that holds it, or "
                             "install it)") from None
        raise UsageError(f"{spec}: importing {module_name!r} failed ({one_line(e)})") from None
    except Exception as e:
        raise UsageError(f"{spec}: importing {module_name!r} failed ({one_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec}: {attr!r} is {_describe(obj)}, not a function")
    try:
        made = obj()
    except Exception as e:
        raise UsageError(f"{spec}: calling {attr}() raised {one_line(e)}") from None
    expected = "a torch.nn.Module, (module, inputs) or (module, args, kwargs)"
    parts = tuple(made) if isinstance(made, (tuple, list)) else (made,)
    model, rest = parts[0], parts[1:]
    if not isinstance(model, torch.nn.Module) or len(rest) > 2:
        raise UsageError(f"{spec}: {attr}() returned {_describe(made)}; expected {expected}")
    if not rest:
        if isinstance(getattr(getattr(model, "config", None), "vocab_size", None), int):
            return model, (), example_batch(model)
        raise UsageError(f"{spec}: {attr}() returned a {type(model).__name__} without example inputs; return "
                         "(module, inputs) with inputs a tuple of arguments, a dict of keyword arguments or a tensor")
    if len(rest) == 2:
        args, kwargs = rest
        if isinstance(args, (tuple, list)) and isinstance(kwargs, dict):
            return model, tuple(args), kwargs
        raise UsageError(f"{spec}: {attr}() returned (module, {_describe(args)}, {_describe(kwargs)}); expected "
                         "(module, args tuple, kwargs dict)")
    (inputs,) = rest
    if isinstance(inputs, dict):
        return model, (), inputs
    if isinstance(inputs, (tuple, list)):
        return model, tuple(inputs), {}
    if isinstance(inputs, torch.Tensor):
        return model, (inputs,), {}
    raise UsageError(f"{spec}: {attr}() returned (module, {_describe(inputs)}); the inputs must be a tuple of "
                     "arguments, a dict of keyword arguments or a tensor")


def _describe(x) -> str:
    name = type(x).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(x, (tuple, list)):
        return f"{article} {name} of {len(x)}"
    return "None" if x is None else f"{article} {name}"


def run_report(args) -> int:
    from .models import MINI_CONFIGS

    options = parse_flags(args.flags)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"--out: no such directory: {os.path.dirname(args.out)!r}")
    specs = sorted(MINI_CONFIGS) if args.all else []
    specs += [m for m in dict.fromkeys(args.models) if m not in specs]
    if not specs and not args.transformers_all:
        raise UsageError("report: give at least one MODEL, or --all, or --transformers-all")
    # Inductor compiles in-process here, not in its 2 worker processes: a cold `--all` on the shared 2-core machine
    # (load ~5) took 297 s with the workers (the first model alone 76 s) and 169 s without (27 s). Scoped to this run.
    from torch._inductor import config as inductor_config

    with _quiet_transformers(), inductor_config.patch(compile_threads=1), compiler(args.compiler):
        jobs = [(name, _built(model, a, kw)) for name, model, a, kw in _resolve_all(specs)]
        if args.transformers_all:
            from .models import decoder_types

            k, n = args.shard or (0, 1)
            jobs += [(t, FamilyJob(t, args.mode)) for t in decoder_types()[k::n] if t not in specs]
        elif args.shard:
            raise UsageError("--shard splits --transformers-all; give that too")
        return _run(args, jobs, options)


def _built(model, args, kwargs) -> Callable:
    return lambda: (model, args, kwargs, None)


def _run(args, jobs, options) -> int:
    # `from . import report` would give the function liger_fx.report, which shadows its module's name
    from .report import ModelReport, run_model, table

    reports, start = [], time.perf_counter()
    progress = len(jobs) > 1
    for i, (name, make) in enumerate(jobs, 1):
        if progress:
            print(f"[{i}/{len(jobs)}] {name}: compiling one {args.mode} step ...", file=sys.stderr, flush=True)
        try:
            model, model_args, model_kwargs, eager_loss = make()
        except Skip as e:
            reports.append(ModelReport(name, name, args.mode, skipped=str(e)))
            if progress:
                print(f"[{i}/{len(jobs)}] {name}: skipped: {e}", file=sys.stderr, flush=True)
            continue
        model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        try:
            rep = run_model(model, model_args, model_kwargs, options=options, mode=args.mode, name=name)
        except Exception as e:  # one broken model must not hide the others' coverage
            rep = ModelReport(name, model_type, args.mode, error=one_line(e))
        if not rep.error and eager_loss is not None and not losses_close(rep.loss, eager_loss):
            rep.error = f"compiled loss {rep.loss!r} differs from eager's {eager_loss!r}"
        if rep.error and isinstance(make, FamilyJob):
            plain = plain_failure(model, model_args, model_kwargs, args.mode, args.compiler, eager_loss)
            if plain:  # not ours: torch.compile without liger-fx fails the same family
                rep = ModelReport(name, model_type, args.mode,
                                  skipped=f"{plain} without liger-fx too (plain torch.compile, {args.compiler}); "
                                          f"with liger-fx: {rep.error}")
        if rep.error:
            print(f"liger-fx: error: {name}: {rep.error}", file=sys.stderr, flush=True)
        reports.append(rep)
        if progress and rep.skipped:
            print(f"[{i}/{len(jobs)}] {name}: skipped: {rep.skipped}", file=sys.stderr, flush=True)
        elif progress and not rep.error:
            done, total = rep.totals()
            fell = f", FELL BACK: {'; '.join(rep.fallbacks)}" if rep.fallbacks else ""
            print(f"[{i}/{len(jobs)}] {name}: {done}/{total} replaced, {rep.graph_breaks} graph break(s), "
                  f"{rep.seconds:.1f} s{fell}", file=sys.stderr, flush=True)
        del model
    if progress:
        print(f"{len(jobs)} models in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    document = {"models": [r.to_dict() for r in reports if not r.error and not r.skipped],
                "errors": [{"model": r.model, "model_type": r.model_type, "error": r.error}
                           for r in reports if r.error],
                "skipped": [{"model": r.model, "reason": r.skipped} for r in reports if r.skipped]}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
    print(json.dumps(document, indent=2) if args.json else table(reports))
    return _exit_code(reports, args.fail_under)


def _exit_code(reports, fail_under: float | None) -> int:
    from .report import coverage

    if any(r.error for r in reports):
        return 1
    fell = [f"{r.model} ({note})" for r in reports for note in r.fallbacks]
    if fell:  # a fallback is a bug of ours: the model trains, unfused, and its coverage is unknown
        print(f"liger-fx: a rewrite fell back to plain Inductor: {'; '.join(fell)}", file=sys.stderr)
        return 1
    if fail_under is None:
        return 0
    done, total = coverage(reports)
    pct = 100.0 * done / total if total else 100.0  # nothing to fuse is not a coverage failure
    if pct < fail_under:
        print(f"liger-fx: coverage {pct:.1f}% is below --fail-under {fail_under:g}%", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _quiet_transformers():
    # A report run builds a dozen models from configs; transformers' per-config notices would bury the progress.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return run_report(args)
    except UsageError as e:
        print(f"liger-fx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
