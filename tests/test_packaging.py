"""No import name of ours but `liger_fx` may resolve into this checkout, from the repository root or from the wheel.

Why: transformers 5.25 depends on Hugging Face's hub-kernels package, imported as `kernels`. Our fused ops lived in a
root folder `kernels/`, which `python -m pytest` (the working directory on sys.path) and pytest's rootdir insertion
made the top-level `kernels`: every transformers model import then failed with "cannot import name 'CUDAProperties'
from 'kernels'", and the suite stopped at collection. Without an `__init__.py` the folder would still be found, as a
namespace package, wherever the real package is absent.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Root folders that are ours to import from a checkout and are never installed: the test suite, the benchmarks (run as
# `python -m bench.run`) and the examples.
DEV_FOLDERS = {"liger_fx", "tests", "bench", "examples"}


def _shadow_candidates() -> list[str]:
    """HF's hub-kernels package and the folder names this project used to have at its root, plus every other
    importable root folder that is not one of DEV_FOLDERS (a new one would shadow whatever shares its name)."""
    names = {"kernels", "patterns"}
    names |= {p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier() and p.name not in DEV_FOLDERS}
    names |= {p.stem for p in ROOT.glob("*.py")}
    return sorted(names)


def _run_in_root(code: str) -> str:
    """Run `code` the way `python -m ...` runs from the repository root: the root first on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '') \n" + textwrap.dedent(code)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_no_root_folder_answers_to_another_packages_name():
    out = _run_in_root(f"""
        import importlib.util, os
        root = os.path.realpath(os.getcwd())
        for name in {_shadow_candidates()!r}:
            spec = importlib.util.find_spec(name)
            places = [spec.origin] if spec and spec.origin else []
            places += list(spec.submodule_search_locations or []) if spec else []
            inside = [p for p in places if os.path.realpath(p).startswith(root + os.sep)]
            print(name, "INSIDE" if inside else "outside", inside)
    """)
    inside = [line for line in out.splitlines() if " INSIDE " in line]
    assert not inside, f"names that resolve into the checkout from its root: {inside}"


def test_import_kernels_from_the_root_is_not_ours():
    """The exact failure: from the root, `import kernels` must not load our code (it is HF's package when installed,
    transformers 5.25 and newer; otherwise an ImportError)."""
    out = _run_in_root("""
        try:
            import kernels
        except ImportError:
            print("absent")
        else:
            print("file", getattr(kernels, "__file__", None), list(getattr(kernels, "__path__", [])))
    """)
    assert str(ROOT) not in out, out


def test_transformers_model_imports_from_the_root():
    """What collection needed: a model module of transformers imports with the root on sys.path, and our ops register."""
    out = _run_in_root("""
        import transformers.models.llama.modeling_llama  # imports transformers.integrations.hub_kernels
        import liger_fx, torch
        print(hasattr(torch.ops.liger_fx, "rms_norm"))
    """)
    assert out.strip().endswith("True"), out


def test_wheel_ships_only_liger_fx():
    """The package list pyproject.toml declares: every one under `liger_fx`, and each exists in the tree."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"liger_fx"}, packages
    for p in packages:
        assert (ROOT / p.replace(".", "/") / "__init__.py").is_file(), p
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in tool, "a package-dir mapping would ship a root folder under another name"
