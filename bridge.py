"""
Bridges between a frozen dense model and a weight-sparse one (docs/METHOD.md section 5), and steering
the dense model through them.

    python bridge.py --dense=out/cpu_dense/ckpt.pt                 # train; out/bridge/ckpt.pt
    python bridge.py --out_dir=out/bridge --resume=True            # continue an interrupted run exactly
    python bridge.py --dense=out/cpu_dense/ckpt.pt --init_sparse=out/cpu/ckpt.pt --anneal_start=0 --anneal_end=0
    python bridge.py --steer=True --steer_site=1.resid_pre         # edit one sparse channel, steer the dense model
    python bridge.py --help                                        # every setting it takes (train.py's too)

Of train.py's settings, bridge.py refuses the ones it has no use for (TRAIN_ONLY_KEYS: no presets,
no compile, so AbsTopK by topk, one micro-batch a step, no samples or task evaluation while training).

Sites: the residual stream after the embedding and after every attention and MLP sublayer
(sparse_gpt's `{i}.resid_pre`, `{i}.resid_mid`, `final_resid`). At site i an encoder
(Linear + AbsTopK) maps the dense activation to the sparse one, a decoder (Linear) maps back [paper].
Loss = coef_ce * the sparse model's next-token loss
     + coef_nmse * mean over sites of NMSE(enc(dense), sparse) + NMSE(dec(sparse), dense)
     + coef_kl_ds * KL(dense || d->s hybrid) + coef_kl_sd * KL(dense || s->d hybrid)
where the d->s hybrid runs the dense model up to site i, encodes, and continues in the sparse model
(s->d: the reverse) [paper]. One site per direction per step, drawn at random (an unbiased estimate
of the mean over sites at 1/(2 n_layer + 1) of the cost). The sparse model trains by train.py's rules
(annealed top-k projection, sharkfin LR, grad-RMS normalization); the bridges by plain AdamW.
The result is a normal checkpoint: tasks.py and prune.py read it unchanged.
"""

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import tasks
from config import (UserError, as_arg, check_not_negative, check_positive, check_writable, parse_args, resolve_device,
                    run_main, write_atomic)
from sparse_gpt import GPT, GPTConfig, abstopk, load_checkpoint, model_in
from train import (MODEL_KEYS, TrainConfig, abstopk_setting, autocast_for, batch_for, check_finite, estimate_loss,
                   is_dense, load_optimizer_state, make_optimizer, optimizer_step, resumed_config, save_checkpoint)


TRAIN_ONLY_KEYS = ("preset", "compile", "abstopk_by", "gradient_accumulation_steps", "sample_tokens", "eval_task")


def train_only_error(arg):
    return UserError(f"{arg} is a train.py setting that bridge.py does not use: leave it out "
                     f"(bridge.py keeps {', '.join(TRAIN_ONLY_KEYS)} at their defaults)")


