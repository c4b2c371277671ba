"""
A weight-sparse GPT (Gao et al., "Weight-sparse transformers have interpretable circuits", 2025).

Notable features, each tied to the paper (docs/METHOD.md section 1):
- RMSNorm, pre-norm blocks, small heads (d_head 16), untied embedding and unembedding,
  no positional embedding unless `learned_pos=True`.
- AbsTopK on activations: keep the k = afrac * dim entries of largest |x| at 8 sites per layer
  (by numpy's partition on a CPU, topk on a GPU; or by a radix select: one torch.compile can fuse,
  or our Triton kernel on a GPU, the gpu preset's: abstopk_by).
- An attention sink per head: a learnable logit b_h for an always-visible slot with zero value.
- A dense bigram logit table: logits += bigram[current token]; never sparsified.
- Weight sparsity: `project_weights` keeps the top-k |w| of every sparse parameter, with at
  least `min_per_channel` weights kept in each output channel (row).
- Named activation sites (the authors' names, `{i}.attn.q`, `{i}.mlp.post_act`, ...) that any
  forward pass can record or rewrite through hooks `fn(x, name) -> x`:

    with model.hooks({"0.mlp.post_act": lambda x, name: x * 0}):
        logits, loss = model(idx, targets)
    logits, cache = model.run_with_cache(idx, ["0.attn.v", "final_resid"])

  The residual stream itself is also a site, before each block (`{i}.resid_pre`; 0.resid_pre is
  the embedding), between its attention and MLP (`{i}.resid_mid`) and after the last block
  (`final_resid`): bridge.py's sites. Its channels are not pruning nodes (the 8 kinds above are).
  A new site is two lines: `self.site_z = Site("attn_z", dim, config)` in the __init__ of a module
  inside a Block and `z = self.site_z(z)` where its forward computes z. It is named `{i}.attn_z`
  (SITE_SUFFIX holds the authors' names) and can be recorded and rewritten. It is not AbsTopK'd nor
  a pruning node: those are the kinds in ALL_SPARSE_SITES, and a kind added there also needs its
  weights in prune.py's edge count and a colour in draw.py.
"""

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError

