"""`dualfuse embed`: embed an image corpus (and its captions) into Parquet shards, on one GPU or over Ray Data.

    dualfuse embed --model clip-vit-b-32 --images photos/ --out emb/ [--captions captions.tsv] [--batch 256]
    dualfuse embed --model M --images data.parquet --text-column caption --out emb/
    dualfuse embed --model M --images 'shards-{000..099}.tar' --text-column txt --out emb/ --engine ray
    dualfuse embed ... --index faiss        # then: dualfuse search --index emb/ --text "a dog"

The library call is dualfuse.embed.run_embed (guide: docs/embed.md). A re-run with the same model and input
resumes: finished shards are kept. Unreadable or corrupt images are skipped and listed in DIR/errors.tsv.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME|PATH", help="preset name or HF model directory")
    parser.add_argument("--images", required=True, metavar="PATH",
                        help="a folder (recursive: jpg, png, webp), a text file of paths, Parquet (file or folder) "
                             "with an image-bytes column, or WebDataset tar shards (file, folder, {000..009} pattern)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (Parquet shards, manifest, errors)")
    cap = parser.add_mutually_exclusive_group()
    cap.add_argument("--captions", metavar="FILE", help="path<TAB>caption lines (folder / list inputs)")
    cap.add_argument("--text-column", dest="text_column", metavar="C",
                     help="caption column (Parquet) or caption member extension (tar, e.g. txt)")
    parser.add_argument("--image-column", dest="image_column", default="image", help="Parquet image-bytes column")
    parser.add_argument("--key-column", dest="key_column", default=None, help="Parquet column naming each row")
    parser.add_argument("--batch", type=int, default=256, help="images per model call (default 256)")
    parser.add_argument("--engine", default="local", choices=["local", "ray"], help="local (default) or ray")
    parser.add_argument("--index", default="none", choices=["none", "faiss"], help="build a FAISS index at the end")
    parser.add_argument("--executor", default="fused", help="executor (default fused: takes uint8 frames)")
    parser.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                        help="default fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (local engine)")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "gpu"],
                        help="cpu: PIL on worker threads (default); gpu: nvJPEG batches (torchvision)")
    parser.add_argument("--workers", type=int, default=None, help="decode threads (default min(16, CPUs))")
    parser.add_argument("--shard-size", dest="shard_size", type=int, default=10_000, help="images per output shard")
    parser.add_argument("--ray-address", dest="ray_address", default=None, help="an existing Ray cluster")
    parser.add_argument("--ray-gpus", dest="ray_gpus", type=int, default=None,
                        help="model actors (one GPU each; default all GPUs of the cluster; 0: one CPU actor)")
    parser.add_argument("--ray-cpus", dest="ray_cpus", type=int, default=None,
                        help="CPUs of the Ray started for the run (default all; not with --ray-address)")
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N images (folders, lists, Parquet; not tar shards)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the summary here")


class _Bar:
    def __init__(self, bar):
        self.bar, self.task = bar, None

    def start(self, total):
        self.task = self.bar.add_task("embed", total=total, failed=0)

    def advance(self, images, failures):
        t = self.bar.tasks[self.task]
        self.bar.update(self.task, advance=images + failures, failed=t.fields["failed"] + failures)


def run(args) -> int:
    import warnings

    from PIL import Image
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn)
    from rich.table import Table
    from rich.text import Text

    from ..embed import EmbedConfig, run_embed
    from ..util import write_json

    cfg = EmbedConfig(model=args.model, images=args.images, out=args.out, captions=args.captions,
                      text_column=args.text_column, image_column=args.image_column, key_column=args.key_column,
                      batch=args.batch, engine=args.engine, index=args.index, executor=args.executor,
                      dtype=args.dtype, device=args.device, decode=args.decode, workers=args.workers,
                      shard_size=args.shard_size, ray_address=args.ray_address, ray_gpus=args.ray_gpus,
                      ray_cpus=args.ray_cpus,
                      limit=args.limit)
    console = Console(stderr=True)
    # an image above PIL's first pixel limit is decoded all the same (above twice it, skipped and reported); its
    # warning, one per size, would only tear the progress bar
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f} images/s" if task.speed else "- images/s", style="cyan")

    with Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), Speed(),
                  TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        result = run_embed(cfg, progress=_Bar(bar))
    out = Console(markup=False)  # keys, notes and paths are printed as they are: "[x]" in a file name is no style
    d = result.to_dict()
    out.print(f"{result.model} · {result.executor} · {result.dtype} · {result.card} · engine {result.engine} · "
              f"decode {result.decode} · batch {result.batch}")
    out.print(f"{result.images} images, {result.failures} failures, {result.wall_s:.2f} s "
              f"({result.images_per_s:.1f} images/s; setup {result.setup_s:.1f} s before it)")
    table = Table(title="seconds per stage")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, s in result.stages.items():
        table.add_row(stage, f"{s:.3f}")
    out.print(table)
    out.print("(read, decode: summed over the decode threads" + (" and Ray tasks" if result.engine == "ray" else "")
              + "; they can exceed the wall time)")
    for e in result.errors[:10]:
        out.print(f"skipped {e.key}: {e.reason}")
    if len(result.errors) > 10:
        out.print(f"... {len(result.errors) - 10} more in {args.out}/errors.tsv")
    for n in result.notes:
        out.print(f"note: {n}")
    if result.index:
        out.print(f"FAISS index: {result.index}")
    if args.json:
        write_json(args.json, d)
    return 0