@dataclass
class BridgeConfig(TrainConfig):
    """train.py's settings (the sparse model and its training), plus the bridges' and steering's."""
    out_dir: str = "out/bridge"
    dense: str = "out/cpu_dense/ckpt.pt"   # the frozen dense model (a train.py checkpoint, l0_frac=1, afrac=1)
    init_sparse: str = ""            # start the sparse model from this checkpoint ("" = from scratch [paper])
    max_iters: int = 500             # about 11 minutes on 2 cores at batch 16 (a 15-minute budget)
    eval_interval: int = 250
    batch_size: int = 16
    sample_tokens: int = 0           # train.py's; bridge.py neither samples
    eval_task: str = ""              # nor evaluates a task while training (TRAIN_ONLY_KEYS)
    coef_ce: float = 1.0             # every coefficient 1, as a replication did [3P]
    coef_nmse: float = 1.0
    coef_kl_ds: float = 1.0
    coef_kl_sd: float = 1.0
    bridge_afrac: float = 0.25       # AbsTopK fraction of the encoders' output (1 = none)
    bridge_lr: float = 3e-3
    # steering (--steer=True): reads out_dir/ckpt.pt
    steer: bool = False
    steer_site: str = "1.resid_pre"  # a bridge site
    steer_channel: int = -1          # a channel of the sparse model there; -1 = the one whose edit moves the sparse model most
    steer_task: str = "single_double_quote"
    steer_prompts: int = 256         # test prompts, half of each class
    steer_controls: int = 8          # random channels whose edits, scaled to the same size, are the control
    steer_dense: str = ""            # the dense model, if moved since the bridges were trained ("" = where it was)
    refused_settings = TRAIN_ONLY_KEYS   # not a setting: --help and "did you mean" leave these out

    def __post_init__(self):
        unused = [k for k in TRAIN_ONLY_KEYS if getattr(self, k) != getattr(BridgeConfig, k)]
        if unused:   # before train.py's checks, which would judge such a value as if it were used
            raise train_only_error(f"--{unused[0]}={as_arg(getattr(self, unused[0]))}")
        super().__post_init__()
        if not self.dense:
            raise UserError("--dense is empty; give the dense model's checkpoint (trained with --l0_frac=1 --afrac=1)")
        self.dense = data.user_dir(self.dense)   # saved absolute: steering and resuming from elsewhere find it
        if not 0.0 < self.bridge_afrac <= 1.0:
            raise UserError(f"--bridge_afrac={self.bridge_afrac} is outside (0, 1]")
        if self.bridge_afrac < 1 and int(self.bridge_afrac * self.d_model) == 0:   # k = 0 would mean "off"
            raise UserError(f"--bridge_afrac={self.bridge_afrac} keeps no channel of d_model={self.d_model}; "
                            f"need bridge_afrac >= {1 / self.d_model:g} (or 1 for no AbsTopK)")
        tasks.get_task(self.steer_task)
        if self.steer_prompts < 2 or self.steer_prompts % 2:
            raise UserError(f"--steer_prompts={self.steer_prompts} must be even and at least 2 (half of each class)")
        if self.steer_controls < 1:
            raise UserError(f"--steer_controls={self.steer_controls} must be at least 1")
        for key in ("coef_ce", "coef_nmse", "coef_kl_ds", "coef_kl_sd"):
            check_not_negative(key, getattr(self, key))
        check_positive("bridge_lr", self.bridge_lr)
        if self.steer_channel < -1:   # -1 only: another negative number is a typo, not a request for auto
            raise UserError(f"--steer_channel={self.steer_channel} must be a channel (0 and up) or -1 (picked for you)")

# -----------------------------------------------------------------------------
# the pieces

def bridge_sites(model):
    """The residual stream after the embedding and after every attention and MLP sublayer."""
    return [name for name, site in model.sites.items() if site.kind in ("resid_pre", "resid_mid", "final_resid")]


class Bridges(nn.Module):
    """Per site: encoder dense -> sparse (Linear + AbsTopK), decoder sparse -> dense (Linear)."""

    def __init__(self, sites, d_dense, d_sparse, afrac):
        super().__init__()
        self.sites, self.k = list(sites), int(afrac * d_sparse) if afrac < 1 else 0
        self.encoders = nn.ModuleList([nn.Linear(d_dense, d_sparse) for _ in sites])
        self.decoders = nn.ModuleList([nn.Linear(d_sparse, d_dense) for _ in sites])

    def encode(self, site, h):
        s = self.encoders[self.sites.index(site)](h)
        return abstopk(s, self.k) if self.k else s

    def decode(self, site, s):
        return self.decoders[self.sites.index(site)](s)