ALL_SPARSE_SITES = ("attn_in", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out")


@dataclass
class GPTConfig:
    vocab_size: int = 2048
    block_size: int = 256
    n_layer: int = 4
    d_model: int = 128
    d_head: int = 16            # small heads, per the paper; n_head = d_model // d_head
    mlp_ratio: int = 4          # d_mlp = mlp_ratio * d_model
    afrac: float = 0.25         # AbsTopK keeps floor(afrac * dim) activations; 1.0 turns it off
    sparse_sites: tuple = ALL_SPARSE_SITES  # site kinds where AbsTopK applies
    learned_pos: bool = False   # learned absolute positional embedding ("roughly neutral")
    bigram: bool = True         # dense vocab x vocab bigram logit table
    sparse_biases: bool = True  # biases are top-k projected too (the paper says so; our choice)
    min_per_channel: int = 4    # j: no output channel keeps fewer nonzero weights than this

    def __post_init__(self):
        self.sparse_sites = tuple(self.sparse_sites)
        for key in ("n_layer", "d_model", "d_head", "mlp_ratio", "vocab_size", "block_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be positive")
        if not 0.0 < self.afrac <= 1.0:
            raise ValueError(f"afrac={self.afrac} is outside (0, 1]")
        widths = self.abstopk_widths()
        if widths and int(self.afrac * min(widths)) == 0:   # k = 0 would mean "off"
            raise ValueError(f"afrac={self.afrac} keeps no activation of a {min(widths)}-wide site; "
                             f"need afrac >= {1 / min(widths):g}")
        if self.d_model % self.d_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of d_head={self.d_head}")
        unknown = set(self.sparse_sites) - set(ALL_SPARSE_SITES)
        if unknown:
            raise ValueError(f"unknown sparse_sites {sorted(unknown)}; allowed: {', '.join(ALL_SPARSE_SITES)}")
        if len(set(self.sparse_sites)) < len(self.sparse_sites):   # saved as given, it would read as a mistake
            raise ValueError(f"sparse_sites={','.join(self.sparse_sites)} names a site twice: give each once")

    @property
    def n_head(self):
        return self.d_model // self.d_head

    @property
    def d_mlp(self):
        return self.mlp_ratio * self.d_model

    def abstopk_widths(self):
        """The width of each AbsTopK site of a layer (the neuron site is d_mlp wide, the rest d_model)."""
        return [self.d_mlp if s == "mlp_neuron" else self.d_model for s in self.sparse_sites] if self.afrac < 1 else []

# -----------------------------------------------------------------------------
# leaf pieces

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g: no mean subtraction, so zero stays special."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def abs_bits(x):
    """|x| read as integers of its width: for floats >= 0 the bit pattern orders as the value (+inf
    above all finite values, nan above +inf, as topk ranks them). topk picks the same entries on
    these as on |x|, faster on a CPU (no nan test per comparison; bench.py measures it)."""
    return x.detach().abs().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def kth_largest(rows, k):
    """Each row's k-th largest entry of a 2-D CPU tensor, as a column, by numpy's partition (a
    vectorized selection): on a CPU about 5x faster than topk per 8192 x 128 AbsTopK site, and 10-17x
    faster than kthvalue on the projection's stacks (docs/performance_log.md)."""
    n = rows.shape[1]
    return torch.from_numpy(np.partition(rows.numpy(), n - k, axis=1)[:, n - k:n - k + 1])


def abstopk_keep_on_cpu(x, k):
    """abstopk's choice as a 0/1 mask in x's dtype, found faster on a CPU than by topk (a training step
    takes about 0.75x as long; README, Performance): each row's k-th largest |x| (kth_largest), then
    a compare. Also whether every row's k-th |x| is finite (so no inf is dropped)."""
    n = x.shape[-1]
    rows = abs_bits(x).reshape(-1, n)
    kth = kth_largest(rows, k)
    # the k largest, and more in a row with ties at its k-th; by uint8, as bool to float is 4x slower
    keep = (rows >= kth).view(torch.uint8).to(x.dtype)
    kept = keep.sum(-1, dtype=torch.float32)   # per row in fp32: exact below 2^24 (bf16 makes 301 300)
    tied = (kept > k).nonzero().squeeze(1)
    if len(tied):
        idx = rows[tied].topk(k, dim=-1, sorted=False).indices     # in those rows, topk's pick
        keep[tied] = torch.zeros(len(tied), n, dtype=x.dtype).scatter_(-1, idx, 1)
    return keep.view(x.shape), bool((kth < abs_bits(x.new_tensor(math.inf))).all())


def abstopk(x, k):
    """Keep the k entries of largest |x| along the last dim, zero the rest (gradient flows only
    through the kept ones, since the rest are multiplied by a constant 0). Exactly k even with ties:
    of the entries tied at a row's k-th largest |x|, those topk picks. On a CPU the zeros are x * 0:
    -0.0 for a dropped negative entry, and a nan or inf gradient there stays nan (0 on a GPU)."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and 0 < k <= x.shape[-1]:
        keep, kth_finite = abstopk_keep_on_cpu(x, k)
        # a multiply is 3x faster than a where here (a dropped inf, though, times 0 would give nan)
        return x * keep if kth_finite else torch.where(keep.bool(), x, 0)
    idx = abs_bits(x).topk(k, dim=-1, sorted=False).indices   # also k = 0, and k > width (topk's error)
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def abstopk_radix(x, k):
    """The same AbsTopK without topk, for torch.compile, which fuses these counting passes into one
    kernel (topk it can only hand to ATen). The k-th largest |x| of each row is found one bit at a
    time on abs_bits(x), a radix select. Kept: the entries above it, and of those equal to it the
    first by index, so exactly k; ties go to the lowest index, where topk's choice is its kernel's."""
    bits = abs_bits(x)
    kth = torch.zeros_like(bits[..., :1])
    # from the bit below the sign bit down: the largest kth with count(bits >= kth) >= k
    for bit in range(8 * x.element_size() - 2, -1, -1):
        candidate = kth | (1 << bit)
        kth = torch.where((bits >= candidate).sum(-1, keepdim=True) >= k, candidate, kth)
    above, tied = bits > kth, bits == kth
    keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return torch.where(keep, x, 0)    # not x * keep: a dropped inf would give nan


# a nested compile region: compiled once per kind of input (shape, strides, dtype, k) and reused at
# every site of that kind (torch allows 8 kinds; a preset has 2-4), the gpu preset's model compiles in
# 68 s on a CPU; inlined at its 64 sites, the passes took 410 s
abstopk_radix_region = torch.compiler.nested_compile_region(abstopk_radix)


def abstopk_radix_when_compiled(x, k):
    """AbsTopK by radix select where torch.compile traces the model, by abstopk in eager calls
    (evaluation, sampling, pruning), where that is the faster."""
    return abstopk_radix_region(x, k) if torch.compiler.is_compiling() else abstopk(x, k)


def abstopk_function(name):
    """What a model's sites select by, for GPT(abstopk_by=name). "triton" is our kernel (abstopk_triton.py),
    imported only when asked for: Triton comes with CUDA builds of torch, not with CPU ones."""
    if name == "triton":
        import abstopk_triton
        return abstopk_triton.abstopk
    return {"topk": abstopk, "radix": abstopk_radix_when_compiled}[name]


ABSTOPK_BY = ("topk", "radix", "triton")


class Site(nn.Module):
    """One named activation: AbsTopK if its kind is sparse, then an optional hook fn(x, name).
    Pruning masks, mean ablation, recording and bridges all attach here."""

    def __init__(self, kind, dim, config):
        super().__init__()
        self.kind = kind            # the authors' kind, e.g. "attn_q"
        self.name = kind            # full name, e.g. "0.attn.q", set by GPT.__init__
        self.k = int(config.afrac * dim) if (kind in config.sparse_sites and config.afrac < 1) else 0
        self.abstopk = abstopk      # or another way to the same selection: see GPT(abstopk_by=...)
        self.hook = None

    def forward(self, x):
        if self.k:
            x = self.abstopk(x, self.k)
        if self.hook is not None:
            x = self.hook(x, self.name)
        return x

# -----------------------------------------------------------------------------
# the transformer

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        d, nh = config.d_model, config.n_head
        self.n_head, self.d_head = nh, config.d_head
        self.c_attn = nn.Linear(d, 3 * d)          # q, k, v for all heads, one matmul
        self.c_proj = nn.Linear(d, d)
        self.sink = nn.Parameter(torch.zeros(nh))  # per-head sink logit b_h, init 0
        self.site_in = Site("attn_in", d, config)
        self.site_q = Site("attn_q", d, config)    # AbsTopK over all heads jointly
        self.site_k = Site("attn_k", d, config)
        self.site_v = Site("attn_v", d, config)
        self.site_out = Site("attn_out", d, config)

    def forward(self, x):
        B, T, C = x.size()
        nh, hs = self.n_head, self.d_head
        x = self.site_in(x)
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = self.site_q(q), self.site_k(k), self.site_v(v)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = sink_attention(q, k, v, self.sink)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.site_out(self.c_proj(y))


def sink_attention(q, k, v, sink):
    """Causal attention with one extra slot per head whose logit is sink[h] and whose value is 0:
    softmax denominator gets + exp(b_h) (the "off-by-one" softmax).
    Done inside fused SDPA: one extra head dim carries the sink logit (q_aug=[q,1], sink key
    [0, b*sqrt(hs)], real keys [k,0]), and the sink slot is prepended to keys and (dummy) queries
    so that is_causal's top-left alignment still lets query t see keys 0..t plus the sink."""
    B, nh, T, hs = q.shape
    pad = 8 if q.is_cuda else 1  # GPU flash kernels want head dims that are multiples of 8
    ones, zeros = q.new_ones(B, nh, T, 1), q.new_zeros(B, nh, T, pad)
    sink_key = torch.cat([q.new_zeros(nh, hs), (sink * math.sqrt(hs)).to(q.dtype)[:, None],
                          q.new_zeros(nh, pad - 1)], 1).expand(B, nh, hs + pad).unsqueeze(2)
    slot = q.new_zeros(B, nh, 1, hs + pad)
    q = torch.cat([slot, torch.cat([q, ones, zeros[..., 1:]], -1)], 2)     # (B, nh, T+1, hs+pad)
    k = torch.cat([sink_key, torch.cat([k, zeros], -1)], 2)
    v = torch.cat([slot, torch.cat([v, zeros], -1)], 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hs))
    return y[:, :, 1:, :hs]


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_mlp)
        self.c_proj = nn.Linear(config.d_mlp, config.d_model)
        self.site_in = Site("mlp_in", config.d_model, config)
        self.site_neuron = Site("mlp_neuron", config.d_mlp, config)
        self.site_out = Site("mlp_out", config.d_model, config)

    def forward(self, x):
        x = self.site_neuron(F.gelu(self.c_fc(self.site_in(x))))
        return self.site_out(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.site_resid_pre = Site("resid_pre", config.d_model, config)   # the residual stream, never AbsTopK'd
        self.norm1 = RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.site_resid_mid = Site("resid_mid", config.d_model, config)
        self.norm2 = RMSNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x):
        x = self.site_resid_pre(x)
        x = x + self.attn(self.norm1(x))   # pre-norm
        x = self.site_resid_mid(x)
        x = x + self.mlp(self.norm2(x))
        return x


