"""An open_clip TimmModel whose trunk is a plain timm VisionTransformer -> the vision TowerSpec.

Covers e.g. open_clip's ViT-*-SigLIP archs (timm ``vit_*_siglip_*``: no class token, ``global_pool='map'``,
an AttentionPoolLatent head, LayerNorm eps 1e-6, exact GELU) and class-token ViTs pooled at the token.
Anything else in the trunk (register tokens, LayerScale, qk-norm, pooling by average, a norm after the MAP
head, an MLP projection, ...) raises NotCovered with the reason.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import AttentionPoolHead, Block, Linear, PatchEmbed, TowerSpec
from ._common import NotCovered, checked_layer_norm, layer_norm, linear, module_activation, patch_weight, t

_IDENTITY_PARTS = {"q_norm": "qk-norm", "k_norm": "qk-norm", "norm": "a norm inside attention"}



def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _mlp(mlp, tower: str, where: str) -> tuple[Linear, Linear, str]:
    """(fc1, fc2, activation) of a timm Mlp (not GluMlp / SwiGLU, no norm inside)."""
    if type(mlp).__name__ != "Mlp" or not _is_identity(getattr(mlp, "norm", None)):
        raise NotCovered(tower, f"MLP {where} ({type(mlp).__name__})", "covered: timm Mlp fc1 -> act -> fc2")
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise NotCovered(tower, f"MLP {where} with convolutional fc layers")
    return linear(mlp.fc1), linear(mlp.fc2), module_activation(mlp.act, tower)


def _blocks(trunk, tower: str) -> tuple[list[Block], str]:
    width = trunk.embed_dim
    blocks, acts = [], set()
    for i, blk in enumerate(trunk.blocks):
        where = f"blocks.{i}"
        if type(blk).__name__ != "Block":
            raise NotCovered(tower, f"block {where} of type {type(blk).__name__}", "covered: timm's pre-LN Block")
        if not _is_identity(blk.ls1) or not _is_identity(blk.ls2):
            raise NotCovered(tower, f"LayerScale ({where}.ls1 / ls2)")
        attn = blk.attn
        if type(attn).__name__ != "Attention":
            raise NotCovered(tower, f"attention {where}.attn of type {type(attn).__name__}")
        for name, why in _IDENTITY_PARTS.items():
            if not _is_identity(getattr(attn, name, None)):
                raise NotCovered(tower, f"{why} ({where}.attn.{name})")
        if getattr(attn, "gate", None) is not None:
            raise NotCovered(tower, f"gated attention ({where}.attn.gate)")
        if attn.qkv.out_features != 3 * width or attn.proj.in_features != width:
            raise NotCovered(tower, f"attention width {attn.qkv.out_features // 3} != model width {width} ({where})")
        fc1, fc2, act = _mlp(blk.mlp, tower, f"{where}.mlp")
        acts.add(act)
        blocks.append(Block(ln1=checked_layer_norm(blk.norm1, tower, f"{where}.norm1"), qkv=linear(attn.qkv),
                            out=linear(attn.proj), ln2=checked_layer_norm(blk.norm2, tower, f"{where}.norm2"), fc1=fc1, fc2=fc2))
    if len(acts) != 1:
        raise NotCovered(tower, f"mix of activations {sorted(acts)}")
    return blocks, acts.pop()


def _map_head(pool, width: int, act: str, tower: str) -> AttentionPoolHead:
    """timm AttentionPoolLatent: latent (1 query) -> q, kv over all tokens -> proj; then x + mlp(norm(x))."""
    if type(pool).__name__ != "AttentionPoolLatent":
        raise NotCovered(tower, f"attention pool {type(pool).__name__}", "covered: timm AttentionPoolLatent (MAP)")
    if pool.pos_embed is not None:
        raise NotCovered(tower, "MAP head with its own position embedding")
    if pool.latent_len != 1 or pool.latent.shape[-1] != width or pool.pool != "token":
        raise NotCovered(tower, f"MAP head with {pool.latent_len} latents of width {pool.latent.shape[-1]}",
                         "covered: one latent of the model width")
    if not isinstance(pool.q, nn.Linear):
        raise NotCovered(tower, "MAP head without a query projection (q_proj=False)")
    if not _is_identity(pool.q_norm) or not _is_identity(pool.k_norm):
        raise NotCovered(tower, "MAP head qk-norm")
    if pool.mlp is None or not isinstance(pool.proj, nn.Linear):
        raise NotCovered(tower, "MAP head without its projection / MLP (out_features=0)")
    if pool.kv.out_features != 2 * width or pool.proj.out_features != width:
        raise NotCovered(tower, "MAP head whose width differs from the model's")
    fc1, fc2, head_act = _mlp(pool.mlp, tower, "attn_pool.mlp")
    if head_act != act:  # the spec runs the head MLP with the tower's activation
        raise NotCovered(tower, f"MAP head activation {head_act} differing from the blocks' {act}")
    if (pool.q.bias is None) != (pool.kv.bias is None):
        raise NotCovered(tower, "MAP head with a bias on only one of q / kv")
    # kv rows are [k | v], each heads-major (timm reshapes to (2, heads, head_dim)): q | k | v as the spec packs
    bias = None if pool.q.bias is None else t(torch.cat([pool.q.bias, pool.kv.bias]))
    return AttentionPoolHead(
        probe=t(pool.latent.reshape(-1)), qkv=Linear(t(torch.cat([pool.q.weight, pool.kv.weight])), bias),
        out=linear(pool.proj), ln=checked_layer_norm(pool.norm, tower, "attn_pool.norm"), fc1=fc1, fc2=fc2,
        heads=pool.num_heads,
    )


def _projection(visual, trunk, tower: str) -> Linear | None:
    """timm's classifier head (used as the projection when open_clip's proj is unset) or open_clip's head."""
    parts = dict(visual.head.named_children()) if isinstance(visual.head, nn.Sequential) else {"head": visual.head}
    extra = [n for n, m in parts.items() if not isinstance(m, (nn.Dropout, nn.Identity)) and n != "proj"]
    if extra:
        raise NotCovered(tower, f"open_clip head part(s) {extra}", "covered: a Linear projection")
    layers = [m for m in (trunk.head, parts.get("proj")) if not _is_identity(m)]
    if len(layers) > 1:
        raise NotCovered(tower, "two stacked projections (timm head and open_clip proj)")
    if not layers:
        return None
    if not isinstance(layers[0], nn.Linear):
        raise NotCovered(tower, f"projection {type(layers[0]).__name__}", "covered: nn.Linear")
    return linear(layers[0])