def nmse(pred, target):
    """||pred - t||^2 / ||t - mean t||^2, the mean over tokens, per channel [paper]."""
    t = target.flatten(0, -2)
    return ((pred.flatten(0, -2) - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum().clamp_min(1e-12)


def kl(p_logits, q_logits):
    """KL(p || q) per token, averaged: the hybrid's output q against the dense model's p."""
    logp, logq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def hybrid(model, idx, site, x):
    """Run model with its activation at site replaced by x: the first model's computation up to the
    site (x), this model's after it. (The layers before the site run but are discarded.)"""
    with model.hooks({site: lambda _, name: x}):
        return model(idx)[0]


def both_models(sparse, dense, x, sites):
    """Logits and the activations at the sites of both models: the dense ones without a graph
    (it is frozen), the sparse ones with theirs (the losses train through them)."""
    with torch.no_grad():
        dense_logits, dense_acts = dense.run_with_cache(x, sites)
    sparse_acts = {}

    def keep(act, name):
        sparse_acts[name] = act
        return act
    with sparse.hooks({n: keep for n in sites}):
        sparse_logits, _ = sparse(x)
    return dense_logits, dense_acts, sparse_logits, sparse_acts


def site_terms(sparse, dense, bridges, x, site, dense_logits, dense_acts, sparse_acts):
    """The bridge terms at one site: encoder and decoder NMSE, and the KL of each hybrid pass."""
    enc, dec = bridges.encode(site, dense_acts[site]), bridges.decode(site, sparse_acts[site])
    return {"nmse_enc": nmse(enc, sparse_acts[site]), "nmse_dec": nmse(dec, dense_acts[site]),
            "kl_ds": kl(dense_logits, hybrid(sparse, x, site, enc)),     # dense up to site, sparse after
            "kl_sd": kl(dense_logits, hybrid(dense, x, site, dec))}      # sparse up to site, dense after


def bridge_losses(sparse, dense, bridges, x, y, site_ds, site_sd):
    """Every term of the training loss on one batch: NMSE averaged over all sites, each hybrid KL at
    its one drawn site. -> {name: scalar}"""
    dense_logits, dense_acts, sparse_logits, sparse_acts = both_models(sparse, dense, x, bridges.sites)
    S = bridges.sites
    return {"ce": F.cross_entropy(sparse_logits.float().flatten(0, 1), y.flatten()),
            "nmse_enc": sum(nmse(bridges.encode(s, dense_acts[s]), sparse_acts[s]) for s in S) / len(S),
            "nmse_dec": sum(nmse(bridges.decode(s, sparse_acts[s]), dense_acts[s]) for s in S) / len(S),
            "kl_ds": kl(dense_logits, hybrid(sparse, x, site_ds, bridges.encode(site_ds, dense_acts[site_ds]))),
            "kl_sd": kl(dense_logits, hybrid(dense, x, site_sd, bridges.decode(site_sd, sparse_acts[site_sd])))}


def total_loss(terms, cfg):
    return (cfg.coef_ce * terms["ce"] + cfg.coef_nmse * (terms["nmse_enc"] + terms["nmse_dec"])
            + cfg.coef_kl_ds * terms["kl_ds"] + cfg.coef_kl_sd * terms["kl_sd"])


@torch.no_grad()
def evaluate_bridges(sparse, dense, bridges, tokens, cfg):
    """Per site: NMSE of encoder and decoder, KL of the hybrid pass in each direction, over
    eval_iters fixed val batches; and the sparse and dense models' own val loss."""
    sparse.eval()
    gen, per_site = torch.Generator().manual_seed(cfg.seed + 1), {s: [0.0] * 4 for s in bridges.sites}
    for _ in range(cfg.eval_iters):
        x, _ = (t.to(cfg.device) for t in data.get_batch(tokens, cfg.batch_size, cfg.block_size, gen))
        dense_logits, dense_acts, _, sparse_acts = both_models(sparse, dense, x, bridges.sites)
        for s in bridges.sites:
            terms = site_terms(sparse, dense, bridges, x, s, dense_logits, dense_acts, sparse_acts)
            for i, key in enumerate(("nmse_enc", "nmse_dec", "kl_ds", "kl_sd")):
                per_site[s][i] += terms[key].item() / cfg.eval_iters
    losses = estimate_loss(sparse, {"sparse": tokens}, cfg, autocast_for(cfg))
    losses.update(estimate_loss(dense, {"dense": tokens}, cfg, autocast_for(cfg)))
    sparse.train()
    return {"sites": {s: dict(zip(("nmse_enc", "nmse_dec", "kl_ds", "kl_sd"), v)) for s, v in per_site.items()},
            "sparse_val_loss": losses["sparse"], "dense_val_loss": losses["dense"]}


def print_eval(ev, log=print):
    log(f"{'site':<14} {'nmse enc':>9} {'nmse dec':>9} {'KL d->s':>9} {'KL s->d':>9}")
    for s, v in ev["sites"].items():
        log(f"{s:<14} {v['nmse_enc']:9.4f} {v['nmse_dec']:9.4f} {v['kl_ds']:9.4f} {v['kl_sd']:9.4f}")
    log(f"val loss: sparse {ev['sparse_val_loss']:.4f} | dense {ev['dense_val_loss']:.4f}")

# -----------------------------------------------------------------------------
# loading, with the checks that the two models can be bridged

def load_dense(path, device, flag="--dense"):
    if not os.path.exists(path):   # the path as typed, or as the bridges saved it (the file may have moved)
        raise UserError(f"the dense model {path} does not exist; {flag}=... names where it is")
    ckpt = load_checkpoint(path, device)
    tc = ckpt.get("train_config", {})
    if not is_dense(tc):
        raise UserError(f"{flag}={path} is a sparse model (l0_frac={tc.get('l0_frac')}, afrac={tc.get('afrac')}); "
                        "bridges need a dense one (trained with --l0_frac=1 --afrac=1)")
    return model_in(ckpt, path).to(device).eval().requires_grad_(False), ckpt


def dense_identity(dense_ckpt):
    """[step, val loss] of a dense checkpoint: saved with the bridges, so that a dense model retrained
    at the same path is not bridged by bridges trained on another (the same run repeated is the same)."""
    return [dense_ckpt.get("step"), dense_ckpt.get("val_loss")]


def check_same_dense(bridge_ckpt, dense_ckpt, path):
    then, now = bridge_ckpt.get("dense_identity"), dense_identity(dense_ckpt)
    if then is None and os.path.realpath(path) != os.path.realpath(bridge_ckpt["dense"]):   # bridges saved before
        raise UserError(f"{path}: these bridges were trained with {bridge_ckpt['dense']} and saved nothing that "
                        "tells whether this is the same model")
    if then is not None and then != now:
        raise UserError(f"{path} is not the dense model these bridges were trained with (step {then[0]}, val loss "
                        f"{then[1]}; it is now step {now[0]}, val loss {now[1]}): retrained at that path? Train new "
                        "bridges in another --out_dir")


def load_bridge_checkpoint(path, device="cpu"):
    ckpt = load_checkpoint(path, device)
    if "bridges" not in ckpt:
        raise UserError(f"{path} is not a bridge.py checkpoint (it has no bridges): train them with "
                        "python bridge.py --dense=..., or pick another --out_dir")
    return ckpt


def check_bridgeable(dense_cfg, sparse_cfg):
    for key in ("n_layer", "vocab_size"):
        if getattr(dense_cfg, key) != getattr(sparse_cfg, key):
            raise UserError(f"cannot bridge: dense {key}={getattr(dense_cfg, key)} but sparse {key}="
                            f"{getattr(sparse_cfg, key)}; the sites must correspond one to one")
    if sparse_cfg.block_size > dense_cfg.block_size:
        raise UserError(f"cannot bridge: sparse block_size={sparse_cfg.block_size} exceeds the dense model's "
                        f"{dense_cfg.block_size}")


BRIDGE_KEYS = MODEL_KEYS + ["bridge_afrac"]   # what --resume may not change (--dense may: check_same_dense)


def used_by_steering(key):
    """Steering reads the models and bridges from out_dir/ckpt.pt: of the settings it uses only these."""
    return key.startswith("steer") or key in ("out_dir", "device", "seed")


def config_from_args(argv):
    """Defaults -> --key=value. With --resume=True the checkpoint's saved settings are the base instead,
    and the models and bridges may not change shape (train.py's rule)."""
    cfg = parse_args(BridgeConfig, argv)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    flags = [a.split("=", 1)[0] for a in argv]       # parse_args has checked that each is --key=value
    refused = [arg for arg, flag in zip(argv, flags) if flag[2:] in TRAIN_ONLY_KEYS]
    if refused:   # even at its default: --preset=cpu would not bring the cpu preset's max_iters here
        raise train_only_error(refused[0])
    ignored = [flag for flag in flags if not used_by_steering(flag[2:])] if cfg.steer else []
    if ignored:
        raise UserError(f"{', '.join(ignored)}: not used with --steer=True, which takes the models and bridges "
                        f"from {ckpt_path} (allowed with it: --steer_*, --out_dir, --device, --seed)")
    if cfg.resume:
        saved = load_bridge_checkpoint(ckpt_path)
        for key in TRAIN_ONLY_KEYS:   # runs from before bridge.py refused them saved train.py's defaults
            saved["train_config"].pop(key, None)
        cfg = resumed_config(BridgeConfig, argv, saved, BRIDGE_KEYS, ckpt_path)
    return cfg

# -----------------------------------------------------------------------------
# training

def train_step(sparse, dense, bridges, optimizer, bridge_opt, x, y, step, cfg):
    """One step of both: backward through the whole loss, AdamW on the bridges, train.py's step
    (grad-RMS, Adam at the sharkfin LR, top-k projection) on the sparse model. -> (terms, lr, L0)"""
    pick = random.Random(cfg.seed * 7919 + step)     # the sites of this step: reproducible on resume
    with autocast_for(cfg):
        terms = bridge_losses(sparse, dense, bridges, x, y, pick.choice(bridges.sites), pick.choice(bridges.sites))
    total_loss(terms, cfg).backward()
    bridge_opt.step()
    bridge_opt.zero_grad(set_to_none=True)
    lr, frac = optimizer_step(sparse, optimizer, step, cfg)
    return terms, lr, frac


def train_bridges(cfg):
    settings = dataclasses.asdict(cfg)   # as asked: saved with the checkpoint (train.save_checkpoint)
    cfg.device = resolve_device(cfg.device)
    check_writable("out_dir", cfg.out_dir)
    torch.manual_seed(cfg.seed)
    dense, dense_ckpt = load_dense(cfg.dense, cfg.device)
    data_dir = dense_ckpt.get("train_config", {}).get("data_dir", "")
    if not data.same_data_dir(cfg.data_dir, data_dir):   # "" is the standard library, by path or not
        raise UserError(f"--data_dir={cfg.data_dir!r} differs from the dense model's {data_dir!r}: "
                        "both models must read the same tokens")
    init = None
    if cfg.init_sparse and not cfg.resume:
        init = load_checkpoint(cfg.init_sparse, cfg.device)
        init_dir = init.get("train_config", {}).get("data_dir", "")
        if not data.same_data_dir(init_dir, data_dir):   # another tokenizer: its embeddings mean other tokens
            raise UserError(f"--init_sparse={cfg.init_sparse} was trained on data_dir={init_dir!r}, the dense model "
                            f"on {data_dir!r}: both models must read the same tokens")
    folder = data.data_folder(dense_ckpt, verbose=True)   # the dense model's own tokenizer
    data_record = data.checkpoint_record(folder)          # saved with each checkpoint
    train_tokens, val_tokens = data.load_tokens(folder, "train"), data.load_tokens(folder, "val")
    sparse = GPT(cfg.model_config()).to(cfg.device)
    check_bridgeable(dense.config, sparse.config)
    if init is not None:
        saved = GPTConfig(**init["model_config"])
        diff = [f"{f.name} {getattr(saved, f.name)} (checkpoint) vs {getattr(sparse.config, f.name)} (configured)"
                for f in dataclasses.fields(GPTConfig) if getattr(saved, f.name) != getattr(sparse.config, f.name)]
        if diff:
            raise UserError(f"--init_sparse={cfg.init_sparse} has another shape than the configured sparse model: "
                            + ", ".join(diff))
        sparse.load_state_dict(init["model"])
    bridges = Bridges(bridge_sites(sparse), dense.config.d_model, sparse.config.d_model, cfg.bridge_afrac).to(cfg.device)
    optimizer = make_optimizer(sparse, cfg)
    bridge_opt = torch.optim.AdamW(bridges.parameters(), lr=cfg.bridge_lr, weight_decay=0.0)
    ckpt_path, start, stop = os.path.join(cfg.out_dir, "ckpt.pt"), 0, cfg.stop_iter or cfg.max_iters
    if cfg.resume:   # settings and shapes come from the checkpoint: see config_from_args
        ckpt = load_bridge_checkpoint(ckpt_path, cfg.device)
        check_same_dense(ckpt, dense_ckpt, cfg.dense)
        sparse.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        bridges.load_state_dict(ckpt["bridges"])
        load_optimizer_state(bridge_opt, ckpt["bridge_optimizer"])
        start = ckpt["step"]   # below stop: resumed_config refuses a run with nothing left to do
        print(f"resuming {ckpt_path} at step {start}")
    elif os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: pass --resume=True to continue it, or pick another --out_dir")
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_atomic(os.path.join(cfg.out_dir, "config.json"), json.dumps(settings, indent=1))   # as train.py does
    print(f"dense {cfg.dense}: d_model {dense.config.d_model}; sparse: d_model {sparse.config.d_model}, "
          f"L0 {cfg.l0_frac:g}, AbsTopK {abstopk_setting(sparse.config)}; {len(bridges.sites)} bridge sites")

    tokens_per_step, t0, saved_step = cfg.batch_size * cfg.block_size, time.time(), start
    t_log, steps_since = t0, start   # for the rate since the last progress line
    for step in range(start, stop):
        x, y = (t.to(cfg.device) for t in batch_for(train_tokens, step, 0, cfg))
        terms, lr, frac = train_step(sparse, dense, bridges, optimizer, bridge_opt, x, y, step, cfg)
        done = step + 1
        if done % cfg.log_interval == 0 or done == stop:
            dt, t_log, steps_since = (time.time() - t_log) / (done - steps_since), time.time(), done
            print(f"step {done:5d} | " + " | ".join(f"{k} {v.item():.4f}" for k, v in terms.items()) +
                  f" | lr {lr:.2e} | L0 {frac:.4f} | {tokens_per_step / dt:6.0f} tok/s | {dt * 1000:6.0f} ms/step")
        if done % cfg.eval_interval == 0 or done == stop:
            ev = evaluate_bridges(sparse, dense, bridges, val_tokens, cfg)
            check_finite(ev["sparse_val_loss"], done, ckpt_path, saved_step)
            print_eval(ev)
            save_checkpoint(ckpt_path, sparse, optimizer, None, done, settings,
                            {"bridges": bridges.state_dict(), "bridge_optimizer": bridge_opt.state_dict(),
                             "bridge_sites": bridges.sites, "bridge_afrac": cfg.bridge_afrac, "dense": cfg.dense,
                             "dense_identity": dense_identity(dense_ckpt),
                             "bridge_eval": ev, "val_loss": ev["sparse_val_loss"], **data_record})
            saved_step = done
            t_log, steps_since = time.time(), done   # the next ms/step leaves the evaluation out
    print(f"done: {stop - start} steps in {time.time() - t0:.0f}s; checkpoint {ckpt_path}")
    return ev

# -----------------------------------------------------------------------------
# steering: an edit in the sparse model, carried into the dense one by the decoder

def load_bridged(cfg):
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_bridge_checkpoint(path, cfg.device)
    sparse = model_in(ckpt, path)
    dense_path = cfg.steer_dense or ckpt["dense"]   # the bridge checkpoint holds the dense model's path, not the model
    dense, dense_ckpt = load_dense(dense_path, cfg.device, "--steer_dense")
    check_same_dense(ckpt, dense_ckpt, dense_path)
    bridges = Bridges(ckpt["bridge_sites"], dense.config.d_model, sparse.config.d_model, ckpt["bridge_afrac"])
    bridges.load_state_dict(ckpt["bridges"])
    return sparse.to(cfg.device).eval(), dense, bridges.to(cfg.device), data.data_folder(ckpt)


def means_from_end(model, prompts, site, device):
    """Mean activation at site at each offset j from the prompt's end, (longest prompt, d): prompts
    end where the answer comes, so offsets from the end line their structure up."""
    acts = [model.run_with_cache(torch.tensor([p.ids], device=device), [site])[1][site][0].flip(0) for p in prompts]
    sums, counts = acts[0].new_zeros(max(map(len, acts)), acts[0].size(1)), acts[0].new_zeros(max(map(len, acts)))
    for a in acts:
        sums[:len(a)] += a
        counts[:len(a)] += 1
    return sums / counts[:, None]


@torch.no_grad()
def steer(cfg):
    cfg.device = resolve_device(cfg.device)
    sparse, dense, bridges, folder = load_bridged(cfg)
    if cfg.steer_site not in bridges.sites:
        raise UserError(f"--steer_site={cfg.steer_site} is not a bridge site; allowed: {', '.join(bridges.sites)}")
    enc = data.get_encoding(folder)
    prompts = tasks.make_prompts(cfg.steer_task, enc, cfg.steer_prompts, cfg.seed, "test")
    fit = [p for p in prompts if len(p.ids) <= sparse.config.block_size]   # a short context sees fewer
    if len(fit) < len(prompts):
        print(f"note: {len(prompts) - len(fit)} of {len(prompts)} prompts are longer than the models' "
              f"block_size={sparse.config.block_size}: left out")
    if {p.label for p in fit} != {0, 1}:
        raise UserError(f"no {cfg.steer_task} prompt of one class fits block_size={sparse.config.block_size}: "
                        "steer a bridge trained with a longer --block_size")
    prompts = fit
    source = [p for p in prompts if p.label == 1]          # the class whose values are written in
    runs = [p for p in prompts if p.label == 0]            # the class the edit is run on
    site, d = cfg.steer_site, sparse.config.d_model
    mean_source = means_from_end(sparse, source, site, cfg.device)

    def edited(s, c):
        """s with channel c set to the source class's mean, at each offset from the end."""
        out, m = s.clone(), min(s.size(1), mean_source.size(0))
        out[0, -m:, c] = mean_source[:m, c].flip(0)
        return out

    def sparse_diff(p, c=None):
        """The sparse model's logit difference (correct - other) on p, with channel c edited if given."""
        with sparse.hooks({site: lambda x, name: edited(x, c)} if c is not None else {}):
            logits = sparse(torch.tensor([p.ids], device=cfg.device))[0][:, -1]
        return tasks.logit_diff(logits, *tasks.answer_ids([p], cfg.device)).item()
    unedited = [sparse_diff(p) for p in runs]          # once: every channel's shift is against these

    def sparse_shift(c, n):
        """Mean change of the sparse model's own logit difference on the first n runs under the edit."""
        pairs = list(zip(runs[:n], unedited))
        return sum(sparse_diff(p, c) - base for p, base in pairs) / len(pairs)
    # default: the channel whose edit moves the sparse model's own answer most, on 16 of the prompts
    channel = cfg.steer_channel if cfg.steer_channel >= 0 else min(range(d), key=lambda c: sparse_shift(c, 16))
    if not 0 <= channel < d:
        raise UserError(f"--steer_channel={channel} is outside [0, {d}) for {site}")
    others = [c for c in range(d) if c != channel]
    controls = random.Random(cfg.seed).sample(others, min(cfg.steer_controls, len(others)))

    def edit_delta(p, s, c):
        """Dense-side change: decode(edited s) - decode(s)."""
        return bridges.decode(site, edited(s, c)) - bridges.decode(site, s)

    def probs(logits, p):
        pr = F.softmax(logits[0, -1].float(), -1)
        return pr[p.correct].item(), pr[p.alt].item()

    rows = {"before": [], "edit": [], "control": []}
    for p in runs:
        idx = torch.tensor([p.ids], device=cfg.device)
        _, cache = sparse.run_with_cache(idx, [site])
        s = cache[site]
        rows["before"].append(probs(dense(idx)[0], p))
        delta = edit_delta(p, s, channel)
        with dense.hooks({site: lambda x, name: x + delta}):
            rows["edit"].append(probs(dense(idx)[0], p))
        ctrl = []
        for c in controls:   # a random channel's edit, scaled to the same size as the real one
            dc = edit_delta(p, s, c)
            dc = dc * delta.norm() / dc.norm().clamp_min(1e-12)
            with dense.hooks({site: lambda x, name: x + dc}):
                ctrl.append(probs(dense(idx)[0], p))
        rows["control"].append(tuple(sum(v) / len(v) for v in zip(*ctrl)))
    mean = {k: tuple(sum(v) / len(v) for v in zip(*r)) for k, r in rows.items()}

    def answers(ps, which="correct"):
        """The distinct answer tokens of prompts ps, in order: one, or in tasks like var_swap one a name."""
        return list(dict.fromkeys(repr(enc.decode([getattr(p, which)])) for p in ps))

    def said(ps):
        a = answers(ps)
        return f"answered {a[0]}" if len(a) == 1 else f"answered {len(a)} ways (e.g. {a[0]})"
    print(f"steer {cfg.steer_task}: {len(runs)} test prompts {said(runs)}; sparse channel {site}[{channel}] set to its "
          f"mean over {len(source)} prompts {said(source)}; control: {len(controls)} random channels, edits scaled "
          "to the same size")
    before = sum(unedited) / len(unedited)
    print(f"the edit in the sparse model itself: logit difference (correct - other) {before:+.3f} before, "
          f"{before + sparse_shift(channel, len(runs)):+.3f} edited")
    heads = [f"P({a[0] if len(a) == 1 else name})"            # the token where all runs share it
             for a, name in ((answers(runs), "correct"), (answers(runs, "alt"), "other"))]
    print(f"{'dense model':<22} {heads[0]:>10} {heads[1]:>10}")
    for k in ("before", "edit", "control"):
        print(f"{k:<22} {mean[k][0]:10.4f} {mean[k][1]:10.4f}")
    change = lambda k, i: f"{round(mean[k][i] - mean['before'][i], 4) + 0.0:+.4f}"   # + 0.0: no "-0.0000"
    print(f"edit: P(correct) {change('edit', 0)}, P(other) {change('edit', 1)} | control: P(correct) "
          f"{change('control', 0)}, P(other) {change('control', 1)}")
    return {"site": site, "channel": channel, **mean}


def main(argv):
    cfg = config_from_args(argv)
    settings = dataclasses.asdict(cfg)
    if cfg.steer:   # it reads the rest from the bridge checkpoint: print only what it uses
        settings = {k: v for k, v in settings.items() if used_by_steering(k)}
    print("settings: " + json.dumps(settings))
    if cfg.steer:
        steer(cfg)
    else:
        train_bridges(cfg)           # it prints the last evaluation itself


if __name__ == "__main__":
    run_main(main)
