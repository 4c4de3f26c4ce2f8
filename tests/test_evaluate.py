"""Parity metrics (hand-computed answers), the eval pipeline on a tiny model, and a perturbed executor failing."""
import json
import math

import pytest
import torch

from dualfuse import evaluate as E
from dualfuse import executors, presets, to_spec
from dualfuse import data as D
from dualfuse.executors.eager import EagerExecutor


# ----------------------------------------------------------------------------------------- hand-computed metrics

def test_embedding_metrics_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    m = E.embedding_metrics(x, ref)
    # cos([1,0],[1,1]) = 1/sqrt2; cos([0,2],[0,1]) = 1
    assert m["min_cosine"] == pytest.approx(1 / math.sqrt(2))
    assert m["mean_cosine"] == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    # ||[0,-1]|| / ||[1,1]|| = 1/sqrt2; ||[0,1]|| / ||[0,1]|| = 1
    assert m["max_rel_err"] == pytest.approx(1.0)
    assert m["mean_rel_err"] == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert m["finite"] and m["n"] == 2


def test_embedding_metrics_nan_is_failure():
    x = torch.tensor([[float("nan"), 0.0]])
    m = E.embedding_metrics(x, torch.tensor([[1.0, 0.0]]))
    assert not m["finite"]
    assert E.verdict({"image": m}, E.pass_criteria(torch.float16)) == ["image embeddings contain NaN/Inf"]


def test_zero_shot_agreement_hand_computed():
    ref = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # ref top1 = 0, margin 0.8
                        [0.1, 0.5, 0.49, 0.0, 0.0, 0.0],  # ref top1 = 1, margin 0.01
                        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])  # ref top1 = 5, margin 1.0
    x = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],     # agrees
                      [0.1, 0.49, 0.5, 0.0, 0.0, 0.0],    # flips 1 -> 2 (ref's 1 still in top-5)
                      [0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])    # ref's class 5 is X's 6th: not in top-5
    m = E.zero_shot_agreement(x, ref, k=5, margin=0.02)
    assert m["top1_agreement"] == pytest.approx(1 / 3)
    assert m["top5_agreement"] == pytest.approx(2 / 3)
    assert m["disagreements"] == 2
    assert m["decisive"] == 2  # images 0 and 2 have margin > 0.02
    assert m["decisive_top1_agreement"] == pytest.approx(0.5)
    # k is capped at the number of classes
    assert E.zero_shot_agreement(x[:, :3], ref[:, :3], k=5)["k"] == 3


def test_retrieval_hit_rates_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.1],
                           [0.2, 0.3, 0.1],
                           [0.5, 0.6, 0.7]])
    targets = torch.tensor([[False, True, False],   # relevant text ranked 2nd
                            [False, False, True],   # ranked 3rd
                            [False, False, True]])  # ranked 1st
    r = E.retrieval_hit_rates(scores, targets, ks=(1, 2, 3, 10))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3), "R@3": pytest.approx(1.0)}
    assert "R@10" not in r  # k > number of texts is left out


def test_top1_targets_and_accuracy():
    s = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]])
    assert E.top1_targets(s).tolist() == [[False, True, False], [True, False, False]]
    acc = E.zero_shot_accuracy(s, torch.tensor([1, 2]), ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(0.5)
    assert acc["top2"] == pytest.approx(1.0)
    assert "top5" not in acc


def test_parity_true_retrieval_and_verdict():
    g = torch.Generator().manual_seed(0)
    img, cls, txt = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g)
    m = E.parity(img, cls, txt, img, cls, txt, dtype=torch.float16, labels=torch.tensor([0, 1, 2, 0]),
                 caption_image=[0, 1, 2, 3])
    assert m["passed"] and m["failures"] == []
    assert m["image"]["min_cosine"] == pytest.approx(1.0)
    assert m["retrieval"]["agreement"]["R@1"] == 1.0
    assert m["retrieval"]["true"]["executor"] == m["retrieval"]["true"]["reference"]
    assert m["zero_shot_accuracy"]["executor"] == m["zero_shot_accuracy"]["reference"]
    bad = E.parity(img * -1, cls, txt, img, cls, txt, dtype=torch.float16)
    assert not bad["passed"]
    assert any("image min cosine" in f for f in bad["failures"])


# ----------------------------------------------------------------------------------------- pipeline on a tiny model

class PerturbedExecutor(EagerExecutor):
    """Eager plus 5% relative noise on every embedding: must FAIL parity."""

    name = "perturbed"

    def _noisy(self, x):
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(x.shape, generator=g).to(x)
        return x + 0.05 * noise * x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])

    def _encode_image(self, px):
        return self._noisy(super()._encode_image(px))

    def _encode_text(self, ids):
        return self._noisy(super()._encode_text(ids))


@pytest.fixture(scope="module")
def tiny():
    model = presets.load("clip-tiny")
    spec = to_spec(model)
    pre = D.preprocess_for(spec, model)
    tok = D.make_tokenizer(spec, model)
    data = D.synthetic(pre, num_images=6, num_classes=5)
    ref = E.reference_embeddings(spec, data, tok, torch.device("cpu"), batch_size=4)
    return model, spec, tok, data, ref


def test_eager_passes_perturbed_fails(tiny):
    model, spec, tok, data, ref = tiny
    good = E.evaluate_executor(executors.get("eager", model, device="cpu", spec=spec), data, tok, ref, batch_size=4)
    assert good["passed"], good["failures"]
    assert good["image"]["max_rel_err"] < 1e-5 and good["text"]["min_cosine"] > 0.99999
    assert good["retrieval"]["texts"] == "captions" and good["retrieval"]["agreement"]["R@1"] == 1.0
    bad = E.evaluate_executor(PerturbedExecutor(model, device="cpu", spec=spec), data, tok, ref, batch_size=4)
    assert not bad["passed"]
    joined = " ".join(bad["failures"])
    assert "image max relative error" in joined and "text max relative error" in joined
    assert bad["image"]["max_rel_err"] == pytest.approx(0.05, rel=0.5)


def test_fp16_tolerance_used_for_half(tiny):
    model, spec, tok, data, ref = tiny
    ex = executors.get("eager", model, device="cpu", dtype="fp16", spec=spec)
    res = E.evaluate_executor(ex, data, tok, ref, batch_size=4)
    assert res["criteria"]["max_rel_err"] == 1e-2
    assert res["image"]["max_rel_err"] < 1e-2


def test_cli_eval_demo_json(tmp_path):
    pytest.importorskip("skimage", reason="scikit-image is not installed here (pip install 'dualfuse[eval]')")
    from dualfuse import cli

    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--model", "siglip-tiny", "--executor", "eager", "--demo", "--device", "cpu",
                   "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "dualfuse.eval/1" and doc["passed"]
    assert doc["command"] == f"dualfuse eval --model siglip-tiny --executor eager --demo --device cpu --json {out}"
    assert doc["tokenizer"]["kind"] == "synthetic"
    r = doc["results"][0]
    assert "true" in r["retrieval"] and "zero_shot_accuracy" in r
    assert doc["data"]["kind"] == "demo" and doc["data"]["images"] >= 10


def test_cli_eval_bad_arguments(capsys):
    from dualfuse import cli

    assert cli.main(["eval", "--model", "clip-tiny", "--executor", "nope", "--device", "cpu"]) == 2
    assert "unknown executor" in capsys.readouterr().err
    assert cli.main(["eval", "--model", "clip-tiny", "--data", "/does/not/exist", "--device", "cpu"]) == 2
    assert "not a directory" in capsys.readouterr().err
