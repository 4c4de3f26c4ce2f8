"""HF Siglip2Model (NaFlex) -> spec -> reference forward vs HF's own outputs (CPU, fp32, tiny seeded model)."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers import Siglip2Config, Siglip2Model  # noqa: E402
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings  # noqa: E402

import dualfuse  # noqa: E402
from dualfuse import reference  # noqa: E402
from dualfuse.adapters import to_spec  # noqa: E402
from dualfuse.adapters.hf_siglip2 import from_hf_siglip2  # noqa: E402
from dualfuse.spec import PatchSequence  # noqa: E402

# G = 4 position grid (native 32 x 32 px at patch 8), 12 text tokens
TINY_VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                   num_patches=16)
TINY_TEXT = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                 max_position_embeddings=12, pad_token_id=0, eos_token_id=1, bos_token_id=2)
# google/siglip2-base-patch16-naflex (transformers' convert_siglip2_to_hf.py "base" options, vocab 256000;
# max_position_embeddings 64, gelu_pytorch_tanh and eps 1e-6 are Siglip2TextConfig/Siglip2VisionConfig defaults)
BASE_NAFLEX_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          patch_size=16, num_patches=256)
BASE_NAFLEX_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        vocab_size=256000, max_position_embeddings=64)
PATCH, CHANNELS = 8, 3


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def rel_err_rows(a, b):
    return ((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).max().item()


def tiny_model(seed=0, attn="sdpa"):
    """Seeded HF init, then every parameter perturbed so that zero-initialised biases, LN affines, the logit
    scale/bias are all non-trivial."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Siglip2Model(Siglip2Config(vision_config=TINY_VISION, text_config=TINY_TEXT)).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.set_attn_implementation(attn)
    return model


def convert_image_to_patches(image, patch_size):
    """HF's own patchify, from its torchvision-backed image processor module: without torchvision (it comes with
    the openclip extra) the test that needs it skips."""
    pytest.importorskip("torchvision", reason="torchvision is not installed here (pip install 'dualfuse[openclip]')")
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches as hf_patchify
    return hf_patchify(image, patch_size)


def patch_sequence(shapes, n, seed=0):
    """Images of the given (h, w) patch grids, cut into patches as HF's processor does
    (convert_image_to_patches: (ph, pw, c) order) and right-padded to n with random values: HF masks padding,
    so its content must not matter."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(len(shapes), n, PATCH * PATCH * CHANNELS, generator=g)
    mask = torch.zeros(len(shapes), n, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        image = torch.randn(CHANNELS, h * PATCH, w * PATCH, generator=g)
        pixel_values[i, : h * w] = convert_image_to_patches(image, PATCH)
        mask[i, : h * w] = 1
    return PatchSequence(pixel_values, torch.tensor(shapes, dtype=torch.long), mask)


def processor_sequence(sizes, max_num_patches, seed=0):
    """Random uint8 images of the given (height, width) in pixels through Siglip2ImageProcessor (resize to the
    patch budget, rescale, normalize, patchify, pad). Odd indices are given as PIL images, even as numpy."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    images = [Image.fromarray(im) if i % 2 else im for i, im in enumerate(images)]
    from transformers import Siglip2ImageProcessor  # without torchvision: its PIL backend, with a warning
    proc = Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=max_num_patches)
    out = proc(images=images, return_tensors="pt")
    return PatchSequence(out["pixel_values"], out["spatial_shapes"], out["pixel_attention_mask"])


def hf_vision(model, seq: PatchSequence):
    with torch.no_grad():
        return model.vision_model(pixel_values=seq.pixel_values, pixel_attention_mask=seq.pixel_attention_mask,
                                  spatial_shapes=seq.spatial_shapes)


def hf_resize(pos, grid, h, w):
    return Siglip2VisionEmbeddings.resize_positional_embeddings(
        pos.reshape(grid, grid, -1), torch.tensor([[h, w]]), max_length=h * w)[0]


