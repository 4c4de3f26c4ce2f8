"""`dualfuse calibrate`: time the fused executor's Triton and library choices (and the fused vs graph executors)
for a model's call shapes on this card, once; merged into the card's calibration cache (dualfuse.calibration),
which ``gemm_impl="auto"`` and ``executor="auto"`` read."""
from __future__ import annotations

HELP = "calibrate the fused executor's Triton / cuBLAS / SDPA choices and executor 'auto' on this card (GPU)"


def parse_shapes(text: str, ctx: int | None = None) -> list[tuple[int, int, int]]:
    """``"1x1,256x0,0x1024x77"`` -> [(images, texts, text_len)]; the text length defaults to ``ctx``."""
    shapes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            nums = [int(x) for x in part.lower().split("x")]
        except ValueError:
            nums = []
        if len(nums) not in (2, 3) or min(nums) < 0 or nums[0] + nums[1] == 0 or (len(nums) == 2 and ctx is None):
            raise ValueError(f"--shapes: expected IMAGESxTEXTS[xTEXT_LEN] items (e.g. 1x1,256x0,0x1024), got {part!r}")
        shapes.append((nums[0], nums[1], nums[2] if len(nums) == 3 else ctx))
    if not shapes:
        raise ValueError("--shapes: no shapes given")
    return shapes


DEFAULT_SHAPES = "1x1,1x0,32x32,256x0,0x1024"


def default_shapes(spec) -> str:
    """DEFAULT_SHAPES, less the items a single tower cannot run (texts for a vision tower, images for a text one)."""
    items = [i for i in DEFAULT_SHAPES.split(",")
             if (spec.vision is not None or i.startswith("0x")) and (spec.text is not None or i.endswith("x0"))]
    return ",".join(items)


def add_arguments(parser) -> None:
    parser.description = HELP
    parser.add_argument("--model", default="clip-vit-b-32", metavar="NAME|PATH",
                        help="preset name, open_clip:ARCH, HF model directory or open_clip checkpoint")
    parser.add_argument("--arch", default=None, help="open_clip architecture of a checkpoint file")
    parser.add_argument("--shapes", default=None, metavar="IxT[xL],...",
                        help=f"call shapes: images x texts [x text length] (default {DEFAULT_SHAPES}; for a single "
                             "tower the items of that tower alone; text length: the model's context length)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--device", default=None, help="default cuda")
    parser.add_argument("--fresh", action="store_true",
                        help="start from an empty calibration (default: keep the timings already in the file and "
                             "take only the missing ones)")
    parser.add_argument("--no-calls", action="store_true",
                        help="time the stages only, not the fused and graph executors end to end (executor 'auto')")
    parser.add_argument("--cache", default=None, metavar="PATH", help="this calibration file instead of the card's")
    parser.add_argument("--json", default=None, help="also write the result (choices, call timings) here")


def run(args) -> int:
    from ..adapters import to_spec
    from ..executors.fused.calibrate import calibrate
    from ..presets import load
    from ..util import write_json

    source = load(args.model, arch=args.arch)
    spec = to_spec(source)
    # a single vision tower has no text length: IxT items need none (calibrate() refuses texts for it)
    shapes = parse_shapes(args.shapes if args.shapes is not None else default_shapes(spec),
                          spec.text.context_length if spec.text is not None else 1)
    res = calibrate(source, shapes, dtype=args.dtype, device=args.device, path=args.cache, calls=not args.no_calls,
                    fresh=args.fresh,
                    log=print)
    for key, choices in res.choices.items():
        print(f"{key}: " + ("; ".join(f"{'+'.join(s)} -> {'/'.join(i)}" for s, i, _ in choices)
                            if choices else "all stages on Triton"))
    for fam, row in res.calls.items():
        print(f"{fam}: fused {row['fused']:.3f} ms, graph {row['graph']:.3f} ms")
    print(f"calibration written to {res.path} ({res.seconds:.1f} s, {res.stages_timed} timings)")
    if args.json:
        write_json(args.json, res.to_dict())
    return 0
