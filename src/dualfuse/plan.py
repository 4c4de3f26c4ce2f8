"""Co-scheduling: turn a DualEncoderSpec + batch sizes into a list of fused stages.

Each tower is first written as a sequence of steps (embed, LN, QKV GEMM, attention, ...). A stage is one
kernel launch: it covers one step of each tower, or of one tower alone. Steps can share a launch only when
they use the same kernel ("kind"): layernorm, linear, attention, embed, pool_index. Within a tower the
order of steps is kept, so every step's inputs were written by an earlier stage.

Vertical fusion (``fold_ln=True``): a LayerNorm whose input was written by a GEMM and whose only reader is the
next GEMM is folded into that GEMM (dualfuse.kernels.gemm.fold_layernorm): ``ln1 -> qkv`` becomes one step
``ln1_qkv`` (layers >= 1), ``ln2 -> fc1`` becomes ``ln2_fc1`` (and SigLIP's ``final_ln -> map_kv``,
``map_ln -> map_fc1``): about two launches fewer per layer and no normalized copy of the activations. The
GEMM that wrote the LN's input leaves per-tile row statistics that the folded GEMM merges.

The two step sequences are aligned by dynamic programming (longest common subsequence over kinds): the
plan with the fewest launches, and among those the one whose fused stages are best balanced by the cost
model (estimated time = max(bytes / bandwidth, FLOPs / matmul rate)). With equal depths this pairs layer i
with layer i; with ViT-L/14 (24 vision vs 12 text layers) it pairs each text layer with one vision layer
and leaves the other vision layers to launch alone. The plan is plain data: printable and testable on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .spec import DualEncoderSpec, TowerSpec

# Ceilings only rank and balance steps; they are not used as measurements. fp16 dense rate and HBM
# bandwidth of an H100-class card (the profile stage measures real ceilings per card).
DEFAULT_BANDWIDTH = 3.0e12  # bytes/s
DEFAULT_MATMUL_RATE = 6.0e14  # FLOP/s

KINDS = ("embed", "pool_index", "layernorm", "linear", "attention")


@dataclass(frozen=True)
class Step:
    tower: str  # "vision" | "text"
    op: str  # e.g. "ln1_qkv" (LN folded in), "qkv", "attn", "out", "ln2_fc1", "fc2", "patch_embed", "proj"
    kind: str  # the kernel that runs it, one of KINDS
    layer: int | None  # block index, None for embeddings and heads
    flops: float
    bytes: float

    def time(self, bandwidth=DEFAULT_BANDWIDTH, rate=DEFAULT_MATMUL_RATE) -> float:
        return max(self.bytes / bandwidth, self.flops / rate)

    @property
    def label(self) -> str:
        return f"{self.tower[0]}{'' if self.layer is None else self.layer}.{self.op}"


@dataclass
class Stage:
    kind: str
    steps: list[Step]

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(s.tower for s in self.steps)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.steps)

    @property
    def bytes(self) -> float:
        return sum(s.bytes for s in self.steps)

    @property
    def balance(self) -> float:
        """min/max of the steps' estimated times: 1.0 = perfectly balanced, 1.0 too for a lone step."""
        times = [s.time() for s in self.steps]
        return min(times) / max(times) if max(times) > 0 else 1.0


@dataclass
class Plan:
    spec_name: str
    image_batch: int
    text_batch: int
    text_len: int
    stages: list[Stage] = field(default_factory=list)

    @property
    def num_launches(self) -> int:
        return len(self.stages)

    @property
    def fused_stages(self) -> int:
        return sum(len(s.steps) > 1 for s in self.stages)

    def steps(self, tower: str) -> list[Step]:
        return [st for s in self.stages for st in s.steps if st.tower == tower]

    def table(self) -> list[dict]:
        rows = []
        for i, s in enumerate(self.stages):
            by = {st.tower: st for st in s.steps}
            rows.append(dict(stage=i, kind=s.kind,
                             vision=by["vision"].label if "vision" in by else "",
                             text=by["text"].label if "text" in by else "",
                             gflops=s.flops / 1e9, mbytes=s.bytes / 1e6, balance=s.balance))
        return rows

    def totals(self) -> dict:
        out = dict(launches=self.num_launches, fused=self.fused_stages)
        for tower in ("vision", "text"):
            steps = self.steps(tower)
            out[tower] = dict(steps=len(steps), gflops=sum(s.flops for s in steps) / 1e9,
                              mbytes=sum(s.bytes for s in steps) / 1e6,
                              est_us=sum(s.time() for s in steps) * 1e6)
        return out


# --------------------------------------------------------------------------------------------- steps


def _linear(tower, op, layer, m, n, k, elt, residual=False):
    return Step(tower, op, "linear", layer, 2.0 * m * n * k, elt * (m * k + n * k + m * n * (2 if residual else 1)))