def definition_resize(pos, grid, h, w):
    """Antialiased bilinear (align_corners=False) written out, in float64: along each axis, output i is centred at
    (i + 0.5) * scale - 0.5 in source pixels, scale = grid / size, with triangle weights of half-width
    max(scale, 1), normalized to sum 1. Separable: the 2-D weight is the product of the two axes' weights."""
    def weights(size):
        scale = grid / size
        center = (torch.arange(size, dtype=torch.float64) + 0.5) * scale - 0.5
        wt = (1 - (torch.arange(grid, dtype=torch.float64) - center[:, None]).abs() / max(scale, 1.0)).clamp(min=0)
        return wt / wt.sum(-1, keepdim=True)

    out = torch.einsum("ia,jb,abd->ijd", weights(h), weights(w), pos.double().reshape(grid, grid, -1))
    return out.reshape(h * w, -1)


def hf_resize_wrong_for_width_1():
    """Older transformers (5.17) resize with F.interpolate; on CPU that gives every row of a width-1 grid the
    first row's value. 5.24 computes the same filter as a weight matrix, which is right."""
    pos = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    return not torch.allclose(hf_resize(pos, 4, 8, 1).double(), definition_resize(pos, 4, 8, 1), atol=1e-5)


@pytest.mark.parametrize("grid,h,w", [
    (4, 4, 4), (4, 2, 2), (4, 8, 8), (4, 14, 18), (4, 1, 40), (4, 40, 1), (4, 3, 7), (4, 1, 1), (4, 8, 1),
    (16, 16, 16), (16, 8, 12), (16, 32, 32), (16, 14, 18), (16, 1, 40), (16, 40, 1), (16, 7, 37), (16, 1, 256),
])
def test_pos_resize_matches_hf(grid, h, w):
    spec = from_hf_siglip2(tiny_model())
    pos = torch.randn(grid * grid, 32, generator=torch.Generator().manual_seed(h * 100 + w))
    embed = copy.copy(spec.vision.embed)
    embed.pos_grid = grid
    ours = reference.naflex_pos_embedding(embed, pos, h, w)
    assert ours.shape == (h * w, 32) and ours.dtype == pos.dtype
    assert (ours.double() - definition_resize(pos, grid, h, w)).abs().max().item() <= 1e-5
    if (h, w) == (grid, grid):  # the native grid: positions used as they are
        assert torch.allclose(ours, pos, rtol=0, atol=1e-6)
    if w == 1 and h != grid and hf_resize_wrong_for_width_1():
        pytest.skip("this transformers resizes with F.interpolate, whose CPU antialias kernel is wrong for width 1")
    assert (ours - hf_resize(pos, grid, h, w)).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_pos_resize_every_small_shape():
    """All grids up to 24 x 24 from G = 4, against the written-out definition."""
    spec = from_hf_siglip2(tiny_model())
    pos = torch.randn(16, 8, generator=torch.Generator().manual_seed(11))
    for h in range(1, 25):
        for w in range(1, 25):
            ours = reference.naflex_pos_embedding(spec.vision.embed, pos, h, w)
            assert (ours.double() - definition_resize(pos, 4, h, w)).abs().max().item() <= 1e-5, (h, w)


