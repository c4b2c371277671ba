"""
Circuits by pruning (docs/METHOD.md section 3): learn one mask per node under mean ablation, bisect the
number of kept nodes to the smallest circuit that still does the task, check it, count its edges,
draw it.

    python prune.py --task=single_double_quote       # on out/cpu45/ckpt.pt: out/circuits/single_double_quote{.json,.svg,_loss.svg}
    python prune.py --task=all                       # every task the model solves: a table + geomean of edges
    python prune.py --task=with_as --nonsense=True   # + the control with the answers swapped (twice the time)
    python prune.py --ablation=zero --tie_qk=True --freeze_norm=True --calibrate=True   # the options
    python prune.py --help                           # every setting

Nodes: every channel of the 8 sites of a layer: residual reads (attn.act_in, mlp.act_in), q, k, v
channels (head h = channels h*d_head..(h+1)*d_head-1), MLP neurons (mlp.post_act), residual writes
(attn.resid_delta, mlp.resid_delta). Node i has a parameter tau_i; the forward pass uses
m_i = H(tau_i) in {0, 1}, the backward pass the gradient of sigmoid(tau_i), and a hook on the site
makes x*m + mean*(1-m): a masked node holds its mean [paper]. Loss = task loss + k_coef * active
nodes; AdamW on tau; then sort by tau, keep the top k, and bisect k over fixed batches of other
train-split prompts (not the ones the masks learned on) to the smallest circuit with loss <= target
[paper], the loss taken as mean + 1 standard error (ours: so the circuit meets the target on new
prompts too). The checks (full model, circuit, circuit ablated) are on held-out test prompts; the
loss-vs-k curve is on the bisection prompts.

Edge rule (ours, the same for every model): an edge is a nonzero entry of a block's weight matrix
whose input and output nodes are both kept: act_in -> q, k, v (c_attn), v -> attn.resid_delta
(attn.c_proj; v channel c reaches output channel c through the attention average), mlp.act_in ->
neuron (c_fc), neuron -> mlp.resid_delta (mlp.c_proj). Not counted: embedding and unembedding rows
(the residual stream has no nodes at either end, so there is no kept node for them to join), the
dense bigram table, biases, q.k products, and the residual stream's identity paths from a write
channel to a later read of the same channel (no weight; drawn dashed in the picture). A kept node
can also act without an edge, through the AbsTopK competition within its site: no edge records that.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter, namedtuple
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch

import data
from config import (UserError, atomic_file, check_not_negative, check_out_dir, check_positive, check_seed,
                    check_writable, parse_args, resolve_device, run_main, write_atomic)
from draw import circuit_svg, curve_svg
from sparse_gpt import ALL_SPARSE_SITES, RMSNorm
from tasks import TASKS, collate, evaluate, get_task, load_model, make_prompts, prompt_losses, task_loss


@dataclass
class PruneConfig:
    ckpt: str = "out/cpu45/ckpt.pt"  # the cpu45 model: it solves 4 tasks at 0.15 (the 15-minute cpu model none)
    task: str = "single_double_quote"  # a task name, or all: every task the model solves
    out_dir: str = "out/circuits"      # <task>.json, <task>.svg, <task>_loss.svg; means/ cache
    target_loss: float = 0.15          # the circuit's task loss must be at most this [paper]
    bisect_se: float = 1.0             # ... as mean + this many standard errors on the bisection prompts (0 = the mean)
    ablation: str = "mean"             # mean (over pretraining tokens) [paper] | task_mean | zero
    tie_qk: bool = False               # one mask for q channel c and k channel c (same head, dim)
    freeze_norm: bool = False          # every RMSNorm divides by the unpruned model's RMS
    calibrate: bool = False            # bisect and report after a 16-step LBFGS logit scale + shift
    nonsense: bool = False             # also prune the control with the answers swapped
    # mask optimization: the center of the authors' search [paper]
    steps: int = 800                   # 3-8 minutes on 2 cores, by host (d_model 128, 4 layers); more keeps shrinking it
    batch_size: int = 64               # task prompts per step ...
    micro_batches: int = 0             # ... run as this many length-sorted pieces; 0 = 4 on a CPU (less
                                       # padding; fewer if a step has fewer prompts), 1 on a GPU (a quarter
                                       # of the kernel launches)
    k_coef: float = 1e-4
    lr: float = 3e-3
    weight_decay: float = 1e-3
    beta2: float = 0.95
    tau_init: float = 0.1              # tau ~ N(tau_init, tau_std^2), kept in [-1, 1]
    tau_std: float = 0.01
    # prompts and means
    n_train: int = 512                 # train-split prompts the masks learn on
    n_eval: int = 256                  # other train-split prompts: the fixed batches of the bisection
    n_test: int = 256                  # held-out prompts of every reported loss
    mean_batches: int = 8              # pretraining means: mean_batches x mean_batch_size x block_size tokens
    mean_batch_size: int = 16
    eval_batch_size: int = 64
    log_interval: int = 50
    seed: int = 0                      # the search's draw: train/eval prompts, mask init, batches, means sample
    device: str = "auto"               # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        if not self.ckpt:
            raise UserError("--ckpt is empty; give a checkpoint (a train.py run's ckpt.pt)")
        if self.task != "all":
            get_task(self.task)
        if self.ablation not in ("mean", "task_mean", "zero"):
            raise UserError(f"--ablation={self.ablation} is unknown; allowed: mean, task_mean, zero")
        check_out_dir("out_dir", self.out_dir)
        check_positive("target_loss", self.target_loss)
        for key in ("lr", "bisect_se", "k_coef", "weight_decay", "tau_std"):   # lr 0: the masks' gradient, no step
            check_not_negative(key, getattr(self, key))
        if not 0.0 <= self.beta2 < 1.0:
            raise UserError(f"--beta2={self.beta2} is outside [0, 1)")
        if not -1.0 <= self.tau_init <= 1.0:
            raise UserError(f"--tau_init={self.tau_init} is outside [-1, 1], where the taus are kept")
        check_seed(self.seed)
        for key in ("n_train", "n_eval", "n_test", "steps", "batch_size", "mean_batches", "mean_batch_size",
                    "eval_batch_size", "log_interval"):
            value, even = getattr(self, key), key.startswith("n_")   # prompt sets hold half of each class
            if value <= 0 or (even and value % 2):
                raise UserError(f"--{key}={value} must be positive" + (" and even" if even else ""))
        if not 0 <= self.micro_batches <= self.batch_size:
            raise UserError(f"--micro_batches={self.micro_batches} is outside [0, --batch_size={self.batch_size}]")


class NoCircuit(UserError):
    """No circuit meets the target: an outcome, which headline.py records, rather than a mistake."""


# -----------------------------------------------------------------------------
# nodes, masks and ablation

def node_sites(model):
    """Sites whose channels are nodes: the 8 of every layer (not the residual stream's own sites)."""
    return [name for name, site in model.sites.items() if site.kind in ALL_SPARSE_SITES]


def dim_of(model, name):
    return model.config.d_mlp if name.endswith("post_act") else model.config.d_model


class HeavisideST(torch.autograd.Function):
    """m = H(tau) = 1[tau > 0] forward; d sigmoid(tau)/d tau = s(1-s) backward (straight-through) [paper]."""

    @staticmethod
    def forward(ctx, tau):
        ctx.save_for_backward(tau)
        return (tau > 0).to(tau.dtype)

    @staticmethod
    def backward(ctx, grad):
        s = torch.sigmoid(ctx.saved_tensors[0])
        return grad * s * (1 - s)


def init_taus(model, cfg, device):
    """{site: tau (dim,)}; with tie_qk the k site holds the very tensor of its q site."""
    gen, taus = torch.Generator().manual_seed(cfg.seed), {}
    for name in node_sites(model):
        if cfg.tie_qk and name.endswith(".attn.k"):
            taus[name] = taus[name[:-1] + "q"]
            continue
        tau = cfg.tau_init + cfg.tau_std * torch.randn(dim_of(model, name), generator=gen)
        taus[name] = torch.nn.Parameter(tau.clamp(-1, 1).to(device))
    return taus


def unique(taus):
    """The distinct tau tensors (a tied q/k pair once), in site order: the mask units."""
    return list({id(t): t for t in taus.values()}.values())


def top_k_masks(taus, k):
    """0/1 masks keeping the k units of largest tau (a tied q/k pair is one unit, two nodes)."""
    params = unique(taus)
    flat = torch.cat([p.detach() for p in params])
    keep = torch.zeros_like(flat)
    keep[flat.argsort(descending=True, stable=True)[:k]] = 1.0
    chunks = dict(zip(map(id, params), keep.split([p.numel() for p in params])))
    return {name: chunks[id(t)] for name, t in taus.items()}


def ablation_hooks(masks, means):
    """{site: fn(x, name)} replacing each masked channel by its mean."""
    def hook(x, name):
        m = masks[name]
        return x * m + means[name] * (1 - m)      # mean-ablate: x*m + mean*(1-m)
    return {name: hook for name in masks}


def node_count(masks):
    return int(sum(m.sum().item() for m in masks.values()))

# -----------------------------------------------------------------------------
# means to ablate to

def checkpoint_key(path):
    """[absolute path, mtime, size]: a checkpoint retrained at the same path gets another key."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    st = os.stat(path)
    return [os.path.abspath(path), st.st_mtime_ns, st.st_size]


def pretraining_means(model, ckpt_path, folder, cfg, device):
    """Mean of every node over pretraining tokens, after AbsTopK (what the hook sees), cached in
    out_dir/means/ under a key of the checkpoint's path and mtime and the sample. -> (means, path)"""
    key = checkpoint_key(ckpt_path) + [folder, cfg.mean_batches, cfg.mean_batch_size, cfg.seed]
    path = os.path.join(cfg.out_dir, "means", hashlib.sha256(repr(key).encode()).hexdigest()[:16] + ".pt")
    if os.path.exists(path):
        return torch.load(path, map_location=device), path
    tokens, gen = data.load_tokens(folder, "train"), torch.Generator().manual_seed(cfg.seed)
    batches = (data.get_batch(tokens, cfg.mean_batch_size, model.config.block_size, gen)[0].to(device)
               for _ in range(cfg.mean_batches))
    means = node_means(model, ((x, torch.ones_like(x, dtype=torch.bool)) for x in batches))   # every token
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path, "wb") as f:                 # headline.py --jobs may write it from two processes
        torch.save(means, f)
    return means, path


