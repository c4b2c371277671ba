"""
The tests: the math of each piece, and the promises a user relies on.

    python -m pytest -q test_all.py
"""

import ast
import contextlib
import copy
import dataclasses
import errno
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

from collections import Counter

# the tests check what CI's machine does, with no GPU, on any machine: a GPU would change what they read
# (--device=auto, the default preset, the DDP test's backend)
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np
import pytest
import regex
import tiktoken.load
import torch
import torch.nn.functional as F

import bench
import bridge
import config
import headline
import data
import draw
import prune
import sparse_gpt
import tasks
import train
from config import UserError, atomic_file, parse_args, write_atomic
from tasks import Prompt, make_prompts
from sparse_gpt import (GPT, GPTConfig, RMSNorm, abs_bits, abstopk, abstopk_radix, abstopk_radix_when_compiled,
                        sink_attention, target_nonzeros, topk_weight_mask)

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")   # a file, where a test needs one in place of a folder


def tiny_config(**kw):
    return GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, d_model=32, d_head=16), **kw})


def tiny_train_config(out_dir, **kw):
    base = dict(out_dir=str(out_dir), max_iters=6, eval_interval=3, eval_iters=1, log_interval=1,
                sample_tokens=4, batch_size=4, block_size=32, n_layer=1, d_model=32, l0_frac=0.25)
    return train.TrainConfig(**{**base, **kw})

# -----------------------------------------------------------------------------
# model pieces


@pytest.mark.parametrize("abstopk", [abstopk, abstopk_radix])
def test_abstopk_keeps_exactly_k_largest_and_grads_only_through_them(abstopk):
    torch.manual_seed(0)
    x = torch.randn(5, 7, 40, requires_grad=True)
    y = abstopk(x, 10)
    assert ((y != 0).sum(-1) == 10).all()
    kept = y != 0
    assert torch.equal(y[kept], x[kept])
    # every kept |x| is at least every dropped |x| in its row
    a = x.detach().abs()
    assert (a.masked_fill(~kept, math.inf).amin(-1) >= a.masked_fill(kept, -math.inf).amax(-1)).all()
    (y * torch.randn_like(y)).sum().backward()
    assert ((x.grad != 0) == kept).all()
    assert ((abstopk(torch.ones(3, 8), 3) != 0).sum(-1) == 3).all()   # ties: still exactly k


def test_abstopk_on_a_gpu_or_compiled_keeps_the_k_largest(monkeypatch):
    """Its topk path (a GPU's, and what torch.compile traces) runs on a CPU for k = 0 or k > width only:
    taken here as it is there, against a threshold from a full sort."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    x = torch.randn(5, 40)
    tenth = x.abs().sort(-1, descending=True).values[:, 9:10]
    assert torch.equal(abstopk(x, 10), torch.where(x.abs() >= tenth, x, 0))


def test_abstopk_on_bits_keeps_what_topk_on_abs_keeps():
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.logspace(-30, 30, 64)[:, None]   # tiny to huge magnitudes, both signs
    x[0, :40] = 0                                              # ties at zero, ties at a nonzero value,
    x[1, 10:] = -x[1, 9]
    x[2, :3] = torch.tensor([math.inf, -math.inf, 0.0]) / torch.tensor([1.0, 1.0, 0.0])   # +-inf, nan (0/0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        y = x.to(dtype)
        idx = y.abs().topk(24, dim=-1, sorted=False).indices   # the plain way: topk on |x|
        plain = torch.zeros_like(y).scatter(-1, idx, y.gather(-1, idx))
        assert torch.equal(abstopk(y, 24).isnan(), plain.isnan()), dtype
        assert torch.equal(abstopk(y, 24).nan_to_num(), plain.nan_to_num()), dtype


def topk_abstopk(x, k):
    """Reference for abstopk on a CPU: AbsTopK as on a GPU, topk on |x|'s bits, then a scatter."""
    idx = abs_bits(x).topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def test_abstopk_on_a_cpu_keeps_what_topk_and_a_scatter_keep_gradient_included():
    torch.manual_seed(0)
    base = torch.randn(6, 40, 3 * 64)
    x = base[..., 64:128]                                      # a strided view, as q, k and v are
    x[0, :, :50] = 0                                           # every row tied at zero (its k-th |x| is 0)
    x[1, 3, 10:] = x[1, 3, 9]                                  # one row tied at a nonzero value
    x[2, 6, :3] = math.nan
    with_infs = base.clone()
    with_infs[2, 5, 64:84] = -math.inf                         # more infs than k: a row's k-th |x| is inf
    for b in (base, with_infs, base.to(torch.bfloat16), base.to(torch.float16), base.to(torch.float64)):
        b = b.detach().requires_grad_()
        y = b[..., 64:128]
        plain, ours = topk_abstopk(y, 16), abstopk(y, 16)
        assert torch.equal(ours.isnan(), plain.isnan()) and torch.equal(ours.nan_to_num(), plain.nan_to_num()), b.dtype
        g = torch.randn_like(ours)
        assert torch.equal(torch.autograd.grad(ours, b, g)[0], torch.autograd.grad(plain, b, g)[0]), b.dtype
    row, columns = torch.randn(64), torch.randn(64, 30).t()    # one row (1-D); rows that are columns of a matrix
    tied_once = (torch.arange(600, dtype=torch.int16) + 0x3F80).view(torch.bfloat16)   # 600 distinct values
    tied_once[0] = -tied_once[300]     # the 300th largest |x| twice: 301 kept at first (in bf16 a sum says 300)
    for y, k in ((row, 1), (row, 64), (row, 63), (columns, 5), (tied_once, 300), (torch.randn(0, 8), 3)):
        assert torch.equal(abstopk(y, k), topk_abstopk(y, k)), (y.shape, k)


def lowest_index_abstopk(x, k):
    """Reference for abstopk_radix: a stable full sort, so ties at the k-th |x| go to the lowest index."""
    idx = (-x.abs().double()).argsort(dim=-1, stable=True)[..., :k]
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def test_abstopk_radix_keeps_what_topk_keeps_and_ties_by_lowest_index():
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.logspace(-30, 30, 64)[:, None]   # tiny to huge magnitudes, both signs
    torch.testing.assert_close(abstopk_radix(x, 24), abstopk(x, 24), rtol=0, atol=0)
    x = torch.tensor([[0.0, 3, -1, 3, 0, -3, 2, 0], [0, 0, -2, 0, 0, 0, 0, 0]])
    kept = abstopk_radix(x.requires_grad_(), 2)                 # ties at the k-th |x|: the first ones
    assert kept.tolist() == [[0, 3, 0, 3, 0, 0, 0, 0], [0, 0, -2, 0, 0, 0, 0, 0]]
    kept.sum().backward()                                      # row 2 keeps its first 0 too: its gradient flows
    assert x.grad.tolist() == [[0, 1, 0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0]]
    up = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))   # one ulp above 1: the lowest bit decides
    assert abstopk_radix(torch.stack([up, up, torch.tensor(1.0)])[None], 1).tolist() == [[up.item(), 0, 0]]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # every float width, each its own bits
        y = torch.randn(32, 64).to(dtype)                       # bf16 and fp16: many exact ties
        assert torch.equal(abstopk_radix(y, 16), lowest_index_abstopk(y, 16)), dtype
    assert abstopk_radix(torch.tensor([[1.0, 1 + 1e-12, 0.5]], dtype=torch.float64), 1)[0, 1] == 1 + 1e-12
    assert abstopk_radix(torch.tensor([[1.0, math.inf, math.inf, -2]]), 1).tolist() == [[0, math.inf, 0, 0]]


def test_a_model_with_abstopk_by_radix_runs_topk_eager_and_radix_compiled(tmp_path):
    model = train.make_model(tiny_train_config(tmp_path, abstopk_by="radix", compile=True, device="cpu"))
    assert all(site.abstopk is abstopk_radix_when_compiled for site in model.sites.values())
    topk_model = train.make_model(tiny_train_config(tmp_path, device="cpu"))
    topk_model.load_state_dict(model.state_dict())
    idx = torch.randint(model.config.vocab_size, (2, 16))
    torch.testing.assert_close(model(idx, idx)[1], topk_model(idx, idx)[1], rtol=0, atol=0)
    x = torch.randn(4, 32)
    x[1, 8:] = x[1, 7]                                         # nonzero ties, where topk and radix keep other entries
    assert not torch.equal(abstopk(x, 8), lowest_index_abstopk(x, 8))
    assert torch.equal(abstopk_radix_when_compiled(x, 8), abstopk(x, 8))   # eager: abstopk, ties as topk's
    with pytest.raises(UserError, match=r"abstopk_by=radix \(given, the gpu preset's, or saved in a resumed run\) is how "
                                        r"compiled code selects; it needs"):
        tiny_train_config(tmp_path, abstopk_by="radix")


def test_a_resumed_run_is_checked_on_its_saved_settings_not_the_presets(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a GPU machine: the gpu preset is the default
    for preset, saved_as in (("cpu", {}), ("gpu", {"abstopk_by": "topk"}), ("gpu", {"compile": True, "abstopk_by": "topk"})):
        run = tmp_path / f"{preset}{len(saved_as)}"
        settings = dataclasses.asdict(train.TrainConfig(preset=preset, **{**train.PRESETS[preset], **saved_as,
                                                                        "out_dir": str(run)}))
        os.makedirs(run)
        torch.save({"format": train.CHECKPOINT_FORMAT, "model": {}, "model_config": {}, "step": 1,
                    "train_config": settings}, run / "ckpt.pt")
        cfg = train.config_from_args([f"--out_dir={run}", "--resume=True", "--compile=False"])
        assert (cfg.preset, cfg.compile, cfg.abstopk_by) == (preset, False, "topk")
    cfg = train.config_from_args([f"--out_dir={run}", "--resume=True", "--abstopk_by=radix"])   # saved compile=True
    assert (cfg.compile, cfg.abstopk_by) == (True, "radix")
    cfg = train.config_from_args([f"--out_dir={tmp_path / 'new'}", "--compile=False"])   # the gpu preset, eager
    assert (cfg.preset, cfg.compile, cfg.abstopk_by) == ("gpu", False, "triton")      # its kernel runs eager too
    with pytest.raises(UserError, match=r"abstopk_by=radix .* needs --compile=True"):
        train.config_from_args([f"--out_dir={tmp_path / 'new'}", "--compile=False", "--abstopk_by=radix"])


def test_abstopk_by_triton_is_refused_off_a_gpu_and_without_triton(tmp_path, monkeypatch):
    with monkeypatch.context() as m:                           # refused before the data is built
        m.setattr(data, "prepare", lambda *a, **k: pytest.fail("the data was built before the refusal"))
        with pytest.raises(UserError, match=r"abstopk_by=triton .* is a kernel for CUDA GPUs; on --device=cpu pass "):
            train.train(tiny_train_config(tmp_path, abstopk_by="triton", device="cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"abstopk_by=triton needs the triton package .* or pass --abstopk_by=topk --compile=False"):
        train.make_model(tiny_train_config(tmp_path, abstopk_by="triton", device="cuda"))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton here (.ci/run installs it)")
def test_the_triton_kernel_selects_as_radix_does_in_tritons_interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")            # read when the kernel is defined: on numpy, on a CPU
    monkeypatch.delitem(sys.modules, "abstopk_triton", raising=False)
    import abstopk_triton
    torch.manual_seed(0)
    wide = torch.randn(6, 3 * 40)
    rows = [(torch.randn(5, 7, 40), 10), (wide[:, 40:80], 8),   # a slice, as q, k and v are (fp32: strided)
            (torch.randn(3, 33), 33), (torch.randn(4, 24), 1),
            (torch.randn(3, 2048), 512), (torch.randn(2, 64), 16),   # one row a program; no padding
            (torch.randn(40, 6).t(), 8)]                      # rows that are columns of a matrix (strides 1, 6)
    x = torch.randn(4, 48)
    x[0, 6:] = 0                                               # fewer than k nonzeros: ties at 0
    x[1, 10:] = x[1, 9]                                        # ties at a nonzero k-th |x|
    x[2, [3, 7]] = math.inf
    x[3, :] = -x[3, 0]                                         # a row of one |x|
    rows.append((x, 12))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        one = torch.ones(1, dtype=dtype)
        for y, k in rows + [(torch.cat([one, torch.nextafter(one, 2 * one)])[None], 1)]:   # the lowest bit decides
            y, y_ref = y.to(dtype).detach().requires_grad_(), y.to(dtype).detach().clone().requires_grad_()
            kept, ref = abstopk_triton.abstopk(y, k), lowest_index_abstopk(y_ref, k)
            grad = torch.arange(y.numel(), dtype=dtype).view_as(y)           # the kept zeros pass theirs too
            kept.backward(grad)
            ref.backward(grad)
            assert torch.equal(kept, ref) and torch.equal(y.grad, y_ref.grad), (dtype, y.shape, k)
        nan = torch.randn(2, 40, dtype=dtype)
        nan[0, [5, 30]], nan[1, 2] = math.nan, -math.nan       # ranked by its bits, above inf, as radix ranks it
        kept, ref = abstopk_triton.abstopk(nan, 8), abstopk_radix(nan, 8)
        assert torch.equal(kept.isnan(), ref.isnan()) and torch.equal(kept.nan_to_num(), ref.nan_to_num()), dtype
    for bad, k in ((x, 0), (x, 49), (x.to(torch.int32), 2), (x.double(), 2)):   # fp64: no kernel of 64-bit rows
        with pytest.raises(ValueError, match=f"k={k}"):
            abstopk_triton.abstopk(bad, k)
    cfg = tiny_train_config(tmp_path, abstopk_by="triton", device="cpu", afrac=0.5)
    model, by_topk = train.make_model(cfg), train.make_model(dataclasses.replace(cfg, abstopk_by="topk"))
    by_topk.load_state_dict(model.state_dict())
    idx = torch.randint(model.config.vocab_size, (2, 32))      # no ties: the same choice as topk's
    losses = [m(idx, idx)[1] for m in (model, by_topk)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == losses[1].item()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), by_topk.parameters())
               if a.grad is not None)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # bf16: what a GPU's autocast gives the sites
def test_compiled_abstopk_by_radix_selects_by_radix_and_ties_by_lowest_index(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32).to(dtype)
    x[0, 0, 4:] = 0                                            # a row with fewer than k nonzeros: ties at 0
    x[1, 2, 8:] = x[1, 2, 7]                                   # and one with ties at a nonzero k-th value
    x.requires_grad_()
    y = torch.compile(abstopk_radix_when_compiled, dynamic=False)(x, 8)
    y.backward(torch.ones_like(y))
    x_ref = x.detach().clone().requires_grad_()
    ref = lowest_index_abstopk(x_ref, 8)
    ref.backward(torch.ones_like(ref))
    assert torch.equal(y, ref)
    assert torch.equal(x.grad, x_ref.grad) and x.grad.sum() == 4 * 8 * 8   # the kept zeros pass a gradient too


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    norm.weight.data = torch.randn(8)
    for x in (torch.randn(3, 8), 1e-3 * torch.randn(3, 8)):        # small x: where eps weighs (trained with 1e-5)
        expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
        torch.testing.assert_close(norm(x), expected)
    assert torch.equal(norm(torch.zeros(2, 8)), torch.zeros(2, 8))   # zero stays zero, not nan


def test_sink_minus_inf_is_plain_causal_attention_and_finite_sink_is_off_by_one_softmax():
    torch.manual_seed(0)
    B, nh, T, hs = 2, 3, 9, 16
    q, k, v = (torch.randn(B, nh, T, hs) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sink_attention(q, k, v, torch.full((nh,), -math.inf)), plain)
    sink = torch.tensor([0.0, 1.5, -2.0])
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    weights = scores.exp() / (scores.exp().sum(-1, keepdim=True) + sink.exp().view(1, nh, 1, 1))
    torch.testing.assert_close(sink_attention(q, k, v, sink), weights @ v, atol=1e-5, rtol=1e-5)


def test_site_names_unique_and_complete():
    model = GPT(tiny_config())
    suffixes = ["resid_pre", "attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta", "resid_mid",
                "mlp.act_in", "mlp.post_act", "mlp.resid_delta"]
    assert list(model.sites) == [f"{i}.{s}" for i in range(2) for s in suffixes] + ["final_resid"]


def test_a_new_site_is_two_lines_named_by_its_kind_recorded_and_no_pruning_node(monkeypatch):
    init, forward = sparse_gpt.CausalSelfAttention.__init__, sparse_gpt.CausalSelfAttention.forward
    def init_with_z(self, config):                                   # as the docstring says to add one
        init(self, config)
        self.site_z = sparse_gpt.Site("attn_z", config.d_model, config)
    monkeypatch.setattr(sparse_gpt.CausalSelfAttention, "__init__", init_with_z)
    monkeypatch.setattr(sparse_gpt.CausalSelfAttention, "forward", lambda self, x: self.site_z(forward(self, x)))
    model = GPT(tiny_config())
    assert {"0.attn_z", "1.attn_z"} <= set(model.sites) and model.sites["0.attn_z"].k == 0   # not AbsTopK'd
    assert "0.attn_z" not in prune.node_sites(model) and "0.attn.q" in prune.node_sites(model)
    _, cache = model.run_with_cache(torch.randint(0, 64, (2, 16)), ["0.attn_z", "0.attn.resid_delta"])
    assert torch.equal(cache["0.attn_z"], cache["0.attn.resid_delta"])   # the attention's output, where it sits


def test_hooks_record_and_replace_exactly_what_they_should():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    _, cache = model.run_with_cache(torch.randint(0, 64, (2, 16)))
    assert not any(a.requires_grad for a in cache.values())   # a record holds no graph: no memory kept, no leak
    with torch.no_grad():
        model.bigram.normal_()                              # not its init's zeros: last= must read it at last
    idx = torch.randint(0, 64, (2, 16))
    logits, cache = model.run_with_cache(idx)
    assert len(cache) == len(model.sites)
    last = torch.tensor([15, 3])                           # logits at one position per row, as tasks read them
    torch.testing.assert_close(model(idx, last=last)[0], logits[torch.arange(2), last])
    with model.hooks({name: (lambda x, name: x) for name in model.sites}):
        assert torch.equal(model(idx)[0], logits)         # identity hooks: bit-identical
    assert all(site.hook is None for site in model.sites.values())   # removed on exit
    seen = {}

    def record(x, name):
        seen[name] = x
        return x

    with torch.no_grad():
        model.blocks[1].mlp.c_proj.bias.normal_()          # not its init's zeros: what it writes shows
    logits, cache = model.run_with_cache(idx)
    hooks = {name: record for name in model.sites}
    hooks["1.mlp.post_act"] = lambda x, name: torch.zeros_like(x)
    with model.hooks(hooks):
        zeroed_logits, _ = model(idx)
    assert not torch.equal(zeroed_logits, logits)
    for name in ["0.attn.q", "0.mlp.post_act", "1.attn.v", "1.mlp.act_in"]:   # upstream: untouched
        assert torch.equal(seen[name], cache[name])
    # downstream: the MLP now writes only its (AbsTopK'd) output bias
    b = model.blocks[1].mlp.c_proj.bias.detach()
    torch.testing.assert_close(seen["1.mlp.resid_delta"], abstopk(b.expand(2, 16, 32), 8))
    assert not torch.equal(seen["final_resid"], cache["final_resid"])
    with pytest.raises(KeyError):
        with model.hooks({"9.attn.q": record}):
            pass


def test_hooks_are_removed_when_the_code_inside_raises():
    model = GPT(tiny_config())
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks({"0.attn.q": lambda x, name: torch.zeros_like(x)}):
            raise RuntimeError("boom")
    assert all(site.hook is None for site in model.sites.values())   # else every later forward stays ablated


def test_generate_samples_from_the_top_k_at_the_temperature_and_crops_the_context():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    with torch.no_grad():
        model.bigram.copy_(torch.arange(64.0).expand(64, 64) * 0.5)   # logits rise with the token id
    idx = torch.zeros(200, 1, dtype=torch.long)
    assert set(model.generate(idx, 1, top_k=3)[:, -1].tolist()) == {61, 62, 63}   # each of the 3, none other
    assert (model.generate(idx, 1, temperature=1e-3)[:, -1] == 63).all()           # near 0: greedy
    assert model.generate(torch.zeros(1, 16, dtype=torch.long), 3).shape == (1, 19)   # past block_size 16
    assert (model.generate(idx, 1, temperature=0)[:, -1] == 63).all()              # 0: greedy, not a division by 0
    assert len(set(model.generate(idx, 1, top_k=100)[:, -1].tolist())) > 3         # more than the vocab: capped, no error
    with torch.no_grad():
        model.bigram.copy_(torch.eye(64).roll(1, 1) * 50)                          # after token t comes t + 1
    context = torch.arange(16)[None]                                               # block_size tokens: 0 ... 15
    assert model.generate(context, 3, temperature=0)[0, 16:].tolist() == [16, 17, 18]   # each read at the newest token


def test_embeddings_and_unembedding_start_at_std_0_02():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=2048, d_model=128))
    for p in (model.wte.weight, model.lm_head.weight):
        assert p.std().item() == pytest.approx(0.02, rel=0.05)


def test_nested_hooks_compose_and_restore():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    ablate = lambda x, name: torch.zeros_like(x)
    with model.hooks({"0.mlp.post_act": ablate}):
        _, cache = model.run_with_cache(idx, ["0.mlp.post_act", "0.attn.q"])
        assert cache["0.mlp.post_act"].abs().sum() == 0           # recorded after the ablation
        assert model.sites["0.mlp.post_act"].hook is ablate       # and the ablation is back
        assert model.run_with_cache(idx, [])[1] == {}             # an empty list records nothing
        assert list(model.run_with_cache(idx, "0.attn.q")[1]) == ["0.attn.q"]   # one name, not its letters
    assert all(site.hook is None for site in model.sites.values())


def test_config_refuses_afrac_that_keeps_nothing_and_bad_sizes():
    with pytest.raises(ValueError, match="afrac=0.005"):
        GPTConfig(d_model=128, afrac=0.005)                      # int(0.64) = 0 would switch AbsTopK off
    assert GPTConfig(d_model=128, afrac=0.005, sparse_sites=()).afrac == 0.005   # no AbsTopK site: fine
    assert GPTConfig(d_model=16, d_head=4, afrac=0.05, sparse_sites=("mlp_neuron",)).afrac == 0.05   # 3 of 64 kept
    for bad in (dict(d_head=0), dict(d_model=-16), dict(mlp_ratio=0), dict(n_layer=0)):
        with pytest.raises(ValueError, match="must be positive"):
            GPTConfig(**bad)


def test_projection_exact_counts_min_per_channel_and_dense_parts_untouched():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    with torch.no_grad():
        for _, p in model.sparse_params():
            if p.dim() == 1:
                p.normal_()                                  # biases start at 0; trained ones are not
        model.blocks[0].mlp.c_fc.weight[3].mul_(1e-6)     # a neuron with only tiny weights
        model.blocks[0].norm1.weight.uniform_()
    bigram, norm = model.bigram.clone(), model.blocks[0].norm1.weight.clone()
    model.project_weights(0.05)
    for name, p in model.sparse_params():
        assert int(torch.count_nonzero(p)) == target_nonzeros(p.shape, 0.05, 4), name
        if p.dim() == 2:
            assert int((p != 0).sum(1).min()) >= 4, name
    assert (model.blocks[0].mlp.c_fc.weight[3] != 0).sum() == 4
    numel = sum(p.numel() for _, p in model.sparse_params())
    exact, params, fewest, reached = train.sparsity_report(model, 0.05)          # what train.py reports at the end
    assert (exact, fewest) == (params, 4) and reached == model.project_weights(0.05) / numel
    assert reached > 0.06        # above the 0.05 asked: rows of 32 keep at least 4 (1/8), and it says so
    assert torch.equal(model.bigram, bigram) and torch.equal(model.blocks[0].norm1.weight, norm)
    assert "bigram" not in [n for n, _ in model.sparse_params()]


@pytest.mark.parametrize("by", ["partition", "topk"])   # the CPU's default and CUDA's, both run here
def test_topk_weight_mask_is_exact_with_ties(by):
    w = torch.zeros(10, 10)
    w[0, :3] = 1.0
    mask = topk_weight_mask(torch.stack([w, -w.T]), 45, 4, by)       # a stack: each keeps its own 45
    assert mask.sum((1, 2)).tolist() == [45, 45] and (mask.sum(2) >= 4).all()
    assert mask[0, 0, :3].all() and mask[1, :3, 0].all()
    torch.manual_seed(0)
    w = torch.randn(3, 64, 32) * torch.rand(3, 64, 1)                # no ties: one right answer
    assert torch.equal(topk_weight_mask(w, 300, 2, by), topk_weight_mask(w, 300, 2, "partition"))
    keep = topk_weight_mask(w, 300, 2, by).bool()
    assert (keep.sum(2) >= 2).all() and keep.sum((1, 2)).tolist() == [300] * 3
    assert topk_weight_mask(w.bfloat16(), 300, 2, by).dtype == torch.bfloat16   # it multiplies the weights in place


def test_target_nonzeros():
    assert target_nonzeros((100, 50), 0.1, 4) == 500
    assert target_nonzeros((100, 50), 0.01, 4) == 400       # min-per-channel floor
    assert target_nonzeros((100,), 0.001, 4) == 1
    assert target_nonzeros((3, 2), 0.5, 4) == 6
    assert target_nonzeros((3, 10), 0.29, 0) == 9 and target_nonzeros((3, 10), 0.21, 0) == 6   # rounded, not floored
    assert target_nonzeros((16, 16), 0.001, 0) == 1         # no floor per row, but never an empty matrix
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, d_model=16, d_head=16, min_per_channel=0))
    assert model.project_weights(0.001) == len(model.sparse_params())   # one weight each, where k = 0 used to crash


