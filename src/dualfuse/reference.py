"""The forward pass computed from a DualEncoderSpec in plain torch: the ground truth for every test.

It must equal the source model's own outputs (get_image_features / get_text_features / logits).
Runs in whatever dtype the spec's weights have (fp32 for parity tests).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .spec import AttentionPoolHead, Block, DualEncoderSpec, LayerNorm, Linear, PatchEmbed, PatchSequence, TowerSpec


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {kind!r}")


def linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    return F.linear(x, lin.weight, lin.bias)


def layer_norm(x: torch.Tensor, ln: LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    """q [B, Sq, D], k/v [B, Sk, D] -> [B, Sq, D]; explicit softmax (no fused SDPA) to stay a plain reference."""
    b, sq, d = q.shape
    sk = k.shape[1]
    dh = d // heads
    q = q.view(b, sq, heads, dh).transpose(1, 2)
    k = k.view(b, sk, heads, dh).transpose(1, 2)
    v = v.view(b, sk, heads, dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = scores.float().softmax(-1).to(q.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, sq, d)


def block(x: torch.Tensor, blk: Block, tower: TowerSpec) -> torch.Tensor:
    h = layer_norm(x, blk.ln1)
    q, k, v = linear(h, blk.qkv).split(tower.width, dim=-1)
    x = x + linear(attention(q, k, v, tower.heads, tower.mask == "causal"), blk.out)
    h = layer_norm(x, blk.ln2)
    return x + linear(activation(linear(h, blk.fc1), tower.activation), blk.fc2)


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H//p)*(W//p), C*p*p] in (c, ph, pw) order, row-major over the patch grid.
    Like a stride-p Conv2d, the last H % p rows and W % p columns are dropped (SigLIP so400m: 384 px, patch 14)."""
    b, c, h, w = pixel_values.shape
    gh, gw = h // patch, w // patch
    x = pixel_values[:, :, : gh * patch, : gw * patch].reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * patch * patch)


