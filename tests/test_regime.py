"""The byte-bound GEMM regime (kernels/gemm/regime.py): the regime a target implies, the cost model's figures and
the configs it picks, each against numbers worked out by hand in the comments."""
from types import SimpleNamespace

import pytest
import torch

from dualfuse.kernels._utils import target_device
from dualfuse.kernels.gemm import heuristics, regime
from dualfuse.targets import get_target


def _problems(dims):
    return [SimpleNamespace(x=torch.empty(m, k, dtype=torch.float16), weight=torch.empty(n, k, dtype=torch.float16),
                            norm=None) for m, n, k in dims]


def test_regime_for_target():
    nano = regime.regime_for_target("orin-nano")
    assert nano.byte_bound and nano.bandwidth == 68e9 and nano.latency_us == regime.LPDDR5_LATENCY_US
    assert regime.regime_for_target("agx-orin").bandwidth == 204.8e9
    assert not regime.regime_for_target("h100").byte_bound
    standin = regime.regime_for_target("orin-nano", bandwidth=49.7e9)  # the stand-in's measured link
    assert standin.byte_bound and standin.latency_us == regime.STANDIN_LATENCY_US
    assert standin.bytes_in_flight == pytest.approx(49.7e9 * 2e-6)
    with pytest.raises(ValueError, match="unknown regime"):
        regime.Regime("compute")
    with pytest.raises(ValueError, match="config regime"):
        regime.as_regime("fast")


def test_estimate_saturated_and_latency_limited():
    r = regime.Regime("byte-bound", 50e9, 2.0)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_stages=4)
    # 12 programs x 3 stages x 128 x 64 x 2 B = 589,824 B in flight >= 100,000: the link's 50 GB/s;
    # 768 x 768 x 2 B / 50 GB/s = 23.593 µs (> FLOPs 2 x 64 x 768 x 768 / (8 x 3e6) = 3.146 µs) + 3 µs launch
    assert regime.estimate_byte_bound_us([(50, 768, 768)], cfg, [1], 2, 8, 2, r) == pytest.approx(26.59296)
    # 2 programs, 2 stages: 2 x 1 x 128 x 64 x 2 = 32,768 B in flight / 2 µs = 16.384 GB/s;
    # 128 x 768 x 2 B at that rate = 12.0 µs, + 3 µs
    cfg2 = dict(cfg, num_stages=2)
    assert regime.estimate_byte_bound_us([(1, 128, 768)], cfg2, [1], 2, 8, 1, r) == pytest.approx(15.0)
    # split 4 asked of 6 K steps: 2 steps per split, so 3 splits, 6 programs x 1 x 16 KiB = 98,304 B in flight
    # / 2 µs = 49.152 GB/s; 196,608 B at that rate = 4.0 µs; + 3 launch + 2.5 + 0.5 x 2 split tail
    assert regime.estimate_byte_bound_us([(1, 128, 768)], cfg2, [4], 2, 8, 1, r) == pytest.approx(10.5)


def test_estimate_counts_a_tail_wave_at_its_own_rate():
    # 12 programs (64 x 64 tiles of 50 x 768 x 768), one per SM on 8 SMs, a link needing 50 GB/s x 8 µs = 400,000 B
    # in flight; a program keeps 3 x 128 x 64 x 2 = 49,152 B in flight and streams 1,179,648 / 12 = 98,304 B.
    # First wave: 8 programs, 393,216 B in flight -> 49.152 GB/s, 786,432 B in 16.0 µs; tail wave: 4 programs,
    # 196,608 B in flight -> 24.576 GB/s, 393,216 B in 16.0 µs. 32.0 µs + 3 µs launch (FLOPs: 3.1 µs).
    r = regime.Regime("byte-bound", 50e9, 8.0)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_stages=4)
    assert regime.estimate_byte_bound_us([(50, 768, 768)], cfg, [1], 2, 8, 1, r) == pytest.approx(35.0)


def test_byte_bound_pick_saturates_without_split_when_tiles_suffice():
    # ViT-B/32 out-proj at batch 1 in 8 SMs: the first candidate (64 x 128 tiles, 4 stages, no split) already has
    # 589,824 B in flight (12 programs): it reaches the stream floor, 26.593 µs; nothing models lower
    dims = [(50, 768, 768)]
    with target_device(get_target("orin-nano").props()):
        cfg = heuristics.default_config(_problems(dims), None, {"regime": regime.Regime("byte-bound", 50e9, 2.0)})
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], cfg["programs_per_sm"]) == (
        64, 64, 128, 4, 0)
    assert cfg["tma"] is False and cfg["num_sms"] == 8


