"""The co-scheduling plan: pure data, checked on CPU."""
import pytest

import dualfuse
from dualfuse.adapters import to_spec
from dualfuse.plan import format_plan, make_plan, tower_steps
from dualfuse.presets import build_hf


@pytest.fixture(scope="module")
def b32():
    return to_spec(build_hf("clip-vit-b-32", meta=True))


@pytest.fixture(scope="module")
def l14():
    return to_spec(build_hf("clip-vit-l-14", meta=True))


def _assert_order_kept(plan, spec, fold_ln=False):
    for tower, t in (("vision", spec.vision), ("text", spec.text)):
        steps = plan.steps(tower)
        batch = plan.image_batch if tower == "vision" else plan.text_batch
        if batch:
            seq = t.seq_len if tower == "vision" else plan.text_len
            assert [s.label for s in steps] == [s.label for s in tower_steps(t, batch, seq, fold_ln=fold_ln)]


def test_equal_depth_pairs_layer_with_layer(b32):
    plan = make_plan(b32, 1, 1)
    _assert_order_kept(plan, b32)
    # every text step shares a launch with a vision step of the same kind, layer i with layer i
    for s in plan.stages:
        if len(s.steps) == 2:
            v, t = s.steps
            assert v.kind == t.kind
            if v.layer is not None and t.layer is not None:
                assert v.layer == t.layer and v.op == t.op
    assert plan.fused_stages == 12 * 7 + 3  # all blocks, embeddings, final LN+pool, projection
    assert plan.num_launches == plan.fused_stages + 2  # vision pre-LN, text EOS index
    assert "clip-vit-b-32" in format_plan(plan)
    # LN folded into QKV (layers >= 1) and FC1 (vertical fusion): 5 launches per layer, 6 in layer 0
    folded = make_plan(b32, 1, 1, fold_ln=True)
    assert folded.fused_stages == 6 + 11 * 5 + 3 and folded.num_launches == plan.num_launches - 23
    _assert_order_kept(folded, b32, fold_ln=True)
    assert [s.steps[0].op for s in folded.stages[3:14]] == ["ln1", "qkv", "attn", "out", "ln2_fc1", "fc2",
                                                             "ln1_qkv", "attn", "out", "ln2_fc1", "fc2"]
    # a folded step costs the GEMM's bytes (x read once, no normalized copy) plus the LN's FLOPs
    f = folded.stages[9].steps[0]
    ln, qkv = plan.stages[10].steps[0], plan.stages[11].steps[0]
    assert (ln.op, qkv.op) == ("ln1", "qkv")
    assert f.bytes == qkv.bytes and f.flops == qkv.flops + ln.flops


def test_deeper_vision_tower_pairs_each_text_layer_once(l14):
    plan = make_plan(l14, 1, 1)
    _assert_order_kept(plan, l14)
    paired_text = {s.steps[1].layer for s in plan.stages if len(s.steps) == 2 and s.steps[1].layer is not None}
    assert paired_text == set(range(12))
    solo_vision = [s for s in plan.stages if s.towers == ("vision",) and s.steps[0].layer is not None]
    assert len(solo_vision) == 12 * 7  # 24 vision layers, 12 of them fused with the text layers
    totals = plan.totals()
    assert totals["vision"]["steps"] == len(tower_steps(l14.vision, 1, 257))
    assert totals["vision"]["gflops"] > totals["text"]["gflops"]


def test_zero_shot_shape_and_one_tower_plans(b32):
    plan = make_plan(b32, 1, 1000)
    # equal depths pair layer with layer whatever the batches: the same 87 fused stages (12 layers x 7 steps,
    # embeddings, pooled LN, projection) and 89 launches (+ vision pre-LN, text EOS index) as batch 1 + 1
    assert (plan.fused_stages, plan.num_launches) == (12 * 7 + 3, 89)
    text_heavy = [s for s in plan.stages if len(s.steps) == 2 and s.kind == "linear"]
    assert all(s.steps[1].flops > s.steps[0].flops for s in text_heavy)  # 1000 prompts outweigh 1 image
    image_only = make_plan(b32, 2, 0)
    assert all(s.towers == ("vision",) for s in image_only.stages)
    # one tower: nothing to pair; embeddings, pre-LN, 12 x 7 block steps, pooled LN, projection
    assert (image_only.fused_stages, image_only.num_launches) == (0, 1 + 1 + 12 * 7 + 2)
    text_only = make_plan(b32, 0, 3, 20)
    assert all(s.towers == ("text",) for s in text_only.stages) and text_only.text_len == 20
    # embeddings, EOS index, 12 x 7 block steps, pooled LN, projection
    assert (text_only.fused_stages, text_only.num_launches) == (0, 1 + 1 + 12 * 7 + 2)


def test_siglip_plan_has_attention_pooling_head():
    spec = to_spec(dualfuse.load("siglip-tiny"))
    plan = make_plan(spec, 2, 3)
    ops = [s.op for s in plan.steps("vision")]
    assert ops[-7:] == ["final_ln", "map_kv", "map_attn", "map_out", "map_ln", "map_fc1", "map_fc2"]
    ops = [s.op for s in make_plan(spec, 2, 3, fold_ln=True).steps("vision")]
    assert ops[-5:] == ["final_ln_map_kv", "map_attn", "map_out", "map_ln_fc1", "map_fc2"]
    assert "proj" not in ops and plan.steps("text")[-1].op == "proj"


def test_bad_plan_requests(b32):
    with pytest.raises(ValueError, match="positive image or text batch"):
        make_plan(b32, 0, 0)
    with pytest.raises(ValueError, match="text length must be in 1..77"):
        make_plan(b32, 1, 1, 78)


def test_plan_cli_prints_table_and_writes_json(tmp_path, capsys):
    import json

    from dualfuse.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "clip-vit-l-14", "--image-batch", "1", "--text-batch", "1000",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "launches" in printed and "balance" in printed
    data = json.loads(out.read_text())
    assert data["text_batch"] == 1000 and len(data["stages"]) == data["totals"]["launches"]
    assert data["totals"]["vision"]["steps"] == 172 and data["totals"]["text"]["steps"] == 88
    assert main(["plan", "--model", "clip-vit-l-14", "--fold-ln", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["totals"]["vision"]["steps"] == 125 and data["totals"]["text"]["steps"] == 65