def test_init_scales_the_output_projections_by_depth():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=4, d_model=128))
    for block in model.blocks:
        for proj in (block.attn.c_proj, block.mlp.c_proj):     # N(0, 0.02 / sqrt(2 n_layer)) [code]
            assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_biases_start_at_0_abstopk_keeps_afrac_of_each_sites_width_and_every_matrix_is_sparsified():
    model = GPT(tiny_config(afrac=0.25))                        # d_model 32, d_mlp 128
    biases = [name for name, p in model.named_parameters() if name.endswith("bias")]
    assert biases and all((p == 0).all() for name, p in model.named_parameters() if name in biases)   # [paper]
    for name, site in model.sites.items():
        width = 128 if site.kind == "mlp_neuron" else 32
        assert site.k == (width // 4 if site.kind in model.config.sparse_sites else 0), name
    sparsified = {name for name, _ in model.sparse_params()}
    matrices = {name for name, p in model.named_parameters() if p.dim() == 2 and p is not model.bigram}
    assert model.config.sparse_biases and sparsified == matrices | set(biases)   # the biases too, by default
    assert {"lm_head.weight", "wte.weight"} <= sparsified                      # the embeddings and unembedding


def test_the_attention_sink_starts_at_0_and_learns():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    for block in model.blocks:
        assert (block.attn.sink == 0).all() and block.attn.sink.grad.abs().min() > 0


def test_learned_pos_adds_a_position_embedding_to_the_token_embedding():
    torch.manual_seed(0)
    model = GPT(tiny_config(learned_pos=True))
    idx = torch.randint(0, 64, (2, 16))
    _, cache = model.run_with_cache(idx, ["0.resid_pre"])
    torch.testing.assert_close(cache["0.resid_pre"], model.wte(idx) + model.wpe.weight[:16])
    assert GPT(tiny_config()).wpe is None                    # off by default: no positional embedding


def test_sparse_biases_false_leaves_every_bias_dense():
    torch.manual_seed(0)
    model = GPT(tiny_config(sparse_biases=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model.project_weights(0.05)
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    assert biases and all((p != 0).all() for p in biases)
    assert not any(name.endswith("bias") for name, _ in model.sparse_params())


# -----------------------------------------------------------------------------
# training pieces


def test_l0_and_lr_schedules_at_breakpoints():
    cfg = train.TrainConfig(max_iters=1000, l0_frac=1 / 16, learning_rate=0.01)
    assert train.l0_at(0, cfg) == 1.0 and train.l0_at(10, cfg) == 1.0          # dense until 1%
    assert train.l0_at(500, cfg) == pytest.approx(1 / 16) and train.l0_at(900, cfg) == pytest.approx(1 / 16)
    mid = (10 + 500) / 2
    assert train.l0_at(mid, cfg) == pytest.approx((1 + 1 / 16) / 2)
    assert train.l0_at(499, cfg) == pytest.approx(1 + (1 / 16 - 1) * 489 / 490)   # reaches the target at 500, not before
    # sharkfin: warmup over 1%, linear decay to 0, times sqrt(target / now)
    assert train.lr_at(0, cfg) == pytest.approx(0.01 * 0.1 * math.sqrt(1 / 16))
    assert train.lr_at(9, cfg) == pytest.approx(0.01 * math.sqrt(1 / 16))
    assert train.lr_at(500, cfg) == pytest.approx(0.01 * 500 / 990)
    assert train.lr_at(1000, cfg) == 0.0
    dense = train.TrainConfig(max_iters=1000, l0_frac=1.0, afrac=1.0, learning_rate=0.01)
    assert train.lr_at(300, dense) == pytest.approx(0.01 * 700 / 990)


def test_the_sparsity_report_counts_a_parameter_off_its_target():
    model = GPT(tiny_config())
    with torch.no_grad():
        for _, p in model.sparse_params():
            p.normal_()                                   # every entry nonzero before projecting
    model.project_weights(0.25)
    exact, params, _, _ = train.sparsity_report(model, 0.25)
    assert exact == params
    with torch.no_grad():
        w = model.blocks[0].mlp.c_fc.weight
        w[w == 0] = 1e-3                                  # one parameter dense again: above its target
    assert train.sparsity_report(model, 0.25)[:2] == (params - 1, params)


def test_grad_rms_normalization():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(7))]
    grads = [torch.randn(4, 5) * 3, torch.randn(7) * 0.1]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    rms = train.normalize_grad_rms(params)
    flat = torch.cat([p.grad.flatten() for p in params])
    assert flat.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(flat * rms, torch.cat([g.flatten() for g in grads]))


def test_config_parsing_and_bad_values(capsys):
    cfg = parse_args(train.TrainConfig, ["--d_model=64", "--l0_frac=0.5", "--compile=true", "--sparse_sites=attn_q,mlp_neuron"])
    assert (cfg.d_model, cfg.l0_frac, cfg.compile, cfg.sparse_sites) == (64, 0.5, True, ("attn_q", "mlp_neuron"))
    for text, value in (("True", True), ("1", True), ("false", False), ("0", False)):
        assert parse_args(train.TrainConfig, [f"--resume={text}"]).resume is value
    with pytest.raises(UserError, match=r"--resume=yes is not a valid bool \(default False\)"):
        parse_args(train.TrainConfig, ["--resume=yes"])                    # not silently False
    assert parse_args(train.TrainConfig, ["--out_dir=~/runs/a"]).out_dir == os.path.expanduser("~/runs/a")
    twice = train.config_from_args(["--preset=gpu", "--preset=cpu45", "--out_dir=out/never"])   # the last wins, whole
    assert (twice.preset, twice.max_iters, twice.d_model) == ("cpu45", 2500, 128)
    for cls in (train.TrainConfig, bridge.BridgeConfig, prune.PruneConfig, bench.BenchConfig):
        with pytest.raises(SystemExit):
            parse_args(cls, ["--help"])
        lines = capsys.readouterr().out.splitlines()[1:]
        shown = [line.split("  # ")[0].strip() for line in lines]
        assert parse_args(cls, shown) == cls(), cls                 # every value --help shows is taken back as is
        assert any(re.match(r"  --device=auto +# auto \| cpu \| cuda", line) for line in lines), cls   # and its meaning
        assert not [a for a in shown if os.getcwd() in a], cls       # paths as written, not this machine's
        if cls is bridge.BridgeConfig:                               # and none that it would refuse
            assert not {a[2:].split("=")[0] for a in shown} & set(bridge.TRAIN_ONLY_KEYS)
    with pytest.raises(SystemExit):
        parse_args(tasks.TaskConfig, ["-h"])                        # the short form too
    notes = config.setting_comments(bench.BenchConfig)           # a comment of two lines whole; a section's not
    assert notes["rounds"].endswith("after one untimed step (so 10 steps in 10 rounds run 20)")
    assert config.setting_comments(train.TrainConfig)["eval_task"].endswith('at each evaluation ("" = none)')
    with pytest.raises(UserError) as info:
        parse_args(bridge.BridgeConfig, ["--compil=True"])
    assert "--compile" not in str(info.value)                       # nor suggests one
    assert train.config_from_args(["--min_per_channel=200", "--l0_frac=1", "--out_dir=out/never"]).l0_frac == 1.0
    for bad, words in [("--d_modle=64", "did you mean --d_model"), ("--d_model=big", "not a valid int"),
                       ("--l0_frac=0", "l0_frac=0.0 is outside"), ("--l0_frac=1.5", "l0_frac=1.5 is outside"),
                       ("--afrac=0", "afrac=0.0 is outside"), ("--sparse_sites=attn_x", "unknown sparse_sites"),
                       ("--d_model=40", "not a multiple of d_head"), ("--preset=tpu", "preset=tpu is unknown"),
                       ("--abstopk_by=sort", "abstopk_by=sort is unknown; allowed: topk, radix"),
                       ("--learning_rate=nan", "learning_rate=nan must be positive and finite"),
                       ("--learning_rate=-1", "learning_rate=-1.0 must be positive"),
                       ("--beta2=1", r"beta2=1.0 is outside \[0, 1\)"), ("--eps=0", "eps=0.0 must be positive"),
                       ("--weight_decay=inf", "weight_decay=inf must be finite and not negative"),
                       ("--warmup_frac=nan", "warmup_frac=nan is outside"), ("--min_per_channel=-1", "must not be negative"),
                       ("--min_per_channel=129", r"min_per_channel=129 exceeds d_model=128.*allowed: 0 to 128"),
                       (f"--seed={2**63}", r"seed=9223372036854775808 is outside \[-2\*\*63, 2\*\*63\)")]:
        with pytest.raises(UserError, match=words):
            train.config_from_args([bad, "--out_dir=out/never"])


def test_the_readme_gives_each_files_length_within_5_percent():
    """The first paragraph sizes every file for a reader deciding what to read: it must stay true."""
    intro = " ".join(open_text(README).split("## Quick start")[0].split())
    stated = {"sparse_gpt.py": r"model about (\d+) lines", "abstopk_triton.py": r"an (\d+)-line GPU kernel",
              "data.py": r"data and tokenizer (\d+)", "train.py": r"training (\d+)", "tasks.py": r"tasks (\d+)",
              "prune.py": r"pruning (\d+)", "draw.py": r"\+ (\d+) for the pictures", "bridge.py": r"bridges (\d+)",
              "bench.py": r"benchmark (\d+)", "headline.py": r"headline experiment (\d+)",
              "config.py": r"settings and safe writes (\d+)"}
    for name, pattern in stated.items():
        lines = len(open_text(os.path.join(HERE, name)).splitlines())
        assert abs(lines - int(re.search(pattern, intro).group(1))) <= 0.05 * lines, (name, lines)


def test_every_setting_the_readme_passes_is_one_its_script_takes():
    """A renamed setting must not leave the README's commands behind (they would stop at an unknown key),
    nor those of the performance log, which says how each figure was measured."""
    settings = {"train": train.TrainConfig, "bench": bench.BenchConfig, "bridge": bridge.BridgeConfig,
                "prune": prune.PruneConfig, "headline": headline.HeadlineConfig, "tasks": tasks.TaskConfig,
                "draw": draw.DrawConfig, "data": data.DataConfig}
    text = " ".join(re.sub(r"\\?\n\s*", " ", open(path).read())   # commands continued over lines
                    for path in (README, os.path.join(HERE, "docs", "performance_log.md")))
    commands = re.findall(r"python (\w+)\.py((?: --\w+=\S*)*)", text)
    assert len(commands) > 60
    for script, args in commands:
        known = {f.name for f in dataclasses.fields(settings[script])}
        assert not [a for a in args.split() if a[2:].split("=")[0] not in known], (script, args)


def test_bad_model_shape_out_dir_and_device_are_user_errors_before_anything_is_written(tmp_path):
    from config import resolve_device
    for bad, words in [("--mlp_ratio=0", "mlp_ratio=0 must be positive"), ("--d_head=0", "d_head=0 must be positive"),
                       ("--sparse_sites=attn_q,mlp_in,attn_q", "sparse_sites=attn_q,mlp_in,attn_q names a site twice"),
                       ("--d_model=-16", "d_model=-16 must be positive"), ("--d_model=0", "d_model=0 must be positive"),
                       ("--out_dir=", "out_dir is empty"), (f"--out_dir={__file__}", "is a file, not a folder"),
                       (f"--out_dir={__file__}/runs/a", r"is inside a file \(.*test_all.py\), not a folder"),
                       (f"--out_dir={__file__}/../o", r"is inside a file \(.*test_all.py\), not a folder")]:
        with pytest.raises(UserError, match=words):
            train.config_from_args([f"--out_dir={tmp_path / 'o'}", bad])
    for name in ["gpu", "cuda:x", "cuda:99", "cpu:0"] + ([] if torch.backends.mps.is_available() else ["mps"]):
        with pytest.raises(UserError, match=f"--device={name} "):
            resolve_device(name)
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(UserError, match="--device=gpu is unknown; allowed: auto, cpu, cuda, cuda:N"):
        train.train(tiny_train_config(tmp_path / "o", device="gpu"))
    assert not (tmp_path / "o").exists()


def test_a_folder_we_cannot_write_in_is_refused_before_the_work_and_a_complete_cache_still_read(tmp_path, corpus,
                                                                                                 monkeypatch):
    locked, cache = tmp_path / "locked", os.path.dirname(corpus[0])
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access
    def access(path, mode):   # both as a read-only mount is, to root too (whom the chmod does not stop)
        return not (os.fspath(path) in (str(locked), cache) and mode & os.W_OK) and real_access(path, mode)
    monkeypatch.setattr(os, "access", access)
    where = f"cannot be written: {locked} does not let us write in it"
    with pytest.raises(UserError, match=f"--out_dir={locked}/runs/a {where}"):
        train.train(tiny_train_config(locked / "runs" / "a"))
    with pytest.raises(UserError, match=f"--out_dir={locked}/b {where}"):
        bridge.train_bridges(tiny_bridge_config(locked / "b", "no_such_dense.pt"))
    for main, args in ((prune.main, ["--ckpt=no_such.pt"]), (headline.main, []), (bench.main, [])):
        with pytest.raises(UserError, match=f"--out_dir={locked}/o {where}"):
            main(args + [f"--out_dir={locked}/o"])
    assert data.prepare(data.DataConfig(), verbose=False) == corpus[0]   # a complete cache is only read
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    with pytest.raises(UserError, match=f"--cache_dir={locked}/data {where}"):
        data.prepare(data.DataConfig(data_dir=str(tmp_path / "src"), cache_dir=f"{locked}/data"))
    assert os.listdir(locked) == []


def run_scripts(arg_lists, cwd=HERE):
    """Run each script side by side (each spends most of its time importing torch on one core); a
    CompletedProcess for each, its output as text."""
    children = []
    try:
        for args in arg_lists:
            children.append(subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True))
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:        # after a timeout or a failed start: none left running
            if child.poll() is None:
                child.kill()
                child.communicate()
    return [subprocess.CompletedProcess(child.args, child.returncode, *out) for child, out in zip(children, outputs)]


def run_script(*args, cwd=HERE):
    return run_scripts([args], cwd)[0]


def one_line_error(args, cwd=HERE):
    """Run a script; assert exit code 2 and a single 'error: ...' line on stderr; return that line."""
    result = run_script(*args, cwd=cwd)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    return lines[0]


