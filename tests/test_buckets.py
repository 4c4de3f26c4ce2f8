"""Text lengths in buckets: a causal text tower pooled at a position padding cannot move runs every length up to
a bucket on one runner per bucket; the embeddings are those of the unpadded call. SigLIP keeps exact lengths.
Also warmup() and the first-call times in build_times."""
import dataclasses
import warnings

import pytest
import torch

import dualfuse
from dualfuse import reference
from dualfuse.adapters import to_spec
from dualfuse.executors.fused import FusedExecutor

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BUCKETS = (4, 8, 12)  # the tiny models' context length is 16: buckets 4, 8, 12, 16


def _load(name):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip")
    return dualfuse.load(name)


def _texts(spec, n, length, seed=0):
    """n texts of ``length`` tokens: EOS at different positions (and one row without EOS), ids above 0."""
    t = spec.text
    g = torch.Generator().manual_seed(seed)
    vocab = t.embed.vocab_size
    eos = t.eos_token_id if t.eos_token_id is not None else vocab - 1
    ids = torch.randint(3, vocab - 1, (n, length), generator=g)
    ids[ids == eos] = 3
    for i in range(n - 1):
        pos = (1 + 2 * i) % length
        ids[i, pos] = eos
        ids[i, pos + 1:] = 1
    if n > 1:
        ids[n - 1, -1] = vocab - 1  # the last row: its maximum id at the very end (argmax), no EOS before it
    return ids


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name,pooling", [("clip-tiny", "first_eos"), ("open_clip-tiny", "argmax"),
                                          ("metaclip2-tiny", "first_eos")])
@pytest.mark.slow
def test_bucketed_texts_give_the_unpadded_embeddings(name, pooling):
    model = _load(name)
    spec = to_spec(model)
    assert spec.text.pooling == pooling and spec.text.mask == "causal"
    on = FusedExecutor(model, dtype=torch.float32, device=DEV, text_buckets=BUCKETS)
    off = FusedExecutor(model, dtype=torch.float32, device=DEV, text_buckets=None)
    ctx = spec.text.context_length
    assert on.text_buckets == BUCKETS + (ctx,) and off.text_buckets is None
    # the pad id cannot be picked by the pooling
    if pooling == "first_eos":
        assert on.text_pad_id != spec.text.eos_token_id
    else:
        assert on.text_pad_id == 0  # never above a row's maximum; a tie keeps the earlier position
    for length in (3, 5, 9):
        ids = _texts(spec, 3, length, seed=length).to(DEV)
        got, exact = on.encode_text(ids), off.encode_text(ids)
        assert list(on.runners)[-1] == (0, 3, on.text_bucket(length)) and on.text_bucket(length) > length
        assert list(off.runners)[-1] == (0, 3, length)
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)  # fp32: same to rounding
        assert _rel(got, reference.encode_text(spec, ids.cpu()).to(DEV)) < 1e-4  # the unpadded fp32 reference
    # the full call pads too, next to the images
    px = torch.randn(2, 3, spec.vision.embed.image_size, spec.vision.embed.image_size, device=DEV)
    ids = _texts(spec, 2, 6, seed=1).to(DEV)
    (i1, t1), (i2, t2) = on.encode(px, ids), off.encode(px, ids)
    assert (2, 2, 8) in on.runners and (2, 2, 6) in off.runners
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(i1, i2, rtol=1e-5, atol=1e-5)
    assert on.plan(2, 2, 6) == on.runners[(2, 2, 8)].plan


@pytest.mark.slow
def test_a_stream_of_12_lengths_builds_one_runner_per_bucket():
    model = _load("clip-tiny")
    spec = to_spec(model)
    ex = FusedExecutor(model, dtype=torch.float32, device=DEV, text_buckets=BUCKETS)
    built = set()
    for length in range(1, 13):
        ex.encode_text(_texts(spec, 2, length, seed=length).to(DEV))
        built |= set(ex.runners)
    assert len(built) <= len(ex.text_buckets) and built == {(0, 2, 4), (0, 2, 8), (0, 2, 12)}
    assert set(ex.build_times) == built
    # the default buckets (16, 32, 48, 64, 77) capped at the context length 16: one runner for every length
    default = FusedExecutor(model, dtype=torch.float32, device=DEV)
    assert default.text_buckets == (16,) and default.text_bucket(5) == 16 and default.text_bucket(16) == 16
    assert FusedExecutor.DEFAULT_TEXT_BUCKETS == (16, 32, 48, 64, 77)


