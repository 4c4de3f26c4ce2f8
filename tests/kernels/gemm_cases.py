"""GEMM test cases shared by the fp16 and int8 GEMM tests (a plain module, as graphs.py)."""

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