@pytest.mark.parametrize("h,w", [(4, 4), (2, 3), (14, 18), (1, 40)])
def test_pos_resize_keeps_dtype(h, w):
    """Computed in fp32, cast back (HF 5.24 always resizes in fp32; older versions on CPU too)."""
    spec = from_hf_siglip2(tiny_model())
    pos = torch.randn(16, 32, generator=torch.Generator().manual_seed(7)).bfloat16()
    ours = reference.naflex_pos_embedding(spec.vision.embed, pos, h, w)
    ref = hf_resize(pos, 4, h, w)
    assert ours.dtype == torch.bfloat16
    # fp32 sums in a different order may round to a neighbouring bf16 value, nothing more
    assert torch.allclose(ours.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
    assert (ours == ref).float().mean().item() >= 0.95


def test_spec_layout():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    spec = from_hf_siglip2(model)
    v, t = spec.vision, spec.text
    assert spec.family == "hf_siglip2" and spec.logit_bias is not None
    assert (v.embed.pos_grid, v.embed.image_size, v.embed.patch_size, v.seq_len) == (4, 32, 8, 16)
    assert v.pos_embedding.shape == (16, 64) and v.embed.weight.shape == (64, v.embed.patch_dim)
    assert (v.pooling, v.mask, v.class_embedding, v.pre_ln) == ("map", "none", None, None)
    assert (t.pooling, t.mask, t.context_length, t.embed.vocab_size) == ("last", "none", 12, 100)
    # the spec's (c, ph, pw) weight on a (c, ph, pw) patch equals HF's Linear on the same patch in (ph, pw, c)
    patch = torch.randn(CHANNELS, PATCH, PATCH, generator=torch.Generator().manual_seed(0))
    ours = torch.nn.functional.linear(patch.reshape(1, -1), v.embed.weight, v.embed.bias)
    with torch.no_grad():
        ref = model.vision_model.embeddings.patch_embedding(patch.permute(1, 2, 0).reshape(1, -1))
    assert rel_err(ours, ref) <= 1e-6
    # the user's model is untouched and shares no storage with the spec
    v.blocks[0].qkv.weight.add_(1.0)
    v.embed.weight.add_(1.0)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


CASES = {
    "same-shape-no-padding": lambda: patch_sequence([(3, 5)] * 3, 15),
    "same-shape-padded": lambda: patch_sequence([(3, 5)] * 3, 20, seed=1),
    "native-grid": lambda: patch_sequence([(4, 4)] * 2, 16, seed=2),
    "mixed-padded": lambda: patch_sequence([(2, 7), (5, 3), (4, 4), (1, 9), (6, 6)], 36, seed=3),
    "processor-mixed": lambda: processor_sequence([(37, 53), (64, 20), (30, 30), (13, 90), (200, 150)], 24),
    "processor-no-padding": lambda: processor_sequence([(32, 32), (50, 50)], 16, seed=4),
    "processor-one-image": lambda: processor_sequence([(120, 41)], 64, seed=5),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_image_features_match_hf(case, attn):
    model = tiny_model(attn=attn)
    spec = from_hf_siglip2(model)
    seq = CASES[case]()
    hw = seq.spatial_shapes.prod(-1)
    assert torch.equal(seq.pixel_attention_mask.sum(-1).long(), hw)
    if case.endswith("no-padding") or case == "native-grid":
        assert (hw == seq.pixel_values.shape[1]).all()
    elif case != "processor-one-image":
        assert (hw < seq.pixel_values.shape[1]).any()
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=seq.pixel_values, pixel_attention_mask=seq.pixel_attention_mask,
                                       spatial_shapes=seq.spatial_shapes).pooler_output
        ours = reference.encode_image(spec, seq)
    assert ours.shape == ref.shape
    assert rel_err_rows(ours, ref) <= 1e-5


def test_width_one_images_match_hf():
    """Very tall images (a single patch column) take the reference's transposed resize."""
    if hf_resize_wrong_for_width_1():
        pytest.skip("this transformers resizes with F.interpolate, whose CPU antialias kernel is wrong for width 1")
    model = tiny_model()
    seq = patch_sequence([(6, 1), (2, 5), (12, 1)], 12, seed=12)
    with torch.no_grad():
        ours = reference.encode_image(from_hf_siglip2(model), seq)
    assert rel_err_rows(ours, hf_vision(model, seq).pooler_output) <= 1e-5


def test_valid_tokens_equal_a_run_over_them_alone():
    """The claim the reference rests on: with HF's masking, each image's valid tokens and pooled output in a
    padded mixed-shape batch equal HF run on that image alone without padding, and the reference's tokens."""
    model = tiny_model()
    spec = from_hf_siglip2(model)
    seq = patch_sequence([(2, 7), (5, 3), (1, 1), (4, 4)], 24, seed=6)
    batch = hf_vision(model, seq)
    tokens = reference.embed_patch_sequence(spec.vision, seq)
    for i, (h, w) in enumerate(seq.spatial_shapes.tolist()):
        n = h * w
        alone = hf_vision(model, PatchSequence(seq.pixel_values[i:i + 1, :n], seq.spatial_shapes[i:i + 1],
                                               seq.pixel_attention_mask[i:i + 1, :n]))
        assert rel_err(batch.last_hidden_state[i, :n], alone.last_hidden_state[0]) <= 1e-5
        assert rel_err(batch.pooler_output[i], alone.pooler_output[0]) <= 1e-5
        x = tokens[i]
        with torch.no_grad():
            for blk in spec.vision.blocks:
                x = reference.block(x, blk, spec.vision)
            x = reference.layer_norm(x, spec.vision.final_ln)
        assert x.shape == (1, n, spec.vision.width)
        assert rel_err(x[0], batch.last_hidden_state[i, :n]) <= 1e-5


@pytest.mark.parametrize("gh,gw", [(4, 4), (3, 5), (6, 2)])
def test_whole_image_tensor_equals_an_unpadded_sequence(gh, gw):
    """A NaFlex spec also takes [B, C, H, W] images: each one unpadded sequence of its (H/p, W/p) grid."""
    model = tiny_model()
    spec = from_hf_siglip2(model)
    px = torch.randn(3, CHANNELS, gh * PATCH, gw * PATCH, generator=torch.Generator().manual_seed(gh * 10 + gw))
    seq = PatchSequence(torch.stack([convert_image_to_patches(im, PATCH) for im in px]),
                        torch.tensor([[gh, gw]] * 3), torch.ones(3, gh * gw, dtype=torch.int32))
    with torch.no_grad():
        ours = reference.encode_image(spec, px)
    assert rel_err_rows(ours, hf_vision(model, seq).pooler_output) <= 1e-5
    assert rel_err_rows(ours, reference.encode_image(spec, seq)) <= 1e-6


def test_text_features_and_logits_match_hf():
    model = tiny_model()
    spec = from_hf_siglip2(model)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, 100, (5, 12), generator=g)
    ids[1, 6:] = 0  # padded to max length, as SigLIP2 is used (the pooled last token is then padding)
    ids[3, 2:] = 0
    seq = processor_sequence([(37, 53), (64, 20), (30, 30)], 24, seed=9)
    with torch.no_grad():
        txt_ref = model.get_text_features(input_ids=ids).pooler_output
        out = model(input_ids=ids, pixel_values=seq.pixel_values, pixel_attention_mask=seq.pixel_attention_mask,
                    spatial_shapes=seq.spatial_shapes)
        txt = reference.encode_text(spec, ids)
        img = reference.encode_image(spec, seq)
        per_image, per_text = reference.logits(spec, img, txt)
    assert rel_err_rows(txt, txt_ref) <= 1e-5
    assert rel_err(per_image, out.logits_per_image) <= 1e-5
    assert torch.equal(per_text, per_image.T)