def timm_vision_tower(visual, tower: str) -> TowerSpec:
    trunk = visual.trunk
    kind = type(trunk).__name__
    if kind != "VisionTransformer":
        convs = sum(isinstance(m, nn.Conv2d) for m in trunk.modules())
        why = "a convolutional tower" if convs > 1 else "not a plain ViT"
        raise NotCovered(tower, f"timm {kind} ({why})", "covered: timm VisionTransformer")
    label = f"{tower} (timm VisionTransformer)"
    width = trunk.embed_dim
    pe = trunk.patch_embed
    if type(pe).__name__ != "PatchEmbed":
        raise NotCovered(label, f"patch embedding {type(pe).__name__}", "covered: a plain strided Conv2d")
    if not _is_identity(pe.norm):
        raise NotCovered(label, "norm in the patch embedding")
    if getattr(pe, "dynamic_img_pad", False):  # pads the remainder; the spec drops it, as a Conv2d does
        raise NotCovered(label, "padded patch embedding (dynamic_img_pad)")
    if trunk.reg_token is not None:
        raise NotCovered(label, f"{trunk.num_reg_tokens} register tokens")
    if pe.img_size is None:
        raise NotCovered(label, "patch embedding without a fixed image size")
    w, b = patch_weight(pe.proj, label)
    h, iw = pe.img_size
    embed = PatchEmbed(w, b, pe.proj.kernel_size[0], int(h), pe.proj.in_channels,
                       **({"image_width": int(iw)} if iw != h else {}))
    seq_len = embed.num_patches + (1 if trunk.cls_token is not None else 0)
    if trunk.pos_embed is None:  # no position embedding == a zero one
        pos = torch.zeros(seq_len, width, dtype=w.dtype, device=w.device)
    else:
        pos = t(trunk.pos_embed.reshape(-1, width))
        if trunk.cls_token is not None and trunk.no_embed_class:  # the class token gets no position: a zero row
            pos = torch.cat([torch.zeros_like(pos[:1]), pos])
    blocks, act = _blocks(trunk, label)
    pre_ln = None if _is_identity(trunk.norm_pre) else checked_layer_norm(trunk.norm_pre, label, "norm_pre")
    pool_head = None
    if trunk.global_pool == "map":
        if trunk.cls_token is not None and not trunk.pool_include_prefix:
            raise NotCovered(label, "MAP head that skips the class token")
        pool_head = _map_head(trunk.attn_pool, width, act, label)
        pooling = "map"
        if not _is_identity(trunk.fc_norm):
            raise NotCovered(label, "norm after the MAP head (fc_norm)")
        final = trunk.norm
    elif trunk.global_pool == "token":
        pooling = "cls"
        # LN is per token: fc_norm after taking the class token == a final LN on every token
        norms = [m for m in (trunk.norm, trunk.fc_norm) if not _is_identity(m)]
        if len(norms) != 1:
            raise NotCovered(label, f"{len(norms)} final norms around the class-token pool", "covered: exactly one")
        final = norms[0]
    else:
        raise NotCovered(label, f"global_pool {trunk.global_pool!r}", "covered: 'token', 'map'")
    if _is_identity(final):
        raise NotCovered(label, "missing final norm (final_norm=False)")
    return TowerSpec(
        kind="vision", width=width, heads=trunk.blocks[0].attn.num_heads, mlp_dim=blocks[0].fc1.out_features,
        activation=act, mask="none", embed=embed, pos_embedding=pos,
        class_embedding=t(trunk.cls_token.reshape(-1)) if trunk.cls_token is not None else None,
        pre_ln=pre_ln, blocks=blocks, final_ln=checked_layer_norm(final, label, "norm"), pooling=pooling, pool_head=pool_head,
        projection=_projection(visual, trunk, label),
    )
