"""Static buffers of a fused runner: one :class:`TowerBuffers` per tower (activations, inputs, the pooled rows)
for one call shape. Inputs start zeroed (the warm-up and capture run before any real input is copied in)."""
from __future__ import annotations

import torch

from ...spec import TowerSpec


class TowerBuffers:
    """Static activations of one tower for one batch size. Rows are flattened [B*S, ...]."""

    def __init__(self, tower: TowerSpec, batch: int, seq: int, dtype, device, output: torch.Tensor,
                 residual_dtype: torch.dtype, fold_ln: bool = False, pixels: str = "float"):
        d, f = tower.width, tower.mlp_dim
        rows = batch * seq
        e = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        self.batch, self.seq = batch, seq
        # the residual stream in residual_dtype (fp32 by default: 12..24 rounding steps to fp16/bf16 otherwise
        # add up), everything else in the model dtype
        self.x = torch.empty(rows, d, dtype=residual_dtype, device=device)
        self.h = e(rows, d)  # LN output
        self.qkv, self.a, self.m = e(rows, 3 * d), e(rows, d), e(rows, f)
        # Inputs start as zeros, not torch.empty: the warm-up and capture run before any real input is copied
        # in, and garbage token ids would make the embedding gather read far out of bounds.
        if tower.kind == "vision":
            emb = tower.embed
            if pixels == "uint8":  # camera frames: stored channels-last, read through a [B, C, H, W] view
                self.input = torch.zeros(batch, emb.image_size, emb.width, emb.channels, dtype=torch.uint8,
                                         device=device).permute(0, 3, 1, 2)
            else:
                self.input = torch.zeros(batch, emb.channels, emb.image_size, emb.width, dtype=dtype, device=device)
        else:
            self.input = torch.zeros(batch, seq, dtype=torch.long, device=device)
        # output: [batch, embed dim], this tower's rows of the runner's one output buffer (one clone per call)
        if tower.pooling == "map":
            fh = tower.pool_head.fc1.out_features
            self.kv, self.ma = e(rows, 2 * d), e(batch, 1, d)
            self.mh = output if tower.projection is None else e(batch, d)  # the head's residual stream
            self.mln, self.mm = e(batch, d), e(batch, fh)
            self.pooled = self.mh
        else:
            self.pooled = output if tower.projection is None else e(batch, d)
            self.pool_idx = torch.empty(batch, dtype=torch.long, device=device)
            if tower.pooling in ("cls", "last"):  # fixed positions: no launch needed
                pos = 0 if tower.pooling == "cls" else seq - 1
                self.pool_idx.copy_(torch.arange(batch, device=device) * seq + pos)
        self.output = output
        self.tokens = None  # the final LN over every token: set by a single-tower runner that reads it
        if fold_ln:  # row statistics of the residual stream(s), written by the GEMM that updates them
            from ...kernels.gemm import row_stats_buffer

            self.x_stats = row_stats_buffer(rows, d, device)
            if tower.pooling == "map":
                self.mh_stats = row_stats_buffer(batch, d, device)
        # the embeddings write the residual stream, or the LN input when a pre-LN follows
        self.embed_out = self.x
        if tower.pre_ln is not None:  # embeddings -> pre-LN -> residual stream
            self.embed_out = torch.empty(rows, d, dtype=residual_dtype, device=device)