def test_bad_patch_sequences_are_rejected():
    spec = from_hf_siglip2(tiny_model())
    seq = patch_sequence([(2, 3), (3, 3)], 12)
    holes = seq.pixel_attention_mask.clone()
    holes[1, 0], holes[1, 10] = 0, 1  # nine ones, not the first nine
    with pytest.raises(ValueError, match=r"image 1: .*first 9 of 12.*not that prefix"):
        reference.encode_image(spec, PatchSequence(seq.pixel_values, seq.spatial_shapes, holes))
    short = seq.pixel_attention_mask.clone()
    short[0, 5] = 0
    with pytest.raises(ValueError, match=r"image 0: .*first 6 of 12.*got 5 ones"):
        reference.encode_image(spec, PatchSequence(seq.pixel_values, seq.spatial_shapes, short))
    with pytest.raises(ValueError, match=r"image 1: spatial shape \(4, 4\) does not fit .* 12 patches"):
        reference.encode_image(spec, PatchSequence(seq.pixel_values, torch.tensor([[2, 3], [4, 4]]),
                                                   seq.pixel_attention_mask))
    fixed = to_spec(dualfuse.load("siglip-tiny"))
    with pytest.raises(ValueError, match="pos_grid is None"):
        reference.encode_image(fixed, seq)


def test_real_config_shapes():
    """google/siglip2-base-patch16-naflex on the meta device: shapes only."""
    with torch.device("meta"):
        model = Siglip2Model(Siglip2Config(vision_config=BASE_NAFLEX_VISION, text_config=BASE_NAFLEX_TEXT))
    spec = from_hf_siglip2(model)
    v, t = spec.vision, spec.text
    assert (v.embed.pos_grid, v.embed.image_size, v.seq_len, v.embed.patch_dim) == (16, 256, 256, 768)
    assert (v.width, v.heads, v.mlp_dim, v.num_layers, v.activation) == (768, 12, 3072, 12, "gelu_tanh")
    assert (t.embed.vocab_size, t.context_length, t.width, t.num_layers) == (256000, 64, 768, 12)
    assert spec.embed_dim == 768 and v.final_ln.eps == 1e-6
