import os

import torch

# Without a GPU, Triton kernels run through Triton's CPU interpreter. It is chosen when a kernel is decorated, so it
# must be on before any kernels module is imported; conftest runs before the test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with no compiled code, zeroed counters and an empty rewrite record."""
    import liger_fx

    torch._dynamo.reset()
    counters.clear()
    liger_fx.clear_records()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def recompute_at_any_size(monkeypatch):
    """The tests' models are tiny: their fused outputs are kilobytes, far under rewrite.RECOMPUTE_MIN_BYTES, below
    which option `recompute` tags nothing. The tests check what recomputing does, so the threshold is 0 here;
    tests/test_recompute.py::test_small_static_graphs_recompute_nothing checks the threshold itself."""
    import liger_fx.rewrite

    monkeypatch.setattr(liger_fx.rewrite, "RECOMPUTE_MIN_BYTES", 0)


_TORCH_CONFIGS = ("torch._functorch.config", "torch._inductor.config", "torch._dynamo.config")


def _config_snapshot() -> dict[str, dict]:
    """Every readable entry of each config module. Read through getattr: an entry deleted with delattr stays in
    `get_config_copy()` but raises on access, which is what broke every compile."""
    import importlib
    import warnings

    out = {}
    for name in _TORCH_CONFIGS:
        module, entries = importlib.import_module(name), {}
        for key in module.get_config_copy():
            try:
                with warnings.catch_warnings():  # deprecated entries warn on every read
                    warnings.simplefilter("ignore")
                    entries[key] = getattr(module, key)
            except AttributeError:
                pass  # deleted: missing from the snapshot, so a test that deletes it is named below
        out[name] = entries
    return out


@pytest.fixture(autouse=True)
def torch_config_unchanged(request):
    """After every test, torch's config modules have the same keys and values as before it.

    Why: pytest 9's `monkeypatch.setattr(torch._functorch.config, ...)` deletes the entry on undo (it records the old
    value from the module's __dict__, where torch's config modules keep nothing), and every later compile failed
    with "enable_autograd_cache does not exist": 111 failures on a fresh machine while CI stayed green.
    Change torch config only with its own `config.patch(...)`. A failure here names the test, module and key."""
    before = _config_snapshot()
    yield
    after = _config_snapshot()
    for name in _TORCH_CONFIGS:
        b, a = before[name], after[name]
        gone, new = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        changed = sorted(k for k in set(a) & set(b) if a[k] != b[k] and not _same_value(a[k], b[k]))
        if gone or new or changed:
            pytest.fail(
                f"{request.node.nodeid} left {name} changed: "
                + "; ".join(part for part in (
                    f"deleted {', '.join(gone)}" if gone else "",
                    f"added {', '.join(new)}" if new else "",
                    f"changed {', '.join(f'{k} ({b[k]!r} -> {a[k]!r})' for k in changed)}" if changed else "",
                ) if part)
                + " (use torch's config.patch, never monkeypatch.setattr, on torch config)",
                pytrace=False,
            )


def _same_value(a, b) -> bool:
    try:  # callables and other objects compare by identity; values that cannot compare are taken as equal
        return bool(a == b) or a is b
    except Exception:
        return True
