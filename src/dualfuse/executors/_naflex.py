"""SigLIP2 NaFlex calls on fixed-resolution kernels.

A NaFlex image is a (h, w) grid of patches, right-padded to the call's length N, with the tower's G x G position
grid resized to (h, w). HF masks the padded patches out of every attention (as keys) and out of the pooling head,
so the valid patches' outputs, and the pooled embedding, equal a run over the h*w valid patches alone. Images that
share a grid therefore run as one fixed-resolution call: the patches are laid back out as an image
[B, C, h*p, w*p] (in the copy into the graph's input buffer), and the tower's positions are the grid resized to
(h, w), computed once per grid.
"""
from __future__ import annotations

import dataclasses

import torch

from ..spec import DualEncoderSpec, PatchSequence


def grid_groups(seq: PatchSequence) -> list[tuple[tuple[int, int], list[int]]]:
    """[((h, w), image indices)] in first-seen order. One read back from the device, for every image's grid and
    whether its mask marks exactly its first h*w patches (what the kernels assume; the processor's masks do)."""
    px, shapes, mask = seq.pixel_values, seq.spatial_shapes, seq.pixel_attention_mask
    n = px.shape[1]
    hw = shapes.to(mask.device).long().prod(-1)
    expected = torch.arange(n, device=mask.device)[None, :] < hw[:, None]
    ok = ((mask != 0) == expected).all(-1)
    rows = torch.cat([shapes.to(mask.device).long(), ok[:, None].long()], 1).tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w, good) in enumerate(rows):
        if h < 1 or w < 1 or h * w > n:
            raise ValueError(f"spatial_shapes: image {i} has a {h}x{w} patch grid, expected 1 <= h*w <= {n} "
                             "(the number of patches per image in pixel_values)")
        if not good:
            raise ValueError(f"pixel_attention_mask: image {i} should mark its first {h * w} patches (its {h}x{w} "
                             "grid) 1 and the rest 0, as the SigLIP2 image processor does; got another mask")
        groups.setdefault((h, w), []).append(i)
    return list(groups.items())


def as_image(patches: torch.Tensor, h: int, w: int, patch: int, channels: int) -> torch.Tensor:
    """[B, >= h*w, p*p*C] patches in (ph, pw, c) order -> a [B, C, h, p, w, p] view of the image they tile
    (copying it into a contiguous [B, C, h*p, w*p] buffer lays the image out)."""
    b = patches.shape[0]
    x = patches[:, : h * w].reshape(b, h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4)


def grid_spec(spec: DualEncoderSpec, pos: torch.Tensor, h: int, w: int) -> DualEncoderSpec:
    """The fixed-resolution spec of one (h, w) grid: images (h*p) x (w*p), positions ``pos`` [h*w, D]; every
    other tensor is shared with ``spec`` (no copy)."""
    v = spec.vision
    p = v.embed.patch_size
    embed = dataclasses.replace(v.embed, image_size=h * p, image_width=w * p, pos_grid=None)
    return dataclasses.replace(spec, vision=dataclasses.replace(v, embed=embed, pos_embedding=pos))
