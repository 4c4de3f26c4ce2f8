"""Debug aid: run the fused executor's launches one by one (no graph), synchronizing after each, and
report the first stage that faults or produces non-finite values. Then compare with the reference.

    python benchmarks/check_fused.py --model clip-vit-b-32 --image-batch 1 --text-batch 1
"""
import argparse
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="clip-vit-b-32")
    p.add_argument("--image-batch", type=int, default=1)
    p.add_argument("--text-batch", type=int, default=1)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--graph", action="store_true", help="also run the captured graph and compare with the step-by-step result")
    args = p.parse_args(argv)
    import dualfuse
    from dualfuse import reference
    from dualfuse.bench import random_inputs
    from dualfuse.executors.fused import FusedExecutor

    model = dualfuse.load(args.model)
    dtype = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32)[args.dtype]
    ex = FusedExecutor(model, dtype=dtype, device="cuda", use_graph=False)
    spec = ex.spec
    (px, ids), = random_inputs(spec, args.image_batch, args.text_batch, None, sets=1, seed=0, device="cuda", dtype=dtype)
    r = ex.runner(args.image_batch, args.text_batch, ids.shape[1])
    if args.image_batch:
        r.buf["vision"].input.copy_(px)
    if args.text_batch:
        r.buf["text"].input.copy_(ids)
    for i, (stage, op) in enumerate(zip(r.plan.stages, r.ops)):
        try:
            op()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            print(f"stage {i} {stage.kind} {[s.label for s in stage.steps]} FAILED: {e}")
            return 1
        for tower, b in r.buf.items():
            if not torch.isfinite(b.x).all():
                print(f"stage {i} {stage.kind} {[s.label for s in stage.steps]}: non-finite {tower} residual")
    img = r.buf["vision"].output.float() if args.image_batch else None
    txt = r.buf["text"].output.float() if args.text_batch else None
    ref = spec.to("cuda", torch.float32)
    for name, out, want in (("image", img, reference.encode_image(ref, px.float()) if img is not None else None),
                            ("text", txt, reference.encode_text(ref, ids) if txt is not None else None)):
        if out is None:
            continue
        cos = torch.nn.functional.cosine_similarity(out, want, dim=-1).min().item()
        rel = ((out - want).norm() / want.norm()).item()
        print(f"{name}: min cosine {cos:.6f}, rel err {rel:.2e}")
    print(f"{len(r.ops)} launches ok")
    if args.graph:
        ex_g = FusedExecutor(model, dtype=dtype, device="cuda", use_graph=True)
        for i in range(3):
            gi, gt = ex_g.encode(px, ids)
            torch.cuda.synchronize()
            print(f"graph replay {i}: image max diff {(gi.float() - img).abs().max().item() if img is not None else 0:.3e}, "
                  f"text max diff {(gt.float() - txt).abs().max().item() if txt is not None else 0:.3e}")
    return 0




def stress(argv=None):
    """Repeated encode calls over rotating inputs, as dualfuse bench does; report the first failing call."""
    import dualfuse
    from dualfuse import executors
    from dualfuse.bench import random_inputs

    model = dualfuse.load("clip-vit-b-32")
    for use_graph in (False, True):
        ex = executors.get("fused", model, dtype=torch.float16, device="cuda", use_graph=use_graph)
        inputs = random_inputs(ex.spec, 1, 1, None, sets=4, seed=0, device="cuda", dtype=torch.float16)
        for i in range(40):
            try:
                ex.encode(*inputs[i % 4])
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                print(f"use_graph={use_graph}: call {i} (input set {i % 4}) failed: {e}")
                return 1
        print(f"use_graph={use_graph}: 40 calls ok")
    return 0


if __name__ == "__main__":
    sys.exit(stress() if "--stress" in sys.argv else main())
