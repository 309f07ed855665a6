"""RMSNorm: `x * rsqrt(mean(x^2, -1) + eps)`, times a weight or not, in the casting conventions model code uses.

    llama   (Llama, Mistral, Qwen2/3, Phi-3, Mixtral; Qwen3's q/k norms on a (B, T, H, D) view; Meta's and gpt-fast's
            `self._norm(x.float()).type_as(x) * self.weight`):
                xf = x.float(); y = xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps); out = w * y.to(x.dtype)
    gemma   (Gemma, Gemma2): everything in fp32, weight as (1 + w):   out = (y * (1.0 + w.float())).to(x.dtype)
    fp32w   the weight multiply in fp32, no offset: torch's own `nn.RMSNorm` / `F.rms_norm` (canonicalize.
            expand_rms_norm writes them so), lit-gpt's `(x_normed * weight.float()).to(dtype)`, DeepSeek-V4's
            `(self.weight * x).to(input_dtype)` with an fp32 weight, OLMo-style bodies under
            `torch.autocast(dev, enabled=False)` with `weight.type_as(x) * x`:   out = (w.float() * y).to(x.dtype)
    noweight  Llama-4's q/k norm `self._norm(x.float()).type_as(x)`, nn.RMSNorm(elementwise_affine=False):
                out = y.to(x.dtype)
    rstd      DeepSeek-V4's unweighted norm, the rstd rounded to x's dtype before the multiply:
                out = x * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)

One search function per convention; the variants (x dtype, weight dtype, operand order) are generated, not cloned.
In an fp32 model the casts vanish after canonicalization, so the fp32 variants are the same functions traced at fp32
(fp32w and llama are then one graph, traced once). The weighted forms come first: the matcher visits a graph's nodes
last to first, and a weighted norm's output follows the normalized tensor that the no-weight forms end at. A no-weight
form also matches the normalization inside a weighted norm whose weight multiply has another form or escapes: the
fused op then normalizes and the weight multiply stays Inductor's. eps and the Gemma offset are captured from the
graph, not fixed; under `dynamic=True` Dynamo makes the module's eps a float input of the graph, which the
replacement pins as a constant (rewrite.specialize).
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from liger_fx.rewrite import Pattern, scalar_hint

aten = torch.ops.aten

def recomputable() -> tuple:
    """Ops whose output the backward recomputes rather than saves (LigerConfig.recompute): the backward saves x and
    the weight anyway, and re-running the forward costs one read of x (0.07 ms at 16384x4096 bf16 on an H200) to
    save B*T*H*2 bytes per norm (64 MiB at Llama-3.2-1B B8 T2048)."""
    return (torch.ops.liger_fx.rms_norm.default,)


_EPS = 1.2345e-5  # distinctive trace-time values, replaced by the captured constants
_OFFSET = 1.375


def _normalize(x, eps):
    xf = x.to(torch.float32)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _llama(weight_first: bool):
    def search(x, w, eps):
        y = _normalize(x, eps).to(x.dtype)
        return w * y if weight_first else y * w

    def replace(x, w, eps):
        return torch.ops.liger_fx.rms_norm(x, w, eps, 0.0, "llama")

    return search, replace


def _gemma(weight_first: bool):
    def search(x, w, eps, offset):
        scale = offset + w.to(torch.float32)
        y = _normalize(x, eps)
        return (scale * y if weight_first else y * scale).to(x.dtype)

    def replace(x, w, eps, offset):
        return torch.ops.liger_fx.rms_norm(x, w, eps, offset, "gemma")

    return search, replace


def _fp32w(weight_first: bool):
    def search(x, w, eps):
        scale = w.to(torch.float32)
        y = _normalize(x, eps)
        return (scale * y if weight_first else y * scale).to(x.dtype)

    def replace(x, w, eps):
        return torch.ops.liger_fx.rms_norm(x, w, eps, 0.0, "gemma")

    return search, replace


def _noweight(_: bool):
    def search(x, eps):
        return _normalize(x, eps).to(x.dtype)

    def replace(x, eps):
        return torch.ops.liger_fx.rms_norm(x, None, eps, 0.0, "llama")

    return search, replace


def _rstd(x_first: bool):
    def search(x, eps):
        r = torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
        return x * r if x_first else r * x

    def replace(x, eps):
        # The op normalizes in fp32 and rounds once; eager rounds the rstd first, then the product: within the
        # tolerance rule of it (ours is the closer to the fp32 result).
        return torch.ops.liger_fx.rms_norm(x, None, eps, 0.0, "llama")

    return search, replace


def _check(match) -> str | None:
    x, w = match.kwargs["x"], match.kwargs.get("w")
    # `w * y` matches any factor: a norm without a weight scaled by a Python float (`2.0 * y`) binds w to the float.
    # Read as a node, it raised AttributeError and the whole graph fell back to plain Inductor.
    if "w" in match.kwargs and not isinstance(w, fx.Node):
        return f"the factor after the normalization is the constant {w!r}, not a weight tensor"
    if not isinstance(x, fx.Node):
        return f"the normalized input is the constant {x!r}"
    # A constant, or a float input of the graph (dynamic=True makes the module's eps one): the replacement gets it
    # as a constant, guarded (rewrite.specialize).
    if scalar_hint(match.kwargs["eps"]) is None or scalar_hint(match.kwargs.get("offset", 0.0)) is None:
        return "eps or offset is a tensor, not a constant"
    xv = x.meta.get("val")
    wv = w.meta.get("val") if w is not None else None
    if xv is None or (w is not None and wv is None):
        return "no shape information"
    if not xv.is_floating_point():
        return f"input dtype {xv.dtype} is not floating point"
    if torch.float64 in (xv.dtype, getattr(wv, "dtype", None)):
        return "float64 operands: the op computes in fp32"
    if wv is None:
        return None
    if wv.dim() != 1 or wv.shape[0] != xv.shape[-1]:
        return f"weight shape {tuple(wv.shape)} is not ({xv.shape[-1]},), the normalized dim"
    if xv.device != wv.device:
        return f"input on {xv.device}, weight on {wv.device}"
    return None


_LOW = (torch.bfloat16, torch.float16)


def _variants():
    """(form, make, x dtype, weight dtype or None, operand order): every dtype pair a model can hold (a bf16 model
    with fp32 norm weights: DeepSeek-V4's, nn.RMSNorm's under a cast model) whose traced graph differs."""
    forms = (("gemma", _gemma), ("llama", _llama), ("fp32w", _fp32w), ("noweight", _noweight), ("rstd", _rstd))
    for form, make in forms:
        for x_dtype in (torch.float32, *_LOW):
            if form in ("noweight", "rstd"):
                if form == "rstd" and x_dtype == torch.float32:
                    continue  # in fp32 the rstd's cast vanishes: the noweight form
                for order in ((True,) if form == "noweight" else (True, False)):
                    yield form, make, x_dtype, None, order
                continue
            w_dtypes = (x_dtype,) if form == "llama" else tuple(dict.fromkeys((x_dtype, torch.float32)))
            for w_dtype in w_dtypes:
                if form == "fp32w" and x_dtype == w_dtype == torch.float32:
                    continue  # the llama fp32 graph
                for order in (True, False):
                    yield form, make, x_dtype, w_dtype, order


def _example(x_dtype, w_dtype):
    x = torch.randn(2, 3, 8, dtype=x_dtype)
    return [x] if w_dtype is None else [x, torch.randn(8, dtype=w_dtype)]


def _name(form, x_dtype, w_dtype, order) -> str:
    dt = str(x_dtype)[6:] + (f"/w{str(w_dtype)[6:]}" if w_dtype not in (None, x_dtype) else "")
    if w_dtype is None:
        return f"rms_norm/{form}/{dt}" + ("" if form == "noweight" else f"/{'x*r' if order else 'r*x'}")
    return f"rms_norm/{form}/{dt}/{'w*y' if order else 'y*w'}"


@functools.cache
def patterns() -> list[Pattern]:
    # Gemma first: in fp32 the llama form `y * w` would also match `y * (1 + w)` with w := (1 + w), correct but
    # leaving the add outside the fused op.
    out = []
    for form, make, x_dtype, w_dtype, order in _variants():
        search, replace = make(order)
        out.append(
            Pattern(
                flag="rms_norm",
                name=_name(form, x_dtype, w_dtype, order),
                search=search,
                replace=replace,
                example_inputs=functools.partial(_example, x_dtype, w_dtype),
                scalars={"eps": _EPS, "offset": _OFFSET} if form == "gemma" else {"eps": _EPS},
                check=_check,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Candidates and near-miss reasons, independent of the matcher: an rsqrt of (a mean of squares + something).


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _mean_of_squares(rsqrt: fx.Node):
    add = rsqrt.args[0]
    if not _is(add, aten.add.Tensor):
        return None, None
    for term, other in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        if _is(term, aten.mean.dim) and _is(term.args[0], aten.pow.Tensor_Scalar) and term.args[0].args[1] == 2:
            return term, other
    return None, None


def candidates(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
    return [
        ("rms_norm", n) for n in graph.nodes if _is(n, aten.rsqrt.default) and _mean_of_squares(n)[0] is not None
    ]


def explain(rsqrt: fx.Node) -> str:
    mean, eps = _mean_of_squares(rsqrt)
    dims = list(mean.args[1])
    if dims != [-1]:
        return f"mean of squares reduces dims {dims}, not the last dim alone"
    if not (len(mean.args) > 2 and mean.args[2]) and not mean.kwargs.get("keepdim"):
        return "mean of squares without keepdim=True"
    if scalar_hint(eps) is None:
        return "eps is a tensor, not a constant"
    add = rsqrt.args[0]
    if len(mean.users) != 1 or len(add.users) != 1 or len(mean.args[0].users) != 1:
        return "the mean of squares (the variance) is used outside the norm (it escapes the pattern)"
    users = list(rsqrt.users)
    if len(users) != 1:
        return f"rsqrt has {len(users)} users; the normalization is shared outside one norm"
    normed = users[0]
    if not _is(normed, aten.mul.Tensor):
        return f"rsqrt feeds {normed.target}, not a multiply by the input"
    if len(normed.users) != 1:
        return "the normalized tensor is used outside the norm (it escapes the pattern)"
    nxt = list(normed.users)[0]
    if _is(nxt, aten.to.dtype) and len(nxt.users) != 1:
        return "the normalized tensor (after its cast) is used outside the norm (it escapes the pattern)"
    return "the weight multiply or cast after the normalization has an unsupported form"