@pytest.mark.skipif(sys.platform == "win32", reason="select() waits on sockets only on Windows")
def test_scripts_write_progress_at_once_into_a_pipe_or_file():
    """run_main (every script's) writes stdout line by line: a line printed before a long wait
    reaches `| tee log` at once, where Python's default for a pipe holds it back until 8 KB or the end."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # as a plain shell runs it
    script = "import time, config; config.run_main(lambda argv: (print('step 1'), time.sleep(120)))"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=HERE, stdout=subprocess.PIPE, env=buffered)
    try:
        arrived, _, _ = select.select([child.stdout], [], [], 60)
        assert arrived and child.stdout.readline() == b"step 1\n"
    finally:
        child.kill()
        child.wait()


def test_scripts_end_quietly_when_the_reader_of_their_output_stops():
    """`python tasks.py | head -1`: the pipe closes while the script writes; no traceback (as cat or grep)."""
    script = "import config; config.run_main(lambda argv: [print('line') for _ in range(3)])"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()                              # the reader is gone before the first line
    assert child.stderr.read() == b"" and child.wait() == 1


def test_ctrl_c_in_any_script_is_one_line_and_exit_130():
    script = "import config\ndef main(argv):\n    raise KeyboardInterrupt\nconfig.run_main(main)"
    result = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "interrupted\n")


def test_a_checkpoint_missing_a_part_is_a_one_line_error_naming_it(tmp_path, corpus):
    model = tiny_model()
    full = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config)}
    resume = lambda path: train.config_from_args([f"--out_dir={os.path.dirname(path)}", "--resume=True"])
    cases = [({"model_config": full["model_config"]}, GPT.from_checkpoint,
              r"not a sparse-circuits checkpoint \(no model"),
             ({**full, "model": {k: v for k, v in full["model"].items() if k != "bigram"}}, GPT.from_checkpoint,
              r"holds a model this code cannot build \(RuntimeError: .*Missing key.*bigram"),   # not random weights
             (full, resume, r"is not a train.py checkpoint \(no train_config\)"),
             ({**full, "train_config": {"data_dir": ""}}, lambda path: headline.load(path, "cpu"), "has no val_loss")]
    for i, (ckpt, load, words) in enumerate(cases):
        path = tmp_path / str(i) / "ckpt.pt"
        path.parent.mkdir()
        torch.save(ckpt, path)
        with pytest.raises(UserError, match=words):
            load(str(path))


def test_bad_input_gives_one_line_and_exit_2_and_writes_nothing(tmp_path):
    not_ours = tmp_path / "ckpt.pt"
    not_ours.write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [["train.py", "--bogus=1"], ["train.py", "--max_iters=ten"], ["train.py", "--l0_frac=2"],
             ["train.py", "--afrac=0"], ["train.py", f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'o'}"],
             ["train.py", f"--out_dir={tmp_path}", "--resume=True"]]
    for args, result in zip(cases, run_scripts(cases)):
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert not_ours.read_bytes() == b"not a checkpoint"
    assert not (tmp_path / "o").exists()


def test_an_optimizer_step_does_not_depend_on_the_loss_scale():
    cfg = tiny_train_config("out/never", l0_frac=1.0, device="cpu")
    weights = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(0)
        model = train.make_model(cfg)
        optimizer = train.make_optimizer(model, cfg)
        idx = torch.randint(0, model.config.vocab_size, (2, 16))
        (model(idx, idx)[1] * scale).backward()
        train.optimizer_step(model, optimizer, 5, cfg)          # grads RMS-normalized first: the scale drops out
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-5)


def test_weight_decay_does_not_shrink_the_bigram_table():
    cfg = tiny_train_config("out/never", device="cpu")
    model = train.make_model(cfg)
    optimizer = train.make_optimizer(model, cfg)
    with torch.no_grad():
        model.bigram.fill_(1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)                            # no gradient: only weight decay could move it
    train.optimizer_step(model, optimizer, 5, cfg)
    assert (model.bigram == 1.0).all()
    decay, no_decay = optimizer.param_groups                    # matrices only [paper]: not biases, gains, sinks
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() == 2 and p is not model.bigram}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == cfg.weight_decay
    assert decay["eps"] == no_decay["eps"] == cfg.eps == 0.1    # Adam's eps as asked, not torch's 1e-8


def test_each_step_projects_to_the_annealed_l0_of_the_next_step():
    cfg = tiny_train_config("out/never", device="cpu", max_iters=10, anneal_start=0.0, anneal_end=1.0, l0_frac=0.25)
    model = train.make_model(cfg)
    optimizer = train.make_optimizer(model, cfg)
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)                        # every weight moves: all nonzero before projecting
        _, frac = train.optimizer_step(model, optimizer, step, cfg)
        assert frac == train.l0_at(step + 1, cfg) > cfg.l0_frac   # mid-anneal: denser than the target
        for name, p in model.sparse_params():
            assert int((p != 0).sum()) == target_nonzeros(p.shape, frac, model.config.min_per_channel), (step, name)


def test_every_step_micro_step_and_rank_draws_its_own_batch():
    cfg, tokens = tiny_train_config("out/never"), torch.arange(100_000)
    keys = [(3, 0, 0), (3, 1, 0), (4, 0, 0), (3, 0, 1)]        # (step, micro-step, rank)
    xs = [train.batch_for(tokens, s, m, cfg, r)[0] for s, m, r in keys]
    xs.append(train.batch_for(tokens, 2, 0, dataclasses.replace(cfg, seed=cfg.seed + 1))[0])   # another seed
    assert len({tuple(x.flatten().tolist()) for x in xs}) == 5  # distinct: accumulation averages them, and
                                                                # one seed's are not another's a step later
    assert torch.equal(train.batch_for(tokens, 3, 1, cfg, 0)[0], xs[1])   # and draws them again on resume


def test_the_anneal_and_warmup_follow_their_settings():
    cfg = train.TrainConfig(max_iters=1000, l0_frac=0.25, anneal_start=0.2, anneal_end=0.6, learning_rate=0.01)
    assert train.l0_at(150, cfg) == 1.0 and train.l0_at(200, cfg) == 1.0          # dense until anneal_start
    assert train.l0_at(400, cfg) == pytest.approx(0.625) and train.l0_at(600, cfg) == pytest.approx(0.25)
    cfg = train.TrainConfig(max_iters=1000, l0_frac=1 / 16, learning_rate=0.01)     # warmup: 10 steps
    assert train.lr_at(10, cfg) == pytest.approx(0.01 * math.sqrt(1 / 16))          # the peak, then decay: no overshoot


def test_estimate_loss_is_the_mean_over_its_fixed_batches(corpus):
    folder, _ = corpus
    cfg = tiny_train_config("out/never", eval_iters=3, device="cpu")
    torch.manual_seed(0)
    model = train.make_model(cfg)
    tokens = data.load_tokens(folder, "val")
    out = train.estimate_loss(model, {"val": tokens}, cfg, train.autocast_for(cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        losses = [model(*data.get_batch(tokens, cfg.batch_size, cfg.block_size, gen))[1].item() for _ in range(3)]
    assert out["val"] == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_an_infinite_loss_stops_the_run_too():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(UserError, match="training diverged"):
            train.check_finite(bad, 5, "ckpt.pt", 0)
    train.check_finite(3.25, 5, "ckpt.pt", 0)


def test_an_empty_or_trailing_comma_list_setting_parses_to_its_items():
    assert parse_args(train.TrainConfig, ["--sparse_sites="]).sparse_sites == ()         # AbsTopK nowhere
    assert parse_args(train.TrainConfig, ["--sparse_sites=attn_q,"]).sparse_sites == ("attn_q",)


# -----------------------------------------------------------------------------
# data


@pytest.fixture(scope="session")
def corpus():
    folder = data.prepare(data.DataConfig(), verbose=False)
    return folder, data.get_encoding(folder)


def test_tokenizer_round_trip_and_vocab(corpus):
    folder, enc = corpus
    assert enc.n_vocab == 2048 and enc.eot_token == 2047
    assert enc.decode([2047]) == "<|endoftext|>"
    source = open(os.path.join(HERE, "sparse_gpt.py")).read()
    for text in [source, "naïve = 'héllo wörld' # 日本語 🐍\n\tx\r\n", "\x00\xff odd bytes"]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert len(enc.encode_ordinary(source)) < len(source.encode()) / 2     # it really compresses
    # our ranks file is in tiktoken's own format
    ours = data.read_ranks(os.path.join(folder, "tokenizer.tiktoken"))
    assert tiktoken.load.load_tiktoken_bpe(os.path.join(folder, "tokenizer.tiktoken"), None) == ours
    train_bin = data.load_tokens(folder, "train")
    assert train_bin.dtype == np.uint16 and train_bin.max() <= 2047


def test_bpe_training_on_a_toy_corpus():
    from collections import Counter
    ranks = data.train_bpe(Counter({"aaab": 5, "ab": 3}), vocab_size=256 + 3)
    # pair counts: aa 10, ab 8; after merging aa: (aa,a) 5, ab still 8 (incremental counts)
    assert ranks[b"aa"] == 256 and ranks[b"ab"] == 257 and len(ranks) == 258
    # ties go to the pair counted first (cd, then ab; then cd+ab, counted before ab+cd), and a pair whose
    # count fell (da: 2, then 0 once cd is merged) is not merged on the count it had
    ranks = data.train_bpe(Counter({"cdab": 2, "abcd": 2}), vocab_size=256 + 4)
    assert sorted(ranks, key=ranks.get)[256:] == [b"cd", b"ab", b"cdab"]
    # a pair whose count a merge changed (ca: 4, then 2 once bc is merged) keeps its first place among
    # the ties: after bb, ca (counted before ac), not ac
    ranks = data.train_bpe(Counter({"abcbb": 2, "bcaca": 2}), vocab_size=256 + 4)
    assert list(ranks)[256:] == [b"bc", b"bb", b"ca"]
    assert list(data.train_bpe(Counter({"abc": 1}), vocab_size=300))[256:] == [b"ab", b"abc"]   # no pair left: stop


def test_a_tokenizer_file_of_another_size_is_refused(tmp_path, corpus):
    ranks = data.read_ranks(os.path.join(corpus[0], "tokenizer.tiktoken"))
    for name, other, words in (("more", {**ranks, b"not ours": 2047}, "not a tokenizer of this data.py"),
                               ("fewer", dict(list(ranks.items())[:-1]), "the data folder holds too little text")):
        data.write_ranks(other, str(tmp_path / name))
        with pytest.raises(UserError, match=f"{name} has {len(other)} tokens, not 2047: {words}"):
            data.make_encoding(str(tmp_path / name))


def test_data_dir_without_py_files_or_with_too_little_text_is_a_user_error(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.py").write_text("x = 1\n")
    with pytest.raises(UserError, match=r"data_dir=.*small holds too little text to train a 2048-token tokenizer"):
        data.prepare(data.DataConfig(data_dir=str(tmp_path / "small"), cache_dir=str(tmp_path / "cache")), verbose=False)
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="holds no .py files"):
        data.prepare(data.DataConfig(data_dir=str(tmp_path / "none")))


def test_a_dangling_link_is_skipped_a_linked_file_read_once_and_a_lost_data_folder_is_named(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").symlink_to(tmp_path / "gone.py")
    assert data.list_py_files(str(tmp_path)) == [str(tmp_path / "a.py")]
    (tmp_path / "c.py").symlink_to(tmp_path / "a.py")         # one file by two names is read once,
    (tmp_path / "sub").mkdir()                                 # by its first name in walk order
    (tmp_path / "sub" / "d.py").symlink_to(tmp_path / "a.py")
    os.link(tmp_path / "a.py", tmp_path / "sub" / "e.py")
    (tmp_path / "sub" / "x.py").write_text("y = 2\n")
    (tmp_path / "0.py").symlink_to(tmp_path / "sub" / "x.py")
    for installed in ("site-packages", "dist-packages", "__pycache__"):   # not the standard library's own code
        (tmp_path / installed).mkdir()
        (tmp_path / installed / "p.py").write_text("z = 3\n")
    assert data.list_py_files(str(tmp_path)) == [str(tmp_path / "0.py"), str(tmp_path / "a.py")]
    (tmp_path / "alias").symlink_to(tmp_path)                  # one folder by two names is one data_dir
    assert data.same_data_dir(str(tmp_path / "alias"), str(tmp_path)) and not data.same_data_dir(str(tmp_path), "")
    lost = {"data": str(tmp_path / "cache"), "train_config": {"data_dir": str(tmp_path / "moved")}}
    with pytest.raises(UserError, match=r"data folder .*cache is gone or incomplete, and so is data_dir=.*moved, the folder"):
        data.data_folder(lost)
    with pytest.raises(UserError, match=r"--cache_dir=.*a.py is a file, not a folder"):
        data.DataConfig(cache_dir=str(tmp_path / "a.py"))
    with pytest.raises(UserError, match=r"--cache_dir=.*a.py/cache is inside a file"):
        data.DataConfig(cache_dir=str(tmp_path / "a.py" / "cache"))


def test_data_config_bad_values_are_user_errors():
    for bad, words in [("--val_every=0", "val_every=0 must be at least 2"), ("--val_every=1", "val_every=1 must"),
                       ("--tokenizer_sample_bytes=0", "tokenizer_sample_bytes=0 must be positive")]:
        with pytest.raises(UserError, match=words):
            parse_args(data.DataConfig, [bad])


def test_a_small_home_relative_folder_gets_one_validation_file(tmp_path, monkeypatch, capsys):
    import zlib
    stdlib = data.default_data_dir()
    files = data.list_py_files(stdlib)
    rel, sizes = [os.path.relpath(p, stdlib) for p in files], [os.path.getsize(p) for p in files]
    assert data.val_flags(rel, sizes, 50) == [data.is_val(r, 50) for r in rel]   # the standard corpus splits as before
    empty = next(f"pkg{i}/__init__.py" for i in range(10 ** 4) if data.is_val(f"pkg{i}/__init__.py", 50))
    flags = data.val_flags([empty, "a.py", "b.py"], [0, 900, 900], 50)     # the hash picked only an empty file:
    assert flags[0] and sum(flags[1:]) == 1                                # a file with text joins it
    unpicked = [f"pkg{i}/__init__.py" for i in range(100) if not data.is_val(f"pkg{i}/__init__.py", 50)][:2]
    assert sum(data.val_flags(unpicked, [0, 0], 50)) == 1                  # only empty files: still one
    assert data.val_flags(["a.py"], [900], 50) == [False]                  # one file: trains (train.py refuses it)
    names = ["argparse.py", "ast.py", "csv.py", "difflib.py", "inspect.py", "typing.py"]
    assert not any(data.is_val(n, 50) for n in names)                      # the hash alone picks none of these
    home = tmp_path / "home"
    (home / "small").mkdir(parents=True)
    for n in names:
        (home / "small" / n).write_bytes(open(os.path.join(stdlib, n), "rb").read())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)                       # "~/small" is not a path relative to here
    folder = data.prepare(data.DataConfig(data_dir="~/small", cache_dir="cache"), verbose=False)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    nearest = min(names, key=lambda n: zlib.crc32(n.encode()) % 50)
    assert meta["data_dir"] == str(home / "small") and meta["val_files"] == 1
    assert meta["val_bytes"] == os.path.getsize(home / "small" / nearest)
    assert len(data.load_tokens(folder, "val")) == meta["val_tokens"] > 0
    assert train.TrainConfig(data_dir="~/small").data_dir == str(home / "small")
    json.dump({**meta, "val_files": 0, "val_tokens": 0}, open(os.path.join(folder, "meta.json"), "w"))
    assert data.prepare(data.DataConfig(data_dir="~/small", cache_dir="cache"), verbose=False) == folder
    assert json.load(open(os.path.join(folder, "meta.json")))["val_tokens"] > 0   # a cache of the old split: rebuilt
    tokenizer = open(os.path.join(folder, "tokenizer.tiktoken"), "rb").read()
    for name, damaged in (("train.bin", b"\0" * 1000), ("val.bin", b"\0" * 10),
                          ("tokenizer.tiktoken", tokenizer[:len(tokenizer) // 2])):
        whole = open(os.path.join(folder, name), "rb").read()
        open(os.path.join(folder, name), "wb").write(damaged)        # a copy cut short: found
        assert not data.cache_is_complete(folder), name
        open(os.path.join(folder, name), "wb").write(whole)
    assert data.cache_is_complete(folder)
    open(os.path.join(folder, "tokenizer.tiktoken"), "wb").write(tokenizer[:len(tokenizer) // 2])
    assert data.prepare(data.DataConfig(data_dir="~/small", cache_dir="cache"), verbose=False) == folder   # built again
    assert len(data.load_tokens(folder, "train")) == meta["train_tokens"] and data.cache_is_complete(folder)
    assert open(os.path.join(folder, "tokenizer.tiktoken"), "rb").read() == tokenizer
    for split, files in (("train", meta["files"] - meta["val_files"]), ("val", meta["val_files"])):
        tokens = data.load_tokens(folder, split)                          # every document ends with one <|endoftext|>
        assert int((tokens == 2047).sum()) == files and tokens[-1] == 2047, split
    data.main(["--data_dir=~/small", "--cache_dir=cache"])              # a cache train.py would not use: said so
    assert "note: with --cache_dir this cache is not the one train.py" in capsys.readouterr().out


def test_a_split_too_short_for_one_window_is_a_user_error_before_training(tmp_path, corpus, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "tokenizer.tiktoken").write_bytes(open(os.path.join(corpus[0], "tokenizer.tiktoken"), "rb").read())
    np.arange(1000, dtype=np.uint16).tofile(folder / "train.bin")
    monkeypatch.setattr(data, "prepare", lambda cfg, verbose=True: str(folder))
    for n in (0, 33):   # block_size 32 needs 34 tokens: a window of 33 and a second place to start it
        np.zeros(n, dtype=np.uint16).tofile(folder / "val.bin")
        smaller = " or a smaller --block_size" if n else "$"   # with 0 tokens a smaller one cannot help
        with pytest.raises(UserError, match=f"val split of .* has {n} tokens, too few for --block_size=32 \\(needs 34\\)"
                                            f": give a folder with more .py files{smaller}"):
            train.train(tiny_train_config(tmp_path / "o", device="cpu"))
    x, y = data.get_batch(np.arange(34, dtype=np.uint16), 200, 32, torch.Generator())   # 34 is enough
    assert x.shape == y.shape == (200, 32) and torch.equal(y, x + 1)   # each target the token after its input
    assert (x[:, 0] == 0).all()          # start 1 is possible but left out (README, Data order): runs reproduce
    assert not (tmp_path / "o").exists()


def test_a_folder_we_may_not_enter_is_no_place_to_write(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not (os.fspath(path) == str(tmp_path) and mode & os.X_OK)
                        and real_access(path, mode))       # as a folder of mode 0o666: writable, not searchable
    with pytest.raises(UserError, match=f"--out_dir={tmp_path}/run cannot be written"):
        config.check_writable("out_dir", str(tmp_path / "run"))


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    write_atomic(path, "old")
    with pytest.raises(ZeroDivisionError):
        with atomic_file(path, "wb") as f:      # as a checkpoint, cut off halfway
            f.write(b"half")
            1 / 0
    assert open_text(path) == "old" and os.listdir(tmp_path) == ["ckpt.pt"]
    model = GPT(tiny_config())                                 # and train.py's checkpoints are written so
    def save_half(obj, f):
        f.write(b"half")
        raise OSError("disk full")
    save = torch.save
    monkeypatch.setattr(torch, "save", save_half)
    optimizer = train.make_optimizer(model, tiny_train_config(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, model, optimizer, None, 1, {}, {})
    assert open_text(path) == "old" and os.listdir(tmp_path) == ["ckpt.pt"]
    def save_to_a_full_disk(obj, f):                           # as torch.save reports it: a RuntimeError
        try:                                                   # raised while handling the file's OSError
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", save_to_a_full_disk)
    with pytest.raises(UserError, match=r"^no space left on the device to write .*ckpt.pt \(its old version, if any, "
                                        r"is kept\): free some space and run again$"):
        train.save_checkpoint(path, model, optimizer, None, 1, {}, {})
    with pytest.raises(UserError, match="no space left on the device to write .*config.json"):
        with atomic_file(str(tmp_path / "config.json")) as f:   # a plain write's own OSError
            raise OSError(errno.ENOSPC, "No space left on device")
    assert open_text(path) == "old" and os.listdir(tmp_path) == ["ckpt.pt"]

    class CtrlCAfter1kB:                                       # Ctrl-C while torch.save writes
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise KeyboardInterrupt
            return self.f.write(b)
        def flush(self):
            self.f.flush()
    monkeypatch.setattr(torch, "save", lambda obj, f: save(obj, CtrlCAfter1kB(f)))
    with pytest.raises(KeyboardInterrupt):                     # not torch's "unexpected pos" RuntimeError
        train.save_checkpoint(path, model, optimizer, None, 1, {}, {})
    assert open_text(path) == "old" and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.skipif(os.name != "posix", reason="a dead writer's temp file is told by its free lock (flock: POSIX)")
def test_a_writer_killed_outright_leaves_a_temp_file_that_a_later_write_removes(tmp_path):
    path = tmp_path / "ckpt.pt"
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time; from config import atomic_file\n"
                               f"with atomic_file({str(path)!r}, 'wb') as f:\n"
                               "    f.write(b'half'); f.flush(); print('writing', flush=True); time.sleep(60)"],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()                                              # SIGKILL: no finally runs
    writer.wait()
    left, = tmp_path.glob("ckpt.pt.*.tmp")
    a_minute_ago = time.time() - 61
    os.utime(left, (a_minute_ago, a_minute_ago))
    # kept: a temp file under a minute old (its writer may not hold its lock yet), a user's file, and a
    # folder named like a temp file (it cannot be locked, and must not fail the write)
    new, user, folder = (tmp_path / f"ckpt.pt.{n}.tmp" for n in ("ba9876543210", "notes", "aaaaaaaaaaaa"))
    new.write_text("new")
    user.write_text("a user's")
    folder.mkdir()
    for old in (user, folder):
        os.utime(old, (a_minute_ago, a_minute_ago))
    with atomic_file(str(path), "w") as slow:                  # and a live writer's, a minute old: its lock
        slow.write("slow")                                     # is held (as another process would hold it)
        live, = set(tmp_path.glob("ckpt.pt.*.tmp")) - {left, new, user, folder}
        os.utime(live, (a_minute_ago, a_minute_ago))
        write_atomic(str(path), "new")
        assert open_text(path) == "new" and not left.exists()  # the dead writer's file: gone
        assert live.exists() and new.exists() and user.exists() and folder.exists()
    assert open_text(path) == "slow"


def test_bpe_counts_only_the_pairs_a_merge_leaves():
    ranks = data.train_bpe(Counter({"aaab": 5, "ab": 3}), vocab_size=256 + 4)
    # after aa and ab, "aaab" is [aa, ab]: its old pair (aa, a) is gone, so the third merge is aa+ab
    assert list(ranks)[256:] == [b"aa", b"ab", b"aaab"]


# -----------------------------------------------------------------------------
# whole runs


def test_training_reaches_exact_sparsity_and_checkpoint_loads(tmp_path, corpus, capsys):
    cfg = tiny_train_config(tmp_path / "run", max_iters=4, anneal_end=1.0, l0_frac=0.1)   # the target L0 after the last step
    history = train.train(cfg)
    assert len(history) == 4 and all(math.isfinite(loss) for _, loss in history)
    model = GPT.from_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    exact, params, fewest, reached = train.sparsity_report(model, 0.1)
    assert exact == params and fewest >= 4 and reached > 0.11   # 32-wide rows keep 4 at least: 1/8
    printed = capsys.readouterr().out
    assert f"(L0 {reached:.4f}, 0.1000 asked)" in printed and "times over" not in printed
    fit = sum(len(p.ids) <= 32 for p in make_prompts("single_double_quote", corpus[1], 128, 0, "test"))
    assert f"note: {128 - fit} of the 128 single_double_quote test prompts are longer than --block_size=32: the " \
           "task loss leaves them out" in printed and f", {fit} prompts)" in printed and 0 < fit < 128
    train.train(tiny_train_config(tmp_path / "long", max_iters=10 ** 7, stop_iter=1))   # 10**7 steps of 128 tokens:
    n = len(data.load_tokens(corpus[0], "train"))                                     # the corpus ~120 times over
    assert f"read the train split ({n:,} tokens) {128 * 10 ** 7 / n:.0f} times over" in capsys.readouterr().out
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=1.0, top_k=10)
    assert out.shape == (1, 8)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    val = train.estimate_loss(model, {"val": data.load_tokens(corpus[0], "val")}, cfg, contextlib.nullcontext())["val"]
    assert ckpt["val_loss"] == pytest.approx(val)             # the val split's: headline.py matches models by it
    # another version's checkpoints:
    for name, other in (("newer", {**ckpt, "model_config": {**ckpt["model_config"], "rope": True}}),
                        ("reshaped", {**ckpt, "model_config": {**ckpt["model_config"], "d_model": 64}})):
        torch.save(other, tmp_path / f"{name}.pt")
        for load in (GPT.from_checkpoint, lambda path: tasks.load_model(path, "cpu")):
            with pytest.raises(UserError, match=rf"{name}.pt holds a model this code cannot build \((TypeError: .* "
                                                r"unexpected keyword argument 'rope'|RuntimeError: .* size mismatch for)"):
                load(str(tmp_path / f"{name}.pt"))          # what differs, not only that something does
    with pytest.raises(UserError, match=rf"checkpoint {tmp_path / 'run'} is a folder; pass {tmp_path / 'run' / 'ckpt.pt'}"):
        tasks.load_model(str(tmp_path / "run"), "cpu")        # the run's --out_dir, not its checkpoint
    (tmp_path / "odd" / "ckpt.pt").mkdir(parents=True)      # a folder of that name: no file to point to
    with pytest.raises(UserError, match=r"odd.ckpt.pt is a folder, not a checkpoint file$"):
        tasks.load_model(str(tmp_path / "odd" / "ckpt.pt"), "cpu")


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, corpus):
    full = train.train(tiny_train_config(tmp_path / "full"))
    first = train.train(tiny_train_config(tmp_path / "cut", stop_iter=3))
    cfg = train.config_from_args([f"--out_dir={tmp_path / 'cut'}", "--resume=True"])
    switched = train.config_from_args([f"--out_dir={tmp_path / 'cut'}", "--resume=True", "--abstopk_by=radix",
                                       "--compile=True"])
    assert switched.abstopk_by == "radix"                      # how AbsTopK selects may change on resume
    second = train.train(cfg)
    assert [s for s, _ in first + second] == list(range(6))
    assert first + second == full                       # exact float equality, step by step
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)     # where its tokenizer is, from anywhere
    assert os.path.isabs(saved["data"]) and saved["tokenizer"] == data.tokenizer_id(saved["data"])


def test_resume_refuses_what_would_silently_change_or_skip_the_run(tmp_path, corpus, capsys):
    train.train(tiny_train_config(tmp_path / "cut", stop_iter=3))
    resume = [f"--out_dir={tmp_path / 'cut'}", "--resume=True"]
    ckpt = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)
    with open(tmp_path / "cut" / "config.json") as f:
        assert ckpt["train_config"]["device"] == json.load(f)["device"] == "auto"        # as asked, not "cpu"
    assert train.config_from_args(resume).device == "auto"
    train.train(tiny_train_config(tmp_path / "on_cpu", stop_iter=3, device="cpu"))
    assert train.config_from_args([f"--out_dir={tmp_path / 'on_cpu'}", "--resume=True"]).device == "cpu"   # stays
    torch.save({**ckpt, "train_config": {**ckpt["train_config"], "device": "cuda"}}, tmp_path / "cut" / "ckpt.pt")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"CUDA is not available.*ckpt.pt was run with --device=cuda; --device=auto"):
            train.config_from_args(resume)
    torch.save({**ckpt, "format": "sparse-circuits/1", "train_config": {**ckpt["train_config"], "device": "cuda"}},
               tmp_path / "cut" / "ckpt.pt")                 # an older checkpoint saved the device it resolved to
    assert train.config_from_args(resume).device == "auto"
    torch.save(ckpt, tmp_path / "cut" / "ckpt.pt")
    assert train.config_from_args(resume + [f"--data_dir={data.default_data_dir()}"])   # "" is the stdlib
    assert train.config_from_args(resume + ["--preset=cpu"]).preset == "cpu"            # its own preset
    assert train.config_from_args(resume + ["--seed=-1"]).seed == -1 and prune.PruneConfig(seed=-1).seed == -1
    for change in ("--afrac=0.5", "--min_per_channel=2", "--d_model=64"):   # the first two keep every tensor's shape
        with pytest.raises(UserError, match=rf"--resume cannot change the model or bridge shape \({change[2:].split('=')[0]}\)"):
            train.config_from_args(resume + [change])
    changed = train.config_from_args(resume + ["--weight_decay=0", "--eps=1e-8", "--beta2=0.99", "--max_iters=8",
                                               "--stop_iter=7"])   # past the run's 6: checked against the new length
    capsys.readouterr()
    train.train(changed)                                     # the optimizer runs with the settings asked, not the saved
    assert re.search(r"note: --max_iters=8 changed on resume: the L0 anneal and learning rate follow the new values "
                     r"\(at step 3: L0 [\d.]+, lr [\d.e+-]+, where the run was at L0 [\d.]+, lr [\d.e+-]+\); "
                     r"not its continuation",
                     capsys.readouterr().out)
    decay, no_decay = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["eps"], g["betas"]) for g in (decay, no_decay)] == [(0.0, 1e-8, (0.9, 0.99))] * 2
    torch.save({**ckpt, "train_config": {**ckpt["train_config"], "abstopk_by": "bisection"}}, tmp_path / "cut" / "ckpt.pt")
    with pytest.raises(UserError, match=r"abstopk_by=bisection is unknown.*\(resuming .*ckpt.pt: its saved settings, with --key=value applied\)"):
        train.config_from_args(resume)                       # a value an older version saved, named as saved
    assert train.config_from_args(resume + ["--abstopk_by=topk"]).abstopk_by == "topk"   # and mended by an argument
    torch.save({**ckpt, "train_config": {**ckpt["train_config"], "old_setting": 1}}, tmp_path / "cut" / "ckpt.pt")
    with pytest.raises(UserError, match=r"saved with settings this TrainConfig lacks \(old_setting\)"):
        train.config_from_args(resume)
    torch.save(ckpt, tmp_path / "cut" / "ckpt.pt")
    for extra, words in [([f"--data_dir={HERE}"], "differs from the one .* trained on .*the standard library.*tokenizer"),
                         (["--preset=cpu45"], "is a cpu run, and a resumed run keeps its saved settings .choose the run by --out_dir"),
                         (["--stop_iter=3"], "already at step 3; nothing to do up to --stop_iter=3"),
                         (["--max_iters=3"], "already at step 3; nothing to do up to max_iters=3")]:
        with pytest.raises(UserError, match=words):
            train.config_from_args(resume + extra)
    fake = tmp_path / "bridge"
    fake.mkdir()
    torch.save({"model": {}, "model_config": {}, "train_config": {"dense": "d.pt"}}, fake / "ckpt.pt")
    with pytest.raises(UserError, match="not a train.py checkpoint .bridge.py's: resume it with bridge.py"):
        train.config_from_args([f"--out_dir={fake}", "--resume=True"])


def nan_from_call(estimate_loss, first):
    """estimate_loss whose losses are nan from its first-th call on: a run that diverges later."""
    calls = []

    def patched(*args):
        calls.append(1)
        return {name: (math.nan if len(calls) >= first else loss) for name, loss in estimate_loss(*args).items()}
    return patched


def test_a_diverging_run_stops_without_saving_a_nan_model(tmp_path, corpus, monkeypatch):
    with pytest.raises(UserError, match=r"training diverged: loss nan at step \d.*no checkpoint was written"):
        train.train(tiny_train_config(tmp_path / "blowup", learning_rate=1e30))
    assert not (tmp_path / "blowup" / "ckpt.pt").exists()
    # the second evaluation (step 6) sees a nan: step 3 is kept
    monkeypatch.setattr(train, "estimate_loss", nan_from_call(train.estimate_loss, 2))
    with pytest.raises(UserError, match=r"loss nan at step 6 .*ckpt.pt keeps step 3$"):
        train.train(tiny_train_config(tmp_path / "late"))
    assert torch.load(tmp_path / "late" / "ckpt.pt", weights_only=False)["step"] == 3


def test_ctrl_c_says_what_the_checkpoint_holds_and_how_to_go_on(tmp_path, corpus, monkeypatch, capsys):
    args = [f"--out_dir={tmp_path / 'run'}", "--max_iters=100000", "--eval_interval=100000", "--batch_size=2",
            "--block_size=32", "--n_layer=1", "--d_model=32", "--sample_tokens=0", "--eval_task=", "--device=cpu"]
    run = subprocess.Popen([sys.executable, "train.py", *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # even where
    try:                                                                                  # our SIGINT is ignored
        while "model:" not in run.stdout.readline():                  # training has started
            assert run.poll() is None, run.stderr.read()
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130 and "Traceback" not in err
    assert err.strip() == "interrupted; no checkpoint yet (one every --eval_interval=100000 steps)"
    train.train(tiny_train_config(tmp_path / "cut", stop_iter=3))    # a checkpoint at step 3, then Ctrl-C
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as stop:
        train.main([f"--out_dir={tmp_path / 'cut'}", "--resume=True"])
    assert stop.value.code == 130
    out, err = capsys.readouterr()
    assert re.search(r"(?m)^preset \w+ \(the checkpoint's\)$", out)                 # not "(no CUDA)": it was resumed
    assert err.strip() == (f"interrupted; {tmp_path / 'cut' / 'ckpt.pt'} holds step 3: continue "
                           f"with --out_dir={tmp_path / 'cut'} --resume=True")


def test_prune_without_the_default_checkpoint_says_how_to_make_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^checkpoint out/cpu45/ckpt.pt \(the default\) does not exist: train it "
                                        r"\(python train.py --preset=cpu45\) or pass --ckpt=PATH$"):
        prune.main([])
    with pytest.raises(UserError, match=r"^checkpoint mine.pt does not exist$"):           # no hint for a path given
        prune.main(["--ckpt=mine.pt"])
    assert capsys.readouterr().out == ""                                         # before the settings line


def test_a_seed_as_large_as_a_timestamp_still_draws_batches():
    cfg = tiny_train_config("out/never", seed=1_700_000_000)
    x, y = train.batch_for(torch.arange(1000), 5, 0, cfg)
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_torchrun_two_cpu_processes_train_as_one_process_on_both_ranks_batches(tmp_path, corpus):
    args = [f"--out_dir={tmp_path / 'ddp'}", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--log_interval=1",
            "--batch_size=2", "--block_size=32", "--n_layer=1", "--d_model=32", "--sample_tokens=0",
            "--gradient_accumulation_steps=2"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--preset=cpu", *args], cwd=HERE, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})      # one thread each, as the check below
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ddp: weights identical on all 2 ranks" in result.stdout
    assert "2 process(es)" in result.stdout and result.stdout.count("settings: ") == 1   # rank 0 speaks
    # the same 3 steps by hand in one process: each rank's micro-batches summed, the ranks' gradients averaged
    cfg = train.config_from_args(["--preset=cpu", *args[1:], f"--out_dir={tmp_path / 'unused'}", "--device=cpu"])
    tokens, threads = data.load_tokens(corpus[0], "train"), torch.get_num_threads()
    torch.set_num_threads(1)                                          # as each process ran: the same sums
    try:
        torch.manual_seed(cfg.seed)
        model = train.make_model(cfg)
        optimizer, first = train.make_optimizer(model, cfg), []
        for step in range(3):
            grads = []
            for rank in (0, 1):
                for micro in (0, 1):
                    loss = model(*train.batch_for(tokens, step, micro, cfg, rank))[1] / 2
                    loss.backward()
                    first += [loss.item()] if step == 0 else []
                grads.append([p.grad for p in model.parameters()])
                model.zero_grad(set_to_none=True)
            for p, g0, g1 in zip(model.parameters(), *grads):
                p.grad = (g0 + g1) / 2
            train.optimizer_step(model, optimizer, step, cfg)
    finally:
        torch.set_num_threads(threads)
    saved = torch.load(tmp_path / "ddp" / "ckpt.pt")["model"]
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(saved[name], weight, rtol=0, atol=1e-6, msg=name)
    logged = float(re.search(r"step +1 \| loss ([\d.]+)", result.stdout).group(1))
    assert logged == pytest.approx(sum(first) / 2, abs=1e-4)         # both ranks' mean, not rank 0's
    rates = re.findall(r"([\d.]+) tok/s \| +([\d.]+) ms/step", result.stdout)
    assert len(rates) == 3 and all(float(rate) * float(ms) / 1e3 == pytest.approx(2 * 2 * 2 * 32, rel=0.05)
                                   for rate, ms in rates)             # a step: 2 ranks x 2 micro-batches x 2 x 32


def test_the_ddp_weights_check_tells_ranks_that_differ(monkeypatch):
    model = GPT(tiny_config())
    def gather(out, flat, shift):                                    # rank i's weights: flat + i * shift
        for i, o in enumerate(out):
            o.copy_(flat + i * shift)
    monkeypatch.setattr(train.dist, "all_gather", lambda out, flat: gather(out, flat, 0.0))
    assert train.ranks_agree(model, 3)
    monkeypatch.setattr(train.dist, "all_gather", lambda out, flat: gather(out, flat, 1e-7))
    assert not train.ranks_agree(model, 3)                           # 1e-7 apart is apart


def test_torchrun_with_more_processes_than_gpus_is_one_line_before_any_rank_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("MASTER_ADDR", raising=False)     # a rank that went on would fail in init_process_group
    for rank in ("0", "1"):                              # each rank of torchrun --nproc_per_node=2, on one GPU
        for key, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
            monkeypatch.setenv(key, value)
        with pytest.raises(UserError, match=r"torchrun --nproc_per_node=2 on a machine with 1 visible GPU\(s\): one "
                                            r"process per GPU, so --nproc_per_node=1 at most, or --device=cpu"):
            train.train(tiny_train_config(tmp_path / "two", device="cuda"))   # not cuda:1's invalid device ordinal
        assert not (tmp_path / "two").exists()


def test_a_context_shorter_than_every_eval_task_prompt_is_refused_before_training(tmp_path, corpus):
    with pytest.raises(UserError, match=r"--block_size=8 is shorter than every single_double_quote test prompt "
                                        r"\(the shortest has \d+ tokens\); pass --eval_task= for no task loss"):
        train.train(tiny_train_config(tmp_path / "short", block_size=8))   # else its task loss would silently vanish
    assert not (tmp_path / "short").exists()


def test_an_eval_task_the_corpus_cannot_pose_names_the_way_out(tmp_path, corpus, monkeypatch):
    def unposable(name, *a, **k):                     # as on a corpus whose tokenizer splits the answer
        raise UserError(f"task {name}: answer '\")' (['\"', ')'] alone) is not one token after the prompt")
    monkeypatch.setattr(train.tasks, "make_prompts", unposable)
    with pytest.raises(UserError, match=r"not one token after the prompt; pass --eval_task= to train without a task "
                                        "loss, or another task"):
        train.train(tiny_train_config(tmp_path / "own"))


def test_gradient_accumulation_reports_the_mean_loss_not_the_sum(tmp_path, corpus, monkeypatch):
    drawn, draw = [], train.batch_for
    monkeypatch.setattr(train, "batch_for", lambda tokens, *key: drawn.append(key[:2]) or draw(tokens, *key))
    history = train.train(tiny_train_config(tmp_path / "acc", max_iters=2, eval_interval=2, eval_task="",
                                            gradient_accumulation_steps=2))
    assert history[0][1] == pytest.approx(math.log(2048), rel=0.05)   # an untrained model's loss per token
    assert drawn == [(0, 0), (0, 1), (1, 0), (1, 1)]                   # each micro-step its own batch


def test_a_half_precision_dtype_on_a_cpu_says_the_run_computes_in_float32(tmp_path, corpus, capsys):
    train.train(tiny_train_config(tmp_path / "bf16", max_iters=1, eval_interval=1, eval_task="", dtype="bfloat16",
                                  device="cpu"))
    assert "note: --dtype=bfloat16 is autocast on CUDA only; on cpu this run computes in float32" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# tasks


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=2048, n_layer=1, d_model=32, block_size=256)).eval()


def test_every_task_builds_balanced_prompts_with_distinct_single_token_answers(corpus):
    _, enc = corpus
    assert len(tasks.TASKS) == 20                                  # the paper's; a fork adds its own
    for name in tasks.TASKS:
        for split in ("train", "test"):
            prompts = tasks.make_prompts(name, enc, 40, seed=0, split=split)
            assert len({tuple(p.ids) for p in prompts}) == 40, name                  # distinct
            assert Counter(p.label for p in prompts) == {0: 20, 1: 20}, name         # balanced
            for p in prompts:
                assert len(p.ids) <= 255 and p.correct != p.alt, name
                for answer in (p.correct, p.alt):   # the answer is the token the tokenizer splits off
                    assert enc.encode_ordinary(enc.decode(p.ids + [answer])) == p.ids + [answer], name
            pairs = {(p.correct, p.alt) for p in prompts}
            if len(pairs) == 2:                     # a fixed pair: each token is right half the time
                assert Counter(p.correct for p in prompts) == Counter({a: 20 for a, _ in pairs}), name
    assert [p.label for p in tasks.make_prompts("for_while", enc, 6)] == [0, 1] * 3   # alternating: any even n is balanced
    with pytest.raises(UserError, match="n=3 must be positive and even"):
        tasks.make_prompts("for_while", enc, 3)                    # half of each class: no odd count


def test_answer_names_are_single_tokens(corpus):
    _, enc = corpus
    for name in tasks.NAMES:
        assert len(enc.encode_ordinary(" " + name)) == 1, name
    assert not set(tasks.NAMES) & set(tasks.LOCALS)   # filler code never names an answer


def test_a_corpus_that_splits_task_answers_still_gets_a_tokenizer_that_poses_every_task(corpus, monkeypatch):
    # as other Pythons' standard libraries do (3.12's splits ` config` and `]]`, Debian's 3.11 ` spec`): here
    # ours, written without them
    splitter, chunks = regex.compile(data.SPLIT_PATTERN), Counter()
    for path in data.list_py_files(data.default_data_dir())[::40]:
        chunks.update(splitter.findall(re.sub(r"\](?=\])", "] ", data.read_text(path)).replace(" config", " conf")))
    ranks, split = data.learn_tokenizer(chunks)
    enc = data.encoding(ranks)
    assert {"]]", " config"} <= set(split) and len(ranks) == data.VOCAB_SIZE - 1
    assert {" " + n for n in tasks.NAMES + sum(tasks.PAIRS, ())} | {"]]", ".add", '")'} <= set(tasks.answers())
    assert all(len(enc.encode_ordinary(a)) == 1 for a in tasks.answers())
    for name in tasks.TASKS:
        tasks.make_prompts(name, enc, 8, seed=0, split="test")
    for each in (enc, corpus[1]):                 # a word's first token: ` en` of ` en` `um` `er` `ate` in ours
        first = each.encode_ordinary(" enumerate")[0]
        assert {p.correct for p in tasks.make_prompts("enumerate_range", each, 8, seed=0) if p.label == 0} == {first}
    ours = corpus[1]
    with pytest.raises(UserError, match=r"answers ' enumerate' and ' en\w*' begin with the same token"):
        tasks.encode_example(ours, "x", "for i, x in", " enumerate", ours.decode(ours.encode_ordinary(" enum")[:1]))
    assert len(ours.encode_ordinary(" xyzzy")) > 1                # a word of several tokens, not in WORD_STARTS:
    with pytest.raises(UserError, match=r"answer ' xyzzy' .* is not one token after the prompt"):   # its first token
        tasks.encode_example(ours, "x", "x = 1\ny =", " xyzzy", " None")                             # is not the answer
    monkeypatch.setitem(tasks.TASKS, "quoted", lambda rng, label: ("x = ", "'r'", "'w'"))   # `'r` `'` whatever BPE does
    tasks.answers.cache_clear()
    try:                                                                          # refused before any training
        with pytest.raises(UserError, match=r"task answer\(s\) \"'r'\", \"'w'\" \(tasks.py\) cannot be one token"):
            data.learn_tokenizer(chunks)
    finally:
        monkeypatch.undo()
        tasks.answers.cache_clear()


def test_train_and_test_are_disjoint_and_a_seed_fixes_the_prompts(corpus):
    _, enc = corpus
    for name in tasks.TASKS:
        train = tasks.make_prompts(name, enc, 40, seed=0, split="train")
        test = tasks.make_prompts(name, enc, 40, seed=0, split="test")
        assert not {tuple(p.ids) for p in train} & {tuple(p.ids) for p in test}, name
        other_seed = tasks.make_prompts(name, enc, 40, seed=1, split="test")
        assert not {tuple(p.ids) for p in train} & {tuple(p.ids) for p in other_seed}, name
        assert tasks.make_prompts(name, enc, 40, seed=0, split="test") == test, name
        assert other_seed != test, name
    texts = ("x = 1", "def f(", "class A:", "return {name", "import os", "for i in")   # the same in every process
    assert [tasks.split_of(t) for t in texts] == ["train"] * 3 + ["test"] * 3        # (a crc32, not hash())


def test_a_task_whose_answer_is_not_one_token_fails_at_construction(corpus, monkeypatch):
    _, enc = corpus
    monkeypatch.setitem(tasks.TASKS, "paper_with_open", lambda rng, label: ("with open(path, ", "'r'", "'w'"))
    with pytest.raises(ValueError, match="paper_with_open: answer \"'r'\".*is not one token"):
        tasks.make_prompts("paper_with_open", enc, 2)
    monkeypatch.setitem(tasks.TASKS, "merges", lambda rng, label: (f"x = {rng.random()}\nif y =", "=None", ":"))
    with pytest.raises(ValueError, match="merges: answer '=None'.*is not one token after the prompt"):
        tasks.make_prompts("merges", enc, 2)   # one token alone and one more, but ` ==` takes the prompt's ` =`
    monkeypatch.setitem(tasks.TASKS, "same", lambda rng, label: (f"x = {rng.random()}\n", "]", "]"))
    with pytest.raises(ValueError, match="both answers are"):
        tasks.make_prompts("same", enc, 2)
    monkeypatch.setitem(tasks.TASKS, "long", lambda rng, label: ("x = [" + "1, " * 200, "]", "]]"))
    with pytest.raises(ValueError, match="at most 255"):
        tasks.make_prompts("long", enc, 2)
    prompt = "x = [" + "1, " * 20 + "1"
    n = len(enc.encode_ordinary(prompt))
    monkeypatch.setattr(tasks, "MAX_PROMPT_TOKENS", n)            # in place of 255 (with its answer: block_size 256)
    assert len(tasks.encode_example(enc, "long", prompt, "]", "]]")[0]) == n   # the most tokens: still posed
    monkeypatch.setattr(tasks, "MAX_PROMPT_TOKENS", n - 1)
    with pytest.raises(UserError, match=rf"a prompt of {n} tokens \(at most {n - 1}\)"):
        tasks.encode_example(enc, "long", prompt, "]", "]]")


def test_else_elif_prompts_are_python_whatever_its_branches_draw(corpus):
    """A branch whose filler drew only comments is no block (a SyntaxError): it gets a `pass`."""
    _, enc = corpus
    for p in make_prompts("else_elif", enc, 256, 0, "test"):
        text = enc.decode(p.ids + [p.correct])
        ind = len(text.rsplit("\n", 1)[1]) - len(text.rsplit("\n", 1)[1].lstrip())
        code = text + (" is None:" if p.label == 0 else "") + "\n" + " " * (ind + 4) + "pass\n"   # elif x / else:
        ast.parse(textwrap.dedent(code))                  # (a method without its class line is indented)


def test_task_loss_is_the_two_way_cross_entropy_averaged_over_prompts():
    logits = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0],
                           [0.0, 2.0, 0.0, 1.0, 5.0]])
    correct, alt = torch.tensor([1, 3]), torch.tensor([3, 1])
    loss, acc = tasks.task_loss(logits, correct, alt)
    # prompt 0: -log(e^3 / (e^3 + e^1)); prompt 1: -log(e^1 / (e^1 + e^2)); the mean, not the sum
    hand = (-math.log(math.exp(3) / (math.exp(3) + math.exp(1)))
            - math.log(math.exp(1) / (math.exp(1) + math.exp(2)))) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert acc.item() == 0.5   # the other tokens (logit 5) play no part
    loss, acc = tasks.task_loss(torch.zeros(4, 10), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
    assert acc.item() == 0.0 and loss.item() == pytest.approx(math.log(2))   # a tie is chance, not solved


def test_batched_right_padded_evaluation_equals_one_prompt_at_a_time(corpus, tiny_gpt):
    _, enc = corpus
    prompts = tasks.make_prompts("bracket_brace", enc, 12, seed=0, split="test")
    assert len({len(p.ids) for p in prompts}) > 1          # really mixed lengths
    batched = tasks.last_logits(tiny_gpt, prompts, "cpu", batch_size=5)
    with torch.no_grad():
        alone = torch.stack([tiny_gpt(torch.tensor([p.ids]))[0][0, -1] for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    loss, acc = tasks.evaluate(tiny_gpt, prompts, "cpu", batch_size=5)
    expected = tasks.task_loss(alone, *tasks.answer_ids(prompts))
    assert loss == pytest.approx(expected[0].item(), abs=1e-5) and acc == expected[1].item()
    diffs = tasks.logit_diff(batched, *tasks.answer_ids(prompts))
    assert diffs.shape == (12,) and torch.allclose(torch.nn.functional.softplus(-diffs).mean(), expected[0], atol=1e-5)


def test_bracket_dilution_probe_runs_at_every_length(corpus, tiny_gpt, capsys):
    _, enc = corpus
    model = copy.deepcopy(tiny_gpt)
    with torch.no_grad():                                  # ]] after every token: P(]]) about e^9 / (e^9 + 2047)
        model.bigram[:, enc.encode_single_token("]]")] = 9.0
    tasks.bracket_dilution(model, enc, "cpu", samples=2)
    out = capsys.readouterr().out
    tasks.bracket_dilution(model, enc, "cpu", seed=1, samples=2)
    assert capsys.readouterr().out != out                  # --seed: other lists
    rows = out.strip().splitlines()[2:]
    assert [int(r.split("|")[0]) for r in rows] == [2, 4, 8, 12, 16, 24, 32, 48, 64]
    for row in rows:
        for cell in row.split("|")[1:]:
            tokens, full, two_way = map(float, cell.split()[-3:])
            assert tokens <= 255 and 0 <= full <= two_way <= 1   # P in the full softmax is the smaller
            assert full > 0.6 and two_way > 0.99           # of ]], not of ]


def test_listing_shows_every_task_with_an_example(capsys):
    tasks.main([])
    out = capsys.readouterr().out
    for name in tasks.TASKS:
        assert f"\n{name}: " in "\n" + out
    assert out.count("  ->  ") == len(tasks.TASKS)


def test_unknown_task_is_a_one_line_user_error_listing_the_tasks():
    with pytest.raises(UserError) as info:
        parse_args(tasks.TaskConfig, ["--task=nope"])
    message = str(info.value)
    assert "unknown task 'nope'" in message and "\n" not in message
    assert all(name in message for name in tasks.TASKS)
    for bad in ("--n_prompts=3", "--split=val", "--probe=bracket_dilution", "--probe=x --ckpt=a", "--batch_size=0"):
        with pytest.raises(UserError):
            parse_args(tasks.TaskConfig, bad.split())
    for unused in ("--task=for_while", "--split=train", "--n_prompts=8", "--batch_size=8"):   # the probe's own prompts
        with pytest.raises(UserError, match=f"{unused} is not used by --probe=bracket_dilution"):
            parse_args(tasks.TaskConfig, ["--probe=bracket_dilution", "--ckpt=a", unused])
    with pytest.raises(UserError, match="--device=tpu is unknown"):
        tasks.main(["--device=tpu"])                                # not only where a model is evaluated
    result = subprocess.run([sys.executable, "tasks.py", "--task=nope"], cwd=HERE,
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown task 'nope'")
    assert "single_double_quote" in lines[0] and "class_init" in lines[0]


def test_evaluation_table_from_a_checkpoint(tmp_path, tiny_gpt, capsys):
    path = tmp_path / "ckpt.pt"
    torch.save({"model_config": vars(tiny_gpt.config), "model": tiny_gpt.state_dict(),
                "train_config": {"data_dir": ""}}, path)
    tasks.main([f"--ckpt={path}", "--n_prompts=4", "--device=cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[2:2 + len(tasks.TASKS)]]
    assert [r[0] for r in rows] == list(tasks.TASKS) and all(r[1] == "4" for r in rows)
    assert lines[-2].startswith("mean") and lines[-1].startswith("solved (loss <= 0.15")


def test_a_prompt_longer_than_the_model_context_is_a_one_line_error_naming_both(tmp_path, corpus, capsys):
    _, enc = corpus
    with pytest.raises(UserError, match=r"^task else_elif: a test prompt of \d+ tokens does not fit the model's "
                                        r"block_size=64$"):
        make_prompts("else_elif", enc, 16, 0, "test", block_size=64)
    longest = max(len(p.ids) for p in make_prompts("else_elif", enc, 16, 0, "test"))
    assert make_prompts("else_elif", enc, 16, 0, "test", block_size=longest)   # exactly block_size long: it fits
    path = save_tiny(tmp_path / "short" / "ckpt.pt", tiny_model(block_size=64), 3.0)
    tasks.main([f"--ckpt={path}", "--n_prompts=4", "--device=cpu"])     # the tasks that fit still get their row
    lines = capsys.readouterr().out.splitlines()
    skipped = [line.split()[0] for line in lines if "does not fit the model's block_size=64" in line]
    assert "else_elif" in skipped and "class_init" not in skipped and lines[-2].startswith("mean")
    losses = [float(line.split()[2]) for line in lines if line.split()[0] in tasks.TASKS and "skipped" not in line]
    assert float(lines[-2].split()[1]) == pytest.approx(sum(losses) / len(losses), abs=2e-4)   # over the rows shown
    with pytest.raises(UserError, match="else_elif: a test prompt of"):   # the one task asked: an error, not a row
        tasks.main([f"--ckpt={path}", "--task=else_elif", "--n_prompts=4", "--device=cpu"])
    with pytest.raises(UserError, match="else_elif: a test prompt of"):
        prune.main(fast_args(path, tmp_path / "p", "--task=else_elif"))
    with pytest.raises(UserError, match=r"for_while: a train prompt of \d+ tokens does not fit"):   # test ones fit
        prune.main(fast_args(path, tmp_path / "p", "--task=for_while", "--target_loss=0.8"))


def test_a_checkpoint_is_read_with_the_tokenizer_of_the_data_folder_it_records(tmp_path, corpus, capsys, monkeypatch):
    folder, _ = corpus
    own = tmp_path / "data" / "0123456789ab"                       # e.g. a tokenizer of older code, kept
    own.mkdir(parents=True)
    for name in ("meta.json", "tokenizer.tiktoken", "train.bin", "val.bin"):
        (own / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    path = save_tiny(tmp_path / "m" / "ckpt.pt", tiny_model(), 3.0)
    torch.save({**torch.load(path, weights_only=False), "data": str(own)}, path)
    assert tasks.load_model(path, "cpu")[2] == str(own)
    torch.save({**torch.load(path, weights_only=False), "data": os.path.join("data", "0123456789ab")}, path)
    with monkeypatch.context() as m:                                 # an older checkpoint's path, relative to
        m.chdir(tmp_path)                                            # where it trained: read from there, made absolute
        assert data.data_folder(torch.load(path, weights_only=False)) == str(own)
    gone = lambda key: {"data": str(tmp_path / "gone" / key), "train_config": {"data_dir": ""}}
    assert data.data_folder(gone(os.path.basename(folder))) == folder   # the same inputs: built again
    assert "note" not in capsys.readouterr().out
    assert data.data_folder(gone("0123456789ab")) == folder             # other inputs: said so
    assert "note: the model's data folder" in capsys.readouterr().out
    same, other = ({**gone("0123456789ab"), "tokenizer": tid} for tid in (data.tokenizer_id(folder), "0" * 12))
    assert data.data_folder(same) == folder and "with the model's tokenizer" in capsys.readouterr().out   # checked
    with pytest.raises(UserError, match=r"gone or incomplete, and the tokenizer built now from data_dir=.* is not the model's: its files, data.py"):
        data.data_folder(other)
    files, cfg = [os.path.join(HERE, "config.py")], data.DataConfig()   # one set of files under two data_dirs:
    assert data.cache_key(HERE, files, cfg) != data.cache_key(os.path.dirname(HERE), files, cfg)   # two val splits
    assert data.cache_key(HERE, files, cfg) != data.cache_key(HERE, files, dataclasses.replace(cfg, val_every=10))
    copy = str(tmp_path / "same_size.py")
    shutil.copy(files[0], copy)
    key, st = data.cache_key(HERE, [copy], cfg), os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))   # edited to the same size: its time tells
    assert data.cache_key(HERE, [copy], cfg) != key
    edited = tmp_path / "data.py"                                   # data.py edited: another tokenizer, maybe
    edited.write_text(open(data.__file__).read() + "# edited\n")
    before = data.cache_key(HERE, files, cfg)
    monkeypatch.setattr(data, "__file__", str(edited))
    assert data.cache_key(HERE, files, cfg) != before
    (tmp_path / "out").write_text("")                               # a file named out where a script runs:
    result = subprocess.run([sys.executable, "-c", "import data"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": HERE},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-500:]             # only the default --cache_dir would be refused


def test_the_quote_task_closes_with_the_quote_that_opened_the_string(corpus):
    _, enc = corpus
    for p in make_prompts("single_double_quote", enc, 40, 0, "test"):
        text = enc.decode(p.ids)
        opened = text[max(text.rfind('"'), text.rfind("'"))]
        assert enc.decode([p.correct]) == opened + ")" != enc.decode([p.alt])


def test_each_tasks_correct_answer_follows_its_rule(corpus):
    _, enc = corpus
    last = lambda t: t.split("\n")[-1]
    rules = {
        "bracket_counting": lambda t: "]]" if last(t)[last(t).index("= [") + 3] == "[" else "]",
        "for_while": lambda t: " in" if last(t).lstrip().startswith("for ") else ":",
        "with_as": lambda t: " as" if last(t).lstrip().startswith("with ") else "\n",
        "var_swap": lambda t: " " + last(t).split(",")[0].strip(),                        # a, b = b, -> a
        "class_init": lambda t: " " + t.rsplit("self.", 1)[1].split(" ")[0].lstrip("_"),  # self.x = -> x
        "indent_for": lambda t: " " * (len(t.split("\n")[-2]) - len(t.split("\n")[-2].lstrip()) + 3),
        "set_or_string": lambda t: ".add" if f"{last(t).strip()} = set()" in t else " +=",
        "set_or_string_fixedvarname": lambda t: ".add" if "current = set()" in t else " +=",
        "with_open": lambda t: "r" if re.search(r"def _?(read|load|parse|scan)_", t) else "w",
        "else_elif": lambda t: ":" if last(t).endswith("else") else         # the chain's own tests, at its indent
                     " " + re.findall(rf"^{last(t)[:-4]}(?:if|elif) (\w+)", t, re.M)[-1],
        "if_ternary": lambda t: ":" if last(t).lstrip().startswith("if ") else " else",
        "if_equals": lambda t: " ==" if last(t).lstrip().startswith("if ") else " =",
        "fstring_brace": lambda t: "}" if re.search(r"f[\"'][^\"']*\{[^{]*$", last(t)) else ":",
        "bracket_brace": lambda t: ":" if t.rfind("{") > t.rfind("[") else ",",
        "var_if": lambda t: " " + t.split("\n")[-2].split()[1],                        # if x is None: -> x
        "while_return_true": lambda t: ":" if last(t).lstrip().startswith("while") else "\n",
        "lambda_func": lambda t: ":" if " lambda " in last(t) else "(",
        "enumerate_range": lambda t: enc.decode(enc.encode_ordinary(" enumerate")[:1]) if "," in last(t) else " range",
        "final_kwarg": lambda t: "=None" if "=" in last(t).rsplit("(", 1)[1] else "):",
    }
    for name, rule in rules.items():
        for p in make_prompts(name, enc, 40, 0, "test"):
            text = enc.decode(p.ids)
            assert enc.decode([p.correct]) == rule(text) != enc.decode([p.alt]), (name, text[-40:])


def test_var_if_and_class_init_ask_the_parameter_their_label_picks_and_not_one_already_assigned(corpus):
    _, enc = corpus
    for p in make_prompts("var_if", enc, 40, 0, "test"):
        text = enc.decode(p.ids)
        assert enc.decode([p.correct]) == " " + re.findall(r"(\w+)=None", text)[p.label]   # label: which optional one
        if_line, body = text.split("\n")[-2:]
        assert len(body) + 1 == len(if_line) - len(if_line.lstrip()) + 4   # with the answer's space: the body's indent
    for p in make_prompts("class_init", enc, 40, 0, "test"):
        text, answer = enc.decode(p.ids), enc.decode([p.correct])[1:]
        params = re.search(r"__init__\(self, ([^)]*)\)", text).group(1).split(", ")
        assert answer == (params[0], params[-1])[p.label]                 # label: the first or the last parameter
        assert not re.search(rf"self\._?{answer} =", text[:text.rfind("self.")])   # else the prompt shows the answer


def test_prompts_are_distinct_even_where_a_task_repeats_itself(corpus, monkeypatch):
    _, enc = corpus
    monkeypatch.setitem(tasks.TASKS, "few", lambda rng, label: (f"x = {rng.randint(0, 30)}\n", *tasks.pick(label, "]", ")")))
    prompts = make_prompts("few", enc, 10, 0, "train")                 # about 15 train prompts exist
    assert len({tuple(p.ids) for p in prompts}) == 10
    with pytest.raises(UserError, match=r"task few: only \d+ distinct train prompts in 4000 draws"):
        make_prompts("few", enc, 40, 0, "train")                       # not fewer prompts than asked, silently


# -----------------------------------------------------------------------------
# pruning


def tiny_model(**kw):
    torch.manual_seed(0)
    config = GPTConfig(**{**dict(vocab_size=2048, block_size=256, n_layer=2, d_model=32, d_head=16), **kw})
    model = GPT(config)
    model.project_weights(0.25)                  # sparse, as a trained model is: some edges are absent
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny model as a checkpoint: it 'solves' a task only at a lax target (its loss ~ log 2)."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "train_config": {"data_dir": ""}}, path)
    return str(path)


def open_text(path):
    with open(path) as f:
        return f.read()


def fast_args(ckpt, out_dir, *extra):
    return [f"--ckpt={ckpt}", f"--out_dir={out_dir}", "--steps=3", "--n_train=32", "--n_eval=16", "--n_test=16",
            "--mean_batches=1", "--mean_batch_size=2", "--device=cpu", *extra]

# -----------------------------------------------------------------------------
# masks and ablation


def test_heaviside_mask_is_0_1_forward_and_sigmoid_gradient_backward():
    tau = torch.tensor([-0.7, -1e-6, 0.0, 1e-6, 0.3, 1.0], requires_grad=True)
    m = prune.HeavisideST.apply(tau)
    assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]             # exactly 0/1: H(0) = 0
    upstream = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    (m * upstream).sum().backward()
    s = torch.sigmoid(tau.detach())
    torch.testing.assert_close(tau.grad, upstream * s * (1 - s), rtol=0, atol=0)


def test_mean_ablated_node_holds_exactly_its_mean_and_kept_nodes_pass_through():
    model = tiny_model()
    idx = torch.randint(0, 2048, (3, 12))
    gen = torch.Generator().manual_seed(1)
    sites = prune.node_sites(model)
    means = {s: torch.randn(prune.dim_of(model, s), generator=gen) for s in sites}
    masks = {s: (torch.rand(prune.dim_of(model, s), generator=gen) < 0.5).float() for s in sites}
    hooks, seen = prune.ablation_hooks(masks, means), {}

    def recording(x, name):
        seen[name] = (x, hooks[name](x, name))
        return seen[name][1]
    passed_on = {}                                                  # what each site hands the next layer
    handles = [model.sites[s].register_forward_hook(lambda mod, args, out, s=s: passed_on.__setitem__(s, out))
               for s in sites]
    with model.hooks({s: recording for s in sites}):
        model(idx)
    for h in handles:
        h.remove()
    for s in sites:
        x_in, x_out = seen[s]
        off, on = masks[s] == 0, masks[s] == 1
        assert torch.equal(x_out[..., off], means[s][off].expand(3, 12, -1)), s    # bit for bit
        assert torch.equal(x_out[..., on], x_in[..., on]), s
        assert torch.equal(passed_on[s], x_out), s      # the mask acts after AbsTopK: no top-k drops a mean
    # all kept: the hooks change nothing at all
    plain = model(idx)[0]
    with model.hooks(prune.ablation_hooks({s: torch.ones_like(m) for s, m in masks.items()}, means)):
        assert torch.equal(model(idx)[0], plain)


def test_top_k_masks_keep_the_largest_taus_and_tied_qk_share_one_unit():
    model = tiny_model(n_layer=1)
    cfg = prune.PruneConfig(tie_qk=True)
    taus = prune.init_taus(model, cfg, "cpu")
    assert taus["0.attn.k"] is taus["0.attn.q"]
    with torch.no_grad():
        for i, t in enumerate(prune.unique(taus)):
            t.copy_(torch.linspace(-1, 1, t.numel()) + 0.001 * i)
    units = prune.unique(taus)
    n = sum(t.numel() for t in units)
    assert n == 11 * 32 - 32                                          # 8 sites, the neurons 4x, k tied to q
    masks = prune.top_k_masks(taus, 5)
    flat = torch.cat([t.detach() for t in units])
    kept = torch.cat([masks[name] for name in dict.fromkeys(n for n in masks if not n.endswith(".attn.k"))])
    assert int(kept.sum()) == 5 and flat[kept == 1].min() >= flat[kept == 0].max()
    assert torch.equal(masks["0.attn.q"], masks["0.attn.k"])
    assert prune.node_count(masks) == 5 + int(masks["0.attn.q"].sum())   # a tied unit is two nodes


def test_frozen_norms_change_nothing_on_the_full_model_and_pin_the_scale_of_a_pruned_one():
    model = tiny_model()
    idx, last = torch.randint(0, 2048, (2, 10)), torch.tensor([9, 6])
    ms = prune.norm_mean_squares(model, idx, last)
    assert len(ms) == 2 * 2 + 1                                       # norm1, norm2 per block, norm_f
    with prune.frozen_norms(model, ms):
        torch.testing.assert_close(model(idx, last=last)[0], GPT.forward(model, idx, last=last)[0], rtol=0, atol=1e-6)
    ms = prune.norm_mean_squares(model, idx, None)
    with prune.frozen_norms(model, ms):
        torch.testing.assert_close(model(idx)[0], GPT.forward(model, idx)[0], rtol=0, atol=1e-6)
    # zero the whole residual stream's writes at layer 0: with frozen norms the later norms'
    # outputs shrink with it instead of being scaled back up
    zero = {"0.attn.resid_delta": lambda x, name: 0.01 * x, "0.mlp.resid_delta": lambda x, name: 0.01 * x}
    got = {}
    with model.hooks({**zero, "1.attn.act_in": lambda x, name: got.setdefault("free", x)}):
        model(idx)
    with model.hooks({**zero, "1.attn.act_in": lambda x, name: got.setdefault("frozen", x)}):
        with prune.frozen_norms(model, ms):
            model(idx)
    assert got["frozen"].norm() < got["free"].norm()


def test_pretraining_means_are_the_mean_over_every_sampled_token(tmp_path, corpus):
    folder, _ = corpus
    model, ckpt = tiny_model(block_size=32), str(tmp_path / "ckpt.pt")
    torch.save({}, ckpt)
    cfg = prune.PruneConfig(ckpt=ckpt, out_dir=str(tmp_path), mean_batches=2, mean_batch_size=3)
    means, _ = prune.pretraining_means(model, ckpt, folder, cfg, "cpu")
    gen, tokens = torch.Generator().manual_seed(cfg.seed), data.load_tokens(folder, "train")
    x = torch.cat([data.get_batch(tokens, 3, 32, gen)[0] for _ in range(2)])   # the same 2 x 3 windows
    _, cache = model.run_with_cache(x, prune.node_sites(model))
    for s in prune.node_sites(model):
        torch.testing.assert_close(means[s], cache[s].mean((0, 1)), rtol=1e-4, atol=1e-6)
    with torch.no_grad():                                                 # the checkpoint retrained in place:
        model.blocks[0].mlp.c_fc.weight.mul_(2)                           # its means, not the cached ones
    torch.save({}, ckpt)
    os.utime(ckpt, ns=(os.stat(ckpt).st_atime_ns, os.stat(ckpt).st_mtime_ns + 10**9))
    retrained, _ = prune.pretraining_means(model, ckpt, folder, cfg, "cpu")
    torch.testing.assert_close(retrained["0.mlp.post_act"], model.run_with_cache(x)[1]["0.mlp.post_act"].mean((0, 1)))
    assert not torch.allclose(retrained["0.mlp.post_act"], means["0.mlp.post_act"])
    prune.pretraining_means(model, ckpt, folder, dataclasses.replace(cfg, seed=1), "cpu")   # another sample
    assert len(os.listdir(tmp_path / "means")) == 3


def test_mask_taus_stay_in_minus_1_to_1():
    model, prompts = answer_model()
    zeros = {s: torch.zeros(prune.dim_of(model, s)) for s in prune.node_sites(model)}
    for k_coef, bound in ((0.1, "min"), (0.0, "max")):   # big steps push taus past -1 (the penalty) or past 1 (the task)
        cfg = prune.PruneConfig(steps=30, lr=0.5, batch_size=16, k_coef=k_coef)
        taus = prune.train_masks(model, prompts, zeros, cfg, "cpu", log=lambda *a: None)
        flat = torch.cat([t.detach() for t in prune.unique(taus)])
        assert flat.min() >= -1.0 and flat.max() <= 1.0 and getattr(flat, bound)().abs() == 1.0, k_coef


def test_freeze_norm_batches_pin_the_norms_of_a_pruned_model(corpus):
    _, enc = corpus
    model, prompts = tiny_model(), make_prompts("for_while", enc, 4, 0, "test")
    frozen, free = (prune.make_batch(model, prompts, "cpu", freeze) for freeze in (True, False))
    sites = prune.node_sites(model)
    means = {s: torch.full((prune.dim_of(model, s),), 0.1) for s in sites}
    kept = {s: torch.ones(prune.dim_of(model, s)) for s in sites}
    torch.testing.assert_close(prune.circuit_logits(model, frozen, kept, means),
                               prune.circuit_logits(model, free, kept, means), rtol=0, atol=1e-5)
    none = {s: torch.zeros(prune.dim_of(model, s)) for s in sites}
    assert not torch.allclose(prune.circuit_logits(model, frozen, none, means),
                              prune.circuit_logits(model, free, none, means))


def test_task_means_average_the_prompts_positions_not_the_padding(corpus):
    _, enc = corpus
    model, prompts = tiny_model(), make_prompts("bracket_brace", enc, 6, 0, "test")   # mixed lengths: padding
    batches = prune.make_batches(model, prompts, "cpu", prune.PruneConfig(eval_batch_size=6))
    means = prune.task_means(model, batches)
    caches = [model.run_with_cache(torch.tensor([p.ids]), prune.node_sites(model))[1] for p in prompts]
    for s in prune.node_sites(model):
        expected = torch.cat([c[s][0] for c in caches]).mean(0)
        torch.testing.assert_close(means[s], expected, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# edges, bisection


def test_edges_on_a_hand_built_model_are_exactly_the_nonzero_weights_between_kept_nodes():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, d_model=16, d_head=16))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
        attn.c_attn.weight[2, 5] = 0.5             # act_in 5 -> q 2
        attn.c_attn.weight[16 + 3, 5] = -1.0       # act_in 5 -> k 3
        attn.c_attn.weight[32 + 7, 1] = 2.0        # act_in 1 -> v 7
        attn.c_attn.weight[32 + 7, 9] = 3.0        # act_in 9 (not kept) -> v 7: no edge
        attn.c_attn.weight[32 + 8, 1] = 3.0        # act_in 1 -> v 8 (not kept): no edge
        attn.c_proj.weight[4, 7] = 0.25            # v 7 -> attn out 4
        mlp.c_fc.weight[10, 4] = 1.5               # mlp in 4 -> neuron 10
        mlp.c_proj.weight[6, 10] = -0.75           # neuron 10 -> mlp out 6
        mlp.c_proj.weight[8, 10] = 0.1             # neuron 10 -> mlp out 8 (not kept): no edge
    kept = {"0.attn.act_in": [1, 5, 9 - 9], "0.attn.q": [2], "0.attn.k": [3, 4], "0.attn.v": [7],
            "0.attn.resid_delta": [4], "0.mlp.act_in": [4], "0.mlp.post_act": [10, 11], "0.mlp.resid_delta": [6]}
    keep = {s: torch.zeros(prune.dim_of(model, s)) for s in prune.node_sites(model)}
    for s, idx in kept.items():
        keep[s][idx] = 1.0
    edges = prune.circuit_edges(model, keep)
    assert sorted(edges) == sorted([
        ("0.attn.act_in", 5, "0.attn.q", 2, 0.5), ("0.attn.act_in", 5, "0.attn.k", 3, -1.0),
        ("0.attn.act_in", 1, "0.attn.v", 7, 2.0), ("0.attn.v", 7, "0.attn.resid_delta", 4, 0.25),
        ("0.mlp.act_in", 4, "0.mlp.post_act", 10, 1.5), ("0.mlp.post_act", 10, "0.mlp.resid_delta", 6, -0.75)])


def test_bisection_finds_the_smallest_k_meeting_the_target():
    calls = []

    def loss_at(k):                       # falls with k; <= 0.15 first at k = 6 (1/7 = 0.143)
        calls.append(k)
        return 1.0 / (1 + k)
    for hi in (None, 50, 6, 3):           # a hint that meets the target, or one that does not
        calls.clear()
        assert prune.bisect_k(loss_at, 100, 0.15, hi=hi) == 6
        assert len(calls) <= 2 + math.ceil(math.log2(102))
    assert prune.bisect_k(loss_at, 100, 2.0) == 0                 # the empty circuit already meets it
    assert prune.bisect_k(loss_at, 100, 0.25) == 3                # 1/4 exactly: at the target meets it
    assert prune.bisect_k(loss_at, 100, 0.001) is None            # not even everything kept does
    steps = [0.9] * 37 + [0.1] * 64                               # a step function: the answer is 37
    assert prune.bisect_k(lambda k: steps[k], 100, 0.15, hi=80) == 37


def answer_model():
    """A hand-built model whose answer runs through exactly 4 nodes: token 10 or 11 writes +-1 on
    residual channel 0; mlp.act_in 0 -> neurons 5 = gelu(x) and 6 = gelu(-x) -> mlp.resid_delta 1,
    which alone the unembedding reads: +-7.8 on the answers 12 vs 13. Everything else is zero."""
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, d_model=16, d_head=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.zero_()
        model.wte.weight[10, 0], model.wte.weight[11, 0] = 1.0, -1.0
        mlp = model.blocks[0].mlp
        mlp.c_fc.weight[5, 0], mlp.c_fc.weight[6, 0] = 1.0, -1.0
        mlp.c_proj.weight[1, 5], mlp.c_proj.weight[1, 6] = 1.0, -1.0
        model.lm_head.weight[12, 1], model.lm_head.weight[13, 1] = 1.0, -1.0
    prompts = [Prompt([t], c, a, t - 10) for t, c, a in ((10, 12, 13), (11, 13, 12))] * 8
    return model.eval().requires_grad_(False), prompts


CARRIERS = {("0.mlp.act_in", 0), ("0.mlp.post_act", 5), ("0.mlp.post_act", 6), ("0.mlp.resid_delta", 1)}


def circuit_of_ranked(model, prompts, cfg, ranked):
    """find_circuit under zero ablation, with masks that rank the units ranked first, in that order.
    -> (keep, k, curve, batches, zeros)"""
    batches = prune.make_batches(model, prompts, "cpu", cfg)
    zeros = {s: torch.zeros(prune.dim_of(model, s)) for s in prune.node_sites(model)}
    taus = prune.init_taus(model, cfg, "cpu")
    with torch.no_grad():
        for t in prune.unique(taus):
            t.fill_(-0.5)
        for r, (s, i) in enumerate(ranked):
            taus[s][i] = 0.9 - 0.1 * r
    return (*prune.find_circuit(model, taus, batches, zeros, cfg), batches, zeros)


def kept_units(keep):
    return {(s, i) for s, m in keep.items() for i in m.nonzero()[:, 0].tolist()}


def test_the_circuit_is_the_smallest_k_found_even_where_loss_does_not_fall_with_k():
    """Neuron 7 reads the input as neuron 5 does and writes the other answer, 3x as hard: ranked just
    after the 4 carriers, it undoes them, and so does keeping everything. A bisection down from the
    units with tau > 0 (5), or from all of them, finds nothing; the curve's k = 4 is the circuit."""
    model, prompts = answer_model()
    mlp = model.blocks[0].mlp
    mlp.c_fc.weight[7, 0], mlp.c_proj.weight[1, 7] = 1.0, -3.0
    cfg = prune.PruneConfig(target_loss=0.15, eval_batch_size=8)
    keep, k, curve, _, _ = circuit_of_ranked(model, prompts, cfg, sorted(CARRIERS, key=str) + [("0.mlp.post_act", 7)])
    assert curve[5][1] > 0.3 and curve[max(curve)][1] > 0.3             # more kept, worse
    assert k == 4 and kept_units(keep) == CARRIERS


