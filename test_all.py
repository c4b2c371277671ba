"""
The tests: the math of each piece, and the promises a user relies on.

    python -m pytest -q test_all.py
"""

import math
import os
import subprocess
import sys

from collections import Counter

import numpy as np
import pytest
import tiktoken.load
import torch
import torch.nn.functional as F

import data
import tasks
import train
from config import UserError, parse_args
from sparse_gpt import GPT, GPTConfig, RMSNorm, abstopk, sink_attention, target_nonzeros, topk_weight_mask

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_config(**kw):
    return GPTConfig(**{**dict(vocab_size=64, block_size=16, n_layer=2, d_model=32, d_head=16), **kw})


def tiny_train_config(out_dir, **kw):
    base = dict(out_dir=str(out_dir), max_iters=6, eval_interval=3, eval_iters=1, log_interval=1,
                sample_tokens=4, batch_size=4, block_size=32, n_layer=1, d_model=32, l0_frac=0.25)
    return train.TrainConfig(**{**base, **kw})

# -----------------------------------------------------------------------------
# model pieces


def test_abstopk_keeps_exactly_k_largest_and_grads_only_through_them():
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


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    torch.testing.assert_close(norm(x), expected)


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
    suffixes = ["attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta", "mlp.act_in",
                "mlp.post_act", "mlp.resid_delta"]
    assert list(model.sites) == [f"{i}.{s}" for i in range(2) for s in suffixes] + ["final_resid"]


def test_hooks_record_and_replace_exactly_what_they_should():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (2, 16))
    logits, cache = model.run_with_cache(idx)
    assert len(cache) == len(model.sites)
    with model.hooks({name: (lambda x, name: x) for name in model.sites}):
        assert torch.equal(model(idx)[0], logits)         # identity hooks: bit-identical
    assert all(site.hook is None for site in model.sites.values())   # removed on exit
    seen = {}

    def record(x, name):
        seen[name] = x
        return x

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
    assert torch.equal(model.bigram, bigram) and torch.equal(model.blocks[0].norm1.weight, norm)
    assert "bigram" not in [n for n, _ in model.sparse_params()]


def test_topk_weight_mask_is_exact_with_ties():
    w = torch.zeros(10, 10)
    w[0, :3] = 1.0
    mask = topk_weight_mask(w, 45, 4)
    assert int(mask.sum()) == 45 and (mask.sum(1) >= 4).all()
    assert mask[0, :3].all()


def test_target_nonzeros():
    assert target_nonzeros((100, 50), 0.1, 4) == 500
    assert target_nonzeros((100, 50), 0.01, 4) == 400       # min-per-channel floor
    assert target_nonzeros((100,), 0.001, 4) == 1
    assert target_nonzeros((3, 2), 0.5, 4) == 6

# -----------------------------------------------------------------------------
# training pieces


def test_l0_and_lr_schedules_at_breakpoints():
    cfg = train.TrainConfig(max_iters=1000, l0_frac=1 / 16, learning_rate=0.01)
    assert train.l0_at(0, cfg) == 1.0 and train.l0_at(10, cfg) == 1.0          # dense until 1%
    assert train.l0_at(500, cfg) == pytest.approx(1 / 16) and train.l0_at(900, cfg) == pytest.approx(1 / 16)
    mid = (10 + 500) / 2
    assert train.l0_at(mid, cfg) == pytest.approx((1 + 1 / 16) / 2)
    # sharkfin: warmup over 1%, linear decay to 0, times sqrt(target / now)
    assert train.lr_at(0, cfg) == pytest.approx(0.01 * 0.1 * math.sqrt(1 / 16))
    assert train.lr_at(9, cfg) == pytest.approx(0.01 * math.sqrt(1 / 16))
    assert train.lr_at(500, cfg) == pytest.approx(0.01 * 500 / 990)
    assert train.lr_at(1000, cfg) == 0.0
    dense = train.TrainConfig(max_iters=1000, l0_frac=1.0, afrac=1.0)
    assert train.lr_at(300, dense) == pytest.approx(0.01 * 700 / 990)


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


def test_config_parsing_and_bad_values():
    cfg = parse_args(train.TrainConfig, ["--d_model=64", "--l0_frac=0.5", "--compile=true", "--sparse_sites=attn_q,mlp_neuron"])
    assert (cfg.d_model, cfg.l0_frac, cfg.compile, cfg.sparse_sites) == (64, 0.5, True, ("attn_q", "mlp_neuron"))
    for bad, words in [("--d_modle=64", "did you mean --d_model"), ("--d_model=big", "not a valid int"),
                       ("--l0_frac=0", "l0_frac=0.0 is outside"), ("--l0_frac=1.5", "l0_frac=1.5 is outside"),
                       ("--afrac=0", "afrac=0.0 is outside"), ("--sparse_sites=attn_x", "unknown sparse_sites"),
                       ("--d_model=40", "not a multiple of d_head"), ("--preset=tpu", "preset=tpu is unknown")]:
        with pytest.raises(UserError, match=words):
            train.config_from_args([bad, "--out_dir=out/never"])


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=120)


