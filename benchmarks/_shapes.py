"""Layer shapes of the kernel benchmarks' four architectures, read from dualfuse's presets.

Each preset is built on the meta device (``presets.build_hf(name, meta=True)``: the published config, no weights
allocated) and read into its spec (``adapters.to_spec``), so `benchmarks/kernel_bench.py` and
`benchmarks/kernels_attention.py` time the shapes the fused executor runs for that model.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent

# benchmark label -> dualfuse preset
PRESETS = {
    "ViT-B/32": "clip-vit-b-32",
    "ViT-B/16": "clip-vit-b-16",
    "ViT-L/14": "clip-vit-l-14",
    "SigLIP-B/16": "siglip-base-patch16-224",
}


@functools.lru_cache(maxsize=None)
def spec(label: str):
    """The DualEncoderSpec of a benchmark label's preset (meta tensors)."""
    # benchmarks/kernel_bench.py would pass for the Hugging Face `kernels` package (transformers probes for it by name
    # and then fails on its missing metadata), so this folder is off sys.path while transformers loads the model.
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    try:
        import transformers

        from dualfuse import adapters, presets

        level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the presets' random-weight configs trip token-id warnings
        try:
            return adapters.to_spec(presets.build_hf(PRESETS[label], meta=True))
        finally:
            transformers.logging.set_verbosity(level)
    finally:
        sys.path[:] = saved


def _tokens(tower) -> int:
    return int(tower.pos_embedding.shape[0])  # positions = sequence length (class token included where there is one)


def gemm_shapes(label: str):
    """(vision (width, tokens, mlp), text (width, tokens, mlp), activation), as benchmarks/kernel_bench.py's MODELS."""
    s = spec(label)
    v, t = s.vision, s.text
    if v.activation != t.activation:
        raise ValueError(f"{label}: towers with different activations ({v.activation}, {t.activation})")
    return ((v.width, _tokens(v), v.mlp_dim), (t.width, _tokens(t), t.mlp_dim), v.activation)


def attention_shapes(label: str):
    """[(tokens, heads, head_dim, causal, ln_eps) for vision, text], as benchmarks/kernels_attention.py's MODELS."""
    s = spec(label)
    return [(_tokens(tw), tw.heads, tw.width // tw.heads, tw.mask == "causal", tw.blocks[0].ln1.eps)
            for tw in (s.vision, s.text)]