# the authors' site names, by kind; a kind of ours not listed here is named by its kind
SITE_SUFFIX = {"attn_in": "attn.act_in", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v",
               "attn_out": "attn.resid_delta", "mlp_in": "mlp.act_in", "mlp_neuron": "mlp.post_act",
               "mlp_out": "mlp.resid_delta", "resid_pre": "resid_pre", "resid_mid": "resid_mid"}


class GPT(nn.Module):

    def __init__(self, config, abstopk_by="topk"):
        """abstopk_by: how AbsTopK selects, "topk" (what topk keeps, on a CPU found by numpy's
        partition), "radix" under torch.compile, or "triton" on a GPU (our kernel: radix's choice,
        compiled or not). All keep exactly k; they differ only in which of several entries tied at
        the k-th |x| they keep (tied zeros: only the gradient differs; in bf16/fp16 nonzero ties are
        common, and the output differs slightly). So it is a training setting, not part of the
        config a checkpoint saves for its model."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model) if config.learned_pos else None
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model)
        self.site_final = Site("final_resid", config.d_model, config)  # residual stream before norm_f
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)  # untied
        self.bigram = nn.Parameter(torch.zeros(config.vocab_size, config.vocab_size)) if config.bigram else None
        self.sites = {}
        for i, block in enumerate(self.blocks):
            for site in block.modules():
                if isinstance(site, Site):
                    site.name = f"{i}.{SITE_SUFFIX.get(site.kind, site.kind)}"
                    self.sites[site.name] = site
        self.site_final.name = "final_resid"
        self.sites["final_resid"] = self.site_final
        for site in self.sites.values():
            site.abstopk = abstopk_function(abstopk_by)
        # init per the authors' code: N(0, 0.02), output projections scaled by 1/sqrt(2 n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
            elif p.dim() == 2 and p is not self.bigram:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias") or name.endswith("sink"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None, last=None):
        """-> (logits (B, T, vocab), loss or None); with last (B,) positions: logits (B, vocab) at
        those positions only (task readouts need one position, and the unembedding costs a block)."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        x = self.site_final(x)
        if last is not None:
            rows = torch.arange(B, device=idx.device)
            x, idx = x[rows, last], idx[rows, last]
        logits = self.lm_head(self.norm_f(x))
        if self.bigram is not None:
            logits = logits.add_(F.embedding(idx, self.bigram))   # logits += bigram[current token], in place
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ---- activation sites: record and rewrite ----

    @contextmanager
    def hooks(self, fns):
        """Install fn(x, name) -> x at the named sites for the length of the block (nested blocks
        compose: recording inside an ablation records the ablated value)."""
        unknown = [n for n in fns if n not in self.sites]
        if unknown:
            raise KeyError(f"unknown site(s) {unknown}; sites are e.g. {list(self.sites)[:9]} ... 'final_resid'")
        previous = {name: self.sites[name].hook for name in fns}
        try:
            for name, fn in fns.items():   # inside another hooks() block: run after the hook already there
                outer = previous[name]
                self.sites[name].hook = fn if outer is None else (lambda x, n, outer=outer, fn=fn: fn(outer(x, n), n))
            yield self
        finally:
            for name, hook in previous.items():
                self.sites[name].hook = hook

    def run_with_cache(self, idx, names=None):
        """Forward pass that also returns {site name: activation} for the named (default: all) sites;
        names: a list of site names, or one name."""
        names = [names] if isinstance(names, str) else names
        cache = {}

        def record(x, name):
            cache[name] = x.detach()
            return x

        with self.hooks({n: record for n in (self.sites if names is None else names)}):
            logits, _ = self(idx)
        return logits, cache

    # ---- weight sparsity ----

    def sparse_params(self):
        """(name, parameter) pairs that the top-k projection acts on: every matrix, the embeddings
        and the unembedding, and biases if config.sparse_biases. Not the bigram, norms or sinks."""
        out = []
        for name, p in self.named_parameters():
            if p is self.bigram or name.endswith("sink") or "norm" in name:
                continue
            if p.dim() == 2 or (name.endswith("bias") and self.config.sparse_biases):
                out.append((name, p))
        return out

    @torch.no_grad()
    def project_weights(self, frac):
        """Weight top-k projection: keep the nonzero target of every sparse parameter (see
        target_nonzeros), each row's top-min_per_channel first. Parameters of one shape (one per
        layer) are projected together, stacked: a few large operations instead of many small ones,
        each of which costs a kernel launch on a GPU. Returns the total nonzeros kept."""
        by_shape = {}
        for _, p in self.sparse_params():
            by_shape.setdefault(tuple(p.shape), []).append(p)
        kept = 0
        for shape, params in by_shape.items():
            k = target_nonzeros(shape, frac, self.config.min_per_channel)
            if k < math.prod(shape):
                masks = topk_weight_mask(torch.stack(params), k, self.config.min_per_channel)
                torch._foreach_mul_(params, list(masks.unbind(0)))
            kept += k * len(params)
        return kept

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoints and sampling ----

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        return model_in(load_checkpoint(path, device), path).to(device)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