def task_means(model, batches):
    """Mean of every node over all positions (not the padding) of the task's prompts."""
    return node_means(model, ((b.idx, torch.arange(b.idx.size(1), device=b.idx.device)[None, :] <= b.last[:, None])
                              for b in batches))


@torch.no_grad()
def node_means(model, inputs):
    """{node site: mean over the positions marked} for inputs of (idx (B, T), marked (B, T) bools)."""
    sums, count = {}, 0
    for idx, marked in inputs:
        _, cache = model.run_with_cache(idx, node_sites(model))
        for name, act in cache.items():                                      # (B, T, dim)
            sums[name] = sums.get(name, 0) + act[marked].double().sum(0)
        count += int(marked.sum())
    return {name: (s / count).float() for name, s in sums.items()}

# -----------------------------------------------------------------------------
# frozen norms: the RMSNorms are not sites, so torch's own module hooks attach there

@contextmanager
def norm_hooks(model, fn):
    """fn(name, module, inputs, output) as a forward hook on every RMSNorm, for the block."""
    handles = [m.register_forward_hook(partial(fn, name))
               for name, m in model.named_modules() if isinstance(m, RMSNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def norm_mean_squares(model, idx, last):
    """{norm name: mean(x^2) per position (B, T, 1); (B, 1) for the final norm} in the unpruned model."""
    ms = {}

    def record(name, module, inputs, output):
        ms[name] = inputs[0].pow(2).mean(-1, keepdim=True)
    with norm_hooks(model, record):
        model(idx, last=last)
    return ms


def frozen_norms(model, ms):
    """Norms dividing by the unpruned model's RMS, y = x / sqrt(ms_full + eps) * g, so that a circuit
    cannot cheat by letting a norm rescale a shrunken residual stream. ms None: the usual norms."""
    if ms is None:
        return nullcontext()
    return norm_hooks(model, lambda name, m, inputs, out: inputs[0] * torch.rsqrt(ms[name] + m.eps) * m.weight)

# -----------------------------------------------------------------------------
# batches and the task loss of a masked model

Batch = namedtuple("Batch", "idx last correct alt norm_ms")   # norm_ms: None unless --freeze_norm


def make_batch(model, prompts, device, freeze_norm):
    idx, last, correct, alt = collate(prompts, device)
    return Batch(idx, last, correct, alt, norm_mean_squares(model, idx, last) if freeze_norm else None)


def make_batches(model, prompts, device, cfg):
    """Fixed batches of similar-length prompts (little padding)."""
    order = sorted(prompts, key=lambda p: len(p.ids))
    return [make_batch(model, order[i:i + cfg.eval_batch_size], device, cfg.freeze_norm)
            for i in range(0, len(order), cfg.eval_batch_size)]


def circuit_logits(model, batch, masks, means):
    """Logits at each prompt's last position (B, vocab), nodes with mask 0 ablated (masks None: none)."""
    hooks = ablation_hooks(masks, means) if masks is not None else {}
    with model.hooks(hooks), frozen_norms(model, batch.norm_ms):
        return model(batch.idx, last=batch.last)[0]


@torch.no_grad()
def eval_logits(model, batches, masks, means):
    """(last logits (N, vocab), correct (N,), alt (N,)) over fixed batches, on the CPU."""
    return (torch.cat([circuit_logits(model, b, masks, means).float().cpu() for b in batches]),
            torch.cat([b.correct.cpu() for b in batches]), torch.cat([b.alt.cpu() for b in batches]))


def fit_calibration(logits, correct, alt, steps=16):
    """logits' = a*logits + b, a scalar, b one shift per token, fit by 16 LBFGS steps [paper]. (One
    shift for all tokens would cancel in the two-way softmax.) a is fit as exp(log a), so a > 0: a
    negative scale would swap the answers, and the nonsense control would look solved. -> (a, b)"""
    log_a, b = torch.zeros((), requires_grad=True), torch.zeros(logits.size(1), requires_grad=True)
    opt = torch.optim.LBFGS([log_a, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = task_loss(log_a.exp() * logits + b, correct, alt)[0]
        loss.backward()
        return loss
    opt.step(closure)
    return log_a.exp().detach(), b.detach()


def calibrated(logits, correct, alt, calibrate, calibration=None):
    """With calibrate: the logits after the calibration given, or else one fit on these logits."""
    if not calibrate:
        return logits
    a, b = calibration or fit_calibration(logits, correct, alt)
    return a * logits + b


def readout_loss(logits, correct, alt, calibrate, calibration=None):
    return task_loss(calibrated(logits, correct, alt, calibrate, calibration), correct, alt)[0].item()

# -----------------------------------------------------------------------------
# pruning: train the masks, then discretize by bisection

def train_masks(model, prompts, means, cfg, device, log=print):
    """AdamW on tau with loss = task loss + k_coef * active nodes. -> {site: tau}"""
    taus = init_taus(model, cfg, device)
    params = unique(taus)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    gen, t0 = torch.Generator().manual_seed(cfg.seed + 1), time.time()
    micro = cfg.micro_batches or (1 if str(device).startswith("cuda") else 4)   # 0: chosen by device
    micro = min(micro, cfg.batch_size, len(prompts))   # every piece holds a prompt
    for step in range(1, cfg.steps + 1):
        pick = torch.randperm(len(prompts), generator=gen)[:cfg.batch_size].tolist()
        pick = sorted((prompts[i] for i in pick), key=lambda p: len(p.ids))
        opt.zero_grad(set_to_none=True)
        task = torch.zeros((), device=device)   # a tensor: no host-device sync inside the step
        for c in range(micro):   # length-sorted pieces: less padding, the same gradient
            chunk = pick[c * len(pick) // micro:(c + 1) * len(pick) // micro]
            batch = make_batch(model, chunk, device, cfg.freeze_norm)
            masks = {name: HeavisideST.apply(tau) for name, tau in taus.items()}   # 0/1, sigmoid gradient
            part = task_loss(circuit_logits(model, batch, masks, means), batch.correct, batch.alt)[0]
            (part * len(chunk) / len(pick)).backward()        # two-way cross-entropy, batch mean [paper]
            task += part.detach() * len(chunk) / len(pick)
        active = sum(HeavisideST.apply(tau).sum() for tau in taus.values())   # kept nodes; tied q/k count 2
        (cfg.k_coef * active).backward()                      # loss = task + k_coef * active nodes [paper]
        opt.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(-1.0, 1.0)                                           # tau in [-1, 1] [paper]
        if step % cfg.log_interval == 0 or step == cfg.steps:
            log(f"step {step:4d} | loss {task.item() + cfg.k_coef * active.item():.4f} | task {task.item():.4f} | "
                f"nodes {int(active.item())} | {(time.time() - t0) * 1000 / step:.0f} ms/step")
    return taus


def bisect_k(loss_at, n, target, hi=None):
    """Smallest k in [0, n] with loss_at(k) <= target, for a loss_at that falls with k (else: a k that
    meets the target where k - 1 does not). Starts from hi (the units with tau > 0) when that meets
    the target, else from n; None if neither does. About log2(n) + 2 calls of loss_at."""
    if hi is None or loss_at(hi) > target:
        hi = n
        if loss_at(hi) > target:
            return None
    lo = -1                                      # invariant: loss_at(lo) > target (k = -1 is virtual)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if loss_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def find_circuit(model, taus, batches, means, cfg):
    """Keep the top-k units by tau, k bisected on the fixed batches; also the loss at 0 and at 17
    log-spaced k for the curve. The bisection asks mean loss + bisect_se standard errors (over the
    prompts) <= target, so that the circuit meets the target on new prompts too, not only on
    average. The loss need not fall with k (masks trained briefly): where a k of the curve below the
    bisection's meets the target, it bisects again below that one, so k is the smallest k evaluated
    that meets the target. -> (keep masks or None, k, {k: (nodes, mean loss)})"""
    curve, bound = {}, {}

    def bound_at(k):
        if k not in curve:
            masks = top_k_masks(taus, k)
            logits, correct, alt = eval_logits(model, batches, masks, means)
            losses = prompt_losses(calibrated(logits, correct, alt, cfg.calibrate), correct, alt)
            curve[k] = (node_count(masks), losses.mean().item())
            bound[k] = curve[k][1] + cfg.bisect_se * losses.std().item() / math.sqrt(len(losses))
        return bound[k]
    n = sum(t.numel() for t in unique(taus))
    k = bisect_k(bound_at, n, cfg.target_loss, hi=sum(int((t > 0).sum()) for t in unique(taus)))
    below = [kk for kk in [0] + [round(n ** (i / 16)) for i in range(17)]   # bound_at first: every k of the
             if bound_at(kk) <= cfg.target_loss and (k is None or kk < k)]      # curve is evaluated, for its picture
    if below:
        k = bisect_k(bound_at, n, cfg.target_loss, hi=min(below))
    return (top_k_masks(taus, k) if k is not None else None), k, curve

# -----------------------------------------------------------------------------
# edges

def circuit_edges(model, keep):
    """Every nonzero weight entry whose input and output nodes are both kept (the docstring's rule).
    -> [(src site, i, dst site, j, w)]"""
    d, edges = model.config.d_model, []
    for layer, block in enumerate(model.blocks):
        qkv = block.attn.c_attn.weight                                        # (3d, d): rows q | k | v
        for w, src, dst in [(qkv[:d], "attn.act_in", "attn.q"), (qkv[d:2 * d], "attn.act_in", "attn.k"),
                            (qkv[2 * d:], "attn.act_in", "attn.v"),
                            (block.attn.c_proj.weight, "attn.v", "attn.resid_delta"),
                            (block.mlp.c_fc.weight, "mlp.act_in", "mlp.post_act"),
                            (block.mlp.c_proj.weight, "mlp.post_act", "mlp.resid_delta")]:
            src, dst = f"{layer}.{src}", f"{layer}.{dst}"
            # w is (out, in): entry [j, i] carries input node i to output node j
            hit = (w != 0) & (keep[dst] > 0)[:, None] & (keep[src] > 0)[None, :]
            edges += [(src, i, dst, j, v) for (j, i), v in zip(hit.nonzero().tolist(), w[hit].tolist())]   # both row-major
    return edges

# -----------------------------------------------------------------------------
# one task: prune, check on the test prompts, record

def search(model, prompts, eval_prompts, means, cfg, device, log):
    """Masks trained on the prompts, discretized on other prompts: a k chosen on the prompts the
    masks fit would meet the target there and miss it on new ones."""
    eval_batches = make_batches(model, eval_prompts, device, cfg)
    taus = train_masks(model, prompts, means, cfg, device, log)
    return (taus, *find_circuit(model, taus, eval_batches, means, cfg), eval_batches)


def checks(model, keep, eval_batches, test_batches, means, cfg):
    """Test losses of the full model; of the circuit with everything else ablated (sufficiency); of
    the full model with only the circuit ablated (necessity); of the calibrated circuit, if asked."""
    out = {"chance": math.log(2)}
    ablated = {s: 1 - m for s, m in keep.items()}                 # only the circuit's nodes ablated
    for key, masks in (("full", None), ("circuit", keep), ("circuit_ablated", ablated)):
        logits, correct, alt = eval_logits(model, test_batches, masks, means)
        loss, acc = task_loss(logits, correct, alt)
        out[key], out[key + "_acc"] = loss.item(), acc.item()
        if key == "circuit" and cfg.calibrate:   # fit on the bisection prompts, measured on the test ones
            calibration = fit_calibration(*eval_logits(model, eval_batches, keep, means))
            out["circuit_calibrated"] = readout_loss(logits, correct, alt, True, calibration)
    return out


def circuit_record(model, name, taus, keep, k, curve, means, cfg):
    """What <task>.json holds, less the losses: nodes with their site, index, mean and tau; edges
    with their weights; counts per site kind and edge type; the loss-vs-k curve; the settings."""
    edges = circuit_edges(model, keep)
    kept = {s: keep[s].nonzero()[:, 0] for s in node_sites(model)}   # one transfer per site, not per node
    nodes = [{"site": s, "index": i, "mean": mean, "tau": tau} for s, idx in kept.items()
             for i, mean, tau in zip(idx.tolist(), means[s][idx].tolist(), taus[s].detach()[idx].tolist())]
    short = lambda site: site.split(".", 1)[1]                           # "0.attn.q" -> "attn.q"
    return {"task": name, "checkpoint": cfg.ckpt, "settings": dataclasses.asdict(cfg),
            "model_config": dataclasses.asdict(model.config), "k": k, "units": sum(t.numel() for t in unique(taus)),
            "n_nodes": len(nodes), "n_edges": len(edges),
            "nodes_by_kind": dict(Counter(model.sites[n["site"]].kind for n in nodes)),
            "edges_by_type": dict(Counter(f"{short(s)}->{short(d)}" for s, _, d, _, _ in edges)),
            "nodes": nodes, "edges": [{"src": s, "i": i, "dst": d, "j": j, "w": w} for s, i, d, j, w in edges],
            "curve": [{"k": kk, "nodes": nn, "loss": ll} for kk, (nn, ll) in sorted(curve.items())]}


def prune_task(model, enc, name, test_prompts, means, cfg, device, log=print):
    """Prune one task. means: the pretraining means (None for the other ablations). -> its record"""
    drawn = make_prompts(name, enc, cfg.n_train + cfg.n_eval, cfg.seed, "train",   # all distinct
                         model.config.block_size)
    train_prompts, eval_prompts = drawn[:cfg.n_train], drawn[cfg.n_train:]
    test_batches = make_batches(model, test_prompts, device, cfg)
    if cfg.ablation == "task_mean":
        means = task_means(model, make_batches(model, train_prompts, device, cfg))
    elif cfg.ablation == "zero":
        means = {s: torch.zeros(dim_of(model, s), device=device) for s in node_sites(model)}
    log(f"{name}: {cfg.steps} mask steps on {len(train_prompts)} train prompts, bisection on {len(eval_prompts)} others")
    taus, keep, k, curve, eval_batches = search(model, train_prompts, eval_prompts, means, cfg, device, log)
    if keep is None:
        raise NoCircuit(f"{name}: no circuit reaches loss {cfg.target_loss} on the bisection prompts, not even "
                        f"the full model (mean loss {curve[max(curve)][1]:.4f}; the bisection asks mean + "
                        f"--bisect_se={cfg.bisect_se:g} standard errors)")
    rec = circuit_record(model, name, taus, keep, k, curve, means, cfg)
    rec["losses"] = checks(model, keep, eval_batches, test_batches, means, cfg)
    if cfg.nonsense:   # the same prompts with the answers swapped: how small can a meaningless "circuit" be?
        log(f"{name}: the nonsense control (answers swapped)")
        swap = lambda prompts: [p._replace(correct=p.alt, alt=p.correct) for p in prompts]
        _, nkeep, _, ncurve, neval = search(model, swap(train_prompts), swap(eval_prompts), means, cfg, device, log)
        rec["nonsense"] = {"found": nkeep is not None, "best_train_loss": min(l for _, l in ncurve.values())}
        if nkeep is not None:
            ntest = [b._replace(correct=b.alt, alt=b.correct) for b in test_batches]
            rec["nonsense"].update(n_nodes=node_count(nkeep), n_edges=len(circuit_edges(model, nkeep)),
                                   losses=checks(model, nkeep, neval, ntest, means, cfg))
    return rec

# -----------------------------------------------------------------------------
# the script

def write_outputs(rec, out_dir):
    """<task>.json (atomic), <task>.svg (the circuit), <task>_loss.svg (loss against kept nodes)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, rec["task"])
    for path, body in ((base + ".json", json.dumps(rec, indent=1)), (base + ".svg", circuit_svg(rec)),
                       (base + "_loss.svg", curve_svg(rec))):
        write_atomic(path, body)
    return base


def report(rec, log=print):
    L, target = rec["losses"], rec["settings"]["target_loss"]
    log(f"{rec['task']}: circuit of {rec['n_nodes']} nodes, {rec['n_edges']} edges "
        f"(top {rec['k']} of {rec['units']} mask units)")
    calibrated = f" | calibrated {L['circuit_calibrated']:.4f}" if "circuit_calibrated" in L else ""
    chosen_on = L.get("circuit_calibrated", L["circuit"])          # the loss k was bisected on (--calibrate)
    meets = "meets" if chosen_on <= target else "ABOVE"            # pruned on train prompts, checked on test
    log(f"  test loss: full {L['full']:.4f} | circuit {L['circuit']:.4f}{calibrated} ({meets} the target {target}) "
        f"| circuit ablated {L['circuit_ablated']:.4f} (chance {L['chance']:.4f})")
    log("  nodes: " + (", ".join(f"{k} {v}" for k, v in rec["nodes_by_kind"].items()) or "none"))
    log("  edges: " + (", ".join(f"{k} {v}" for k, v in rec["edges_by_type"].items()) or "none"))
    ns = rec.get("nonsense")
    if ns and ns["found"]:
        log(f"  nonsense control: {ns['n_nodes']} nodes, {ns['n_edges']} edges, "
            f"test loss {ns['losses']['circuit']:.4f}")
    elif ns:
        log(f"  nonsense control: no circuit at the target (best train loss {ns['best_train_loss']:.4f})")


def geomean(edge_counts):
    """The paper's summary of circuit sizes: their geometric mean, an empty circuit counted as 1."""
    return math.exp(sum(math.log(max(1, n)) for n in edge_counts) / len(edge_counts))


def chance_note(target_loss):
    """A target at or above chance (the two-way loss of a 50/50 guess) is met without doing the task."""
    if target_loss >= math.log(2):
        print(f"note: --target_loss={target_loss} is at or above chance (ln 2 = 0.693): a model that guesses meets "
              "it, and so may an empty circuit")


def main(argv):
    cfg = parse_args(PruneConfig, argv)
    device = resolve_device(cfg.device)
    check_writable("out_dir", cfg.out_dir)
    if cfg.ckpt == PruneConfig.ckpt and not os.path.exists(cfg.ckpt):
        raise UserError(f"checkpoint {cfg.ckpt} (the default) does not exist: train it (python train.py "
                        "--preset=cpu45) or pass --ckpt=PATH")
    ckpt_key = checkpoint_key(cfg.ckpt)   # in every record; taken first, so a file rewritten meanwhile mismatches
    print("settings: " + json.dumps(dataclasses.asdict(cfg)))
    chance_note(cfg.target_loss)
    model, _, folder = load_model(cfg.ckpt, device)         # folder: the tokenizer the model was trained with
    model.requires_grad_(False)                                          # only the masks learn
    enc = data.get_encoding(folder)
    # 1) which tasks the full model solves on test prompts: nothing is written for one it does not
    names = list(TASKS) if cfg.task == "all" else [cfg.task]
    test, full = {}, {}
    for name in names:
        try:   # one fixed test set whatever the seed
            test[name] = make_prompts(name, enc, cfg.n_test, 0, "test", model.config.block_size)
        except UserError as e:                 # a task this model cannot be asked (context, tokenizer)
            if len(names) == 1:
                raise
            print(f"skipped: {e}")
            continue
        full[name] = evaluate(model, test[name], device, cfg.eval_batch_size)[0]   # as tasks.py and headline.py do
    if not full:
        raise UserError(f"{cfg.ckpt}: none of the {len(names)} tasks can be posed to this model (see above)")
    solved = [name for name in full if full[name] <= cfg.target_loss]
    best = min(full, key=full.get)
    if not solved and len(names) == 1:   # a NoCircuit: an outcome headline.py records
        raise NoCircuit(f"{cfg.ckpt} does not solve {best}: full-model test loss {full[best]:.4f} > "
                        f"--target_loss={cfg.target_loss}; python tasks.py --ckpt={cfg.ckpt} shows the tasks it solves")
    if not solved:
        raise UserError(f"{cfg.ckpt} solves none of the {len(full)} tasks at --target_loss={cfg.target_loss} "
                        f"(best: {best}, full-model test loss {full[best]:.4f}); try a model trained on more text "
                        "(python train.py --preset=cpu45) or a higher --target_loss")
    for name in (n for n in full if n not in solved):
        print(f"{name}: not solved (full-model test loss {full[name]:.4f}), skipped")
    # 2) the means to ablate to, once per checkpoint; 3) prune every solved task
    means, means_from = None, cfg.ablation
    if cfg.ablation == "mean":
        means, means_from = pretraining_means(model, cfg.ckpt, folder, cfg, device)
    records = []
    for name in solved:
        t0 = time.time()
        try:
            rec = prune_task(model, enc, name, test[name], means, cfg, device)
        except UserError as e:
            if len(names) == 1:
                raise
            print(f"skipped: {e}")
            continue
        rec["means"], rec["checkpoint_key"] = means_from, ckpt_key
        base = write_outputs(rec, cfg.out_dir)
        report(rec)
        print(f"  {time.time() - t0:.0f}s; wrote {base}.json, {base}.svg, {base}_loss.svg")
        records.append(rec)
    if cfg.task == "all" and records:
        calibrated_column = lambda L: f" {L['circuit_calibrated']:>7.4f}" if cfg.calibrate else ""
        print(f"{'task':<28} {'full':>7} {'circuit':>7}{' calibr.' if cfg.calibrate else ''} {'ablated':>7} "
              f"{'nodes':>6} {'edges':>6} | nonsense nodes edges")
        for r in records:
            L, ns = r["losses"], r.get("nonsense", {})
            extra = (f"{ns['n_nodes']:>14} {ns['n_edges']:>5}" if ns.get("found")
                     else ("none" if ns else "-").rjust(14))       # -: no control run; none: none found
            print(f"{r['task']:<28} {L['full']:>7.4f} {L['circuit']:>7.4f}{calibrated_column(L)} "
                  f"{L['circuit_ablated']:>7.4f} {r['n_nodes']:>6} {r['n_edges']:>6} | {extra}")
        print(f"geometric mean of edge counts over {len(records)} task(s), an empty circuit as 1: "
              f"{geomean([r['n_edges'] for r in records]):.1f}")


if __name__ == "__main__":
    run_main(main)