def test_bisection_on_a_model_with_a_known_circuit_and_masks_that_learn_it():
    model, prompts = answer_model()
    cfg = prune.PruneConfig(target_loss=0.15, eval_batch_size=8, steps=200, batch_size=16)   # the paper's settings
    # the carriers ranked first, in a known order
    keep, k, curve, batches, zeros = circuit_of_ranked(model, prompts, cfg, sorted(CARRIERS, key=str))
    assert k == 4 and curve[3][1] > 0.3 and curve[4][1] < 0.01     # 3 carriers: half the prompts at chance
    assert kept_units(keep) == CARRIERS
    assert sorted(prune.circuit_edges(model, keep)) == [
        ("0.mlp.act_in", 0, "0.mlp.post_act", 5, 1.0), ("0.mlp.act_in", 0, "0.mlp.post_act", 6, -1.0),
        ("0.mlp.post_act", 5, "0.mlp.resid_delta", 1, 1.0), ("0.mlp.post_act", 6, "0.mlp.resid_delta", 1, -1.0)]
    losses = prune.checks(model, keep, batches, batches, zeros, cfg)
    assert losses["circuit"] == pytest.approx(losses["full"], abs=0.01)            # sufficient: it alone does it
    assert losses["circuit_ablated"] >= math.log(2) - 1e-3                         # necessary: without it, chance
    # the mask optimization itself keeps the carriers (tau > 0) and drops the rest
    taus = prune.train_masks(model, prompts, zeros, cfg, "cpu", log=lambda *a: None)
    assert {(s, i) for s, t in taus.items() for i in (t > 0).nonzero()[:, 0].tolist()} == CARRIERS