def _ln(tower, op, layer, rows, d, elt, rows_in=None):
    return Step(tower, op, "layernorm", layer, 8.0 * rows * d, elt * (d * ((rows_in or rows) + rows) + 2 * d))


def _attn(tower, op, layer, b, heads, sq, sk, dh, causal, elt):
    frac = 0.5 if causal and sq == sk else 1.0
    flops = 4.0 * b * heads * sq * sk * dh * frac
    return Step(tower, op, "attention", layer, flops, elt * b * heads * dh * (2 * sq + 2 * sk))


def _fold(ln: Step, lin: Step) -> Step:
    """LN -> linear as one linear step over the raw input (the LN's statistics are computed in the GEMM)."""
    return Step(lin.tower, f"{ln.op}_{lin.op.removeprefix('map_') if ln.op.startswith('map_') else lin.op}",
                "linear", lin.layer, lin.flops + ln.flops, lin.bytes)


def tower_steps(tower: TowerSpec, batch: int, seq: int, elt: int = 2, fold_ln: bool = False,
                outputs: "TowerOutputs | None" = None) -> list[Step]:
    """The ordered steps of one tower's forward for a batch (seq = tokens per sample). fold_ln: LayerNorms
    that feed one GEMM become part of that GEMM's step (see the module docstring). outputs: what a single-tower
    call reads (None: the pooled embedding of the whole tower): fewer layers, no pooling head, the final LN
    over every token (``tokens_ln``)."""
    out = outputs if outputs is not None else TowerOutputs(layers=tower.num_layers)
    name, d, f, rows = tower.kind, tower.width, tower.mlp_dim, batch * seq
    steps: list[Step] = []
    if name == "vision":
        e = tower.embed
        k = e.channels * e.patch_size ** 2
        patches = batch * e.num_patches
        steps.append(Step(name, "patch_embed", "embed", None, 2.0 * patches * d * k,
                          elt * (patches * k + d * k + rows * d + seq * d)))
    else:
        steps.append(Step(name, "token_embed", "embed", None, float(rows * d), elt * (2 * rows * d + seq * d)))
        if tower.pooling in ("first_eos", "argmax") and out.pooled:
            steps.append(Step(name, "pool_index", "pool_index", None, float(rows), 8.0 * rows))
    if tower.pre_ln is not None:
        steps.append(_ln(name, "pre_ln", None, rows, d, elt))
    causal = tower.mask == "causal"
    def ln_linear(ln: Step, lin: Step) -> list[Step]:
        return [_fold(ln, lin)] if fold_ln else [ln, lin]

    for i in range(out.layers):
        ln1, qkv = _ln(name, "ln1", i, rows, d, elt), _linear(name, "qkv", i, rows, 3 * d, d, elt)
        steps += [
            # layer 0's LN reads the embeddings, which no GEMM wrote: no statistics to fold with; kept apart
            *(ln_linear(ln1, qkv) if i > 0 else [ln1, qkv]),
            _attn(name, "attn", i, batch, tower.heads, seq, seq, tower.head_dim, causal, elt),
            _linear(name, "out", i, rows, d, d, elt, residual=True),
            *ln_linear(_ln(name, "ln2", i, rows, d, elt), _linear(name, "fc1", i, rows, f, d, elt)),
            _linear(name, "fc2", i, rows, d, f, elt, residual=True),
        ]
    if out.tokens_ln:  # the final LN over every token (last_hidden_state of SigLIP, text towers)
        steps.append(_ln(name, "tokens_ln", None, rows, d, elt))
    if not out.pooled or tower.pooling == "none":
        return steps
    if tower.pooling == "map":
        h = tower.pool_head
        steps += [
            *ln_linear(_ln(name, "final_ln", None, rows, d, elt), _linear(name, "map_kv", None, rows, 2 * d, d, elt)),
            _attn(name, "map_attn", None, batch, h.heads, 1, seq, d // h.heads, False, elt),
            _linear(name, "map_out", None, batch, d, d, elt),
            *ln_linear(_ln(name, "map_ln", None, batch, d, elt),
                       _linear(name, "map_fc1", None, batch, h.fc1.out_features, d, elt)),
            _linear(name, "map_fc2", None, batch, d, h.fc1.out_features, elt, residual=True),
        ]
    else:
        steps.append(_ln(name, "pool_ln", None, batch, d, elt, rows_in=batch))
    if tower.projection is not None:
        steps.append(_linear(name, "proj", None, batch, tower.projection.out_features, d, elt))
    return steps


@dataclass(frozen=True)
class TowerOutputs:
    """What a single-tower call reads, so that its runner computes only that: the first ``layers`` blocks,
    copies of the residual stream at ``hidden`` (hidden-state indices 0..layers: 0 is the embeddings output,
    i the output of block i-1), the final LN over every token (``tokens_ln``) and the pooled embedding
    (``pooled``: pooling, head, projection)."""

    layers: int
    hidden: tuple[int, ...] = ()
    tokens_ln: bool = False
    pooled: bool = True

    def __post_init__(self):
        if any(not 0 <= i <= self.layers for i in self.hidden):
            raise ValueError(f"hidden-state indices must be in 0..{self.layers}, got {self.hidden}")


# ------------------------------------------------------------------------------------------ alignment


def _pair_score(x: Step, y: Step) -> float:
    tx, ty = x.time(), y.time()
    balance = min(tx, ty) / max(tx, ty) if max(tx, ty) > 0 else 1.0
    # bonuses stay small enough that, summed over a few hundred pairs, they never outweigh one more pair
    return 1.0 + 1e-3 * (x.op == y.op) + 1e-6 * balance


def align(a: list[Step], b: list[Step]) -> list[Stage]:
    """Merge two step sequences into stages: most pairs of same-kind steps (fewest launches), order kept;
    ties broken towards pairs of the same op (a text layer shares launches with one whole vision layer),
    then towards balanced pairs."""
    n, m = len(a), len(b)
    # score[i][j]: best score for a[i:], b[j:] (see _pair_score).
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, nxt = score[i], score[i + 1]
        ai = a[i]
        for j in range(m - 1, -1, -1):
            best = max(nxt[j], row[j + 1])
            if ai.kind == b[j].kind:
                best = max(best, _pair_score(ai, b[j]) + nxt[j + 1])
            row[j] = best
    stages, i, j = [], 0, 0
    eps = 1e-12
    while i < n or j < m:
        if i < n and j < m and a[i].kind == b[j].kind:
            if abs(score[i][j] - (_pair_score(a[i], b[j]) + score[i + 1][j + 1])) < eps:
                stages.append(Stage(a[i].kind, [a[i], b[j]]))
                i, j = i + 1, j + 1
                continue
        if i < n and (j == m or abs(score[i][j] - score[i + 1][j]) < eps):
            stages.append(Stage(a[i].kind, [a[i]]))
            i += 1
        else:
            stages.append(Stage(b[j].kind, [b[j]]))
            j += 1
    return stages


def make_plan(spec: DualEncoderSpec, image_batch: int, text_batch: int, text_len: int | None = None,
              elt: int = 2, fold_ln: bool = False, outputs: TowerOutputs | None = None) -> Plan:
    """Plan for one call shape; image_batch or text_batch may be 0 (image-only / text-only calls).
    fold_ln: fold each LayerNorm into the GEMM it feeds (vertical fusion; see the module docstring).
    outputs: what a call of one tower reads (TowerOutputs; None: its pooled embedding)."""
    if image_batch < 0 or text_batch < 0 or image_batch + text_batch == 0:
        raise ValueError(f"need a positive image or text batch, got image_batch={image_batch}, text_batch={text_batch}")
    for n, name in ((image_batch, "vision"), (text_batch, "text")):
        if n and getattr(spec, name) is None:
            raise ValueError(f"{spec.name or 'this model'} has no {name} tower (batch {n} asked for)")
    if outputs is not None and image_batch and text_batch:
        raise ValueError("outputs= describes a call of one tower: give image_batch or text_batch, not both")
    ctx = spec.text.context_length if spec.text is not None else 0
    text_len = ctx if text_len is None else text_len
    if text_batch and not 1 <= text_len <= ctx:
        raise ValueError(f"text length must be in 1..{ctx}, got {text_len}")
    a = tower_steps(spec.vision, image_batch, spec.vision.seq_len, elt, fold_ln, outputs) if image_batch else []
    b = tower_steps(spec.text, text_batch, text_len, elt, fold_ln, outputs) if text_batch else []
    return Plan(spec.name, image_batch, text_batch, text_len, align(a, b))


def format_plan(plan: Plan) -> str:
    """A plain-text stage table (the CLI renders the same rows with rich)."""
    lines = [f"plan for {plan.spec_name}: {plan.image_batch} image(s) x {plan.text_batch} text(s) of "
             f"{plan.text_len} tokens -> {plan.num_launches} launches, {plan.fused_stages} fused",
             f"{'#':>4} {'kind':<10} {'vision':<14} {'text':<14} {'GFLOP':>9} {'MB':>9} {'balance':>7}"]
    for r in plan.table():
        lines.append(f"{r['stage']:>4} {r['kind']:<10} {r['vision']:<14} {r['text']:<14} "
                     f"{r['gflops']:>9.3f} {r['mbytes']:>9.2f} {r['balance']:>7.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
# `dualfuse plan --model NAME`: the first docstring line of this module is not the CLI help, so set it here.
