"""Input validation at the executor boundary: every bad input gets a ValueError naming what was expected."""
import pytest
import torch

import dualfuse
from dualfuse import executors
from dualfuse.executors import validate_inputs

# clip-tiny: 3 x 32 x 32 images, vocabulary 100, context 16
_EX = {}


def ex():
    if "ex" not in _EX:
        _EX["ex"] = executors.get("eager", dualfuse.load("clip-tiny"), dtype="fp32", device="cpu")
    return _EX["ex"]


def px(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device) if dtype.is_floating_point else \
        torch.randint(0, 255, shape, dtype=dtype, device=device)


def ids(*shape, dtype=torch.long, device="cpu", high=99):
    return torch.randint(0, high, shape, device=device).to(dtype)


GOOD_PX, GOOD_IDS = (2, 3, 32, 32), (2, 16)


@pytest.mark.parametrize("bad,match", [
    (px(2, 3, 64, 64), r"expected images of 32x32 \(\[batch, 3, 32, 32\]\), got 64x64"),
    (px(2, 3, 32, 16), r"expected images of 32x32 .*got 32x16"),
    (px(2, 1, 32, 32), r"expected 3 channels .*got 1 channels"),
    (px(3, 32, 32), r"expected a 4-D tensor \[batch, 3, 32, 32\], got 3-D shape \[3, 32, 32\]"),
    (px(1, 1, 3, 32, 32), r"4-D tensor .*got 5-D"),
    (px(2, 3, 32, 32, dtype=torch.uint8), r"expected a floating-point tensor .*got torch.uint8"),
    (px(2, 3, 32, 32, dtype=torch.int64), r"floating-point .*got torch.int64"),
    (px(0, 3, 32, 32), r"pixel_values: empty batch: expected \[batch, 3, 32, 32\] with batch >= 1, got \[0, 3, 32, 32\]"),
    (px(2, 3, 32, 32, device="meta"), r"pixel_values: expected a tensor on cpu \(the executor's device\), got one on meta"),
    ([[0.0] * 32] * 32, r"pixel_values: expected a torch.Tensor of shape \[batch, 3, 32, 32\], got a list"),
])
def test_bad_pixels(bad, match):
    with pytest.raises(ValueError, match=match):
        ex().encode(bad, ids(*GOOD_IDS))
    with pytest.raises(ValueError, match=match):
        ex().encode_image(bad)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[5, -1, 7]]), r"token id -1 is out of the vocabulary: expected ids in \[0, 100\), got min -1, max 7"),
    (torch.tensor([[5, 100, 7]]), r"token id 100 is out of the vocabulary: expected ids in \[0, 100\), got min 5, max 100"),
    (ids(2, 17), r"sequences of 17 tokens are longer than the model's context length 16"),
    (ids(2, 16).float(), r"expected an integer tensor of token ids, got torch.float32"),
    (ids(2, 16).bool(), r"integer tensor of token ids, got torch.bool"),
    (ids(16), r"expected a 2-D tensor \[batch, length\] with 1 <= length <= 16, got 1-D shape \[16\]"),
    (ids(0, 16), r"input_ids: empty batch"),
    (ids(2, 0), r"input_ids: empty sequences"),
    (ids(2, 16, device="meta"), r"input_ids: expected a tensor on cpu .*got one on meta"),
    ([[1, 2, 3]], r"input_ids: expected a torch.Tensor of token ids .*got a list"),
])
def test_bad_ids(bad, match):
    with pytest.raises(ValueError, match=match):
        ex().encode(px(*GOOD_PX), bad)
    with pytest.raises(ValueError, match=match):
        ex().encode_text(bad)


def test_missing_inputs():
    with pytest.raises(ValueError, match="encode needs both pixel_values and input_ids"):
        ex().encode(None, ids(*GOOD_IDS))
    with pytest.raises(ValueError, match="pixel_values: expected a tensor, got None"):
        ex().encode_image(None)
    with pytest.raises(ValueError, match="input_ids: expected a tensor, got None"):
        ex().encode_text(None)


def test_bad_embeddings_for_logits():
    img = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"text_embeds: expected a tensor \[batch, 32\], got a torch.float32 tensor of shape \[2, 7\]"):
        ex().logits(img, torch.randn(2, 7))


def test_any_float_pixels_are_cast_to_the_executor_dtype():
    half = px(*GOOD_PX).half()
    out = ex().encode_image(half)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ex().encode_image(half.float()), rtol=1e-6, atol=1e-6)
    img, _ = validate_inputs(ex().spec, half.double(), None, device="cpu", dtype=torch.bfloat16)
    assert img.dtype == torch.bfloat16


def test_any_integer_ids_are_accepted_and_shorter_sequences_too():
    t = ids(2, 16)
    want = ex().encode_text(t)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.allclose(ex().encode_text(t.to(dtype)), want)
    _, out = validate_inputs(ex().spec, None, t.int(), device="cpu", dtype=torch.float32)
    assert out.dtype == torch.long
    assert ex().encode_text(ids(3, 5)).shape == (3, 32)


def test_id_range_check_can_be_skipped():
    _, out = validate_inputs(ex().spec, None, torch.tensor([[100]]), device="cpu", dtype=torch.float32,
                             check_ids=False)
    assert out.tolist() == [[100]]


def test_validation_is_the_same_for_every_executor_here():
    """compile shares the boundary (no compilation happens: validation fails first)."""
    c = executors.get("compile", dualfuse.load("siglip-tiny"), dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match=r"sequences of 13 tokens are longer than the model's context length 12"):
        c.encode(torch.randn(1, 3, 32, 32), torch.zeros(1, 13, dtype=torch.long))
