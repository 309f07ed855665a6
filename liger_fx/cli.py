"""`liger-fx report`: pattern coverage of models, as a table or JSON, with a CI guard.

    liger-fx report --all                                # every built-in mini family, table on stdout
    liger-fx report llama ./my-model/config.json --json  # built-in model types, config.json files, pretrained dirs
    liger-fx report ./ckpt --flags rope=false --mode infer --fail-under 90

Exit codes: 0 done; 1 coverage below --fail-under (or a rewrite fell back, so coverage is unknown), or a model
failed to run; 2 bad input (unknown model, bad path, bad flag), said in one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from .config import LigerConfig

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="liger-fx", description="liger-fx tools")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    rep = sub.add_parser("report", help="which patterns of a model run fused, and why the others do not",
                         description="Compile each model with the liger backend on CPU (reference ops, random "
                                     "weights, reduced size), run one step, and report replaced/candidates per "
                                     "pattern with the near misses' module paths and reasons.")
    rep.add_argument("models", nargs="*", metavar="MODEL",
                     help="a built-in model type (see --all), a config.json path or a pretrained directory")
    rep.add_argument("--all", action="store_true", help="every built-in mini model family")
    rep.add_argument("--flags", default="", metavar="K=V,...", help="liger flags, e.g. rope=false,cross_entropy=true")
    rep.add_argument("--mode", choices=("train", "infer"), default="train",
                     help="one training step (default) or a forward under no_grad")
    rep.add_argument("--json", action="store_true", help="print JSON instead of the table")
    rep.add_argument("--out", metavar="PATH", help="also write the JSON to PATH")
    rep.add_argument("--fail-under", type=_percent, metavar="PCT",
                     help="exit 1 when replaced/candidates over all patterns is below PCT")
    return parser


def _resolve_all(specs: list[str]) -> list[tuple[str, object]]:
    """(name, model) for each spec, all built before any compile so that bad input fails fast (building is
    ~0.1 s a model; compiling is ~10 s)."""
    from .models import build, resolve

    out = []
    for spec in specs:
        try:
            model_type, config = resolve(spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            model = build(config)
        except Exception as e:
            raise UsageError(f"{spec}: cannot build a {model_type!r} model from its config "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        out.append((spec, model))
    return out


def run_report(args) -> int:
    from .models import MINI_CONFIGS

    options = parse_flags(args.flags)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"--out: no such directory: {os.path.dirname(args.out)!r}")
    specs = sorted(MINI_CONFIGS) if args.all else []
    specs += [m for m in dict.fromkeys(args.models) if m not in specs]
    if not specs:
        raise UsageError("report: give at least one MODEL, or --all")
    # Inductor compiles in-process here, not in its 2 worker processes: a cold `--all` on the shared 2-core machine
    # (load ~5) took 297 s with the workers (the first model alone 76 s) and 169 s without (27 s). Scoped to this run.
    from torch._inductor import config as inductor_config

    with _quiet_transformers(), inductor_config.patch(compile_threads=1):
        return _run(args, specs, options)


def _run(args, specs, options) -> int:
    # `from . import report` would give the function liger_fx.report, which shadows its module's name
    from .report import ModelReport, example_batch, run_model, table

    models = _resolve_all(specs)
    reports, start = [], time.perf_counter()
    progress = len(models) > 1
    for i, (name, model) in enumerate(models, 1):
        if progress:
            print(f"[{i}/{len(models)}] {name}: compiling one {args.mode} step ...", file=sys.stderr, flush=True)
        try:
            rep = run_model(model, (), example_batch(model), options=options, mode=args.mode, name=name)
        except Exception as e:  # one broken model must not hide the others' coverage
            rep = ModelReport(name, model.config.model_type, args.mode,
                                 error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"liger-fx: error: {name}: {rep.error}", file=sys.stderr, flush=True)
        reports.append(rep)
        if progress and not rep.error:
            done, total = rep.totals()
            print(f"[{i}/{len(models)}] {name}: {done}/{total} replaced, {rep.graph_breaks} graph break(s), "
                  f"{rep.seconds:.1f} s", file=sys.stderr, flush=True)
    if progress:
        print(f"{len(models)} models in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    document = {"models": [r.to_dict() for r in reports if not r.error]}
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
    if fail_under is None:
        return 0
    if any(r.fallbacks for r in reports):
        print("liger-fx: coverage unknown: a rewrite fell back to plain Inductor", file=sys.stderr)
        return 1
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
