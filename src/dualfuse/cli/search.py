"""`dualfuse search`: the nearest images of an embedded corpus to a text or an image (a FAISS index).

    dualfuse search --index emb/ --text "a dog on a beach" [--k 10]
    dualfuse search --index emb/ --image query.jpg

The index folder is the --out of `dualfuse embed ... --index faiss`; the query is embedded with the model
recorded there (its name, dtype and executor).
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--index", required=True, metavar="DIR", help="an output folder of dualfuse embed --index faiss")
    q = parser.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a text query")
    q.add_argument("--image", metavar="PATH", help="an image query")
    parser.add_argument("--k", type=int, default=10, help="results (default 10)")
    parser.add_argument("--device", default=None, help="where the query is embedded (default cuda if present)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")


def run(args) -> int:
    import json

    from ..embed.search import search

    result = search(args.index, text=args.text, image=args.image, k=args.k, device=args.device)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    for n in result.notes:
        print(f"note: {n}")
    for h in result.hits:
        print(f"{h.score:.4f}\t{h.key}")
    return 0