# -----------------------------------------------------------------------------
# weight top-k helpers (module level so tests and bench.py can call them on any tensor)

def target_nonzeros(shape, frac, min_per_channel):
    """Nonzeros a parameter keeps at L0 fraction frac: round(frac * numel), but never fewer than
    min_per_channel per row (a 1-D bias has no rows), never fewer than 1 and never more than numel."""
    numel = math.prod(shape)
    floor = min(shape[0] * min_per_channel, numel) if len(shape) == 2 else 0
    return min(numel, max(round(frac * numel), floor, 1))


def topk_weight_mask(w, k, min_per_channel, by=None):
    """0/1 masks for a stack w (P, *shape) of same-shape parameters, each keeping exactly k entries:
    a matrix's top-min_per_channel |w| of every row first, then the largest |w| of the rest.
    by: "partition" (on a CPU only, its default), a threshold and a tie fill, ties to the lowest index; or
    "topk" (the default elsewhere), topk's indices, ties as its kernel picks. Neither sorts fully."""
    score = w.detach().abs().float()
    if w.dim() == 3 and min_per_channel > 0:
        top = score.topk(min(min_per_channel, w.shape[2]), dim=2).indices
        score.scatter_(2, top, float("inf"))       # guaranteed keepers rank above everything
    flat = score.flatten(1)                        # (P, numel)
    by = by or ("partition" if w.device.type == "cpu" else "topk")
    if by == "topk":
        # kthvalue is slow on CUDA, and the tie fill's cumsum over a few 1M-long rows runs one row per
        # thread block there: 5.7 of the projection's 8.6 ms in the gpu preset's step (README)
        idx = flat.topk(k, dim=1, sorted=False).indices
        return torch.zeros_like(flat, dtype=w.dtype).scatter_(1, idx, 1.0).view_as(w)
    bits = flat.view(torch.int32)                  # scores >= 0 order as their bits (abs_bits)
    threshold = kth_largest(bits, k)
    above, ties = bits > threshold, bits == threshold        # k - 1 at most above it
    missing = k - above.sum(1, keepdim=True)                 # ties at the threshold: take the first ones
    mask = above | (ties & (ties.cumsum(1) <= missing))
    return mask.view(torch.uint8).to(w.dtype).view_as(w)     # by uint8, as in abstopk_keep_on_cpu