def test_the_bisection_asks_the_mean_loss_plus_a_standard_error_of_the_prompts():
    """The answer model with a bias toward answer 12: the two classes' losses differ (0.090 and 0.111,
    mean 0.100, one standard error over 16 prompts 0.003). Asked 0.101, only the mean meets it."""
    model, prompts = answer_model()
    with torch.no_grad():
        model.blocks[0].mlp.c_proj.bias[1] = 2.0
        model.lm_head.weight.mul_(0.3)
    for bisect_se, target, found in ((0.0, 0.101, 4), (1.0, 0.101, None), (1.0, 0.104, 4)):
        cfg = prune.PruneConfig(target_loss=target, eval_batch_size=8, bisect_se=bisect_se)
        assert circuit_of_ranked(model, prompts, cfg, sorted(CARRIERS, key=str))[1] == found, (bisect_se, target)


def test_k_is_chosen_on_other_prompts_than_the_masks_learn_on(corpus, monkeypatch):
    _, enc = corpus
    model, cfg = tiny_model(), prune.PruneConfig(eval_batch_size=8)
    train_prompts, eval_prompts = make_prompts("if_equals", enc, 16, 0, "train"), make_prompts("if_equals", enc, 16, 1, "train")
    means = {s: torch.zeros(prune.dim_of(model, s)) for s in prune.node_sites(model)}
    learned_on, chosen_on = [], []
    monkeypatch.setattr(prune, "train_masks", lambda model, prompts, *a: learned_on.append(prompts) or
                        prune.init_taus(model, cfg, "cpu"))
    monkeypatch.setattr(prune, "find_circuit", lambda model, taus, batches, *a: chosen_on.append(batches) or (None, None, {}))
    prune.search(model, train_prompts, eval_prompts, means, cfg, "cpu", log=lambda *a: None)
    assert learned_on == [train_prompts]
    expected = prune.make_batches(model, eval_prompts, "cpu", cfg)
    assert len(chosen_on[0]) == len(expected) and all(torch.equal(a.idx, b.idx) for a, b in zip(chosen_on[0], expected))


def test_checks_ablate_what_they_name_and_calibrate_on_the_bisection_prompts(corpus, monkeypatch):
    _, enc = corpus
    model, cfg = tiny_model(), prune.PruneConfig(calibrate=True, eval_batch_size=8)
    eval_batches = prune.make_batches(model, make_prompts("if_equals", enc, 16, 0, "train"), "cpu", cfg)
    test_batches = prune.make_batches(model, make_prompts("if_equals", enc, 16, 0, "test"), "cpu", cfg)
    gen = torch.Generator().manual_seed(2)
    means = {s: torch.randn(prune.dim_of(model, s), generator=gen) for s in prune.node_sites(model)}
    keep = {s: (torch.rand(m.numel(), generator=gen) < 0.3).float() for s, m in means.items()}
    fitted, fit = [], prune.fit_calibration
    monkeypatch.setattr(prune, "fit_calibration", lambda *a: fitted.append(a) or fit(*a))
    out = prune.checks(model, keep, eval_batches, test_batches, means, cfg)
    loss = lambda masks: prune.task_loss(*prune.eval_logits(model, test_batches, masks, means))[0].item()
    assert out["circuit"] == loss(keep)                                        # sufficiency: the rest ablated
    assert out["circuit_ablated"] == loss({s: 1 - m for s, m in keep.items()})  # necessity: the circuit alone ablated
    assert out["circuit_ablated"] != loss({s: 0 * m for s, m in keep.items()})  # not everything
    (args,) = fitted                                                           # fit on the bisection prompts
    assert all(torch.equal(a, b) for a, b in zip(args, prune.eval_logits(model, eval_batches, keep, means)))


def test_the_node_penalty_counts_a_tied_q_k_pair_as_two_nodes():
    model, prompts = answer_model()                     # attention weights all 0: no task gradient on q, k, v
    cfg = prune.PruneConfig(steps=1, batch_size=16, lr=0.0, tau_std=0.0, tie_qk=True, k_coef=1.0)
    zeros = {s: torch.zeros(prune.dim_of(model, s)) for s in prune.node_sites(model)}
    taus = prune.train_masks(model, prompts, zeros, cfg, "cpu", log=lambda *a: None)
    assert taus["0.attn.k"] is taus["0.attn.q"] and taus["0.attn.v"].grad.abs().min() > 0
    torch.testing.assert_close(taus["0.attn.q"].grad, 2 * taus["0.attn.v"].grad)   # one mask, two nodes kept


def test_length_sorted_micro_batches_give_the_batch_gradient(corpus):
    _, enc = corpus
    model = tiny_model()
    prompts = make_prompts("else_elif", enc, 32, 0, "train")         # lengths vary: padding differs
    means = {s: torch.zeros(prune.dim_of(model, s)) for s in prune.node_sites(model)}
    grads = []
    for micro in (1, 4):
        cfg = prune.PruneConfig(steps=1, batch_size=32, micro_batches=micro, lr=0.0, tau_std=0.5)
        taus = prune.train_masks(model, prompts, means, cfg, "cpu", log=lambda *a: None)
        grads.append(torch.cat([t.grad for t in prune.unique(taus)]))   # the last (only) step's gradient
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


def test_a_step_of_fewer_prompts_than_pieces_gives_the_batch_gradient(corpus):
    _, enc = corpus
    model = tiny_model()
    prompts = make_prompts("else_elif", enc, 2, 0, "train")
    means = {s: torch.zeros(prune.dim_of(model, s)) for s in prune.node_sites(model)}
    grads = []
    for batch_size, micro in ((2, 1), (2, 0), (64, 0), (64, 3)):   # 0: 4 pieces on a CPU; 3 > the 2 prompts
        cfg = prune.PruneConfig(steps=1, batch_size=batch_size, micro_batches=micro, lr=0.0, tau_std=0.5)
        taus = prune.train_masks(model, prompts, means, cfg, "cpu", log=lambda *a: None)
        grads.append(torch.cat([t.grad for t in prune.unique(taus)]))
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)
    with pytest.raises(UserError, match=r"--micro_batches=3 is outside \[0, --batch_size=2\]"):
        parse_args(prune.PruneConfig, ["--batch_size=2", "--micro_batches=3"])


# -----------------------------------------------------------------------------
# records, pictures, the script


def test_record_round_trips_through_json_and_rebuilds_the_same_circuit(tmp_path, corpus):
    _, enc = corpus
    model = tiny_model()
    cfg = prune.PruneConfig(ckpt="none", eval_batch_size=16)
    test_batches = prune.make_batches(model, make_prompts("for_while", enc, 16, 0, "test"), "cpu", cfg)
    means = prune.task_means(model, test_batches)
    taus = prune.init_taus(model, cfg, "cpu")
    with torch.no_grad():
        for t in prune.unique(taus):
            t.normal_()
    keep = prune.top_k_masks(taus, 60)
    curve = {0: (0, 0.7), 60: (60, 0.5), 640: (640, 0.6)}
    rec = prune.circuit_record(model, "for_while", taus, keep, 60, curve, means, cfg)
    rec["losses"] = prune.checks(model, keep, test_batches, test_batches, means, cfg)
    assert rec["n_nodes"] == 60 and rec["n_edges"] > 0
    assert sum(rec["edges_by_type"].values()) == rec["n_edges"] and sum(rec["nodes_by_kind"].values()) == 60
    base = prune.write_outputs(rec, str(tmp_path))
    loaded = json.loads(open_text(base + ".json"))
    assert loaded == json.loads(json.dumps(rec))
    assert loaded["nodes"] == rec["nodes"] and loaded["edges"] == rec["edges"]      # floats exactly
    masks = {name: torch.zeros(prune.dim_of(model, name)) for name in prune.node_sites(model)}
    for n in loaded["nodes"]:                                     # the masks rebuilt from the JSON alone
        masks[n["site"]][n["index"]] = 1.0
    assert all(torch.equal(masks[s], keep[s]) for s in keep)
    assert [tuple(e.values()) for e in loaded["edges"]] == prune.circuit_edges(model, masks)
    loss = prune.readout_loss(*prune.eval_logits(model, test_batches, masks, means), False)
    assert loss == loaded["losses"]["circuit"]
    # the pictures: well-formed SVG, one dot per node, one line per edge (plus axes, rows, residual lines)
    svg = ET.parse(base + ".svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svg.findall(f"{ns}circle")) == 60
    assert sum(1 for l in svg.findall(f"{ns}line") if l.find(f"{ns}title") is not None) == rec["n_edges"]
    curve = ET.parse(base + "_loss.svg").getroot()
    assert len(curve.findall(f"{ns}circle")) == 3 and curve.find(f"{ns}polyline") is not None
    pictures = [open_text(base + ext) for ext in (".svg", "_loss.svg")]
    os.remove(base + ".svg")
    draw.main([f"--circuit={base}.json"])                             # draw.py redraws both from the record
    assert [open_text(base + ext) for ext in (".svg", "_loss.svg")] == pictures
    for damage in ({"nodes": None}, {"curve": []}, {"losses": {}}, {"nodes": [{**loaded["nodes"][0], "site": 5}]},
                   {"curve": [{**c, "loss": math.inf} for c in loaded["curve"]]}):   # edited by hand: one line
        with open(base + ".json", "w") as f:
            json.dump({**loaded, **damage}, f)
        with pytest.raises(UserError, match=r"for_while.json is a damaged circuit record \(\w+Error"):
            draw.main([f"--circuit={base}.json"])
    with pytest.raises(UserError, match=r"if_equals.json does not exist: python prune.py --task=if_equals writes it"):
        draw.main([f"--circuit={os.path.join(os.path.dirname(base), 'if_equals.json')}"])   # not pruned yet


def test_calibration_scales_by_a_positive_factor_so_a_wrong_model_stays_wrong():
    correct, alt = torch.tensor([0, 1] * 8), torch.tensor([1, 0] * 8)    # each answer right half the time
    logits = torch.zeros(16, 5)
    logits[torch.arange(16), alt] = 2.0                                   # always prefers the wrong one
    a, b = prune.fit_calibration(logits, correct, alt)
    assert a > 0 and prune.readout_loss(logits, correct, alt, True) >= math.log(2) - 1e-3   # a < 0 would fix it
    logits[torch.arange(16), correct] = 2.5                               # right, but unsure: the fit helps
    assert prune.readout_loss(logits, correct, alt, True) < 0.5 * prune.readout_loss(logits, correct, alt, False)


def test_prune_end_to_end_on_a_tiny_checkpoint(tmp_path, tiny_ckpt, corpus, capsys, monkeypatch):
    frozen, checked, make_batch, checks = [], [], prune.make_batch, prune.checks
    monkeypatch.setattr(prune, "make_batch", lambda model, prompts, device, freeze:
                        frozen.append(freeze) or make_batch(model, prompts, device, freeze))
    monkeypatch.setattr(prune, "checks", lambda model, keep, eval_batches, test_batches, *rest:
                        checked.append(test_batches) or checks(model, keep, eval_batches, test_batches, *rest))
    prune.main(fast_args(tiny_ckpt, tmp_path / "c", "--target_loss=0.8", "--task=for_while", "--nonsense=True",
                         "--tie_qk=True", "--freeze_norm=True", "--calibrate=True"))
    assert frozen and all(frozen)                    # --freeze_norm: the mask steps', bisection's and test batches
    task_test, control_test = checked                # the control is checked on its own, swapped, answers
    assert all(torch.equal(a.correct, b.alt) and torch.equal(a.alt, b.correct) for a, b in zip(task_test, control_test))
    out = capsys.readouterr().out
    assert "for_while: circuit of" in out and "nonsense control" in out and "calibrated" in out
    rec = json.loads(open_text(tmp_path / "c" / "for_while.json"))
    assert rec["losses"]["circuit"] <= 0.8 and rec["settings"]["tie_qk"] and "nonsense" in rec
    for calibrated_loss, verdict in ((0.5, "meets"), (0.85, "ABOVE")):   # judged on the loss k was bisected on
        lines = []
        prune.report({**rec, "losses": {**rec["losses"], "circuit": 0.9, "circuit_calibrated": calibrated_loss}},
                     lines.append)
        assert f"circuit 0.9000 | calibrated {calibrated_loss:.4f} ({verdict} the target 0.8)" in lines[1]
    assert "for_while: calibrated task loss against kept nodes" in open_text(tmp_path / "c" / "for_while_loss.svg")
    assert (tmp_path / "c" / "for_while.svg").exists() and (tmp_path / "c" / "for_while_loss.svg").exists()
    (means_file,) = os.listdir(tmp_path / "c" / "means")
    searched_with, search = [], prune.search
    monkeypatch.setattr(prune, "search", lambda model, prompts, eval_prompts, means, *rest:
                        searched_with.append(means) or search(model, prompts, eval_prompts, means, *rest))
    prune.main(fast_args(tiny_ckpt, tmp_path / "c", "--target_loss=0.8", "--task=for_while"))
    assert os.listdir(tmp_path / "c" / "means") == [means_file]          # the means come from the cache,
    cached = torch.load(tmp_path / "c" / "means" / means_file)           # and --ablation=mean ablates to them
    assert searched_with and all(torch.equal(searched_with[0][s], cached[s]) for s in cached)
    prune.main(fast_args(tiny_ckpt, tmp_path / "s1", "--target_loss=0.8", "--task=for_while", "--seed=1"))
    other = json.loads(open_text(tmp_path / "s1" / "for_while.json"))  # another search, the same test set
    assert other["losses"]["full"] == rec["losses"]["full"] and other["settings"]["seed"] == 1


def test_a_target_at_or_above_chance_gets_a_note_in_prune_and_headline(tiny_ckpt, tmp_path, capsys):
    prune.chance_note(0.6)
    assert capsys.readouterr().out == ""
    prune.main(fast_args(tiny_ckpt, tmp_path / "c", "--target_loss=0.8", "--task=for_while", "--steps=1"))
    assert "note: --target_loss=0.8 is at or above chance (ln 2 = 0.693)" in capsys.readouterr().out
    with pytest.raises(UserError):                                   # headline notes it before anything else
        headline.main([f"--sparse={tiny_ckpt}", "--dense=", "--target_loss=0.7"])
    assert "note: --target_loss=0.7 is at or above chance" in capsys.readouterr().out


def test_a_task_whose_loss_is_exactly_the_target_counts_as_solved(tiny_ckpt, tmp_path, monkeypatch):
    model, _, folder = prune.load_model(tiny_ckpt, "cpu")
    enc = data.get_encoding(folder)
    loss = tasks.evaluate(model, make_prompts("for_while", enc, 16, 0, "test", model.config.block_size), "cpu")[0]
    cfg = headline.HeadlineConfig(n_test=16, target_loss=loss)      # "task loss at most the target" [paper]
    assert headline.solved_tasks(model, enc, ["for_while"], cfg, "cpu") == {"for_while": loss}
    def pruned(model, enc, name, *args):
        raise SystemExit(f"pruning {name}")
    monkeypatch.setattr(prune, "prune_task", pruned)
    with pytest.raises(SystemExit, match="pruning for_while"):       # past the check, not "does not solve"
        prune.main(fast_args(tiny_ckpt, tmp_path / "c", f"--target_loss={loss!r}", "--task=for_while"))


def test_prune_bad_input_gives_one_line_and_exit_2_and_writes_nothing(tmp_path, tiny_ckpt, corpus):
    cases = [(["--task=no_such_task"], "unknown task 'no_such_task'"),
             (["--task=for_while", "--target_loss=0.3"], "does not solve for_while: full-model test loss 0.7"),
             (["--task=all", "--target_loss=0.3"], f"solves none of the {len(tasks.TASKS)} tasks"),
             (["--ablation=half"], "--ablation=half is unknown"), (["--ckpt="], "--ckpt is empty; give a checkpoint")]
    results = run_scripts([["prune.py", *fast_args(tiny_ckpt, tmp_path / "out", *args)] for args, _ in cases])
    for (args, words), result in zip(cases, results):
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, result.stderr)
    assert results[1].stderr.strip().endswith(f"; python tasks.py --ckpt={tiny_ckpt} shows the tasks it solves")
    assert results[2].stderr.strip().endswith("; try a model trained on more text (python train.py --preset=cpu45) "
                                              "or a higher --target_loss")    # what to do about it
    assert not (tmp_path / "out").exists()
    with pytest.raises(prune.NoCircuit, match="does not solve for_while"):   # for headline.py: a result, recorded
        prune.main(fast_args(tiny_ckpt, tmp_path / "out", "--task=for_while", "--target_loss=0.3"))


def test_geomean_is_geometric_and_counts_an_empty_circuit_as_1():
    assert prune.geomean([2, 8]) == pytest.approx(4.0) and prune.geomean([0, 4]) == pytest.approx(2.0)