@pytest.mark.slow
def test_siglip_text_keeps_its_exact_length():
    model = _load("siglip-tiny")
    spec = to_spec(model)
    ex = FusedExecutor(model, dtype=torch.float32, device=DEV)  # default "auto": off for SigLIP
    assert ex.text_buckets is None and "bidirectional" in ex.text_buckets_off
    assert ex.text_bucket(5) == 5
    ids = _texts(spec, 2, 5).to(DEV)
    ex.encode_text(ids)
    assert list(ex.runners) == [(0, 2, 5)]
    with pytest.warns(UserWarning, match="text_buckets ignored: the text tower's attention is bidirectional"):
        asked = FusedExecutor(model, dtype=torch.float32, device=DEV, text_buckets=(4, 8))
    assert asked.text_buckets is None


def test_text_bucket_options_and_pad_ids():
    model = _load("clip-tiny")
    spec = to_spec(model)
    ex = FusedExecutor(spec, dtype=torch.float32, device=DEV, text_buckets=[12, 4, 40, 4])
    assert ex.text_buckets == (4, 12, 16)  # sorted, deduplicated, capped at the context length, ctx added
    assert [ex.text_bucket(n) for n in (1, 4, 5, 12, 13, 16)] == [4, 4, 12, 12, 16, 16]
    for bad in ((0, 8), (4.0,), "many", (True,)):
        with pytest.raises(ValueError, match="text_buckets"):
            FusedExecutor(spec, dtype=torch.float32, device=DEV, text_buckets=bad)
    for off in (None, False, ()):
        assert FusedExecutor(spec, dtype=torch.float32, device=DEV, text_buckets=off).text_buckets is None
    # first-EOS pooling with EOS id 0: the pad id is 1 (an EOS pad would become the pooled position)
    eos0 = dataclasses.replace(spec, text=dataclasses.replace(spec.text, eos_token_id=0))
    assert FusedExecutor(eos0, dtype=torch.float32, device=DEV).text_pad_id == 1
    assert ex.text_pad_id == 0 and spec.text.eos_token_id != 0
    # a bidirectional text tower pooled at the class token: exact lengths (padding is visible to position 0)
    bidi = dataclasses.replace(spec, text=dataclasses.replace(spec.text, mask="none", pooling="cls"))
    assert FusedExecutor(bidi, dtype=torch.float32, device=DEV).text_buckets is None


@pytest.mark.slow
def test_warmup_builds_runners_up_front_and_records_first_call_times():
    model = _load("clip-tiny")
    spec = to_spec(model)
    fused = dualfuse.fuse(model, dtype=torch.float32, device=DEV, text_buckets=BUCKETS,
                          warmup=[(1, 2, 5), (1, 0, None), (2, 0, None, "uint8"), (0, 3, 12)])
    ex = fused.executor
    want = {(1, 2, 8), (1, 0, 16), (2, 0, 16, "uint8"), (0, 3, 12)}
    assert set(ex.runners) == want and set(ex.build_times) == want
    assert all(t > 0 for t in ex.build_times.values())
    before = dict(ex.build_times)
    ids = _texts(spec, 2, 7).to(DEV)
    px = torch.randn(1, 3, 32, 32, device=DEV)
    fused.executor.encode(px, ids)  # length 7 -> bucket 8: the warmed runner, nothing new built
    assert set(ex.runners) == want and ex.build_times == before
    again = ex.warmup([(1, 2, 6)])
    assert again == {(1, 2, 8): before[(1, 2, 8)]}
    for bad, match in (([(1,)], "expected shapes"), ([(0, 0, 4)], "not both 0"), ([(1, 1, 17)], r"\[1, 16\]"),
                       ([(1, 1, 4, "rgb")], "'float' or 'uint8'"), ([(0, 1, 4, "uint8")], "with images >= 1"),
                       (5, "list of")):
        with pytest.raises(ValueError, match=match):
            ex.warmup(bad)
    with pytest.raises(ValueError, match="max_graphs=2"):
        FusedExecutor(spec, dtype=torch.float32, device=DEV, max_graphs=2, text_buckets=BUCKETS,
                      warmup=[(1, 1, 4), (1, 1, 8), (1, 1, 12)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = FusedExecutor(spec, dtype=torch.float32, device=DEV, warmup=(1, 1, 16))  # one shape as a tuple
    assert set(one.runners) == {(1, 1, 16)}