def load_checkpoint(path, device="cpu"):
    """torch.load with a one-line error for anything that is not one of our checkpoints."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except (FileNotFoundError, NotADirectoryError):   # the latter: a part of the path is a file
        raise UserError(f"checkpoint {path} does not exist")
    except IsADirectoryError:   # a run's --out_dir, or a folder named ckpt.pt
        inside = os.path.join(path, "ckpt.pt")
        raise UserError(f"checkpoint {path} is a folder" + (f"; pass {inside}" if os.path.isfile(inside) else
                                                             ", not a checkpoint file"))
    except Exception as e:
        raise UserError(f"{path} is not a sparse-circuits checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a sparse-circuits checkpoint (no model_config/model)")
    return ckpt


def model_in(ckpt, path):
    """The GPT a loaded checkpoint holds, with a one-line error for one this code cannot build."""
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))   # TypeError: a setting this GPTConfig lacks
        model.load_state_dict(ckpt["model"])               # RuntimeError: other shapes or parameters
    except (TypeError, ValueError, RuntimeError) as e:
        # load_state_dict's first line only says that there are errors: name the first of them too
        detail = " ".join(line.strip() for line in str(e).strip().splitlines())
        raise UserError(f"{path} holds a model this code cannot build ({type(e).__name__}: {detail[:240]})")
    return model
