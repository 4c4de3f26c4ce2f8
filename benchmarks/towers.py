"""Single image towers at batch 1, fp16: the fused tower against a CUDA graph and torch.compile of the same tower,
read as its callers read it, all in one process; then the vision part of a LLaVA-1.5-shaped VLM with and without
the fused tower.

    python benchmarks/towers.py --out benchmarks/results/<card>-<date>/towers/
    python benchmarks/towers.py --sms 8 --out ...        # inside an 8-SM green context (dualfuse.green)
    python benchmarks/towers.py --stand-in orin-nano ... # the byte-bound stand-in (dualfuse.standin): 8 SMs and
                                                         # every variant's weights host-mapped, read over PCIe

Cases (random weights of the published architectures, dualfuse.presets):
- clip-l14-336-llava: CLIP ViT-L/14-336 as LLaVA-1.5 reads it: ``hidden_states[-2]`` (fused with
  ``hidden_states=(-2,)``: the last block and the pooling never run);
- siglip-so400m-384-tokens: SigLIP so400m/14-384 patch tokens of the last layer (``last_hidden_state``, as
  PaliGemma / LLaVA-OneVision-style models read it; fused with ``pooled=False``);
- siglip-b16-224-pooled: SigLIP B/16-224 ``pooler_output``;
- clip-b32-proj: CLIPVisionModelWithProjection ViT-B/32 ``image_embeds``;
- llava-1.5-vision: ``LlavaForConditionalGeneration.model.get_image_features`` (CLIP ViT-L/14-336 tower + the
  2-layer GELU MLP projector 1024 -> 4096 -> 4096); the language model is one small layer with LLaVA-1.5's width
  (4096), since only the vision part is timed.

Variants per case: ``graph`` (the source tower's call captured in one CUDA graph), ``compile`` (torch.compile,
mode reduce-overhead, of the same call), ``fused`` (dualfuse.fuse(tower, ...); no calibration on a fresh machine, so
every step on Triton), ``fused-lib`` (the same with ``gemm_impl="library"``: cuBLAS and SDPA wherever a step allows);
the VLM case: ``eager`` and
``graph`` of the unfused vision part, ``fused`` (the fused tower swapped in, projector eager). Correctness first:
each variant's output against the fp32 source (lowest cosine over output rows); then timing (CUDA events, median
of --iters calls); a table; JSON to --out. In the stand-in every variant reads the same tower's weights from
host-mapped memory (the fused tower's packed weights; the source tower's parameters, and LLaVA's projector, for
graph, compile and eager), the fused tower takes the stand-in's GEMM configs, and each row prints its share of the
stand-in floor (the source tower's fp16 weight bytes / the measured host-mapped bandwidth; where callers read
``hidden_states[-2]`` the fused tower skips the last block, so its share is overstated by about one block's bytes).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

CASES = ("clip-l14-336-llava", "siglip-so400m-384-tokens", "siglip-b16-224-pooled", "clip-b32-proj",
         "llava-1.5-vision")
TARGETS = {"clip-l14-336-llava": 0.8, "siglip-so400m-384-tokens": 0.8, "siglip-b16-224-pooled": 0.5,
           "clip-b32-proj": 0.5}  # fused / graph at most this


def tower_case(name: str, device):
    """(source tower fp32, read(out) -> tensor, fuse kwargs, call kwargs)."""
    from dualfuse.presets import build_tower

    if name == "clip-l14-336-llava":
        return (build_tower("clip-vit-l-14-336:vision", device=device), lambda o: o.hidden_states[-2],
                dict(hidden_states=(-2,)), dict(output_hidden_states=-2))
    if name == "siglip-so400m-384-tokens":
        return (build_tower("siglip-so400m-patch14-384:vision", device=device), lambda o: o.last_hidden_state,
                dict(pooled=False), {})
    if name == "siglip-b16-224-pooled":
        return build_tower("siglip-base-patch16-224:vision", device=device), lambda o: o.pooler_output, {}, {}
    if name == "clip-b32-proj":
        return build_tower("clip-vit-b-32:vision-proj", device=device), lambda o: o.image_embeds, {}, {}
    raise KeyError(name)


def llava_case(device):
    """A LLaVA-1.5-7B-shaped model's vision part: CLIP ViT-L/14-336 + the MLP projector; a 1-layer LLM."""
    import transformers as T

    from dualfuse.presets import PRESETS

    vision = T.CLIPVisionConfig(**PRESETS["clip-vit-l-14-336"].vision)
    text = T.LlamaConfig(hidden_size=4096, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=1024, max_position_embeddings=1024)
    cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=1000, projector_hidden_act="gelu",
                        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(0)
    with torch.device(device):
        vlm = T.LlavaForConditionalGeneration(cfg)
    return vlm.eval()


def graph_of(fn, px):
    """fn(px) captured in one CUDA graph on a static input; returns call(px) -> a copy of the output."""
    static = px.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(static)

    def call(x):
        static.copy_(x)
        g.replay()
        return out.clone()

    return call