def naflex_pos_embedding(embed: PatchEmbed, pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """SigLIP2's position grid pos [G*G, D] resized to an h x w patch grid -> [h*w, D], row-major.
    As HF: bilinear, align_corners=False, antialias=True (a triangle filter widened when downsampling),
    computed in fp32 and cast back to pos's dtype. At h == w == G it is the identity."""
    g = embed.pos_grid
    grid = pos.reshape(g, g, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, D, G, G]
    if w == 1:
        # torch's CPU antialias kernel (seen in 2.11 and 2.14; CUDA is right) gives every row of a width-1 output
        # the first row's value, so resize the transposed grid to (1, h): it flattens in the same order.
        h, w, grid = w, h, grid.transpose(2, 3)
    resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(-1, h * w).t().contiguous().to(pos.dtype)


def embed_image(tower: TowerSpec, pixel_values: torch.Tensor) -> torch.Tensor:
    emb = tower.embed
    assert isinstance(emb, PatchEmbed)
    x = F.linear(patchify(pixel_values.to(emb.weight.dtype), emb.patch_size), emb.weight, emb.bias)
    if emb.pos_grid is not None:  # NaFlex: a whole image is one unpadded patch sequence of its own grid
        gh, gw = pixel_values.shape[-2] // emb.patch_size, pixel_values.shape[-1] // emb.patch_size
        return x + naflex_pos_embedding(emb, tower.pos_embedding, gh, gw)
    if tower.class_embedding is not None:
        cls = tower.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
    return x + tower.pos_embedding[: x.shape[1]]


def embed_patch_sequence(tower: TowerSpec, images: PatchSequence) -> list[torch.Tensor]:
    """NaFlex images -> one [1, h*w, D] tensor per image: its valid patches only, embedded, plus positions.
    HF runs the padded batch with padded keys masked in every attention and in the MAP head, so each image's
    valid tokens (and its pooled output) equal a run over those tokens alone, which is what this gives."""
    emb = tower.embed
    if not isinstance(emb, PatchEmbed) or emb.pos_grid is None:
        raise ValueError("a PatchSequence needs a NaFlex (SigLIP2) vision tower: spec.vision.embed.pos_grid is None")
    p, c = emb.patch_size, emb.channels
    n = images.pixel_values.shape[1]
    out = []
    for i, (h, w) in enumerate(images.spatial_shapes.tolist()):
        if h < 1 or w < 1 or h * w > n:
            raise ValueError(f"image {i}: spatial shape ({h}, {w}) does not fit a sequence of {n} patches")
        mask = images.pixel_attention_mask[i].bool()
        if not torch.equal(mask, torch.arange(n, device=mask.device) < h * w):
            ones = int(mask.sum())
            got = f"{ones} ones" if ones != h * w else "ones that are not that prefix"
            raise ValueError(f"image {i}: pixel_attention_mask must be 1 for exactly the first {h * w} of {n} "
                             f"patches (spatial shape ({h}, {w})), got {got}")
        # patches come flattened (ph, pw, c); the spec's weight columns are (c, ph, pw)
        patches = images.pixel_values[i, : h * w].to(emb.weight.dtype).reshape(h * w, p, p, c).permute(0, 3, 1, 2)
        x = F.linear(patches.reshape(h * w, c * p * p), emb.weight, emb.bias)
        out.append((x + naflex_pos_embedding(emb, tower.pos_embedding, h, w)).unsqueeze(0))
    return out


def embed_text(tower: TowerSpec, input_ids: torch.Tensor) -> torch.Tensor:
    return tower.embed.weight[input_ids] + tower.pos_embedding[: input_ids.shape[1]]


def pool_positions(tower: TowerSpec, input_ids: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    """Index of the pooled token per sample ([B] int64)."""
    device = tower.pos_embedding.device
    if tower.pooling == "cls":
        return torch.zeros(batch, dtype=torch.long, device=device)
    if tower.pooling == "last":
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    if tower.pooling == "argmax":
        return input_ids.argmax(dim=-1)
    if tower.pooling == "first_eos":
        return (input_ids == tower.eos_token_id).int().argmax(dim=-1)
    raise ValueError(f"pooling {tower.pooling!r} has no single position")


def attention_pool(x: torch.Tensor, head: AttentionPoolHead, tower: TowerSpec) -> torch.Tensor:
    """SigLIP MAP head on tokens x [B, S, D] -> [B, D]."""
    d = tower.width
    wq, wk, wv = head.qkv.weight.split(d)
    bq, bk, bv = head.qkv.bias.split(d) if head.qkv.bias is not None else (None, None, None)
    q = F.linear(head.probe.view(1, 1, d), wq, bq).expand(x.shape[0], 1, d)
    k, v = F.linear(x, wk, bk), F.linear(x, wv, bv)
    h = linear(attention(q, k, v, head.heads, causal=False), head.out)
    h = h + linear(activation(linear(layer_norm(h, head.ln), head.fc1), tower.activation), head.fc2)
    return h[:, 0]


def encode_tower(tower: TowerSpec, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Embedded tokens x [B, S, D] -> embeddings [B, out_dim] (unnormalized, like get_*_features); a tower
    without pooling ("none") gives its tokens [B, S, D] after the final LN (its last_hidden_state)."""
    if tower.pre_ln is not None:
        x = layer_norm(x, tower.pre_ln)
    for blk in tower.blocks:
        x = block(x, blk, tower)
    x = layer_norm(x, tower.final_ln)
    if tower.pooling == "none":  # no pooled output (a VLM's SigLIP tower): every token after the final LN
        return x
    if tower.pooling == "map":
        pooled = attention_pool(x, tower.pool_head, tower)
    else:
        pos = pool_positions(tower, input_ids, x.shape[0], x.shape[1])
        pooled = x[torch.arange(x.shape[0], device=x.device), pos]
    return linear(pooled, tower.projection) if tower.projection is not None else pooled


def encode_image(spec: DualEncoderSpec, pixel_values: torch.Tensor | PatchSequence) -> torch.Tensor:
    if isinstance(pixel_values, PatchSequence):  # images of different grids: one tower run each
        return torch.cat([encode_tower(spec.vision, x) for x in embed_patch_sequence(spec.vision, pixel_values)])
    return encode_tower(spec.vision, embed_image(spec.vision, pixel_values))


def encode_text(spec: DualEncoderSpec, input_ids: torch.Tensor) -> torch.Tensor:
    return encode_tower(spec.text, embed_text(spec.text, input_ids), input_ids)


def encode(spec: DualEncoderSpec, pixel_values: torch.Tensor, input_ids: torch.Tensor):
    return encode_image(spec, pixel_values), encode_text(spec, input_ids)


def logits(spec: DualEncoderSpec, image_embeds: torch.Tensor, text_embeds: torch.Tensor):
    """(logits_per_image [Bi, Bt], logits_per_text [Bt, Bi]) from unnormalized embeddings, as CLIP/SigLIP do."""
    img = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    txt = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    per_text = (txt @ img.t()) * math.exp(spec.logit_scale)
    if spec.logit_bias is not None:
        per_text = per_text + spec.logit_bias
    return per_text.t(), per_text