def save_tiny(path, model, val_loss=3.0, **train_config):
    """A train.py-like checkpoint of model with the given saved settings (data_dir "" unless given)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config), "val_loss": val_loss,
                "train_config": {"data_dir": "", **train_config}}, path)
    return str(path)


def test_headline_matches_the_closest_dense_model_and_its_table_is_the_circuits_ratio(tmp_path, corpus, monkeypatch,
                                                                                   capsys):
    torch.manual_seed(1)
    dense = lambda: GPT(tiny_model().config).eval()                 # unprojected: every weight nonzero
    sparse = save_tiny(tmp_path / "sparse" / "ckpt.pt", tiny_model(), 3.0)
    far, near = (save_tiny(tmp_path / name / "ckpt.pt", dense(), val) for name, val in (("far", 2.5), ("near", 3.1)))
    real_main, calls = prune.main, []
    tiny = dataclasses.make_dataclass("PruneConfig", [("n_train", int, 32), ("n_eval", int, 16), ("mean_batches", int, 1),
                                                      ("mean_batch_size", int, 2)], bases=(prune.PruneConfig,))
    monkeypatch.setattr(prune, "PruneConfig", tiny)                  # the real pruning, with tiny defaults
    def counted_prune(argv):
        calls.append(argv)
        real_main(argv)
    monkeypatch.setattr(prune, "main", counted_prune)
    args = [f"--sparse={sparse}", f"--dense={far},{near}", "--tasks=for_while,if_equals", "--target_loss=0.8",
            "--prune_steps=3", "--k_coefs=1e-4,0.5", "--n_test=16", f"--out_dir={tmp_path / 'h'}", "--device=cpu"]
    headline.main(args)
    result = json.loads(open_text(tmp_path / "h" / "headline.json"))
    (c,) = result["comparisons"]
    assert c["matched_dense"] == near and c["val_loss_gap"] == pytest.approx(0.1)
    assert [r["task"] for r in c["rows"]] == ["for_while", "if_equals"]     # a random model "solves" both at 0.8
    for r in c["rows"]:   # each entry is the smallest circuit prune.py recorded over the k_coefs
        for kind, name, path in (("sparse", "sparse", sparse), ("dense", "near", near)):
            recs = [json.loads(open_text(tmp_path / "h" / "circuits" / name / f"k_coef={kc}" / f"{r['task']}.json"))
                    for kc in ("0.0001", "0.5")]
            found = [rec for rec in recs if rec["n_nodes"] is not None]
            assert r[f"{kind}_edges"] == min(rec["n_edges"] for rec in found)
            assert all(rec["checkpoint"] == path and rec["settings"]["steps"] == 3 for rec in recs)
    gs = math.sqrt(max(1, c["rows"][0]["sparse_edges"]) * max(1, c["rows"][1]["sparse_edges"]))
    assert c["geomean_sparse"] == pytest.approx(gs) and c["ratio"] == pytest.approx(c["geomean_dense"] / gs)
    assert len(result["points"]) == 3 and len(calls) == 12          # every model solves both tasks: all on the plot
    svg = ET.parse(tmp_path / "h" / "headline.svg").getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}circle")) == 3
    headline.main(args)
    assert len(calls) == 12                                          # the second run reads every circuit from the cache

    pooled, pruned_in_pool = [], []
    class SerialPool:                                                # --jobs's pool, run here (prune.main is patched)
        def __init__(self, n, initializer): assert initializer is headline.set_up_process
        def __enter__(self): return self
        def __exit__(self, *exc): pass
        def starmap(self, fn, args, chunksize=1):
            pooled.extend(args)
            out = [fn(*a) for a in args]
            pruned_in_pool.append(len(calls))
            return out
    monkeypatch.setattr(headline.multiprocessing, "get_context", lambda method: SimpleNamespace(Pool=SerialPool))
    before = len(calls)
    shutil.copytree(tmp_path / "h", tmp_path / "hj")
    for record in (tmp_path / "hj" / "circuits").rglob("for_while.json"):
        record.unlink()                                              # 6 runs to prune again, 6 to read
    headline.main([a.replace(str(tmp_path / "h"), str(tmp_path / "hj")) for a in args] + ["--jobs=2"])
    assert len(pooled) == 12 and pruned_in_pool == [before + 6] == [len(calls)]   # the pool pruned what was missing;
    assert all("--task=for_while" in argv for argv in calls[before:])                # main then only read
    assert json.loads(open_text(tmp_path / "hj" / "headline.json"))["comparisons"] == result["comparisons"]
    before = len(calls)
    headline.main(args + ["--prune_seeds=0,1", "--k_coefs=1e-4"])    # seed 1 joins the search: only its runs are new
    assert len(calls) - before == 6 and all("--seed=1" in argv for argv in calls[before:])
    grid = json.loads(open_text(tmp_path / "h" / "headline.json"))["comparisons"][0]["rows"]
    for r in grid:                                                   # the smallest over both seeds
        for kind, name in (("sparse", "sparse"), ("dense", "near")):
            recs = [json.loads(open_text(tmp_path / "h" / "circuits" / name / folder / f"{r['task']}.json"))
                    for folder in ("k_coef=0.0001", "k_coef=0.0001_seed=1")]
            assert r[f"{kind}_edges"] == min(rec["n_edges"] for rec in recs if rec["n_nodes"] is not None)
    for bad, words in (("--tasks=for_while,nope", "unknown task 'nope'"), ("--dense=", "give one or more"),
                       ("--prune_steps=0", "--prune_steps=0 must be positive"), ("--jobs=0", "--jobs=0 must be"), ("--prune_seeds=1,x", "--prune_seeds"),
                       ("--k_coefs=1e-4,x", "--k_coefs"), ("--k_coefs=-1e-4", r"floats in \[0, 2\*\*63\)"),
                       (f"--prune_seeds=0,{2**63}", r"ints in \[-2\*\*63, 2\*\*63\)"), (f"--prune_seeds={-2**63 - 1}", "--prune_seeds"),
                       ("--k_coefs=nan,1e-4", "--k_coefs='nan,1e-4'"), ("--k_coefs=inf", "--k_coefs='inf'"),
                       ("--prune_seeds=" + "9" * 400, "--prune_seeds")):
        with pytest.raises(UserError, match=words):
            headline.main(args + [bad])
    assert headline.HeadlineConfig(k_coefs="0", prune_seeds="-5,0").search_grid() == [(0.0, -5), (0.0, 0)]   # as prune.py's --seed


def test_headline_keeps_the_fewest_edges_over_the_grid_and_only_tasks_both_models_solve(monkeypatch):
    edges = {(1e-4, 0): 50, (3e-3, 0): 9, (1e-4, 1): 30, (3e-3, 1): None}   # None: no circuit met the target
    monkeypatch.setattr(headline, "circuit", lambda path, task, k_coef, seed, cfg, device: None if edges[k_coef, seed]
                        is None else {"n_edges": edges[k_coef, seed], "n_nodes": 100 - edges[k_coef, seed]})
    cfg = headline.HeadlineConfig(k_coefs="1e-4,3e-3", prune_seeds="0,1")
    assert headline.smallest_circuit("m", "t", cfg, "cpu")["n_edges"] == 9     # by edges, not nodes
    models = {"s": {"name": "s", "val_loss": 3.0, "solved": {"for_while": 0.1, "with_as": 0.1}},
              "d": {"name": "d", "val_loss": 3.0, "solved": {"with_as": 0.1}}}
    monkeypatch.setattr(headline, "smallest_circuit", lambda path, task, cfg, device: {
        "n_edges": 4 if path == "s" else 16, "n_nodes": 2, "losses": {"circuit": 0.1}, "settings": {"k_coef": 1, "seed": 0}})
    c = headline.compare("s", ["d"], models, headline.HeadlineConfig(), "cpu")
    assert [r["task"] for r in c["rows"]] == ["with_as"] and c["ratio"] == pytest.approx(4)   # not for_while


def test_headline_table_notes_a_circuit_that_misses_the_target_on_test_prompts_and_an_empty_one(capsys):
    row = lambda task, se, de, sl, dl, sn, dn: {"task": task, "sparse_edges": se, "dense_edges": de,
                                                "sparse_circuit_loss": sl, "dense_circuit_loss": dl,
                                                "sparse_nodes": sn, "dense_nodes": dn}
    rows = [row("single_double_quote", 40, 400, 0.12, 0.14, 12, 50),    # both meet 0.15: no note
            row("with_as", 30, 300, 0.17, 0.10, 9, 40),                 # chosen on the bisection prompts, misses on test
            row("else_elif", 0, 21, 0.09, 0.158, 0, 15)]                # the bigram table alone: empty
    c = {"sparse": "s", "matched_dense": "d", "rows": rows, "geomean_sparse": 1.0, "geomean_dense": 1.0, "ratio": 1.0}
    headline.print_table(c, {"s": {"name": "s", "val_loss": 3.0}, "d": {"name": "d", "val_loss": 3.0}}, 0.15)
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["single_double_quote"].rstrip().endswith("10.0")
    assert lines["with_as"].rstrip().endswith("sparse test loss 0.170 > target")
    assert lines["else_elif"].rstrip().endswith("sparse circuit empty; dense test loss 0.158 > target")


def test_headline_skips_a_task_whose_answer_this_tokenizer_splits(corpus, tiny_gpt, monkeypatch, capsys):
    _, enc = corpus                                   # another corpus's BPE may split an answer: skip, do not crash
    real = headline.make_prompts
    def split_answer(name, *args):
        if name == "if_equals":
            raise ValueError("task if_equals: answer '==' (['=', '=']) is not one token")
        return real(name, *args)
    monkeypatch.setattr(headline, "make_prompts", split_answer)
    cfg = headline.HeadlineConfig(target_loss=10.0, n_test=16)      # every posable task counts as solved
    assert list(headline.solved_tasks(tiny_gpt, enc, ["for_while", "if_equals"], cfg, "cpu")) == ["for_while"]
    assert "skipped if_equals: task if_equals: answer '=='" in capsys.readouterr().out


def test_headline_leaves_out_what_has_no_circuit_and_still_writes_the_table(tmp_path, corpus, monkeypatch, capsys):
    torch.manual_seed(1)                                              # the models of the test above: both tasks solved
    dense = lambda: GPT(tiny_model().config).eval()
    sparse = save_tiny(tmp_path / "sparse" / "ckpt.pt", tiny_model(), 3.0)
    far, near = (save_tiny(tmp_path / name / "ckpt.pt", dense(), val) for name, val in (("far", 2.5), ("near", 3.1)))
    def smallest(path, task, cfg, device):                           # far (only on the plot): no circuit at all
        if path == far or (path == near and task == "if_equals"):
            raise prune.NoCircuit(f"{path}: no circuit for {task}")
        return {"n_edges": 7 if path == sparse else 70, "n_nodes": 3, "losses": {"circuit": 0.5},
                "settings": {"k_coef": 1e-4, "seed": 0}}
    monkeypatch.setattr(headline, "smallest_circuit", smallest)
    headline.main([f"--sparse={sparse}", f"--dense={far},{near}", "--tasks=for_while,if_equals", "--target_loss=0.8",
                   "--n_test=16", f"--out_dir={tmp_path / 'h'}", "--device=cpu"])
    result = json.loads(open_text(tmp_path / "h" / "headline.json"))
    (c,) = result["comparisons"]
    assert [r["task"] for r in c["rows"]] == ["for_while"] and c["ratio"] == pytest.approx(10)
    assert result["plot_tasks"] == ["for_while"] and [p["name"] for p in result["points"]] == ["sparse", "near"]
    out = capsys.readouterr().out
    assert "if_equals left out" in out and "plot: far left out" in out
    sparse2 = save_tiny(tmp_path / "sparse2" / "ckpt.pt", tiny_model(), 3.0)
    def disjoint(path, task, cfg, device):                           # the two comparisons share no task
        if (path, task) in ((sparse, "if_equals"), (sparse2, "for_while")):
            raise prune.NoCircuit(f"{path}: no circuit for {task}")
        return {"n_edges": 7, "n_nodes": 3, "losses": {"circuit": 0.5}, "settings": {"k_coef": 1e-4, "seed": 0}}
    monkeypatch.setattr(headline, "smallest_circuit", disjoint)
    headline.main([f"--sparse={sparse},{sparse2}", f"--dense={near}", "--tasks=for_while,if_equals", "--target_loss=0.8",
                   "--n_test=16", f"--out_dir={tmp_path / 'd'}", "--device=cpu"])
    result = json.loads(open_text(tmp_path / "d" / "headline.json"))
    assert [[r["task"] for r in c["rows"]] for c in result["comparisons"]] == [["for_while"], ["if_equals"]]
    assert result["plot_tasks"] == [] and result["points"] == [] and not (tmp_path / "d" / "headline.svg").exists()
    assert "plot: geometric mean of edges over no task common to every comparison" in capsys.readouterr().out


def test_headline_cache_is_keyed_on_the_checkpoint_file_and_its_folder_is_the_models_own(tmp_path, monkeypatch):
    a = save_tiny(tmp_path / "a" / "x" / "ckpt.pt", tiny_model(), 3.0)
    b = str(tmp_path / "b" / "x" / "ckpt.pt")                          # a folder of the same name
    cfg = headline.HeadlineConfig(sparse=a, dense=f"{b},out/cpu45/ckpt.pt,out/cpu45/step800.pt", n_test=16,
                                  out_dir=str(tmp_path / "h"))
    names = headline.model_names(cfg)
    assert names["out/cpu45/ckpt.pt"] == "cpu45" and names["out/cpu45/step800.pt"] == "cpu45_step800"
    assert names[a].startswith("x_") and names[b].startswith("x_") and names[a] != names[b]
    alias = os.path.join(os.path.dirname(a), "..", "x", "ckpt.pt")    # a's file named another way: one model
    assert headline.model_names(dataclasses.replace(cfg, dense=alias)) == {a: "x", alias: "x"}
    calls = []
    def failing(argv):                                                 # any other error: not a result, not kept
        raise UserError(f"the model's data folder is gone ({argv[0]})")
    monkeypatch.setattr(prune, "main", failing)
    with pytest.raises(UserError, match="data folder is gone"):
        headline.circuit(a, "for_while", 1e-4, 0, cfg, "cpu")
    assert not (tmp_path / "h" / "circuits" / names[a] / "k_coef=0.0001" / "for_while.json").exists()
    def no_circuit(argv):
        calls.append(argv)
        raise prune.NoCircuit("for_while: no circuit reaches loss 0.15 on the bisection prompts")
    monkeypatch.setattr(prune, "main", no_circuit)
    assert headline.circuit(a, "for_while", 1e-4, 0, cfg, "cpu") is None
    assert "--n_test=16" in calls[0]                                   # prune poses the task on headline's prompts
    assert headline.circuit(a, "for_while", 1e-4, 0, cfg, "cpu") is None
    assert len(calls) == 1                                             # the failure is cached ...
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))         # ... until the checkpoint is written again
    headline.circuit(a, "for_while", 1e-4, 0, cfg, "cpu")
    assert len(calls) == 2
    record = tmp_path / "h" / "circuits" / names[a] / "k_coef=0.0001" / "for_while.json"
    for later, pruned in ((0, 3), (10 ** 9, 4), (2 * 10 ** 9, 4)):   # a record from before the key: reused if newer
        old = {k: v for k, v in json.loads(open_text(record)).items() if k != "checkpoint_key"}
        record.write_text(json.dumps(old))
        os.utime(record, ns=(st.st_atime_ns, st.st_mtime_ns + later))
        headline.circuit(a, "for_while", 1e-4, 0, cfg, "cpu")
        assert len(calls) == pruned                                    # than the file (written in the same tick: not)
    record.write_text(json.dumps({**json.loads(open_text(record)), "checkpoint": b}))   # as newer, but of another
    os.utime(record, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10 ** 9))              # run's checkpoint: not reused
    headline.circuit(a, "for_while", 1e-4, 0, cfg, "cpu")
    assert len(calls) == 5 and json.loads(open_text(record))["settings"]["lr"] == 3e-3   # the failure: all settings
    with monkeypatch.context() as m:                                   # prune.py's default lr changed since:
        m.setattr(prune, "PruneConfig", dataclasses.make_dataclass("PruneConfig", [("lr", float, 1e-2)],
                                                                   bases=(prune.PruneConfig,)))
        headline.circuit(a, "for_while", 1e-4, 0, cfg, "cpu")
        assert len(calls) == 6                                         # every setting is in the key: pruned again,
        headline.circuit(a, "for_while", 1e-4, 0, dataclasses.replace(cfg, target_loss=0.1), "cpu")
        assert len(calls) == 7                                         # the target too
    with pytest.raises(UserError, match="search that found no circuit: for_while: no circuit reaches"):
        draw.main([f"--circuit={record}"])                             # draw.py on it: one line, not a KeyError
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a circuit record of prune.py"):
        draw.main([f"--circuit={tmp_path / 'list.json'}"])
    for bad in (3, 0):
        with pytest.raises(UserError, match=f"--n_test={bad} must be positive and even"):
            headline.HeadlineConfig(n_test=bad)


def test_zero_ablation_holds_nodes_at_0_and_the_nonsense_control_swaps_the_answers(tmp_path, tiny_ckpt, monkeypatch):
    real, searched = prune.search, []
    monkeypatch.setattr(prune, "search", lambda model, prompts, *a: searched.append(prompts) or real(model, prompts, *a))
    prune.main(fast_args(tiny_ckpt, tmp_path / "z", "--target_loss=0.8", "--task=for_while", "--ablation=zero",
                         "--nonsense=True"))
    rec = json.loads(open_text(tmp_path / "z" / "for_while.json"))
    assert rec["means"] == "zero" and all(n["mean"] == 0.0 for n in rec["nodes"])
    task, control = searched                                       # the control: the same prompts, answers swapped
    assert [(p.ids, p.correct, p.alt) for p in control] == [(p.ids, p.alt, p.correct) for p in task]


def test_the_circuit_picture_puts_layer_0_at_the_bottom_and_a_neuron_over_its_neighbour():
    node = lambda s, i: {"site": s, "index": i, "mean": 0.0, "tau": 0.5}
    rec = {"task": "t", "n_nodes": 4, "n_edges": 1, "model_config": {"d_head": 16}, "settings": {"target_loss": 0.15},
           "losses": {"circuit": 0.1, "full": 0.1, "circuit_ablated": 0.7},
           "nodes": [node("0.mlp.act_in", 3), node("0.mlp.act_in", 7), node("0.mlp.post_act", 5), node("1.attn.act_in", 3)],
           "edges": [{"src": "0.mlp.act_in", "i": 7, "dst": "0.mlp.post_act", "j": 5, "w": 1.0}]}
    ns = "{http://www.w3.org/2000/svg}"
    at = {c.find(f"{ns}title").text.split(" ")[0]: (float(c.get("cx")), float(c.get("cy")))
          for c in ET.fromstring(draw.circuit_svg(rec)).findall(f"{ns}circle")}
    assert at["0.mlp.act_in[3]"][1] > at["0.mlp.post_act[5]"][1] > at["1.attn.act_in[3]"][1]   # the flow goes up
    assert at["0.mlp.post_act[5]"][0] == at["0.mlp.act_in[7]"][0]                          # over its one neighbour
    rec["edges"].append({"src": "0.mlp.act_in", "i": 3, "dst": "0.mlp.post_act", "j": 5, "w": -0.5})
    colour = {l.find(f"{ns}title").text.split(":")[0]: l.get("stroke")
              for l in ET.fromstring(draw.circuit_svg(rec)).findall(f"{ns}line") if l.find(f"{ns}title") is not None}
    assert colour == {"0.mlp.act_in[7] -> 0.mlp.post_act[5]": "#2166ac",        # blue w > 0, as the legend says
                      "0.mlp.act_in[3] -> 0.mlp.post_act[5]": "#b2182b"}        # red w < 0
    svg = ET.fromstring(draw.circuit_svg({**rec, "nodes": rec["nodes"] + [node("1.attn.q", 3)], "n_nodes": 5}))
    width = {l.find(f"{ns}title").text.split(":")[0]: l.get("stroke-width")
             for l in svg.findall(f"{ns}line") if l.find(f"{ns}title") is not None}
    assert width == {"0.mlp.act_in[7] -> 0.mlp.post_act[5]": "4.00", "0.mlp.act_in[3] -> 0.mlp.post_act[5]": "2.25"}
    at = {c.find(f"{ns}title").text.split(" ")[0]: (float(c.get("cx")), float(c.get("cy")))
          for c in svg.findall(f"{ns}circle")}
    assert at["0.mlp.post_act[5]"][0] == (at["0.mlp.act_in[3]"][0] + at["0.mlp.act_in[7]"][0]) / 2
    dashed = {(l.get("y1"), l.get("y2")) for l in svg.findall(f"{ns}line") if l.get("stroke-dasharray")}
    y = lambda name: f"{at[name][1]:.1f}"                         # each residual channel's kept rows, not 1.attn.q's
    assert dashed == {(y("1.attn.act_in[3]"), y("0.mlp.act_in[3]")), (y("0.mlp.act_in[7]"), y("0.mlp.act_in[7]"))}
    assert next(svg.iter(f"{ns}text")).text == "t: 5 nodes, 1 edges"
    assert [draw.node_label(s, i, 16) for s, i in (("0.attn.q", 18), ("1.attn.k", 18), ("0.attn.v", 35),
                                                   ("0.mlp.post_act", 5), ("0.attn.act_in", 5))] == \
        ["h1.2", "h1.2", "h2.3", "n5", "r5"]                       # head.dim of q/k/v, neuron, residual channel
    rec["curve"] = [{"nodes": n, "loss": l} for n, l in ((0, 0.69), (4, 0.12), (40, 0.05))]
    labels = [t.text for t in ET.fromstring(draw.curve_svg(rec)).iter(f"{ns}text")]
    assert "full model 0.050" in labels and "target 0.15" in labels   # full: every node kept, the curve's last
    cy = [float(c.get("cy")) for c in ET.fromstring(draw.curve_svg(rec)).iter(f"{ns}circle")]
    assert cy[:3] == sorted(cy[:3])                                   # lower loss drawn higher: y down in SVG


def test_headline_plot_and_notes_say_what_the_figures_say():
    points = [{"name": "s", "kind": "sparse", "val_loss": 3.0, "geomean_edges": 10.0},
              {"name": "d", "kind": "dense", "val_loss": 3.1, "geomean_edges": 1000.0}]
    circles = ET.fromstring(headline.plot_svg(points)).iter("{http://www.w3.org/2000/svg}circle")
    (sx, sy, sparse), (dx, dy, dense) = [(float(c.get("cx")), float(c.get("cy")), c.get("fill")) for c in circles]
    assert sx < dx and dy < sy and (sparse, dense) == ("#d62728", "#1f77b4")   # more edges higher; sparse red
    row = dict(sparse_circuit_loss=0.15, dense_circuit_loss=0.1, sparse_nodes=3, dense_nodes=2, sparse_edges=0,
               dense_edges=2)
    assert headline.row_notes(row, 0.15) == []       # at the target meets it; nodes without edges: not empty
    assert headline.row_notes({**row, "sparse_circuit_loss": 0.2, "dense_nodes": 0}, 0.15) == \
        ["sparse test loss 0.200 > target", "dense circuit empty"]


def test_headline_compares_only_the_tasks_every_model_solves():
    models = {"s": {"solved": {"for_while": 0.1, "with_as": 0.1}}, "d": {"solved": {"with_as": 0.12, "var_if": 0.1}}}
    assert headline.solved_by_all(["s", "d"], models) == ["with_as"]


# -----------------------------------------------------------------------------
# bridges


def identity_bridges(model, afrac=1.0):
    d = model.config.d_model
    bridges = bridge.Bridges(bridge.bridge_sites(model), d, d, afrac)
    with torch.no_grad():
        for lin in [*bridges.encoders, *bridges.decoders]:
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()
    return bridges


def test_nmse_equals_its_formula():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 4, generator=gen), torch.randn(3, 5, 4, generator=gen) * 2 + 1
    p, t = pred.reshape(-1, 4).numpy().astype(np.float64), target.reshape(-1, 4).numpy().astype(np.float64)
    expected = ((p - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
    assert bridge.nmse(pred, target).item() == pytest.approx(expected, rel=1e-5)
    assert bridge.nmse(target, target).item() == 0.0


def test_identity_bridges_between_a_model_and_its_copy_give_zero_nmse_and_kl():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    copy = GPT(tiny_config()).eval()
    copy.load_state_dict(model.state_dict())
    bridges = identity_bridges(model)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        dense_logits, dense_acts, _, sparse_acts = bridge.both_models(model, copy, x, bridges.sites)
        assert len(bridges.sites) == 2 * 2 + 1                         # embedding + attn and mlp of 2 layers
        for site in bridges.sites:
            terms = bridge.site_terms(model, copy, bridges, x, site, dense_logits, dense_acts, sparse_acts)
            for key, value in terms.items():
                assert abs(value.item()) < 1e-6, (site, key, value.item())


def test_hybrid_pass_runs_the_first_model_up_to_the_site_and_the_other_after_it():
    torch.manual_seed(0)
    first, second = GPT(tiny_config()).eval(), GPT(tiny_config()).eval()
    with torch.no_grad():
        second.bigram.normal_()                          # a bigram table that is not zero, to see whose is used
        idx = torch.randint(0, 64, (2, 16))
        _, acts = first.run_with_cache(idx, ["1.resid_pre", "1.resid_mid"])
        # by hand: first's embedding and block 0, then second's block 1, final norm, unembedding and bigram
        x = first.blocks[0](first.wte(idx))
        by_hand = second.lm_head(second.norm_f(second.blocks[1](x))) + second.bigram[idx]
        torch.testing.assert_close(bridge.hybrid(second, idx, "1.resid_pre", acts["1.resid_pre"]), by_hand)
        # switching mid-block: second's MLP half of block 1 only
        b = second.blocks[1]
        x = acts["1.resid_mid"]
        by_hand = second.lm_head(second.norm_f(x + b.mlp(b.norm2(x)))) + second.bigram[idx]
        torch.testing.assert_close(bridge.hybrid(second, idx, "1.resid_mid", x), by_hand)


def two_bridged_models():
    """A frozen 'dense' model and a 'sparse' one of another width (so a swapped pass cannot run), both random."""
    torch.manual_seed(0)
    dense = GPT(tiny_config(d_model=48)).eval().requires_grad_(False)
    sparse = GPT(tiny_config(d_model=32)).eval()
    with torch.no_grad():
        dense.bigram.normal_()                           # bigram tables that are not zero: the outputs differ more
        sparse.bigram.normal_()
    return dense, sparse, bridge.Bridges(bridge.bridge_sites(sparse), 48, 32, afrac=0.25)


def test_bridge_losses_and_their_gradients_equal_the_terms_by_hand():
    dense, sparse, bridges = two_bridged_models()
    sites, x, y = bridges.sites, torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    # by hand: the activations at the sites (the sparse ones with their graph), then every term from its formula
    d_logits, d_acts = dense.run_with_cache(x, sites)
    s_acts = {}

    def keep(a, name):
        s_acts[name] = a
        return a
    with sparse.hooks({s: keep for s in sites}):
        s_logits = sparse(x)[0]

    def nmse(p, t):
        p, t = p.flatten(0, 1), t.flatten(0, 1)
        return ((p - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()

    def kl(p_logits, q_logits):                                      # KL(p || q) per token, averaged
        return F.kl_div(F.log_softmax(q_logits, -1).flatten(0, 1), F.log_softmax(p_logits, -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")

    def at(site):
        i = sites.index(site)
        enc = abstopk(bridges.encoders[i](d_acts[site]), 8)          # k = 0.25 * 32
        dec = bridges.decoders[i](s_acts[site])
        with sparse.hooks({site: lambda a, name: enc}):
            ds = sparse(x)[0]                                        # dense up to the site, sparse after
        with dense.hooks({site: lambda a, name: dec}):
            sd = dense(x)[0]                                         # sparse up to the site, dense after
        return {"nmse_enc": nmse(enc, s_acts[site]), "nmse_dec": nmse(dec, d_acts[site]),
                "kl_ds": kl(d_logits, ds), "kl_sd": kl(d_logits, sd)}
    by_site = {s: at(s) for s in sites}
    # the evaluation's per-site terms
    with torch.no_grad():
        dense_logits, dense_acts, _, sparse_acts = bridge.both_models(sparse, dense, x, sites)
        for s in sites:
            got = bridge.site_terms(sparse, dense, bridges, x, s, dense_logits, dense_acts, sparse_acts)
            for key, value in got.items():
                torch.testing.assert_close(value, by_site[s][key].detach(), msg=f"{s} {key}")
    # the training loss: values, and gradients into the sparse model and the bridges
    want = {"ce": F.cross_entropy(s_logits.flatten(0, 1), y.flatten()),
            "nmse_enc": sum(by_site[s]["nmse_enc"] for s in sites) / len(sites),
            "nmse_dec": sum(by_site[s]["nmse_dec"] for s in sites) / len(sites),
            "kl_ds": by_site["1.resid_pre"]["kl_ds"], "kl_sd": by_site["0.resid_mid"]["kl_sd"]}
    got = bridge.bridge_losses(sparse, dense, bridges, x, y, "1.resid_pre", "0.resid_mid")
    params = [*sparse.parameters(), *bridges.parameters()]

    def grads(loss):
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
        for p, g, w in zip(params, grads(got[key]), grads(want[key])):
            torch.testing.assert_close(g, w, msg=key)
    # every bridge term trains the sparse model and the bridges (the pass through the frozen dense model too)
    wte, enc_w, dec_w = sparse.wte.weight, bridges.encoders[0].weight, bridges.decoders[0].weight
    for key, reaches in [("nmse_enc", [wte, enc_w]), ("nmse_dec", [wte, dec_w]), ("kl_sd", [wte]),
                         ("kl_ds", [sparse.lm_head.weight, bridges.encoders[2].weight])]:
        for p, g in zip(params, grads(got[key])):
            if any(p is r for r in reaches):
                assert g.abs().sum() > 0, key
    assert not any(p.requires_grad for p in dense.parameters())


def test_bridge_loss_weights_each_term_by_its_own_coefficient_and_evaluation_averages_its_batches():
    terms = {k: torch.tensor(v) for k, v in dict(ce=1.0, nmse_enc=10.0, nmse_dec=100.0, kl_ds=1e3, kl_sd=1e4).items()}
    cfg = bridge.BridgeConfig(coef_ce=2.0, coef_nmse=3.0, coef_kl_ds=5.0, coef_kl_sd=7.0)
    assert bridge.total_loss(terms, cfg).item() == 2 + 3 * 110 + 5e3 + 7e4
    dense, sparse, bridges = two_bridged_models()
    tokens = np.random.default_rng(0).integers(0, 64, 500).astype(np.uint16)
    cfg = bridge.BridgeConfig(device="cpu", n_layer=2, d_model=32, block_size=16, eval_task="", eval_iters=3,
                              batch_size=2)
    got = bridge.evaluate_bridges(sparse, dense, bridges, tokens, cfg)["sites"]["0.resid_mid"]["nmse_enc"]
    gen, want = torch.Generator().manual_seed(cfg.seed + 1), []      # the val loss's batches, as estimate_loss draws
    with torch.no_grad():
        for _ in range(3):
            x, _ = data.get_batch(tokens, 2, 16, gen)
            d_logits, d_acts, _, s_acts = bridge.both_models(sparse, dense, x, bridges.sites)
            terms = bridge.site_terms(sparse, dense, bridges, x, "0.resid_mid", d_logits, d_acts, s_acts)
            want.append(terms["nmse_enc"])
    assert got == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)   # the mean over eval_iters batches


def test_bridge_training_steps_move_the_bridges_and_lower_the_loss():
    dense, sparse, bridges = two_bridged_models()
    sparse.train()
    cfg = bridge.BridgeConfig(device="cpu", max_iters=10, n_layer=2, d_model=32, block_size=16, l0_frac=0.5,
                              eval_task="")
    optimizer = train.make_optimizer(sparse, cfg)
    bridge_opt = torch.optim.AdamW(bridges.parameters(), lr=cfg.bridge_lr, weight_decay=0.0)
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))

    @torch.no_grad()
    def loss():                                                      # over every site, on the one batch
        return sum(bridge.total_loss(bridge.bridge_losses(sparse, dense, bridges, x, y, s, s), cfg).item()
                   for s in bridges.sites)
    before, weights = loss(), [p.detach().clone() for p in bridges.parameters()]
    for step in range(cfg.max_iters):
        bridge.train_step(sparse, dense, bridges, optimizer, bridge_opt, x, y, step, cfg)
    assert all(not torch.equal(w, p) for w, p in zip(weights, bridges.parameters()))
    after = loss()
    assert after < 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("dense")
    train.train(tiny_train_config(out / "run", max_iters=2, eval_interval=2, l0_frac=1.0, afrac=1.0, eval_task="",
                                  block_size=256))
    return str(out / "run" / "ckpt.pt")


def tiny_bridge_config(out_dir, dense, **kw):
    base = dict(out_dir=str(out_dir), dense=dense, max_iters=3, eval_interval=3, eval_iters=1, log_interval=1,
                sample_tokens=0, batch_size=2, block_size=256, n_layer=1, d_model=32, l0_frac=0.25, eval_task="")
    return bridge.BridgeConfig(**{**base, **kw})


def test_bridge_training_keeps_the_dense_model_frozen_and_writes_a_normal_checkpoint(tmp_path, tiny_dense,
                                                                                    monkeypatch, capsys):
    loaded = []

    def spy(path, device):
        model, ckpt = load_dense(path, device)
        loaded.append(model)
        return model, ckpt
    load_dense = bridge.load_dense
    monkeypatch.setattr(bridge, "load_dense", spy)
    ev = bridge.train_bridges(tiny_bridge_config(tmp_path / "b", tiny_dense, sparse_sites=()))   # AbsTopK nowhere
    saved = torch.load(tiny_dense, weights_only=False)["model"]
    assert all(torch.equal(loaded[0].state_dict()[k], saved[k]) for k in saved)     # the dense model did not move
    assert set(ev["sites"]) == {"0.resid_pre", "0.resid_mid", "final_resid"}
    assert all(math.isfinite(v) for s in ev["sites"].values() for v in s.values())
    model = GPT.from_checkpoint(str(tmp_path / "b" / "ckpt.pt"))                # a normal checkpoint
    exact, params, _, _ = train.sparsity_report(model, 0.25)
    assert exact == params
    out = capsys.readouterr().out
    assert "kl_ds" in out and "nmse_enc" in out and "val loss: sparse" in out and "AbsTopK off;" in out   # as train.py
    monkeypatch.undo()
    result = bridge.steer(tiny_bridge_config(tmp_path / "b", tiny_dense, sparse_sites=(), steer=True, steer_prompts=8,
                                             steer_site="0.resid_mid", steer_controls=2))
    for key in ("before", "edit", "control"):
        assert all(0.0 <= p <= 1.0 for p in result[key])
    assert result["edit"] != result["before"]                                        # the edit reached the dense model
    before, edited = map(float, re.search(r"logit difference \(correct - other\) (\S+) before, (\S+) edited",
                                          capsys.readouterr().out).groups())
    assert edited != before                                                          # the value edited, not the change
    cfg, channel = tiny_bridge_config(tmp_path / "b", tiny_dense), result["channel"]  # the same, computed here:
    sparse, site = GPT.from_checkpoint(str(tmp_path / "b" / "ckpt.pt")).eval(), "0.resid_mid"
    prompts = tasks.make_prompts(cfg.steer_task, data.get_encoding(data.data_folder(torch.load(
        tmp_path / "b" / "ckpt.pt", weights_only=False))), 8, cfg.seed, "test")
    source = [sparse.run_with_cache(torch.tensor([p.ids]), site)[1][site][0, :, channel] for p in prompts if p.label]
    mean_at = [statistics.mean(a[-1 - j].item() for a in source if len(a) > j) for j in range(max(map(len, source)))]
    diffs = {}
    for p in (p for p in prompts if p.label == 0):
        def edit(x, name):      # the channel at offset j from the end <- the source class's mean there
            x = x.clone()
            for j in range(min(len(p.ids), len(mean_at))):
                x[0, -1 - j, channel] = mean_at[j]
            return x
        for name, hooks in (("before", {}), ("edited", {site: edit})):
            with torch.no_grad(), sparse.hooks(hooks):
                logits = sparse(torch.tensor([p.ids]))[0][0, -1]
            diffs.setdefault(name, []).append((logits[p.correct] - logits[p.alt]).item())
    expected = statistics.mean(diffs["before"]), statistics.mean(diffs["edited"])
    assert (before, edited) == pytest.approx(expected, abs=1e-3)                     # printed to 3 decimals


def test_bridge_bad_input_is_a_one_line_error(tmp_path, tiny_dense, corpus):
    sparse_dir = tmp_path / "sparse"
    train.train(tiny_train_config(sparse_dir, max_iters=1, eval_interval=1, eval_task=""))
    with pytest.raises(UserError, match="is a sparse model"):
        bridge.train_bridges(tiny_bridge_config(tmp_path / "x", str(sparse_dir / "ckpt.pt")))
    with pytest.raises(UserError, match="cannot bridge: dense n_layer=1 but sparse n_layer=2"):
        bridge.train_bridges(tiny_bridge_config(tmp_path / "y", tiny_dense, n_layer=2))
    with pytest.raises(UserError, match="dense vocab_size=64 but sparse vocab_size=128"):
        bridge.check_bridgeable(tiny_config(), dataclasses.replace(tiny_config(), vocab_size=128))
    result = subprocess.run([sys.executable, "bridge.py", f"--dense={sparse_dir / 'ckpt.pt'}",
                             f"--out_dir={tmp_path / 'z'}"], cwd=HERE, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "is a sparse model" in lines[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
    with pytest.raises(UserError, match="is not a bridge.py checkpoint"):              # a train.py run
        bridge.config_from_args([f"--out_dir={sparse_dir}", "--resume=True"])
    for bad, words in (("--steer_prompts=7", "must be even"), ("--steer_prompts=0", "must be even"),
                       ("--steer_controls=0", "steer_controls=0 must be at least 1"),
                       ("--bridge_afrac=0.01", "keeps no channel of d_model=32"),
                       ("--compile=True", "compile=True is a train.py setting that bridge.py does not use"),
                       ("--eval_task=with_as", "eval_task=with_as is a train.py setting"),
                       ("--preset=bogus", "preset=bogus is a train.py setting"),
                       ("--abstopk_by=radix", "abstopk_by=radix is a train.py setting"),
                       ("--coef_kl_sd=nan", "coef_kl_sd=nan must be finite and not negative"),
                       ("--bridge_lr=0", "bridge_lr=0.0 must be positive and finite"),
                       ("--dense=", "--dense is empty; give the dense model's checkpoint"),
                       ("--preset=cpu", "--preset=cpu is a train.py setting"),          # at their defaults too:
                       ("--abstopk_by=topk", "--abstopk_by=topk is a train.py setting")):  # no preset is applied
        with pytest.raises(UserError, match=words):
            bridge.config_from_args([bad, "--d_model=32", f"--out_dir={tmp_path / 'w'}"])
    with pytest.raises(UserError, match=r"--dense, --d_model: not used with --steer=True, which takes the models"):
        bridge.config_from_args(["--steer=True", "--dense=other.pt", "--d_model=32", "--steer_channel=3"])
    assert bridge.config_from_args(["--steer=True", "--seed=3", f"--out_dir={tmp_path}"]).seed == 3   # steering's own
    no_abstopk = bridge.config_from_args(["--bridge_afrac=1", "--d_model=32", f"--out_dir={tmp_path / 'w'}"])
    assert no_abstopk.bridge_afrac == 1
    assert bridge.Bridges(["0.resid_mid"], 32, 32, 1.0).k == 0                   # 1: no AbsTopK on the bridges


def test_bridge_resume_takes_its_settings_from_the_checkpoint_and_reproduces_the_run_bit_for_bit(tmp_path, tiny_dense):
    not_default = dict(max_iters=4, eval_interval=2, learning_rate=1e-2, bridge_lr=1e-2, coef_kl_sd=0.5)
    full = bridge.train_bridges(tiny_bridge_config(tmp_path / "full", tiny_dense, **not_default))
    bridge.train_bridges(tiny_bridge_config(tmp_path / "cut", tiny_dense, stop_iter=2, **not_default))
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["train_config"]["device"] == "auto"   # as asked
    args = [f"--out_dir={tmp_path / 'cut'}", "--resume=True"]
    cfg = bridge.config_from_args(args)                               # nothing repeated on the command line
    assert (cfg.learning_rate, cfg.bridge_lr, cfg.coef_kl_sd, cfg.d_model, cfg.dense) == (1e-2, 1e-2, 0.5, 32, tiny_dense)
    assert bridge.train_bridges(cfg) == full                          # the same evaluation, exactly
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=False) for run in ("full", "cut"))
    for part in ("model", "bridges"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    old = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)      # as saved before bridge.py refused
    old["train_config"].update(sample_tokens=48, eval_task="single_double_quote", compile=True)   # train.py's keys
    torch.save(old, tmp_path / "cut" / "ckpt.pt")
    assert bridge.config_from_args(args + ["--max_iters=6"]).eval_task == ""   # resumes, with bridge.py's own values
    for extra, words in ((["--d_model=64"], r"cannot change the model or bridge shape \(d_model\)"),
                         (["--bridge_afrac=0.5"], r"bridge shape \(bridge_afrac\)"),
                         ([], r"already at step 4; nothing to do up to max_iters=4 \(raise it")):
        with pytest.raises(UserError, match=words):
            bridge.train_bridges(bridge.config_from_args(args + extra))
    bridge.train_bridges(bridge.config_from_args(args + ["--max_iters=5", "--bridge_lr=3e-3", "--weight_decay=0"]))
    saved = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)      # run under the settings asked
    assert saved["bridge_optimizer"]["param_groups"][0]["lr"] == 3e-3
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    assert saved["dense_identity"] == bridge.dense_identity(torch.load(tiny_dense, weights_only=False))
    torch.save({**saved, "dense_identity": [99, 1.0]}, tmp_path / "cut" / "ckpt.pt")   # as if retrained at its path
    retrained = r"ckpt.pt is not the dense model these bridges were trained with \(step 99, val loss 1.0; it is now step"
    with pytest.raises(UserError, match=retrained):
        bridge.train_bridges(bridge.config_from_args(args + ["--max_iters=6"]))
    with pytest.raises(UserError, match=retrained):
        bridge.load_bridged(bridge.config_from_args([f"--out_dir={tmp_path / 'cut'}", "--steer=True", "--device=cpu"]))


def test_steering_follows_its_recipe_by_hand(tmp_path, tiny_dense):
    bridge.train_bridges(tiny_bridge_config(tmp_path / "b", tiny_dense, block_size=64, max_iters=1, bridge_afrac=0.5))
    with pytest.raises(UserError, match="exists: pass --resume=True"):             # a run is never overwritten
        bridge.train_bridges(tiny_bridge_config(tmp_path / "b", tiny_dense, block_size=64, max_iters=1))
    steer = dict(steer=True, steer_prompts=8, steer_site="0.resid_mid", steer_controls=1)
    with pytest.raises(UserError, match="--steer_site=0.attn.resid_delta is not a bridge site"):
        bridge.steer(tiny_bridge_config(tmp_path / "b", tiny_dense, **{**steer, "steer_site": "0.attn.resid_delta"}))
    result = bridge.steer(tiny_bridge_config(tmp_path / "b", tiny_dense, **steer))   # the default channel
    sparse, dense, bridges, folder = bridge.load_bridged(tiny_bridge_config(tmp_path / "b", tiny_dense, device="cpu"))
    assert bridges.k == 16                                            # the run's bridge_afrac, 0.5 of 32
    prompts = [p for p in make_prompts("single_double_quote", data.get_encoding(folder), 8, 1337, "test")
               if len(p.ids) <= 64]
    site, source, runs = "0.resid_mid", [p for p in prompts if p.label == 1], [p for p in prompts if p.label == 0]
    act = lambda model, p: model.run_with_cache(torch.tensor([p.ids]), [site])[1][site]   # (1, T, d)
    sources = [act(sparse, p)[0] for p in source]

    def edited(s, c):   # channel c at each position: the source prompts' mean as many tokens before their end
        out, T = s.clone(), s.size(1)
        for j in range(min(T, max(len(a) for a in sources))):
            out[0, T - 1 - j, c] = torch.stack([a[len(a) - 1 - j, c] for a in sources if len(a) > j]).mean()
        return out

    def shift(c):       # the sparse model's own answer under the edit of channel c, against unedited
        diffs = []
        for p in runs:
            unedited = sparse(torch.tensor([p.ids]))[0][0, -1]
            with sparse.hooks({site: lambda x, name: edited(x, c)}):
                logits = sparse(torch.tensor([p.ids]))[0][0, -1]
            diffs.append((logits[p.correct] - logits[p.alt] - unedited[p.correct] + unedited[p.alt]).item())
        return np.mean(diffs)
    channel = min(range(32), key=shift)
    assert result["channel"] == channel and shift(channel) < 0     # the channel that moves the answer most

    def dense_probs(p, delta):
        with dense.hooks({site: lambda x, name: x + delta}):
            pr = F.softmax(dense(torch.tensor([p.ids]))[0][0, -1], -1)
        return pr[p.correct].item(), pr[p.alt].item()
    edits = [dense_probs(p, bridges.decode(site, edited(act(sparse, p), channel)) - bridges.decode(site, act(sparse, p)))
             for p in runs]
    assert result["before"] == pytest.approx(tuple(map(np.mean, zip(*[dense_probs(p, 0.0) for p in runs]))), rel=1e-5)
    assert result["edit"] == pytest.approx(tuple(map(np.mean, zip(*edits))), rel=1e-5)
    assert result["edit"] != pytest.approx(result["before"], rel=1e-4)     # the edit moves the dense model
    control = random.Random(bridge.BridgeConfig().seed).sample([c for c in range(32) if c != channel], 1)[0]

    def control_delta(p):  # the control channel's edit on the dense side, scaled to the size of the real one's
        s = act(sparse, p)
        real, other = (bridges.decode(site, edited(s, c)) - bridges.decode(site, s) for c in (channel, control))
        return other * real.norm() / other.norm()
    controls = [dense_probs(p, control_delta(p)) for p in runs]
    control_change = np.subtract(tuple(map(np.mean, zip(*controls))), result["before"])   # ~1e-8 on this dense model,
    assert np.subtract(result["control"], result["before"]) == pytest.approx(control_change, rel=0.03)   # ~3 float32
    # steps of P ~1e-3 (equal here to the last bit): an unscaled control edit moves it 7% otherwise


def test_bridges_find_the_dense_model_from_any_folder_or_where_it_moved_and_steering_names_varying_answers(
        tmp_path, tiny_dense, monkeypatch, capsys):
    os.makedirs(tmp_path / "d")
    shutil.copy(tiny_dense, tmp_path / "d" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    bridge.train_bridges(bridge.config_from_args(                    # --dense as typed, relative to this folder
        ["--dense=d/ckpt.pt", "--out_dir=b", "--max_iters=1", "--eval_iters=1", "--batch_size=2", "--n_layer=1",
         "--d_model=32", "--device=cpu"]))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["dense"] == str(tmp_path / "d" / "ckpt.pt")
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    steer = [f"--out_dir={tmp_path / 'b'}", "--steer=True", "--steer_prompts=8", "--steer_site=0.resid_mid",
             "--steer_controls=1", "--steer_channel=0", "--device=cpu"]
    capsys.readouterr()
    bridge.main(steer)                                               # found from another folder
    assert "P(\'\")\')" in capsys.readouterr().out                     # one answer for all prompts: named
    os.rename(tmp_path / "d" / "ckpt.pt", tmp_path / "moved.pt")
    with pytest.raises(UserError, match=r"dense model .*d/ckpt.pt does not exist; --steer_dense=\.\.\. names where it is"):
        bridge.main(steer)
    bridge.main(steer + [f"--steer_dense={tmp_path / 'moved.pt'}", "--steer_task=else_elif"])
    out = capsys.readouterr().out
    assert re.search(r"4 test prompts answered \d ways \(e\.g\. ' \w+'\); .* over 4 prompts answered ':'", out)
    assert re.search(r"dense model +P\(correct\) +P\(':'\)\n", out)       # else_elif's other answer is always `:`
    other = torch.load(tmp_path / "moved.pt", weights_only=False)
    torch.save({**other, "step": 99}, tmp_path / "other.pt")          # a dense model, but not that one
    with pytest.raises(UserError, match="other.pt is not the dense model these bridges were trained with"):
        bridge.main(steer + [f"--steer_dense={tmp_path / 'other.pt'}"])
    resume = [f"--out_dir={tmp_path / 'b'}", "--resume=True", "--max_iters=2"]
    with pytest.raises(UserError, match=r"d/ckpt.pt does not exist; --dense=\.\.\. names where it is"):
        bridge.train_bridges(bridge.config_from_args(resume))
    old = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)    # as saved before bridges noted their dense model
    os.makedirs(tmp_path / "old")
    torch.save({k: v for k, v in old.items() if k != "dense_identity"}, tmp_path / "old" / "ckpt.pt")
    with pytest.raises(UserError, match="saved nothing that tells whether this is the same model"):
        bridge.train_bridges(bridge.config_from_args([f"--out_dir={tmp_path / 'old'}", "--resume=True", "--max_iters=2",
                                                      f"--dense={tmp_path / 'moved.pt'}"]))
    bridge.train_bridges(bridge.config_from_args(resume + [f"--dense={tmp_path / 'moved.pt'}"]))   # where it moved
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 2


def test_steer_leaves_out_prompts_longer_than_the_context_and_refuses_when_a_class_has_none(tmp_path, tiny_dense,
                                                                                            capsys):
    # its 8 test prompts (seed 1337) are 29 (label 0), 34 (0), 34 (1), 39, 40, 52, 72 and 78 tokens long
    for block in (34, 33):
        bridge.train_bridges(tiny_bridge_config(tmp_path / str(block), tiny_dense, block_size=block, max_iters=1))
    steer = dict(steer=True, steer_prompts=8, steer_site="0.resid_mid", steer_controls=1)
    capsys.readouterr()
    bridge.main([f"--out_dir={tmp_path / '34'}", "--steer=True", "--steer_prompts=8", "--steer_site=0.resid_mid",
                 "--steer_controls=1", "--device=cpu"])                # a prompt of exactly block_size tokens fits
    out = capsys.readouterr().out
    assert "note: 5 of 8 prompts are longer than the models' block_size=34" in out
    shown = json.loads(out.split("settings: ", 1)[1].splitlines()[0])   # only what steering uses, nothing it ignores
    assert shown["steer_site"] == "0.resid_mid" and "n_layer" not in shown and "dense" not in shown
    result = bridge.steer(tiny_bridge_config(tmp_path / "34", tiny_dense, **steer))
    assert all(0.0 <= p <= 1.0 for p in result["edit"])
    with pytest.raises(UserError, match="fits block_size=33"):          # one prompt fits: of one class only
        bridge.steer(tiny_bridge_config(tmp_path / "33", tiny_dense, **steer))


def test_bridges_saved_before_the_dense_models_identity_take_the_dense_model_at_its_saved_path(tiny_dense):
    _, dense_ckpt = bridge.load_dense(tiny_dense, "cpu")
    bridge.check_same_dense({"dense": tiny_dense}, dense_ckpt, tiny_dense)          # the same path: accepted
    with pytest.raises(UserError, match="saved nothing that tells"):
        bridge.check_same_dense({"dense": "/elsewhere/ckpt.pt"}, dense_ckpt, tiny_dense)


def test_bridge_losses_compute_no_gradient_for_the_frozen_dense_model(tiny_dense):
    dense, _ = bridge.load_dense(tiny_dense, "cpu")
    sparse = GPT(dense.config)
    bridges = bridge.Bridges(bridge.bridge_sites(sparse), 32, 32, 0.25)
    x = torch.randint(0, 2048, (2, 16))
    sum(bridge.bridge_losses(sparse, dense, bridges, x, x, "0.resid_mid", "0.resid_mid").values()).backward()
    assert sparse.wte.weight.grad is not None and all(p.grad is None for p in dense.parameters())


def test_bridge_steps_draw_their_hybrid_sites_anew_each_step(monkeypatch):
    dense, sparse, bridges = two_bridged_models()
    sparse.train()
    cfg = bridge.BridgeConfig(device="cpu", max_iters=8, n_layer=2, d_model=32, block_size=16, l0_frac=0.5, eval_task="")
    optimizer, bridge_opt = train.make_optimizer(sparse, cfg), torch.optim.AdamW(bridges.parameters())
    real, drawn = bridge.bridge_losses, []
    monkeypatch.setattr(bridge, "bridge_losses", lambda *a: drawn.append(a[-2:]) or real(*a))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for step in range(cfg.max_iters):
        bridge.train_step(sparse, dense, bridges, optimizer, bridge_opt, x, y, step, cfg)
    assert len(set(drawn)) > 1 and {s for pair in drawn for s in pair} <= set(bridges.sites)


# -----------------------------------------------------------------------------
# bench


def test_naive_reference_projection_gives_exactly_our_projection():
    torch.manual_seed(0)
    ours, naive = GPT(tiny_config()), GPT(tiny_config())
    with torch.no_grad():
        ours.blocks[0].mlp.c_fc.weight[:3] = 0.5                  # ties at the threshold
        naive.load_state_dict(ours.state_dict())
    ours.project_weights(0.2)
    bench.naive_project(naive, 0.2)
    for (name, a), (_, b) in zip(ours.sparse_params(), naive.sparse_params()):
        assert torch.equal(a, b), name
    ours, naive = GPT(tiny_config()), GPT(tiny_config())
    with torch.no_grad():                                         # ties everywhere, within rows too
        for p in ours.parameters():
            p.copy_((p * 50).round() / 50)
        naive.load_state_dict(ours.state_dict())
    ours.project_weights(0.2)
    bench.naive_project(naive, 0.2)
    for (name, a), (_, b) in zip(ours.sparse_params(), naive.sparse_params()):
        assert torch.equal(a, b), name


def test_bench_times_every_projection_on_the_weights_as_adam_leaves_them():
    model, seen = GPT(tiny_config()), []
    def project():                                                # what each timed call is handed
        seen.append([p.detach().clone() for _, p in model.sparse_params()])
        model.project_weights(0.2)
    start = [p.detach().clone() for _, p in model.sparse_params()]   # a fresh init: dense, as after an Adam step
    bench.projection_seconds(model, project, 3, "cpu")
    after = [p for _, p in model.sparse_params()]                      # left as it came, for the next timing
    assert len(seen) >= 3 and all(torch.equal(a, b) for call in seen + [after] for a, b in zip(call, start))


def test_bench_fixed_masks_keep_k_per_row_at_every_sparse_site_the_same_each_step(tmp_path):
    # AbsTopK's cost apart from choosing: its output and its masked gradient, at places that never move
    cfg = tiny_train_config(tmp_path, device="cpu")
    model = train.make_model(dataclasses.replace(cfg, afrac=1.0))   # as bench.py's worker builds it
    state = torch.get_rng_state()
    hooks = bench.fixed_mask_hooks(model, cfg)
    assert len(hooks) == 8 * cfg.n_layer and torch.equal(torch.get_rng_state(), state)   # the worker's tokens: sparse's
    kept = {}
    for step in range(2):                                         # new tokens each step: the same places
        x = torch.randint(model.config.vocab_size, (cfg.batch_size, cfg.block_size))
        with model.hooks(hooks):
            _, cache = model.run_with_cache(x, list(hooks))
        for name, act in cache.items():
            k = int(cfg.afrac * act.shape[-1])
            assert act.dtype == torch.float32 and ((act != 0).sum(-1) == k).all(), name
            assert step == 0 or torch.equal(act != 0, kept[name]), name
            kept[name] = act != 0
    h = torch.randn(cfg.batch_size, cfg.block_size, model.config.d_model, requires_grad=True)
    with model.hooks(hooks):
        out = model.sites["0.attn.q"](h)
    out.sum().backward()
    k = int(cfg.afrac * model.config.d_model)
    assert torch.equal(h.grad != 0, out != 0) and ((h.grad != 0).sum(-1) == k).all()   # exactly k, masked


def test_bench_worker_steps_past_the_anneal_through_the_fixed_masks_it_is_asked_for(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path, device="cpu")
    calls, steps, fixed_mask_hooks, optimizer_step = Counter(), [], bench.fixed_mask_hooks, bench.optimizer_step
    monkeypatch.setattr(bench, "fixed_mask_hooks", lambda model, c: {   # each hook counts its calls
        name: lambda x, n, fn=fn: calls.update([n]) or fn(x, n) for name, fn in fixed_mask_hooks(model, c).items()})
    monkeypatch.setattr(bench, "optimizer_step", lambda model, opt, step, c: steps.append((step, c.l0_frac)) or
                        optimizer_step(model, opt, step, c))
    class Parent:                                             # the pipe's other end: build, time a step, stop
        asked, answers = ["build", 1, 0], []
        recv = lambda self: self.asked.pop(0)
        send = lambda self, answer: self.answers.append(answer)
    parent = Parent()
    bench.training_worker(parent, cfg, 0, keep_memory=False, fixed_masks=True)
    assert parent.answers[0] == "ready" and set(parent.answers[2]) == {"projection_ms", "peak_mem_mb"}
    assert len(calls) == 8 * cfg.n_layer and set(calls.values()) == {3}   # every site, in the untimed step, the
    past = cfg.max_iters - 1                                  # timed one and the one before the projection's timing
    assert train.l0_at(past + 1, cfg) == cfg.l0_frac          # past the anneal: the L0 of most of a run
    assert steps == [(past, cfg.l0_frac)] * 2 + [(past, 1.0)]   # the last unprojected: what the projection is timed on


def test_keep_freed_memory_reuses_big_blocks_without_page_faults():
    code = """
