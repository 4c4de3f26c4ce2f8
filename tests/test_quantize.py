"""Weight-only int8 in the fused executor (dualfuse.quantize, ``fuse(model, weights="int8")``): parity with the fp32
source model within the quantized criteria on every family's tiny config (CPU: Triton interpreter), image-only and
text-only calls, uint8 frames, LayerNorm folding on and off, only int8 weights kept, weight bytes, bad options, and
the --weights plumbing of `dualfuse bench` / `dualfuse eval` / benchmarks/int8.py."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dualfuse
from dualfuse import cli, executors, presets
from dualfuse.adapters import family_of
from dualfuse.bench import random_inputs
from dualfuse.evaluate import similarity, zero_shot_agreement
from dualfuse.executors.base import source_forward
from dualfuse.quantize import COSINE_MIN, REL_ERR_MAX, weight_bytes
from dualfuse.adapters import to_spec
from dualfuse.spec import gemm_linears

ROOT = Path(__file__).resolve().parents[1]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FAMILIES = ["clip-tiny", "siglip-tiny", "metaclip2-tiny", "siglip2-tiny", "open_clip-tiny", "open_clip-siglip-tiny"]


def _load(name, seed=3):
    if name.startswith("open_clip"):
        pytest.importorskip("open_clip")
        pytest.importorskip("timm")
    return presets.load(name, seed=seed)


def _metrics(got, want):
    g, w = got.double().cpu(), want.double().cpu()
    cos = torch.nn.functional.cosine_similarity(g, w, dim=-1).min().item()
    return cos, ((g - w).norm() / w.norm()).item()


def _assert_parity(got, want, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    cos, rel = _metrics(got, want)
    assert cos >= COSINE_MIN and rel <= REL_ERR_MAX, f"{what}: min cosine {cos:.5f}, rel err {rel:.4f}"
    return cos, rel


def _assert_only_quantized_gemm_weights(ex, fmt=torch.int8):
    """The device keeps the quantized GEMM weights only: no 16-bit copy of any of them."""
    n = scales = 0
    for name in ("vision", "text"):
        for owner, attr in gemm_linears(getattr(ex.weights, name)):
            lin = getattr(owner, attr)
            if lin is not None:
                assert lin.weight.dtype == fmt, f"{name}.{attr}: {lin.weight.dtype}"
                assert lin.weight.device.type == ex.device.type
                assert lin.bias is None or lin.bias.dtype == ex.dtype  # biases stay in the model dtype
                n += 1
                scales += lin.scale is not None and lin.scale.shape == lin.weight.shape[:1]
        assert getattr(ex.weights, name).final_ln.weight.dtype == ex.dtype
    for key, (lin, norm) in ex.folded.items():
        assert lin.weight.dtype == fmt, f"folded {key}: {lin.weight.dtype}"
        n += 1
        scales += lin.scale is not None and lin.scale.shape == lin.weight.shape[:1]
    if getattr(ex, "map_kv", None) is not None:
        assert ex.map_kv.weight.dtype == fmt
    assert n > 0 and scales >= n


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_int8_within_the_quantized_criteria(name):
    """Both towers, fp16 activations, int8 weights (LN folded: the CPU default) vs the fp32 source model: min
    cosine >= COSINE_MIN, relative error <= REL_ERR_MAX, no decisive zero-shot flip; and really quantized (not the
    fp16 result: its error is several times smaller)."""
    model = _load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # covered: no fallback
        fused = dualfuse.fuse(model, dtype=torch.float16, weights="int8")
    ex = fused.executor
    assert ex.fallback is None and ex.weight_format == "int8" and "int8 weights" in ex.notes
    _assert_only_quantized_gemm_weights(ex)
    (px, ids), = random_inputs(ex.io, 2, 3, sets=1, seed=7)
    image_fn, text_fn = source_forward(model, family_of(model))
    with torch.no_grad():
        want_img, want_txt = image_fn(px), text_fn(ids)
    got_img, got_txt = ex.encode(px, ids)
    _assert_parity(got_img, want_img, "image")
    _, rel_txt = _assert_parity(got_txt, want_txt, "text")
    zs = zero_shot_agreement(similarity(got_img.float().cpu(), got_txt.float().cpu()),
                             similarity(want_img.float(), want_txt.float()), margin=2 * REL_ERR_MAX)
    assert zs["decisive_top1_agreement"] == 1.0, zs
    # the unquantized fused model is far closer: the int8 path was really taken
    ref16 = dualfuse.fuse(model, dtype=torch.float16).executor
    assert _metrics(ref16.encode_text(ids), want_txt)[1] < rel_txt


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
@pytest.mark.parametrize("fold_ln", [False, True])
def test_fold_ln_on_and_off_one_tower_calls(name, fold_ln):
    """Image-only and text-only calls, LayerNorms folded into the int8 GEMMs (quantized after folding, column sums
    of the dequantized weights) or not (split-K partial sums left to the LayerNorm where the GEMM splits)."""
    model = _load(name)
    ex = executors.get("fused", model, dtype=torch.float16, device=DEV, weights="int8", fold_ln=fold_ln,
                       gemm_config={"programs_per_sm": 4, "min_k_iters": 1} if not fold_ln else None)
    assert ex.fold_ln is fold_ln and bool(ex.folded) is fold_ln
    _assert_only_quantized_gemm_weights(ex)
    (px, ids), = random_inputs(ex.io, 3, 2, sets=1, seed=11)
    image_fn, text_fn = source_forward(model, family_of(model))
    with torch.no_grad():
        want_img, want_txt = image_fn(px), text_fn(ids)
    _assert_parity(ex.encode_image(px), want_img, "image only")
    _assert_parity(ex.encode_text(ids), want_txt, "text only")
    if not fold_ln:  # the int8 GEMMs that split K left scaled partial sums to the LayerNorms
        from dualfuse.kernels.gemm import GroupedLinear

        ops = [op for r in ex.runners.values() for op in r.ops if isinstance(op, GroupedLinear)]
        assert any(p.partial_sums and p.weight_scale is not None for op in ops for p in op.problems)


@pytest.mark.slow
def test_uint8_frames_with_int8_weights():
    from dualfuse.adapters._norm import OPENAI_MEAN, OPENAI_STD

    model = _load("clip-tiny")
    fused = dualfuse.fuse(model, dtype=torch.float16, device=DEV, weights="int8")
    ex = fused.executor
    s = ex.io.image_size
    nhwc = torch.randint(0, 256, (3, s, s, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    x = nhwc.permute(0, 3, 1, 2).float()
    x = (x / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    image_fn, _ = source_forward(model, family_of(model))
    with torch.no_grad():
        want = image_fn(x)
    got = ex.encode_image(nhwc.to(DEV))
    _assert_parity(got, want, "uint8 frames")
    assert any(len(k) == 4 and k[3] == "uint8" for k in ex.runners), list(ex.runners)


def test_quantize_spec_of_one_tower():
    """quantize_spec / weight_bytes of a single-tower spec (the other tower None): its GEMM linears quantized, with
    their scales in Linear.scale."""
    import dataclasses

    from dualfuse.quantize import quantize_spec

    spec = to_spec(_load("clip-tiny"))
    for keep in ("vision", "text"):
        one = dataclasses.replace(spec, **{"text" if keep == "vision" else "vision": None})
        q = quantize_spec(one, "int8")
        assert q.towers == (keep,)
        for owner, attr in gemm_linears(getattr(q, keep)):
            lin = getattr(owner, attr)
            assert lin.weight.dtype == torch.int8 and lin.scale is not None
            assert lin.scale.shape == (lin.weight.shape[0],)
        wb = weight_bytes(one, "int8")
        assert set(wb) >= {keep, "total"} and wb["total"] == wb[keep]["total"] > 0


def test_weights_option_errors():
    model = _load("clip-tiny")
    with pytest.raises(ValueError, match=r"weights must be None or one of \['fp16', 'int8', 'fp8'\]"):
        dualfuse.fuse(model, weights="int4")
    with pytest.raises(ValueError, match=r"weights must be None or one of"):
        executors.get("fused", model, weights=torch.int8)
    if DEV == "cpu" or torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ValueError, match=r"weights='fp8': .*compute capability >= 8\.9"):
            dualfuse.fuse(model, dtype=torch.float16, weights="fp8")
    ex = executors.get("fused", model, dtype=torch.float16, device=DEV, weights="fp16")
    assert ex.weight_format == "fp16"
    assert all(getattr(o, a).weight.dtype == torch.float16 and getattr(o, a).scale is None
               for o, a in gemm_linears(ex.weights.text) if getattr(o, a) is not None)


def test_weight_bytes_vit_b32_int8_about_half():
    """ViT-B/32 (meta tensors: shapes only): int8 GEMM weights + fp32 scales vs fp16, both towers and one."""
    spec = dualfuse.adapters.to_spec(presets.build_hf("clip-vit-b-32", meta=True))
    f16, q8 = weight_bytes(spec, "fp16"), weight_bytes(spec, "int8")
    assert 0.25e9 <= f16["total"] <= 0.32e9, f16["total"]  # ~0.3 GB of fp16 weights per call (DESIGN.md)
    assert q8["vision"]["linear"] * 2 == f16["vision"]["linear"]
    assert q8["vision"]["scales"] > 0 and f16["vision"]["scales"] == 0
    assert 0.5 < q8["total"] / f16["total"] < 0.56, q8["total"] / f16["total"]
    img = weight_bytes(spec, "int8", towers=("vision",))
    assert img["total"] == q8["vision"]["total"] and "text" not in img
    with pytest.raises(ValueError, match="weights must be None or one of"):
        weight_bytes(spec, "int4")


def test_executor_weight_bytes_and_dropin_rebuild():
    model = _load("siglip-tiny")
    fused = dualfuse.fuse(model, dtype=torch.float16, device=DEV, weights="int8")
    ex = fused.executor
    wb = weight_bytes(ex)
    assert wb["weights"] == "int8" and wb["dtype"] == "float16"
    assert wb["total"] < weight_bytes(ex, "fp16")["total"]
    # a rebuild keeps the fuse() options
    f32 = fused.float()
    assert f32.executor.weight_format == "int8" and f32.executor.dtype == torch.float32


@pytest.mark.slow
def test_eval_and_bench_weights_flag(tmp_path):
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--model", "clip-tiny", "--executor", "fused", "--weights", "int8", "--dtype", "fp16",
                   "--device", DEV, "--samples", "3", "--classes", "3", "--synthetic-tokenizer",
                   "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["weights_format"] == "int8" and doc["criteria"]["min_cosine"] == COSINE_MIN
    r = doc["results"][0]
    assert r["criteria"]["max_rel_err"] == REL_ERR_MAX and r["status"] == "ok", r
    assert rc == 0 and doc["passed"], r.get("failures")
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", "clip-tiny", "--executors", "eager,fused", "--weights", "int8", "--dtype",
                   "fp16", "--iters", "1", "--warmup", "0", "--no-progress", "--device", DEV, "--json", str(path)])
    doc = json.loads(path.read_text())
    rows = {r["executor"]: r for r in doc["results"]}
    assert doc["resolved"]["weights"] == "int8"
    assert "int8 weights" in rows["fused"]["notes"] and rows["fused"]["cosine_ok"], rows["fused"]
    assert "int8" not in (rows["eager"]["notes"] or "")
    assert rc == 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU pass")
def test_int8_benchmark_smoke(tmp_path):
    out = tmp_path / "int8.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8.py"), "--smoke", "--widen-convert",
                           "--int8-block-m", "16", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert len(doc["gemm"]) == 4
    assert all(r["int8"]["ok"] and r["int8-convert"]["ok"] and r["int8-bm16"]["ok"] for r in doc["gemm"])
    for row in doc["e2e"]:
        assert row["executors"]["fused int8"]["min_cosine"] >= COSINE_MIN
        assert row["executors"]["fused int8 convert"]["min_cosine"] >= COSINE_MIN
        assert row["executors"]["fused int8 bm16"]["min_cosine"] >= COSINE_MIN
        assert row["executors"]["fused int8"]["weight_bytes"] < row["executors"]["fused fp16"]["weight_bytes"]
    assert "int8 weights vs fp16" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("widen", ["bits", "convert"])
@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_fused_int8_equals_the_dequantized_reference(name, widen):
    """Unfolded LayerNorms: the fused int8 forward is the fp32 reference forward of the dequantized weights
    (quantize.dequantized_spec) up to fp16 rounding, i.e. within the unquantized fp16 criteria: only the weight
    rounding separates it from the source model. widen: how int8 weights become fp16 in the GEMMs."""
    from dualfuse import reference
    from dualfuse.quantize import dequantized_spec

    model = _load(name)
    ex = executors.get("fused", model, dtype=torch.float16, device=DEV, weights="int8", fold_ln=False,
                       gemm_config={"widen": widen})
    dq = dequantized_spec(ex.spec.to(DEV, torch.float32), "int8")
    (px, ids), = random_inputs(ex.io, 2, 3, sets=1, seed=5, device=DEV)
    with torch.no_grad():
        want_img, want_txt = reference.encode_image(dq, px), reference.encode_text(dq, ids)
    got_img, got_txt = ex.encode(px, ids)
    for got, want in ((got_img, want_img), (got_txt, want_txt)):
        cos, rel = _metrics(got, want)
        assert cos >= 0.999 and rel <= 1e-2, (cos, rel)


GPU_MODELS = ["clip-vit-b-32", "siglip-base-patch16-224"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", GPU_MODELS)
def test_gpu_real_models_int8_in_graphs(name, dtype):
    """ViT-B/32 and SigLIP B/16 (seeded random weights) with int8 (and fp8 where the card has it) weights: CUDA
    graphs, default configs (PDL, split-K deferred to the LayerNorms; fold_ln off and on), batch 1 and 8, image-only;
    against the fp32 source model within the quantized criteria and against the dequantized reference within the
    fp16 criteria (fold_ln off)."""
    from dualfuse import reference
    from dualfuse.quantize import dequantized_spec

    model = presets.load(name, seed=0).to("cuda")
    fmts = ["int8"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else [])
    image_fn, text_fn = source_forward(model, family_of(model))
    for fmt in fmts:
        for fold_ln in (False, True):
            ex = executors.get("fused", model, dtype=dtype, device="cuda", weights=fmt, fold_ln=fold_ln)
            assert ex.fallback is None and ex.weight_format == fmt
            _assert_only_quantized_gemm_weights(ex, torch.int8 if fmt == "int8" else torch.float8_e4m3fn)
            dq = dequantized_spec(ex.spec.to("cuda", torch.float32), fmt)
            for bi, bt in ((1, 1), (8, 8), (1, 0)):
                for seed in (1, 2):  # two replays of the captured graph with different inputs
                    (px, ids), = random_inputs(ex.io, bi, bt, sets=1, seed=seed, device="cuda")
                    with torch.no_grad():
                        want_img = image_fn(px)
                        got_img = ex.encode(px, ids)[0] if bt else ex.encode_image(px)
                        _assert_parity(got_img, want_img, f"{fmt} fold_ln={fold_ln} image {bi}+{bt}")
                        if bt:
                            _assert_parity(ex.encode_text(ids), text_fn(ids), f"{fmt} text {bt}")
                        if not fold_ln:
                            cos, rel = _metrics(got_img, reference.encode_image(dq, px))
                            assert cos >= 0.999 and rel <= 2e-2, (fmt, cos, rel)
            del ex
            torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_fp8_refused_below_sm89():
    if torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has fp8")
    with pytest.raises(ValueError, match=r"compute capability >= 8\.9"):
        dualfuse.fuse(_load("clip-tiny"), dtype=torch.float16, device="cuda", weights="fp8")


def test_quantize_spec_returns_a_new_spec_whose_linears_carry_their_scales():
    """dualfuse.quantize.quantize_spec: the source spec untouched; every GEMM linear of the new one holds int8
    weights with their per-channel scales (Linear.scale), which spec.to() moves but never casts."""
    from dualfuse.quantize import dequantize_weight, quantize_spec, quantize_weight

    spec = to_spec(dualfuse.load("clip-tiny"))
    q = quantize_spec(spec, "int8")
    pairs = [(getattr(o, a), getattr(p, a)) for name in ("vision", "text")
             for (o, a), (p, _) in zip(gemm_linears(getattr(spec, name)), gemm_linears(getattr(q, name)))]
    assert pairs and all(src.scale is None and src.weight.dtype == torch.float32 for src, _ in pairs)
    for src, lin in pairs:
        want_q, want_s = quantize_weight(src.weight, "int8")
        assert torch.equal(lin.weight, want_q) and torch.equal(lin.scale, want_s) and lin.bias is src.bias
        assert (dequantize_weight(lin.weight, lin.scale) - src.weight).abs().max() <= want_s.max() / 2 + 1e-6
    half = q.to(dtype=torch.float16)
    lin = half.text.blocks[0].fc1
    assert lin.weight.dtype == torch.int8 and lin.scale.dtype == torch.float32 and lin.bias.dtype == torch.float16
