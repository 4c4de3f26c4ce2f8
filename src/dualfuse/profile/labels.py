"""Labels: every profiled forward runs inside ``record_function("df:forward:<i>")``; inside it, ranges name the
tower, block and op that launched each kernel.

- source-model executors (eager, streams, graph): the executor's tower functions (``image_fn``/``text_fn``) are
  wrapped in ``df:vision`` / ``df:text`` ranges, and forward pre/post hooks on the executor's *private* model
  copy open ``df:<tower>:L<i>`` ranges per block and ``df:<tower>:L<i>:<op>`` per sub-op (ln1, qkv, attn, out,
  ln2, fc1, act, fc2) and ``df:<tower>:-:<op>`` outside the blocks (patch_embed, pre_ln, pool_ln, proj, ...).
  The op names are the plan's step names (dualfuse.plan), so FLOPs and bytes come from the spec.
- compile: labels cannot go inside compiled code (TorchDynamo drops ``record_function`` there, and hooks that
  open ranges break graphs and recompile once the profiler is on). So compile is profiled as its two per-tower
  compiled graphs, ``encode_image`` then ``encode_text``, each inside a tower range (see capture.py).
- fused: each plan stage's launch runs in ``df:stage:<k>`` when the ops run outside a CUDA graph (CPU, or
  ``use_graph=False``).
- ``nvtx=True`` pushes the same names as NVTX ranges (for ``nsys profile``).
"""
from __future__ import annotations

import re

import torch

PREFIX = "df"
FORWARD = "df:forward:"


def label(tower: str, layer: int | None = None, op: str | None = None) -> str:
    if layer is None and op is None:
        return f"{PREFIX}:{tower}"
    return f"{PREFIX}:{tower}:{'-' if layer is None else f'L{layer}'}" + (f":{op}" if op else "")


def parse_label(name: str) -> dict | None:
    """'df:vision:L3:qkv' -> {kind: 'op', tower, layer, op}; None for other names."""
    if not name.startswith(PREFIX + ":"):
        return None
    parts = name.split(":")[1:]
    if not parts:
        return None
    if parts[0] == "forward":
        it = parts[1] if len(parts) > 1 else "0"
        return dict(kind="forward", iteration=int(it) if it.lstrip("-").isdigit() else -1)
    if parts[0] == "stage":
        return dict(kind="stage", stage=int(parts[1]))
    if parts[0] not in ("vision", "text"):
        return None
    d = dict(kind="tower", tower=parts[0], layer=None, op=None)
    if len(parts) > 1:
        d["kind"] = "layer"
        d["layer"] = int(parts[1][1:]) if parts[1].startswith("L") and parts[1][1:].isdigit() else None
    if len(parts) > 2:
        d["kind"] = "op"
        d["op"] = parts[2]
    return d


class Range:
    """record_function (+ NVTX when asked) as a context manager usable from hooks."""

    __slots__ = ("name", "nvtx", "_rf")

    def __init__(self, name: str, nvtx: bool = False):
        self.name, self.nvtx, self._rf = name, nvtx, None

    def __enter__(self):
        self._rf = torch.profiler.record_function(self.name)
        self._rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._rf.__exit__(*exc)
        return False