import resource, sys, torch
from config import keep_freed_memory
threshold = keep_freed_memory() if sys.argv[1] == "keep" else 0   # as run_main does: before any tensor
for _ in range(10):                          # 64 MB tensors allocated and freed, as training steps do: the
    torch.ones(16 * 2**20)                   # heap grows until small objects in its gaps no longer matter
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(16 * 2**20)
print(threshold, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    def page_faults(mode):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.split()
        return int(out[0]), int(out[1])
    threshold, faults = page_faults("keep")
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc: keep_freed_memory does nothing here")
    assert threshold > 0
    if threshold < 64 * 2**20:
        pytest.skip(f"this glibc caps the mmap threshold at {threshold >> 20} MB: 64 MB tensors still map afresh")
    _, default_faults = page_faults("default")
    assert default_faults > 20 * max(faults, 50)  # glibc's default: a fresh mapping each time, faulted page by page
    assert faults < 1_000                         # kept: the freed block is reused as it is

# -----------------------------------------------------------------------------
# bad input to prune.py (and every script's out_dir): a one-line error before any work


def test_every_script_refuses_an_out_dir_that_is_empty_or_a_file():
    for cls in (train.TrainConfig, bridge.BridgeConfig, prune.PruneConfig, headline.HeadlineConfig, bench.BenchConfig):
        with pytest.raises(UserError, match="--out_dir is empty; give a folder"):
            cls(out_dir="")
        with pytest.raises(UserError, match=r"--out_dir=.*README.md is a file, not a folder"):
            cls(out_dir=README)


def test_prune_refuses_bad_optimizer_and_search_settings():
    cases = [(dict(lr=-1.0), r"--lr=-1.0 must be finite and not negative"),
             (dict(lr=float("nan")), r"--lr=nan must be finite and not negative"),
             (dict(lr=float("inf")), r"--lr=inf must be finite"),
             (dict(weight_decay=-1.0), r"--weight_decay=-1.0 must be finite and not negative"),
             (dict(beta2=2.0), r"--beta2=2.0 is outside \[0, 1\)"), (dict(beta2=1.0), r"--beta2=1.0 is outside"),
             (dict(k_coef=-1.0), r"--k_coef=-1.0 must be finite and not negative"),
             (dict(bisect_se=-3.0), r"--bisect_se=-3.0 must be finite and not negative"),
             (dict(bisect_se=float("nan")), r"--bisect_se=nan must be finite"),
             (dict(bisect_se=float("inf")), r"--bisect_se=inf must be finite"),
             (dict(target_loss=float("nan")), r"--target_loss=nan must be positive and finite"),
             (dict(target_loss=0.0), r"--target_loss=0.0 must be positive"),
             (dict(tau_std=float("nan")), r"--tau_std=nan must be finite and not negative"),
             (dict(tau_init=2.0), r"--tau_init=2.0 is outside \[-1, 1\]"),
             (dict(seed=2**64), r"--seed=18446744073709551616 is outside"),
             (dict(seed=-2**63 - 1), r"--seed=-9223372036854775809 is outside")]
    for kw, words in cases:
        with pytest.raises(UserError, match=words):
            prune.PruneConfig(**kw)
    prune.PruneConfig(lr=0.0, k_coef=0.0, bisect_se=0.0, weight_decay=0.0, beta2=0.0, seed=-2**63)   # the edges of
    prune.PruneConfig(seed=2**63 - 1)                                                                 # what is allowed


def test_prune_script_refuses_a_bad_out_dir_before_loading_anything(tmp_path):
    assert "--out_dir=README.md is a file, not a folder" in one_line_error(["prune.py", "--out_dir=README.md"])
    line = one_line_error([os.path.join(HERE, "prune.py"), "--out_dir=", "--ckpt=none.pt"], cwd=tmp_path)
    assert "--out_dir is empty" in line and os.listdir(tmp_path) == []

# -----------------------------------------------------------------------------
# bad input to headline.py


def test_headline_refuses_a_target_it_cannot_meet_and_a_bad_out_dir_up_front(tmp_path):
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match=f"--target_loss={bad} must be positive and finite"):
            headline.HeadlineConfig(target_loss=bad)
    line = one_line_error([os.path.join(HERE, "headline.py"), "--out_dir="], cwd=tmp_path)
    assert "--out_dir is empty" in line and os.listdir(tmp_path) == []   # no circuits/ left here


