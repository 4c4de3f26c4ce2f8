"""GEMM test cases shared by the fp16 and int8 GEMM tests (a plain module, as graphs.py)."""
import torch
import torch.nn.functional as F

# every epilogue the grouped GEMM has, as _make(...) keyword arguments
EPILOGUES = {
    "none": dict(),
    "bias": dict(bias=True),
    "quick_gelu": dict(activation="quick_gelu"),
    "gelu": dict(bias=True, activation="gelu"),
    "gelu_tanh": dict(bias=True, activation="gelu_tanh"),
    "residual": dict(residual="sep"),
    "residual_inplace": dict(residual="inplace"),
    "all": dict(bias=True, activation="quick_gelu", residual="inplace"),
}


def reference(x, w, bias=None, activation=None, residual=None):
    """``act(x @ wᵀ + bias) + residual`` in fp64 from the same (rounded) inputs (for int8: the dequantized w)."""
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    if activation == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    elif activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual.double()
    return y


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_outputs(problems, refs, tol):
    """Every output fully written (no NaN left from the poisoning) and within ``tol`` relative error of its ref."""
    for i, (p, ref) in enumerate(zip(problems, refs)):
        assert not torch.isnan(p.out).any(), f"problem {i}: output not fully written (NaN left)"
        err = rel_err(p.out, ref)
        assert err <= tol, f"problem {i}: rel err {err:.3g} > {tol}"


def launch_and_check(problems, refs, tol, **kw):
    """One GroupedLinear launch over ``problems`` (refs computed before: outputs may alias residuals), checked."""
    from dualfuse.kernels.gemm import GroupedLinear

    g = GroupedLinear(problems, **kw)
    g()
    check_outputs(problems, refs, tol)
    return g