def module_labels(model, family: str, pooling_vision: str | None = None) -> tuple[list, list]:
    """(tower roots, detailed) lists of (module, tower, layer, op) for a source model.

    Tower roots are the modules that make up each tower (used alone for compile); the detailed list has the
    per-block and per-op modules. Works from parameter-free module names, so it covers HF CLIP/SigLIP and
    open_clip without depending on module classes."""
    roots, detail = [], []
    named = dict(model.named_modules())

    def tower_of(name: str) -> str | None:
        if family in ("hf_clip", "hf_siglip"):
            if name.startswith("vision_model") or name.startswith("visual_projection"):
                return "vision"
            if name.startswith("text_model") or name.startswith("text_projection"):
                return "text"
            return None
        if name.startswith("visual"):
            return "vision"
        return "text" if name else None

    if family in ("hf_clip", "hf_siglip"):
        root_names = ["vision_model", "visual_projection", "text_model", "text_projection"]
    else:
        root_names = ["visual", "token_embedding", "transformer", "ln_final"]
    for n in root_names:
        if n in named:
            roots.append((named[n], tower_of(n), None, None))

    layer_re = re.compile(r"^(.*\.)?(layers|resblocks)\.(\d+)$")
    in_layer = {"layer_norm1": "ln1", "ln_1": "ln1", "self_attn": "attn", "attn": "attn",
                "self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
                "self_attn.out_proj": "out", "layer_norm2": "ln2", "ln_2": "ln2", "mlp": "mlp",
                "mlp.fc1": "fc1", "mlp.c_fc": "fc1", "mlp.activation_fn": "act", "mlp.gelu": "act",
                "mlp.fc2": "fc2", "mlp.c_proj": "fc2"}
    outside = {"embeddings": None, "conv1": "patch_embed", "token_embedding": "token_embed",
               "pre_layrnorm": "pre_ln", "ln_pre": "pre_ln", "post_layernorm": "post_ln", "ln_post": "pool_ln",
               "final_layer_norm": "pool_ln", "ln_final": "pool_ln", "visual_projection": "proj",
               "text_projection": "proj", "head": None, "head.attention": "map_attn", "head.layernorm": "map_ln",
               "head.mlp.fc1": "map_fc1", "head.mlp.fc2": "map_fc2", "head.mlp.activation_fn": "act",
               "head.mlp": "map_mlp"}
    layers: dict[str, tuple[str, int]] = {}
    for name, mod in named.items():
        m = layer_re.match(name)
        if m and tower_of(name):
            layers[name] = (tower_of(name), int(m.group(3)))
            detail.append((mod, tower_of(name), int(m.group(3)), None))
    for name, mod in named.items():
        tower = tower_of(name)
        if tower is None or name in layers:
            continue
        parent = next((p for p in layers if name.startswith(p + ".")), None)
        if parent is not None:
            rel = name[len(parent) + 1:]
            if rel in in_layer:
                detail.append((mod, tower, layers[parent][1], in_layer[rel]))
            continue
        # strip the tower prefix: vision_model.X / text_model.X / visual.X / X
        rel = name
        for pre in ("vision_model.", "text_model.", "visual."):
            if rel.startswith(pre):
                rel = rel[len(pre):]
                break
        if rel not in outside:
            continue
        op = outside[rel]
        if rel == "embeddings":
            op = "patch_embed" if tower == "vision" else "token_embed"
        elif rel == "post_layernorm":
            op = "final_ln" if pooling_vision == "map" else "pool_ln"
        elif rel == "head":
            op = "map_head" if tower == "vision" else "proj"
        detail.append((mod, tower, None, op))
    return roots, detail


class Labeller:
    """Installs the labels on an executor for the duration of a ``with`` block and removes them after.

    ``mode``: "full" (tower wrappers + per-layer/op hooks), "split" (compile: no hooks, the towers are called
    one by one inside tower ranges by :func:`dualfuse.profile.capture.capture`), "fused" (per-stage wrappers of
    a fused Runner's ops), "none" (an executor we do not know: no labels)."""

    def __init__(self, ex, mode: str, *, nvtx: bool = False, runner=None):
        self.ex, self.mode, self.nvtx, self.runner = ex, mode, nvtx, runner
        self._handles, self._stack, self._restore = [], [], []

    def _rng(self, name):
        return Range(name, self.nvtx)

    def _hook(self, module, name: str):
        def pre(mod, args):
            r = self._rng(name)
            r.__enter__()
            self._stack.append(r)

        def post(mod, args, out):
            if self._stack:
                self._stack.pop().__exit__(None, None, None)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def __enter__(self):
        ex = self.ex
        if self.mode == "full":
            pooling = getattr(getattr(ex.spec, "vision", None), "pooling", None)
            _, detail = module_labels(ex.model, ex.family, pooling)
            for attr, tower in (("image_fn", "vision"), ("text_fn", "text")):
                orig = getattr(ex, attr)
                self._restore.append((ex, attr, orig))
                setattr(ex, attr, self._wrap(orig, label(tower)))
            for mod, tower, layer, op in detail:
                self._hook(mod, label(tower, layer, op))
        elif self.mode == "fused" and self.runner is not None:
            ops = self.runner.ops
            self._restore.append((self.runner, "ops", ops))
            self.runner.ops = [self._wrap(op, f"{PREFIX}:stage:{k}") for k, op in enumerate(ops)]
        return self

    def _wrap(self, fn, name):
        rng = self._rng

        def wrapped(*args, **kwargs):
            with rng(name):
                return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn
        return wrapped

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for obj, attr, orig in reversed(self._restore):
            setattr(obj, attr, orig)
        self._restore.clear()
        while self._stack:
            self._stack.pop().__exit__(None, None, None)
        return False