def test_bad_input_gives_one_line_and_exit_2_and_writes_nothing(tmp_path):
    not_ours = tmp_path / "ckpt.pt"
    not_ours.write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [["train.py", "--bogus=1"], ["train.py", "--max_iters=ten"], ["train.py", "--l0_frac=2"],
             ["train.py", "--afrac=0"], ["train.py", f"--data_dir={tmp_path / 'empty'}", f"--out_dir={tmp_path / 'o'}"],
             ["train.py", f"--out_dir={tmp_path}", "--resume=True"]]
    for args in cases:
        result = run_script(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert not_ours.read_bytes() == b"not a checkpoint"
    assert not (tmp_path / "o").exists()

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


def test_data_dir_without_py_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no .py files"):
        data.prepare(data.DataConfig(data_dir=str(tmp_path)))

# -----------------------------------------------------------------------------
# whole runs


def test_training_reaches_exact_sparsity_and_checkpoint_loads(tmp_path, corpus):
    cfg = tiny_train_config(tmp_path / "run", max_iters=4)
    history = train.train(cfg)
    assert len(history) == 4 and all(math.isfinite(loss) for _, loss in history)
    model = GPT.from_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    exact, params, fewest = train.sparsity_report(model, 0.25)
    assert exact == params and fewest >= 4
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=1.0, top_k=10)
    assert out.shape == (1, 8)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, corpus):
    full = train.train(tiny_train_config(tmp_path / "full"))
    first = train.train(tiny_train_config(tmp_path / "cut", stop_iter=3))
    cfg = train.config_from_args([f"--out_dir={tmp_path / 'cut'}", "--resume=True"])
    second = train.train(cfg)
    assert [s for s, _ in first + second] == list(range(6))
    assert first + second == full                       # exact float equality, step by step
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_cpu_processes_hold_identical_weights(tmp_path, corpus):
    args = [f"--out_dir={tmp_path / 'ddp'}", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
            "--batch_size=2", "--block_size=32", "--n_layer=1", "--d_model=32", "--sample_tokens=0"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", "--preset=cpu", *args], cwd=HERE, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ddp: weights identical on all 2 ranks" in result.stdout
    assert "2 process(es)" in result.stdout

# -----------------------------------------------------------------------------
# tasks


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=2048, n_layer=1, d_model=32, block_size=256)).eval()


def test_every_task_builds_balanced_prompts_with_distinct_single_token_answers(corpus):
    _, enc = corpus
    assert len(tasks.TASKS) == 20
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


def test_answer_names_are_single_tokens(corpus):
    _, enc = corpus
    for name in tasks.NAMES:
        assert len(enc.encode_ordinary(" " + name)) == 1, name
    assert not set(tasks.NAMES) & set(tasks.LOCALS)   # filler code never names an answer


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


def test_a_task_whose_answer_is_not_one_token_fails_at_construction(corpus, monkeypatch):
    _, enc = corpus
    monkeypatch.setitem(tasks.TASKS, "paper_with_open", lambda rng, label: ("with open(path, ", "'r'", "'w'"))
    with pytest.raises(ValueError, match="paper_with_open: answer \"'r'\".*is not one token"):
        tasks.make_prompts("paper_with_open", enc, 2)
    monkeypatch.setitem(tasks.TASKS, "same", lambda rng, label: (f"x = {rng.random()}\n", "]", "]"))
    with pytest.raises(ValueError, match="both answers are"):
        tasks.make_prompts("same", enc, 2)
    monkeypatch.setitem(tasks.TASKS, "long", lambda rng, label: ("x = [" + "1, " * 200, "]", "]]"))
    with pytest.raises(ValueError, match="at most 255"):
        tasks.make_prompts("long", enc, 2)


def test_task_loss_is_the_two_way_cross_entropy_averaged_over_prompts():
    logits = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0],
                           [0.0, 2.0, 0.0, 1.0, 5.0]])
    correct, alt = torch.tensor([1, 3]), torch.tensor([3, 1])
    loss, acc = tasks.task_loss(logits, correct, alt)
    # prompt 0: -log(e^2 / (e^2 + e^1)); prompt 1: -log(e^1 / (e^1 + e^2)); the mean, not the sum
    hand = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
            - math.log(math.exp(1) / (math.exp(1) + math.exp(2)))) / 2
    assert loss.item() == pytest.approx(hand, abs=1e-6)
    assert acc.item() == 0.5   # the other tokens (logit 5) play no part


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
    diffs = tasks.logit_diffs(tiny_gpt, prompts, "cpu")
    assert diffs.shape == (12,) and torch.allclose(torch.nn.functional.softplus(-diffs).mean(), expected[0], atol=1e-5)


def test_bracket_dilution_probe_runs_at_every_length(corpus, tiny_gpt, capsys):
    _, enc = corpus
    tasks.bracket_dilution(tiny_gpt, enc, "cpu", samples=2)
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [int(r.split("|")[0]) for r in rows] == [2, 4, 8, 12, 16, 24, 32, 48, 64]
    for row in rows:
        for cell in row.split("|")[1:]:
            tokens, full, two_way = map(float, cell.split()[-3:])
            assert tokens <= 255 and 0 <= full <= two_way <= 1   # P in the full softmax is the smaller


def test_listing_shows_every_task_with_an_example(capsys):
    tasks.main([])
    out = capsys.readouterr().out
    for name in tasks.TASKS:
        assert f"\n{name}: " in "\n" + out
    assert out.count("  ->  ") == 20


def test_unknown_task_is_a_one_line_user_error_listing_the_tasks():
    with pytest.raises(UserError) as info:
        parse_args(tasks.TaskConfig, ["--task=nope"])
    message = str(info.value)
    assert "unknown task 'nope'" in message and "\n" not in message
    assert all(name in message for name in tasks.TASKS)
    for bad in ("--n_prompts=3", "--split=val", "--probe=bracket_dilution", "--probe=x --ckpt=a"):
        with pytest.raises(UserError):
            parse_args(tasks.TaskConfig, bad.split())
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
    rows = [line.split() for line in lines[2:22]]
    assert [r[0] for r in rows] == list(tasks.TASKS) and all(r[1] == "4" for r in rows)
    assert lines[-2].startswith("mean") and lines[-1].startswith("solved (loss <= 0.15")