def compiled_of(fn):
    c = torch.compile(fn, mode="reduce-overhead", dynamic=False)

    def call(x):
        torch.compiler.cudagraph_mark_step_begin()
        return c(x).clone()

    return call


def min_cosine(out, ref) -> float:
    o, r = out.detach().float().reshape(-1, out.shape[-1]), ref.detach().float().reshape(-1, ref.shape[-1])
    return torch.nn.functional.cosine_similarity(o, r, dim=-1).min().item()


def time_ms(fn, px, iters: int) -> float:
    from dualfuse.timing import stats, time_calls

    for _ in range(10):
        fn(px)
    torch.cuda.synchronize()
    return stats(time_calls(lambda i: fn(px), iters, px.device))["median_ms"]


def _place(module, stand) -> int:
    """In the stand-in: the module's parameters and buffers into host-mapped memory (bytes moved); else nothing."""
    if stand is None:
        return 0
    from dualfuse.hostmem import place_module_params

    return place_module_params(module, "host")


def run_case(name, args, device, stand=None) -> dict:
    """One case; ``stand``: the stand-in's StandInInfo (weights host-mapped, its GEMM configs) or None."""
    import dualfuse
    from dualfuse import FusedConfig

    t0 = time.time()
    rec = {"case": name, "variants": {}}
    if name == "llava-1.5-vision":
        vlm = llava_case(device)
        size = vlm.config.vision_config.image_size
        px = torch.randn(1, 3, size, size, device=device)
        with torch.no_grad():
            ref = vlm.model.get_image_features(px, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output[0]
        vlm = vlm.half()
        pxh = px.half()
        fused_vlm = copy.deepcopy(vlm)  # before placing: its tower is fused, its projector placed below
        weight_bytes = sum(p.numel() * p.element_size() for m in (vlm.model.vision_tower,
                                                                 vlm.model.multi_modal_projector)
                           for p in m.parameters())
        _place(vlm.model.vision_tower, stand)
        _place(vlm.model.multi_modal_projector, stand)

        def vision_part(x, m=vlm):
            return m.model.get_image_features(x, vision_feature_layer=-2,
                                              vision_feature_select_strategy="default").pooler_output[0]

        variants = {"eager": vision_part, "graph": None}
        rec["notes"] = ("LLaVA-1.5 vision part: CLIP ViT-L/14-336 hidden_states[-2] without the class token, then "
                        "the MLP projector 1024->4096->4096; language model of one small layer (not timed)")
    else:
        src, read, fuse_kw, call_kw = tower_case(name, device)
        size = src.config.image_size
        px = torch.randn(1, 3, size, size, device=device)
        with torch.no_grad():
            ref = read(src(px, **call_kw))
        src = src.half()
        pxh = px.half()
        weight_bytes = sum(p.numel() * p.element_size() for p in src.parameters())
        fused_src = src if stand is None else copy.deepcopy(src)  # fused from device weights, then placed
        _place(src, stand)

        def vision_part(x, m=src):
            return read(m(x, **call_kw))

        variants = {"graph": None}
        if not args.no_compile:
            variants["compile"] = None
        rec["fuse_kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in fuse_kw.items()}
    with torch.no_grad():
        calls = {}
        for v in variants:
            if v == "eager":
                calls[v] = vision_part
            elif v == "graph":
                calls[v] = graph_of(vision_part, pxh)
            elif v == "compile":
                calls[v] = compiled_of(vision_part)
        # the fused towers' options: the stand-in's (its GEMM configs, no PDL) or the defaults, then the case's
        base = FusedConfig()
        if stand is not None:
            from dualfuse import standin
            from dualfuse.hostmem import place_executor

            base = standin.fused_config(stand.config, stand)
        if name == "llava-1.5-vision":  # the copy of the VLM with the one-line swap
            fused_vlm.model.vision_tower = dualfuse.fuse(fused_vlm.model.vision_tower,
                                                         config=base.with_overrides(hidden_states=(-2,)))
            if stand is not None:
                place_executor(fused_vlm.model.vision_tower.executor, "host")
                _place(fused_vlm.model.multi_modal_projector, stand)
            calls["fused"] = lambda x: vision_part(x, fused_vlm)
        else:
            fused = dualfuse.fuse(fused_src, config=base.with_overrides(**fuse_kw))
            # the same tower with every GEMM and attention step that allows it on the library (cuBLAS, SDPA):
            # what gemm_impl="auto" would pick per stage once this card is calibrated (docs/executors.md)
            fused_lib = dualfuse.fuse(fused_src, config=base.with_overrides(**fuse_kw, gemm_impl="library"))
            if stand is not None:
                place_executor(fused.executor, "host")
                place_executor(fused_lib.executor, "host")
            del fused_src
            calls["fused"] = lambda x: read(fused(x, **call_kw))
            calls["fused-lib"] = lambda x: read(fused_lib(x, **call_kw))
        for v, fn in calls.items():
            out = fn(pxh)
            cos = min_cosine(out, ref)
            rec["variants"][v] = {"min_cosine": cos, "ok": bool(cos >= 0.999)}
        for v, fn in calls.items():
            rec["variants"][v]["median_ms"] = time_ms(fn, pxh, args.iters)
    base = rec["variants"].get("graph", {}).get("median_ms")
    rec["weight_bytes"] = weight_bytes
    for v in rec["variants"].values():
        v["vs_graph"] = v["median_ms"] / base if base else None
        if stand is not None:
            v["floor_share"] = stand.share(weight_bytes, v["median_ms"])
    if name in TARGETS:
        rec["target_vs_graph"] = TARGETS[name]
        rec["meets_target"] = bool(rec["variants"]["fused"]["vs_graph"] <= TARGETS[name])
        if "fused-lib" in rec["variants"]:
            rec["meets_target_lib"] = bool(rec["variants"]["fused-lib"]["vs_graph"] <= TARGETS[name])
    rec["seconds"] = time.time() - t0
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--out", default="results", help="folder for towers[-smsN].json")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--sms", type=int, default=None, help="run inside a green context of N SMs (e.g. 8)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (the slowest to build)")
    p.add_argument("--stand-in", default=None, metavar="TARGET",
                   help="the byte-bound stand-in of a Jetson target (orin-nano, orin-nx, agx-orin, ...): its SMs "
                        "in a green context, every variant's weights host-mapped")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        print(f"towers.py: error: unknown case(s) {bad}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    green, stand = None, None
    if args.stand_in is not None and args.sms is not None:
        print("towers.py: error: --stand-in sets its own SM count: drop --sms", file=sys.stderr)
        return 2
    if args.stand_in is not None:
        from dualfuse import standin

        try:
            cfg = standin.StandInConfig(args.stand_in)
            green = standin.enter(cfg)  # before anything else touches CUDA
        except (standin.StandInError, RuntimeError) as e:  # the target, the card, the green context
            print(f"towers.py: error: {e}", file=sys.stderr)
            return 2
        args.sms = cfg.sms
    elif args.sms is not None:
        from dualfuse import green as G

        green = G.enter(args.sms)  # before anything else touches CUDA
    if not torch.cuda.is_available():
        print("towers.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    from dualfuse.environment import environment

    result = {"environment": environment(device), "green_context": green, "iters": args.iters, "cases": []}
    if args.stand_in is not None:
        try:
            stand = standin.measure(cfg, green)
        except RuntimeError as e:  # host-mapped reads differ from device reads: no stand-in on this machine
            print(f"towers.py: error: {e}", file=sys.stderr)
            return 2
        result["stand_in"] = stand.to_dict()
        for line in stand.lines():
            print(line, flush=True)
    for name in cases:
        print(f"=== {name}", flush=True)
        try:
            rec = run_case(name, args, device, stand)
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the others
            rec = {"case": name, "error": f"{type(e).__name__}: {e}"}
            print(f"    error: {rec['error']}", flush=True)
        result["cases"].append(rec)
        torch.cuda.empty_cache()
    card = result["environment"].get("card") or torch.cuda.get_device_name()
    print(f"\nimage towers, batch 1, fp16, {card}" + (f", {args.sms} SMs (green context)" if args.sms else "")
          + (f", stand-in {args.stand_in} (weights host-mapped, {stand.gbps:.1f} GB/s)" if stand else ""))
    print(f"{'case':<26} {'variant':<10} {'median ms':>10} {'vs graph':>9} {'min cos':>9} {'floor':>6}  target")
    for rec in result["cases"]:
        if "error" in rec:
            print(f"{rec['case']:<26} ERROR {rec['error'][:80]}")
            continue
        for v, r in rec["variants"].items():
            tgt = ""
            if v in ("fused", "fused-lib") and "target_vs_graph" in rec:
                met = rec["meets_target" if v == "fused" else "meets_target_lib"]
                tgt = f"<= {rec['target_vs_graph']:.1f}x: {'met' if met else 'MISSED'}"
            vs = f"{r['vs_graph']:.2f}x" if r.get("vs_graph") else ""
            share = f"{r['floor_share']:.0%}" if r.get("floor_share") else ""
            print(f"{rec['case']:<26} {v:<10} {r['median_ms']:>10.3f} {vs:>9} {r['min_cosine']:>9.5f} {share:>6}"
                  f"{'' if r['ok'] else ' BAD'}  {tgt}")
    os.makedirs(args.out, exist_ok=True)
    tag = f"-standin-{args.stand_in}" if args.stand_in else (f"-sms{args.sms}" if args.sms else "")
    path = os.path.join(args.out, f"towers{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {path}")
    return 0 if all("error" not in r and all(v["ok"] for v in r["variants"].values()) for r in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
