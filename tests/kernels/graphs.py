"""CUDA-graph capture shared by the kernel tests (a plain module: `import conftest` is ambiguous across folders)."""
import torch


def capture_graph(op) -> torch.cuda.CUDAGraph:
    """Warm ``op`` up on a side stream (as torch.cuda.graphs recommends), then capture one call of it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        op()
    return g