def test_byte_bound_pick_splits_k_to_cover_the_sms():
    # One skinny problem, M=1, N=128, K=8192 in 16 SMs, a slow link (8 µs: 400,000 B must be in flight).
    # Without split-K at most 2 programs stream (BLOCK_N 64), 163,840 B in flight at 6 stages: 105 µs.
    # 32 x 256 tiles, one program per SM: 4 tiles x 32 K steps, 8 steps per split -> 4 splits, 16 programs,
    # 16 x 3 x 256 x 32 x 2 = 786,432 B in flight: saturated; 2,097,152 B / 50 GB/s = 41.943 µs
    # + 3 launch + 2.5 + 0.5 x 3 split tail = 48.943 µs, the lowest of the candidates (hand-ranked: 64 x 256
    # x 3 stages and 64 x 128 need 8 splits, 50.943 µs; more programs per SM add splits)
    dims = [(1, 128, 8192)]
    r = regime.Regime("byte-bound", 50e9, 8.0)
    with target_device(get_target("agx-orin").props()):
        ranked = heuristics.ranked_byte_bound(dims, 2, 2, 16, get_target("agx-orin").smem_per_block, r)
        cfg = heuristics.default_config(_problems(dims), None, {"regime": r})
    best_us, best = ranked[0]
    assert best_us == pytest.approx(48.94304)
    assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"], cfg["programs_per_sm"]) == (32, 256, 4, 1)
    assert heuristics.choose_splits(dims, cfg, None, None) == [4]


def test_tall_tiles_offered_above_64_rows():
    def block_ms(max_m):
        return sorted({c["BLOCK_M"] for c in regime.byte_bound_candidates(max_m, 8)})
    assert block_ms(50) == [64] and block_ms(17) == [32]
    assert block_ms(77) == [64, 128] and block_ms(196) == [64, 256] and block_ms(729) == [64, 256]


def test_byte_bound_pick_reads_each_weight_once_with_a_tall_tile():
    # SigLIP B/16 fc1 at batch 1 in the 8-SM stand-in (49.3 GB/s, 2 µs): 196 rows.
    # Tall tile 256 x 64 x 64, 8 warps, 3 stages, no split: 48 programs, shared memory 3 x (256 x 2 + 64 x 2) x 64
    # = 122,880 B -> 1 per SM (also the register bound 65536 / (256 x 200)), 8 resident x 2 x 64 x 64 x 2 =
    # 131,072 B in flight >= 98,600: the full link. Weights read once: 3072 x 768 x 2 = 4,718,592 B / 49.3 GB/s
    # = 95.712 µs (> FLOPs 2 x 256 x 3072 x 768 / (8 x 3e6) = 50.332 µs) + 3 µs launch = 98.712 µs.
    # 64-row tiles read the weights 4 times: 4 x 95.712 + 3 = 385.848 µs at best.
    dims = [(196, 3072, 768)]
    r = regime.Regime("byte-bound", 49.3e9, 2.0)
    ranked = heuristics.ranked_byte_bound(dims, 2, 2, 8, 227 * 1024, r)
    best_us, best = ranked[0]
    assert (best["BLOCK_M"], best["BLOCK_N"], best["BLOCK_K"], best["num_warps"], best["num_stages"]) == (
        256, 64, 64, 8, 3)
    assert best_us == pytest.approx(3 + 4718592 / 49.3e9 * 1e6)
    assert min(us for us, c in ranked if c["BLOCK_M"] == 64) == pytest.approx(3 + 4 * 4718592 / 49.3e9 * 1e6)
    # Orin's 163 KB of shared memory per block holds the same tile
    assert heuristics.ranked_byte_bound(dims, 2, 2, 8, get_target("orin-nano").smem_per_block, r)[0][1] == best


def test_full_card_picks_unchanged():
    dims = [(50, 2304, 768), (77, 1536, 512)]
    with target_device(get_target("h100").props()):
        base = heuristics.default_config(_problems(dims), None, None)
        same = heuristics.default_config(_problems(dims), None, {"regime": "latency"})
    same.pop("regime", None)
    assert same == base


def test_tuned_table_overrides_the_model(tmp_path):
    dims = [(50, 768, 768)]
    key = regime.shape_key(dims, 2, 8)
    assert key == "8|w2|50x768x768"
    table = {key: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=5,
                       programs_per_sm=2, min_k_iters=1, max_split=8)}
    assert regime.tuned_config(dims, 2, 8, table)["BLOCK_N"] == 32
    assert regime.tuned_config(dims, 2, 16, table) is None
    path = tmp_path / "t.json"
    path.write_text('{"configs": {"8|w2|50x768x768": {"BLOCK_N": 32}}}')
    assert regime.load_table(str(path)) == {"8|w2|50x768x768": {"BLOCK_N": 32}}
