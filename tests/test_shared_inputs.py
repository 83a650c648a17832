"""Issue 23 item 1 and 3: layers reading the same input tensor share one float64 accumulator
(detected at run time, confirmed on every batch, split correctly when a batch breaks it), the
factors are those of unshared collection, and ``statistics_bytes`` counts a shared accumulator once."""

import threading

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from factorize_plugin import Targets
from factorize_plugin.surgery.statistics.collector import ActivationCollector
from factorize_plugin.surgery.swap.refactorize import build_candidates


def _llama(kv_heads=2) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).double().eval()


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def _collect(model, layers, share, batches, **kw):
    col = ActivationCollector(layers, max_samples=None, share_inputs=share, **kw)
    with torch.no_grad(), col:
        for ids in batches:
            model(input_ids=ids)
    return col


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


@pytest.mark.parametrize("space", ["input", "auto"])
def test_llama_qkv_and_gate_up_share_and_give_identical_factors(space):
    model = _llama()
    layers = _linears(model)
    shared = _collect(model, layers, True, _batches(), space=space)
    alone = _collect(model, layers, False, _batches(), space=space)
    groups = sorted(tuple(g) for g in shared.groups().values() if len(g) > 1)
    blocks = [f"model.layers.{i}" for i in range(2)]
    if space == "input":  # k/v have 16 < 32 outputs: projected (per layer) under "auto"
        expect = [(f"{b}.self_attn.q_proj", f"{b}.self_attn.k_proj", f"{b}.self_attn.v_proj") for b in blocks]
    else:
        expect = []
    expect += [(f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj") for b in blocks]
    assert groups == sorted(expect)
    assert all(len(g) == 1 for g in alone.groups().values())
    s, a = shared.stats, alone.stats
    for name in layers:
        assert s[name].num_samples == a[name].num_samples == 3 * 2 * 12
        assert torch.equal(s[name].cxx, a[name].cxx) and torch.equal(s[name].mean_x, a[name].mean_x)
    cs, ca = build_candidates(layers, s, holdout=shared.holdout.pairs()), build_candidates(layers, a, holdout=alone.holdout.pairs())
    for name in layers:
        ds, da = cs[name].decomposition, ca[name].decomposition
        for r in (1, 4, 16):
            for fs, fa in zip(ds.factors(r), da.factors(r)):
                assert (fs is None and fa is None) or torch.equal(fs, fa), name
        assert torch.equal(cs[name].heldout_curve, ca[name].heldout_curve), name  # held-out halves too


def test_llama_under_inference_mode_shares_as_under_no_grad():
    model = _llama()
    layers = _linears(model)
    cols = {}
    for share in (True, False):
        cols[share] = ActivationCollector(layers, max_samples=None, share_inputs=share, space="input")
        with torch.inference_mode(), cols[share]:  # activations are inference tensors (no version counter)
            for ids in _batches(2):
                model(input_ids=ids)
    assert sum(len(g) > 1 for g in cols[True].groups().values()) == 4
    for name in layers:
        assert torch.equal(cols[True].stats[name].cxx, cols[False].stats[name].cxx)


def test_llama_statistics_memory_drops_by_3_for_qkv_and_2_for_gate_up():
    model = _llama()
    layers = _linears(model)
    for holdout in (False, True):
        shared = _collect(model, layers, True, _batches(2), space="input", holdout=holdout)
        alone = _collect(model, layers, False, _batches(2), space="input", holdout=holdout)
        for b in ("model.layers.0", "model.layers.1"):
            qkv = [f"{b}.self_attn.{p}_proj" for p in "qkv"]
            gate_up = [f"{b}.mlp.gate_proj", f"{b}.mlp.up_proj"]
            assert alone.statistics_bytes_of(qkv) == 3 * shared.statistics_bytes_of(qkv) > 0
            assert alone.statistics_bytes_of(gate_up) == 2 * shared.statistics_bytes_of(gate_up) > 0
        # per block: q/k/v (3 -> 1 of 32 x 32), o (1), gate/up (2 -> 1 of 32 x 32), down (1 of 64 x 64)
        one = 8 * (32 * 32 + 32 + 1) * (2 if holdout else 1)
        down = 8 * (64 * 64 + 64 + 1) * (2 if holdout else 1)
        assert alone.statistics_bytes == 2 * (6 * one + down)
        assert shared.statistics_bytes == 2 * (3 * one + down)


class _Branches(nn.Module):
    """a and b read the same tensor, except when ``mode`` says otherwise."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 5).double(), nn.Linear(6, 7).double(), nn.Linear(6, 4).double()
        self.mode = "same"

    def forward(self, x):
        out = self.a(x)
        if self.mode == "same":
            out = out + self.b(x)[..., :5]
        elif self.mode == "other":
            out = out + self.b(x * 2 + 1)[..., :5]
        # mode "skip": b does not run
        return out + self.c(x + 0)[..., :1]


@pytest.mark.parametrize("modes", [["same", "other", "same"], ["same", "skip", "same"], ["same", "same", "skip"],
                                   ["other", "same", "same"]])  # fmt: skip
@pytest.mark.parametrize("holdout", [False, True])
def test_a_batch_that_breaks_the_sharing_splits_the_statistics_exactly(modes, holdout):
    torch.manual_seed(0)
    net = _Branches()
    layers = {"a": net.a, "b": net.b, "c": net.c}
    xs = [torch.randn(n, 6, dtype=torch.float64) + i for i, n in enumerate((5, 8, 7))]
    cols = {}
    for share in (True, False):
        cols[share] = ActivationCollector(layers, max_samples=None, share_inputs=share, holdout=holdout)
        with cols[share]:
            for x, mode in zip(xs, modes):
                net.mode = mode
                net(x)
    s, u = cols[True], cols[False]
    assert all(len(g) == 1 for g in s.groups().values())  # c never shared; a/b split (or never joined)
    for name in layers:
        assert s.samples()[name] == u.samples()[name]
        assert s.calls[name] == u.calls[name]
        assert torch.equal(s.stats[name].cxx, u.stats[name].cxx), name
        assert torch.equal(s.stats[name].mean_x, u.stats[name].mean_x), name
    ps, pu = s.holdout.pairs(), u.holdout.pairs()
    assert ps.keys() == pu.keys()
    for name in ps:
        for hs, hu in zip(ps[name], pu[name]):
            assert torch.equal(hs.cxx, hu.cxx)


def test_sharing_that_holds_on_every_batch_stays_and_bytes_count_it_once():
    torch.manual_seed(0)
    net = _Branches()
    layers = {"a": net.a, "b": net.b, "c": net.c}
    col = ActivationCollector(layers, max_samples=None, holdout=False)
    with col:
        for _ in range(3):
            net(torch.randn(4, 6, dtype=torch.float64))
    assert sorted(map(tuple, col.groups().values())) == [("a", "b"), ("c",)]
    assert col.stats["a"] is col.stats["b"]
    assert col.statistics_bytes == 2 * 8 * (36 + 6 + 1)
    assert col.statistics_bytes_of(["a", "b"]) == 8 * (36 + 6 + 1)


def test_all_reduce_reduces_a_shared_accumulator_once_and_ranks_agree_on_sharing():
    """Two 'ranks' (threads summing through a barrier): rank 1's batch breaks a/b's sharing, so
    both ranks split it before reducing; every statistic is that of the union of both ranks' rows."""
    torch.manual_seed(0)
    x0, x1 = torch.randn(5, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    nets = [_Branches(), _Branches()]
    nets[1].load_state_dict(nets[0].state_dict())
    barrier, slots = threading.Barrier(2), [None, None]

    def sum_fn(rank):
        def f(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return t.copy_(total)
        return f

    cols = [ActivationCollector({"a": n.a, "b": n.b, "c": n.c}, max_samples=None, holdout=False) for n in nets]
    for rank, (net, col, x) in enumerate(zip(nets, cols, (x0, x1))):
        net.mode = "same" if rank == 0 else "other"
        with col:
            net(x)
    assert ("a", "b") in [tuple(g) for g in cols[0].groups().values()]
    threads = [threading.Thread(target=cols[r].all_reduce_, args=(sum_fn(r),)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(len(g) == 1 for c in cols for g in c.groups().values())
    with ActivationCollector({"a": nets[0].a, "b": nets[0].b, "c": nets[0].c}, max_samples=None, holdout=False,
                             share_inputs=False) as both:  # fmt: skip
        nets[0].mode = "same"
        nets[0](x0)
        nets[0].mode = "other"
        nets[0](x1)
    for name in ("a", "b", "c"):
        for col in cols:
            torch.testing.assert_close(col.stats[name].cxx, both.stats[name].cxx, rtol=1e-12, atol=1e-12)
            assert col.stats[name].num_samples == 12


def test_factorize_model_reports_carry_the_statistics_bytes():
    from factorize_plugin import factorize_model

    model = _llama().float()
    reports = factorize_model(model, _batches(2), rank=0.5, speed_guard=False, input_fn=lambda ids: {"input_ids": ids},
                              targets=Targets("model.layers.*", min_params=0, min_features=0))  # fmt: skip
    assert isinstance(reports, list) and len(reports) == 14
    # per block under space="auto": q alone, k/v projected (16 wide), o, gate/up shared, down
    # projected (32 wide); each as held-out halves plus their union once the solve read them (x 3),
    # and the snapshots, in their own dtype, of the float32 W of k, v (32 x 16) and down (64 x 32)
    one, small = 3 * 8 * (32 * 32 + 32 + 1), 3 * 8 * (16 * 16 + 16 + 1)
    assert reports.statistics_bytes == 2 * (4 * one + 2 * small + 4 * (2 * 32 * 16 + 64 * 32))


def test_convolutions_share_only_with_the_same_patches():
    torch.manual_seed(0)
    one_a, one_b = nn.Conv2d(4, 6, 1).double(), nn.Conv2d(4, 3, 1).double()
    three, strided = nn.Conv2d(4, 5, 3, padding=1).double(), nn.Conv2d(4, 6, 1, stride=2).double()
    layers = {"one_a": one_a, "one_b": one_b, "three": three, "strided": strided}
    cols = {}
    for share in (True, False):
        cols[share] = ActivationCollector(layers, max_samples=None, share_inputs=share)
        with cols[share]:
            for i in range(2):
                img = torch.randn(2, 4, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) + i
                for m in layers.values():
                    m(img)
    assert sorted(map(tuple, cols[True].groups().values())) == [("one_a", "one_b"), ("strided",), ("three",)]
    for name in layers:
        assert torch.equal(cols[True].stats[name].cxx, cols[False].stats[name].cxx)


def test_callback_sampling_auto_shares_on_the_llama():
    """The callback's settings (sample_fraction="auto", space="auto"): gate/up share one random
    subset of rows (so not the unshared statistics, but as many rows); the solve runs."""
    model = _llama().float()
    layers = _linears(model)
    col = _collect(model, layers, True, _batches(3), space="auto", sample_fraction="auto", expected_batches=3)
    groups = sorted(tuple(g) for g in col.groups().values() if len(g) > 1)
    assert groups == [(f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj") for i in range(2)]
    alone = _collect(model, layers, False, _batches(3), space="auto", sample_fraction="auto", expected_batches=3)
    assert col.samples() == alone.samples()
    build_candidates(layers, col.stats)
