"""A tiny timm SigLIP-style ViT (no class token, MAP head), registered with timm by name: open_clip's TimmModel
builds its trunk with ``timm.create_model(name)`` and passes no size arguments through. Imported (and so
registered) only by presets.build_open_clip("siglip-tiny")."""
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = ["dualfuse_test_vit_siglip_tiny"]

# as timm's vit_base_patch16_siglip_224 but 72 wide, 2 heads (head dim 36), 2 blocks, 32 px / patch 8
ARGS = dict(img_size=32, patch_size=8, embed_dim=72, depth=2, num_heads=2, mlp_ratio=1.5,
            class_token=False, global_pool="map")


@register_model
def dualfuse_test_vit_siglip_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    kwargs.pop("pretrained_cfg", None)
    return build_model_with_cfg(VisionTransformer, "dualfuse_test_vit_siglip_tiny", pretrained,
                                pretrained_cfg=dict(input_size=(3, 32, 32), num_classes=0), **dict(ARGS, **kwargs))