def test_headline_checks_each_models_role_and_data_before_evaluating_any(tmp_path, monkeypatch, capsys):
    model = GPT(tiny_config())
    sparse = save_tiny(tmp_path / "sparse" / "ckpt.pt", model, l0_frac=0.25, afrac=0.25)
    dense = save_tiny(tmp_path / "dense" / "ckpt.pt", model, l0_frac=1.0, afrac=1.0)
    bridged = save_tiny(tmp_path / "bridge" / "ckpt.pt", model, l0_frac=0.25, afrac=0.25, dense=dense)   # bridge.py's
    other_data = save_tiny(tmp_path / "other" / "ckpt.pt", model, l0_frac=1.0, afrac=1.0, data_dir=str(tmp_path))
    stdlib = save_tiny(tmp_path / "stdlib" / "ckpt.pt", model, l0_frac=1.0, afrac=1.0, data_dir=data.default_data_dir())

    def reached(path, device):                     # past the checks: the first model is loaded to be evaluated
        raise UserError("reached load")
    monkeypatch.setattr(headline, "load", reached)
    out = tmp_path / "h"
    cases = [(sparse, dense, "reached load"), (sparse, stdlib, "reached load"),   # "" and the stdlib's path agree
             (bridged, dense, "reached load"),                                    # a bridge-trained sparse model
             (dense, sparse, rf"--sparse={dense} is not weight-sparse \(l0_frac=1.0\)"),
             (sparse, sparse, rf"--dense={sparse} is a sparse model \(l0_frac=0.25, afrac=0.25\)"),
             (sparse, f"{dense},{other_data}", rf"{other_data} was trained on data_dir={tmp_path} but {sparse} on "
                                               "the standard library")]
    for name, tokenizer in (("tok_a", "a" * 12), ("tok_b", "b" * 12)):
        torch.save({**torch.load(dense, weights_only=False), "tokenizer": tokenizer}, tmp_path / f"{name}.pt")
    short = save_tiny(tmp_path / "short" / "ckpt.pt", GPT(tiny_config(block_size=8)), l0_frac=1.0, afrac=1.0)
    cases += [(sparse, f"{dense},{short}", rf"{short} has block_size=8 but {sparse} 16: val losses over contexts")]
    cases += [(sparse, f"{tmp_path / 'tok_a.pt'},{dense}", "reached load"),             # one id, one unrecorded
              (sparse, f"{tmp_path / 'tok_a.pt'},{tmp_path / 'tok_b.pt'}", "trained with different tokenizers")]
    for s, d, words in cases:
        with pytest.raises(UserError, match=words):
            headline.main([f"--sparse={s}", f"--dense={d}", f"--out_dir={out}", "--device=cpu"])
    assert not out.exists()
    capsys.readouterr()
    alike = dict(eval_iters=4, batch_size=8, seed=1)
    recorded = [save_tiny(tmp_path / n / "ckpt.pt", model, l0_frac=l0, **alike) for n, l0 in (("s2", 0.25), ("d2", 1.0))]
    other = save_tiny(tmp_path / "e" / "ckpt.pt", model, l0_frac=1.0, **{**alike, "eval_iters": 10})
    headline.check_models(recorded[:1], [recorded[1], other])
    assert "note: the models' val losses, which pair them, are over different val batches" in capsys.readouterr().out
    headline.check_models(recorded[:1], [recorded[1], dense])                      # alike, or not recorded: no note
    assert "note" not in capsys.readouterr().out
    line = one_line_error(["headline.py", f"--sparse={dense}", f"--dense={sparse}", f"--out_dir={out}"])
    assert "is not weight-sparse" in line and not out.exists()                      # swapped roles: nothing written

# -----------------------------------------------------------------------------
# bad input to bridge.py


def test_bridge_data_dir_and_init_sparse_are_checked_against_the_dense_model(tmp_path, tiny_dense, monkeypatch):
    cfg = tiny_bridge_config(tmp_path / "b", tiny_dense)
    with pytest.raises(UserError, match="differs from the dense model's ''"):
        bridge.train_bridges(tiny_bridge_config(tmp_path / "b", tiny_dense, data_dir=str(tmp_path)))
    other = save_tiny(tmp_path / "other.pt", GPT(cfg.model_config()), data_dir=str(tmp_path))
    with pytest.raises(UserError, match=f"--init_sparse={other} was trained on data_dir='{tmp_path}', the dense "
                                        "model on ''"):
        bridge.train_bridges(tiny_bridge_config(tmp_path / "b", tiny_dense, init_sparse=other))
    shape = save_tiny(tmp_path / "shape.pt", GPT(dataclasses.replace(cfg.model_config(), afrac=1.0, d_head=8)))
    with pytest.raises(UserError, match=r"another shape than the configured sparse model: d_head 8 \(checkpoint\) "
                                        r"vs 16 \(configured\), afrac 1.0 \(checkpoint\) vs 0.25 \(configured\)$"):
        bridge.train_bridges(tiny_bridge_config(tmp_path / "b", tiny_dense, init_sparse=shape))
    assert not (tmp_path / "b").exists()
    stdlib = data.default_data_dir()                 # the standard library by its path is the default ""
    ok = save_tiny(tmp_path / "ok.pt", GPT(cfg.model_config()), data_dir=stdlib)
    starts, make_optimizer = [], bridge.make_optimizer               # the sparse model as its training begins
    monkeypatch.setattr(bridge, "make_optimizer", lambda model, c: starts.append(copy.deepcopy(model.state_dict()))
                        or make_optimizer(model, c))
    bridge.train_bridges(tiny_bridge_config(tmp_path / "ok", tiny_dense, data_dir=stdlib, init_sparse=ok,
                                            max_iters=1, eval_interval=1))
    assert (tmp_path / "ok" / "ckpt.pt").exists()
    init = torch.load(ok)["model"]
    assert all(torch.equal(starts[0][k], v) for k, v in init.items())   # --init_sparse's weights, not a new draw


def test_a_diverging_bridge_run_stops_without_saving(tmp_path, tiny_dense, monkeypatch):
    with pytest.raises(UserError, match=r"training diverged: loss nan at step \d.*no checkpoint was written"):
        bridge.train_bridges(tiny_bridge_config(tmp_path / "b", tiny_dense, learning_rate=1e30))
    assert not (tmp_path / "b" / "ckpt.pt").exists()
    # the second evaluation (step 6) sees a nan: step 3 is kept (two calls an evaluation: sparse, dense)
    monkeypatch.setattr(bridge, "estimate_loss", nan_from_call(bridge.estimate_loss, 3))
    with pytest.raises(UserError, match=r"loss nan at step 6 .*ckpt.pt keeps step 3$"):
        bridge.train_bridges(tiny_bridge_config(tmp_path / "late", tiny_dense, max_iters=6))
    assert torch.load(tmp_path / "late" / "ckpt.pt", weights_only=False)["step"] == 3


def test_bridge_steer_channel_below_minus_1_is_refused(tmp_path):
    args = ["--d_model=32", f"--out_dir={tmp_path / 'w'}"]
    with pytest.raises(UserError, match=r"--steer_channel=-7 must be a channel \(0 and up\) or -1"):
        bridge.config_from_args(args + ["--steer_channel=-7"])
    for ok in (-1, 0, 5):
        assert bridge.config_from_args(args + [f"--steer_channel={ok}"]).steer_channel == ok

# -----------------------------------------------------------------------------
# bad input to bench.py


def stub_bench_timings_but_the_steps(monkeypatch):
    """bench_shape's other timings as constants: a test sets time_in_turns, the steps' times."""
    for name, f in (("matmul_peak", lambda *a: 1e12), ("projection_seconds", lambda *a: 1.0),
                    ("hook_overhead", lambda *a: (1.0, 1.0)), ("abstopk_alone_ms", lambda *a: (1.0, 1.0))):
        monkeypatch.setattr(bench, name, f)


def test_bench_compares_the_presets_abstopk_with_another_way(monkeypatch):
    ms = {"dense": 10, "eager": 40, "sparse_no_abstopk": 12, "sparse_radix": 16, "sparse_topk": 25}
    stub_bench_timings_but_the_steps(monkeypatch)
    def label(cfg):                                            # which variant, told by its settings
        return ("dense" if cfg.l0_frac == 1 else "sparse_no_abstopk" if cfg.afrac == 1 else
                f"sparse_{cfg.abstopk_by}" if cfg.compile else "eager")
    def fake_runs(variants, *args):
        return {name: {"ms_per_step": ms[label(cfg)], "ms_per_round": [ms[label(cfg)]], "tokens_per_s": 1.0,
                       "projection_ms": 1.0, "peak_mem_mb": 1.0} for name, (cfg, _) in variants.items()}, [1e12]
    monkeypatch.setattr(bench, "time_in_turns", fake_runs)
    # compiled on a CPU, the cpu preset selects by topk and the gpu preset by radix (its kernel is for GPUs)
    for shape, preset_way, other, ratio in (("cpu", "topk", "radix", 16 / 25), ("gpu", "radix", "topk", 25 / 16)):
        bc = bench.BenchConfig(shapes=shape, cpu_compile=True, steps=1, warmup=0, cpu_batch_gpu_shape=1)
        r = bench.bench_shape(shape, bc, "cpu")
        assert (r["abstopk_by"], r["other_abstopk"]) == (preset_way, other)
        assert r["other_abstopk_over_preset_step"] == pytest.approx(ratio)
        eager_over_compiled = {"dense": 1.0, "sparse": ms["eager"] / ms[f"sparse_{preset_way}"]}
        assert r["compile_speedup"] == pytest.approx(eager_over_compiled)
    on_gpu = bench.variant("gpu", "cuda", 64)                  # on a GPU: our kernel, against radix
    assert (on_gpu.compile, on_gpu.abstopk_by, bench.other_abstopk(on_gpu)) == (True, "triton", "radix")
    on_cpu = bench.variant("gpu", "cpu", 4)                    # on a CPU, eager unless --cpu_compile: by topk
    assert (on_cpu.compile, on_cpu.abstopk_by, on_cpu.batch_size) == (False, "topk", 4)


def test_flops_per_token_is_6n_plus_12_l_d_t():
    model = GPT(tiny_config())                       # vocab 64, T 16, L 2, d 32, d_mlp 128
    c = model.config
    n = c.n_layer * (3 * c.d_model ** 2 + c.d_model ** 2 + 2 * c.d_model * c.d_mlp) + c.vocab_size * c.d_model
    assert bench.flops_per_token(model, 16) == 6 * n + 12 * c.n_layer * c.d_model * 16   # lm_head in; wte, bigram not


def test_bench_counts_a_matmul_of_n_by_n_as_2_n_cubed_flops(monkeypatch):
    monkeypatch.setattr(bench, "seconds_per_call", lambda fn, n, device: 0.25)
    assert bench.matmul_peak("cpu", "float32") == 2 * 2048 ** 3 / 0.25    # n = 2048 on a CPU: MFU's denominator


def test_bench_times_a_plain_forward_against_one_recording_a_site(tmp_path, monkeypatch):
    recorded, run_with_cache = [], GPT.run_with_cache
    monkeypatch.setattr(GPT, "run_with_cache", lambda self, idx, names: recorded.append(names) or
                        run_with_cache(self, idx, names))
    def seconds_per_call(fn, n, device):                      # a forward that records takes 2 s, a plain one 1 s
        before = len(recorded)
        fn()
        return 2.0 if len(recorded) > before else 1.0
    monkeypatch.setattr(bench, "seconds_per_call", seconds_per_call)
    assert bench.hook_overhead(tiny_train_config(tmp_path, device="cpu", n_layer=2), 4, 2) == (1e3, 2e3)   # ms
    assert recorded == [["1.mlp.post_act"]] * 2               # one site, once a round


def test_bench_times_abstopk_alone_at_every_sparse_site_with_its_k(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path, device="cpu", n_layer=2)
    c, calls = cfg.model_config(), []
    monkeypatch.setattr(bench, "abstopk_function", lambda by: lambda x, k: calls.append((x.shape[-1], x.dtype, k)))
    monkeypatch.setattr(bench, "seconds_per_call", lambda fn, n, device: (fn(), 1e-3)[1])   # 1 ms a call
    assert bench.abstopk_alone_ms(cfg, 3) == pytest.approx((8 * 2, 8 * 2))   # 8 sites in each of 2 layers, ms
    assert sorted(calls) == [(w, torch.float32, int(c.afrac * w)) for w in (c.d_model, c.d_mlp)]   # a call per width


def test_bench_times_prune_on_its_checkpoint_before_any_shape(tmp_path, monkeypatch, capsys):
    pruned = []
    monkeypatch.setattr(bench, "prune_time", lambda *args: pruned.append(args) or 5.0)
    def stop(shape, bc, device):
        raise SystemExit(f"{len(pruned)} pruned")
    monkeypatch.setattr(bench, "bench_shape", stop)
    with pytest.raises(SystemExit, match="1 pruned"):
        bench.main(["--shapes=cpu", "--prune_ckpt=m/ckpt.pt", "--prune_task=for_while", "--device=cpu",
                    f"--out_dir={tmp_path}"])
    assert pruned == [("m/ckpt.pt", "for_while", "cpu", str(tmp_path))]
    assert "prune for_while on m/ckpt.pt: 5 s" in capsys.readouterr().out


def test_bench_peak_memory_is_in_bytes(monkeypatch):
    if bench.resource is None:                                # Windows: nothing to read
        assert math.isnan(bench.peak_rss())
        return
    if sys.platform.startswith("linux"):                      # VmHWM: at least what is resident now; about ru_maxrss
        resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert resident <= bench.peak_rss() < 2 * bench.resource.getrusage(bench.resource.RUSAGE_SELF).ru_maxrss * 1024
    def no_proc(*args):
        raise FileNotFoundError
    monkeypatch.setattr(bench, "open", no_proc, raising=False)   # elsewhere: ru_maxrss, in kB (on macOS in bytes)
    monkeypatch.setattr(bench.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3000))
    for platform_name, peak in (("linux", 3000 * 1024), ("darwin", 3000)):
        monkeypatch.setattr(sys, "platform", platform_name)
        assert bench.peak_rss() == peak, platform_name
    monkeypatch.setattr(bench, "resource", None)                # Windows has no resource module: not measured
    assert math.isnan(bench.peak_rss())


def test_bench_times_a_call_and_the_projection_net_of_putting_the_weights_back(monkeypatch):
    clock = iter(range(10 ** 6))                      # a clock that ticks once per reading
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    assert bench.seconds_per_call(lambda: None, 4, "cpu") == pytest.approx(1 / 4)   # one tick over 4 calls
    calls = []
    bench.seconds_per_call(lambda: calls.append(1), 4, "cpu")
    assert len(calls) == 5                            # and one untimed before them: a GPU loads its kernels there
    times = iter([3.0, 1.0])                          # with the projection, then putting back alone
    monkeypatch.setattr(bench, "seconds_per_call", lambda fn, n, device: (fn(), next(times))[1])
    assert bench.projection_seconds(GPT(tiny_config()), lambda: None, 2, "cpu") == pytest.approx(2.0)


def test_bench_takes_each_ratio_within_a_round_of_turns_and_writes_them(tmp_path, monkeypatch, capsys):
    # a host slowing down mid-run: round 2 is slow for both; compared within rounds, sparse is 1.5x dense
    rounds = {"dense": [10, 20, 40], "sparse": [15, 50, 60], "sparse_no_abstopk": [12, 40, 48],
              "sparse_fixed_masks": [12, 45, 54], "sparse_glibc_malloc": [18, 60, 66]}
    stub_bench_timings_but_the_steps(monkeypatch)
    monkeypatch.setattr(bench, "abstopk_alone_ms", lambda *a: (5.0, 15.0))   # AbsTopK's forward: ours, plain
    monkeypatch.setattr(bench, "hook_overhead", lambda *a: (4.0, 5.0))       # forward: plain, recording a site
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: 1)               # as under glibc
    peaks, timed = [1e9, 4e9, 2e9], {}                                # the matmul peak, measured in each round
    monkeypatch.setattr(bench, "time_in_turns", lambda variants, *a: (timed.update(variants) or {
        name: {"ms_per_step": statistics.median(rounds[name]), "ms_per_round": rounds[name], "tokens_per_s": 1.0,
               "projection_ms": 1.0, "peak_mem_mb": 1.0} for name in variants if name in rounds}, peaks))
    naive_calls = []
    monkeypatch.setattr(bench, "naive_project", lambda model, frac: naive_calls.append(frac))
    def projection_seconds(model, project, *args):   # the naive projection 7 ms, ours 1 ms
        naive_calls.clear()
        project()
        return 7e-3 if naive_calls else 1e-3
    monkeypatch.setattr(bench, "projection_seconds", projection_seconds)
    bench.main(["--shapes=cpu", "--steps=3", "--rounds=3", "--warmup=0", "--device=cpu", f"--out_dir={tmp_path}"])
    r = json.loads(open_text(tmp_path / "cpu.json"))["shapes"]["cpu"]    # what it wrote
    printed = capsys.readouterr().out
    assert re.search(r"cpu: sparse/dense step 1.50 \(rounds 1.50-2.50\) \| projection 2.0% of a step", printed)
    assert r["sparse_over_dense_step"] == pytest.approx(1.5)          # the medians' ratio would say 2.5
    assert r["projection_share"] == pytest.approx(1.0 / 50)           # of the sparse step's median
    assert (r["projection_ms"], r["naive_projection_ms"], r["naive_over_ours_projection"]) == pytest.approx((1, 7, 7))
    assert r["sparse_over_dense_rounds"] == pytest.approx([1.5, 2.5, 1.5])
    assert r["abstopk_share"] == pytest.approx(0.2)                    # 1 - median(12/15, 40/50, 48/60)
    assert r["abstopk_selection_share"] == pytest.approx(0.1)          # 1 - median(12/15, 45/50, 54/60)
    assert r["fixed_masks_over_dense_step"] == pytest.approx(1.35)     # median(12/10, 45/20, 54/40)
    flops = r["batch_size"] * r["block_size"] * r["flops_per_token"]    # per step
    assert r["runs"]["dense"]["mfu"] == pytest.approx(statistics.median(flops / (ms / 1e3) / p for ms, p in
                                                                        zip(rounds["dense"], peaks)))
    assert r["matmul_peak_flops"] == 2e9 and r["matmul_peak_rounds"] == peaks
    assert r["allocator_speedup"] == pytest.approx(1.2)                # median(18/15, 60/50, 66/60)
    assert (r["abstopk_forward_ms"], r["abstopk_plain_over_ours"], r["abstopk_forward_share"]) == pytest.approx((5, 3, 0.1))
    assert (r["forward_ms"], r["forward_recording_ms"]) == (4.0, 5.0)
    assert naive_calls == [train.TrainConfig.l0_frac]                  # projected to the run's L0 after the anneal
    cfgs, options = ({name: v[i] for name, v in timed.items()} for i in (0, 1))   # what each variant ran
    sparse = cfgs["sparse"]
    assert r["batch_size"] == train.TrainConfig.batch_size and sparse.afrac < 1 and sparse.l0_frac < 1   # the preset's
    assert all(cfg.batch_size == r["batch_size"] for cfg in cfgs.values())
    assert (cfgs["dense"].l0_frac, cfgs["dense"].afrac) == (1, 1)
    assert (cfgs["sparse_no_abstopk"].l0_frac, cfgs["sparse_no_abstopk"].afrac) == (sparse.l0_frac, 1)
    assert cfgs["sparse_fixed_masks"] == cfgs["sparse_glibc_malloc"] == sparse       # told apart by their options:
    assert options == {"dense": {}, "sparse": {}, "sparse_no_abstopk": {}, "sparse_fixed_masks": {"fixed_masks": True},
                       "sparse_glibc_malloc": {"keep_memory": False}}


def test_bench_times_each_variant_in_rounds_in_its_own_process(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path, device="cpu")
    dense = dataclasses.replace(cfg, l0_frac=1.0)
    asked, ask = [], bench.ask
    def recording_ask(name, process, conn, message=None):      # what the parent asks each worker, in order
        asked.append((name, message))
        return ask(name, process, conn, message)
    monkeypatch.setattr(bench, "ask", recording_ask)
    runs, extra = bench.time_in_turns({"dense": (dense, {}), "sparse": (cfg, {})}, steps=3, rounds=2, warmup=1,
                                      each_round=lambda: len(asked))
    assert extra == [4, 6]                                         # run after each round's turns
    assert asked == [("dense", "build"), ("sparse", "build"),  # each built and warmed up, then turns:
                     ("dense", 2), ("sparse", 2), ("sparse", 1), ("dense", 1),   # the second round the other way
                     ("dense", 0), ("sparse", 0)]              # then their peak memory and projection
    for name, r in runs.items():
        assert len(r["ms_per_round"]) == 2 and min(r["ms_per_round"]) > 0      # a share of 2 steps, then of 1
        assert r["ms_per_step"] == statistics.median(r["ms_per_round"]) and r["peak_mem_mb"] > 0
        assert min(r["ms_per_round"]) > 0.1                    # ms, not seconds: a step takes more than 0.1 ms
        assert r["tokens_per_s"] == pytest.approx(cfg.batch_size * cfg.block_size / r["ms_per_step"] * 1e3)
    assert runs["sparse"]["projection_ms"] > 0 and runs["dense"]["projection_ms"] == 0   # dense projects nothing
    # a variant whose process fails stops the benchmark with its name (its traceback goes to stderr), not a hang
    with pytest.raises(RuntimeError, match="timing broken stopped with exit code 1"):
        bench.time_in_turns({"dense": (dense, {}), "broken": (dataclasses.replace(cfg, device="cuda:99"), {})},
                            steps=1, rounds=1, warmup=0, each_round=lambda: None)
    assert not multiprocessing.active_children()                 # the healthy one was stopped too


def test_bench_refuses_a_batch_of_0_a_shape_twice_and_a_prune_task_without_a_checkpoint():
    for bad in (0, -2):
        with pytest.raises(UserError, match=f"--cpu_batch_gpu_shape={bad} must be positive"):
            bench.BenchConfig(cpu_batch_gpu_shape=bad)
    assert bench.BenchConfig(cpu_batch_gpu_shape=1).cpu_batch_gpu_shape == 1
    with pytest.raises(UserError, match="--shapes=cpu,cpu names a shape twice"):
        bench.BenchConfig(shapes="cpu,cpu")                       # else its JSON would keep the second run only
    with pytest.raises(UserError, match="--prune_task=for_while needs --prune_ckpt"):
        bench.BenchConfig(prune_task="for_while")                 # else silently not timed
    with pytest.raises(UserError, match="unknown task 'For_While'"):
        bench.BenchConfig(prune_task="For_While")                 # said first: a checkpoint would not help
    line = one_line_error(["bench.py", "--shapes=gpu", "--cpu_batch_gpu_shape=0"])
    assert line == "error: --cpu_batch_gpu_shape=0 must be positive"
    for bad in ("--steps=0", "--rounds=0", "--warmup=-1"):        # else a median of no rounds, or a % 0, at the end
        with pytest.raises(UserError, match="need steps > 0, rounds > 0 and warmup >= 0"):
            parse_args(bench.BenchConfig, [bad])


def test_bench_runs_and_records_no_more_rounds_than_steps(monkeypatch, capsys):
    def stop(shape, bc, device):
        raise SystemExit(f"rounds {bc.rounds}")
    monkeypatch.setattr(bench, "bench_shape", stop)
    with pytest.raises(SystemExit, match="rounds 2"):
        bench.main(["--shapes=cpu", "--steps=2", "--rounds=5", "--device=cpu"])
    note, settings = capsys.readouterr().out.splitlines()[:2]
    assert note == "note: --rounds=5 is more than --steps=2: 2 round(s) of one step"
    assert '"rounds": 2,' in settings                             # the settings printed and saved: what ran
