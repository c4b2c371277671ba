"""
Annealed weight-sparse training (docs/METHOD.md section 2), and dense baselines, nanoGPT style.

    python train.py                                  # GPU preset if CUDA is there, else the CPU preset
    python train.py --preset=cpu45                   # about 35-40 minutes on 2 cores: solves 4 tasks (README)
    python train.py --preset=cpu --l0_frac=1 --afrac=1 --out_dir=out/cpu_dense   # the dense twin
    python train.py --out_dir=out/cpu --resume=True  # continue an interrupted run exactly
    torchrun --standalone --nproc_per_node=2 train.py --preset=cpu --out_dir=out/cpu_ddp   # DDP: gloo on CPU
    python train.py --help                           # every setting; override any with --key=value

Each step: forward/backward, global gradient-RMS normalization, Adam(0.9, 0.95, eps 0.1) with
decoupled weight decay on matrices, then the weight top-k projection at the annealed L0 fraction.
The learning rate follows the "sharkfin": warmup, linear decay, times sqrt(L0_target / L0_now).
"""

import copy
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import tasks
from config import (UserError, atomic_file, check_not_negative, check_out_dir, check_positive, check_seed, check_writable,
                    default_of, parse_args, parse_values, resolve_device, run_main, write_atomic)
from sparse_gpt import ABSTOPK_BY, ALL_SPARSE_SITES, GPT, GPTConfig, load_checkpoint, target_nonzeros


@dataclass
class TrainConfig:
    comments_from = (GPTConfig,)   # --help shows the model settings' comments from there, not written twice
    preset: str = "cpu"            # cpu | cpu45 | gpu: each sets the defaults it names in PRESETS
    out_dir: str = "out/cpu"
    resume: bool = False           # continue from out_dir/ckpt.pt
    data_dir: str = ""             # folder of .py files; empty = this Python's standard library
    seed: int = 1337               # init and batches: a run is reproduced by its seed (on one kind of host)
    # run length and logging
    max_iters: int = 800           # optimizer steps; the schedules are fractions of it
    stop_iter: int = 0             # stop after this step as if interrupted (0 = run to max_iters)
    eval_interval: int = 200       # val loss (and train.py's samples) and a checkpoint every this many steps
    eval_iters: int = 10           # batches per split at each evaluation (the same ones every time)
    log_interval: int = 25         # a progress line every this many steps
    sample_tokens: int = 48        # sampled continuation printed at each evaluation (0 = none)
    eval_task: str = "single_double_quote"  # task loss on its test prompts at each evaluation ("" = none)
    # batch
    batch_size: int = 32           # sequences per micro-batch (per process under DDP)
    block_size: int = 256
    gradient_accumulation_steps: int = 1   # micro-batches per step: tokens/step = this x batch x block x processes
    # model (sparse_gpt.GPTConfig)
    n_layer: int = 4
    d_model: int = 128
    d_head: int = 16
    mlp_ratio: int = 4
    afrac: float = 0.25            # AbsTopK fraction at the 8 sites; 1 = off
    sparse_sites: tuple = ALL_SPARSE_SITES  # where AbsTopK applies (comma-separated on the command line)
    learned_pos: bool = False
    bigram: bool = True
    sparse_biases: bool = True
    min_per_channel: int = 4
    abstopk_by: str = "topk"       # topk | radix (compiled) | triton (a GPU kernel); ties differ: sparse_gpt.GPT
    # weight sparsity and its anneal
    l0_frac: float = 0.125         # target fraction of nonzero weights; 1 = dense
    anneal_start: float = 0.01     # dense until this fraction of training ...
    anneal_end: float = 0.5        # ... then linear in L0 fraction down to l0_frac by this one
    # optimizer
    learning_rate: float = 3e-2    # base LR of the sharkfin (at the target L0)
    warmup_frac: float = 0.01      # linear LR warmup over this fraction of max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 0.1               # large on purpose (authors' code)
    # system
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"         # float32 | bfloat16 | float16 (autocast on CUDA)
    compile: bool = False          # torch.compile the model (the gpu preset sets it; needs a C++ compiler on a CPU)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise UserError(f"--preset={self.preset} is unknown; allowed: {', '.join(PRESETS)}")
        check_out_dir("out_dir", self.out_dir)
        self.data_dir = data.user_dir(self.data_dir)   # saved absolute: a resume from elsewhere reads the same files
        if not 0.0 < self.l0_frac <= 1.0:
            raise UserError(f"--l0_frac={self.l0_frac} is outside (0, 1]")
        if not 0.0 < self.afrac <= 1.0:
            raise UserError(f"--afrac={self.afrac} is outside (0, 1]")
        if not 0.0 <= self.anneal_start <= self.anneal_end <= 1.0:
            raise UserError(f"anneal_start={self.anneal_start}, anneal_end={self.anneal_end}: "
                            "need 0 <= anneal_start <= anneal_end <= 1")
        if self.abstopk_by not in ABSTOPK_BY:
            raise UserError(f"--abstopk_by={self.abstopk_by} is unknown; allowed: {', '.join(ABSTOPK_BY)}")
        if self.abstopk_by == "radix" and not self.compile:
            raise UserError("--abstopk_by=radix (given, the gpu preset's, or saved in a resumed run) is how compiled "
                            "code selects; it needs --compile=True, or pass --abstopk_by=topk")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--dtype={self.dtype} is unknown; allowed: float32, bfloat16, float16")
        check_positive("learning_rate", self.learning_rate)
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"--{key}={getattr(self, key)} is outside [0, 1)")
        check_positive("eps", self.eps)
        check_not_negative("weight_decay", self.weight_decay)
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise UserError(f"--warmup_frac={self.warmup_frac} is outside [0, 1]")
        for key in ("min_per_channel", "sample_tokens"):
            if getattr(self, key) < 0:
                raise UserError(f"--{key}={getattr(self, key)} must not be negative")
        check_seed(self.seed)
        for key in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                    "block_size", "gradient_accumulation_steps"):
            if getattr(self, key) <= 0:
                raise UserError(f"--{key}={getattr(self, key)} must be positive")
        if self.eval_task:
            tasks.get_task(self.eval_task)
        if self.stop_iter < 0 or self.stop_iter > self.max_iters:
            raise UserError(f"--stop_iter={self.stop_iter} is outside [0, max_iters={self.max_iters}]")
        try:
            self.model_config()      # the model's own checks (sizes positive, d_head divides d_model, site names)
        except ValueError as e:
            raise UserError(str(e))
        if self.l0_frac < 1 and self.min_per_channel > self.d_model:   # every d_model-wide row kept whole
            raise UserError(f"--min_per_channel={self.min_per_channel} exceeds d_model={self.d_model}, the width of "
                            f"most weight rows; allowed: 0 to {self.d_model}")

    def model_config(self):
        fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
        return GPTConfig(vocab_size=data.VOCAB_SIZE, **{k: getattr(self, k) for k in fields})


# presets: overrides of the defaults above. The cpu preset is the defaults (a 2-core laptop,
# under 15 minutes); cpu45 is the same model trained 3x longer (about 35-40 minutes), the smallest
# run we found that solves tasks at the pruning target; the gpu preset is a bigger model for one GPU
# (its lr: 1e-2 blew up during the anneal of a 3000-step H200 run, 3e-3 did not; README).
PRESETS = {
    "cpu": {},
    "cpu45": dict(out_dir="out/cpu45", max_iters=2500, eval_interval=500),
    "gpu": dict(out_dir="out/gpu", max_iters=20000, eval_interval=1000, eval_iters=50, log_interval=100,
                batch_size=64, n_layer=8, d_model=512, l0_frac=1 / 32, learning_rate=3e-3,
                dtype="bfloat16", compile=True, abstopk_by="triton"),   # triton: 0.83x the step by radix on an H200
}
MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]   # block_size among them
SCHEDULE_KEYS = ("max_iters", "l0_frac", "anneal_start", "anneal_end", "learning_rate", "warmup_frac")   # l0_at, lr_at

# -----------------------------------------------------------------------------
# schedules (docs/METHOD.md section 2)

def l0_at(step, cfg):
    """Kept fraction of weights at step: 1) dense until anneal_start  2) linear to l0_frac by
    anneal_end  3) hold."""
    t = step / cfg.max_iters
    if t <= cfg.anneal_start:
        return 1.0
    if t >= cfg.anneal_end:
        return cfg.l0_frac
    return 1.0 + (cfg.l0_frac - 1.0) * (t - cfg.anneal_start) / (cfg.anneal_end - cfg.anneal_start)


def lr_at(step, cfg):
    """Sharkfin: base_lr * D(t) * sqrt(L0_target / L0_now), D = linear warmup then linear decay to 0."""
    warmup = max(1, round(cfg.warmup_frac * cfg.max_iters))
    if step < warmup:
        decay = (step + 1) / warmup
    else:
        decay = (cfg.max_iters - step) / max(1, cfg.max_iters - warmup)
    return cfg.learning_rate * decay * math.sqrt(cfg.l0_frac / l0_at(step, cfg))

# -----------------------------------------------------------------------------
# model, optimizer and the step

def check_abstopk_by(cfg):
    """--abstopk_by=triton is a kernel for GPUs (on a CPU it runs only in Triton's interpreter: the tests)."""
    if cfg.abstopk_by != "triton":
        return
    if not (cfg.device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1"):
        raise UserError(f"--abstopk_by=triton (given, the gpu preset's, or saved in a resumed run) is a kernel "
                        f"for CUDA GPUs; on --device={cfg.device} pass --abstopk_by=topk")
    if importlib.util.find_spec("triton") is None:
        raise UserError("--abstopk_by=triton needs the triton package (CUDA builds of torch on Linux install "
                        "it): pip install triton, or pass --abstopk_by=topk --compile=False (compiling for a GPU "
                        "needs triton too)")


def make_model(cfg):
    check_abstopk_by(cfg)
    return GPT(cfg.model_config(), cfg.abstopk_by).to(cfg.device)


def make_optimizer(model, cfg):
    """Adam with decoupled weight decay on matrices only (not the bigram table, biases, gains, sinks)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() == 2 and p is not model.bigram else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def load_optimizer_state(optimizer, state):
    """A checkpoint's Adam moments and step counts under this run's hyperparameters: load_state_dict
    alone would bring back the saved betas, eps and weight decay, and a resume may change them. (How
    Adam runs, e.g. fused, stays as saved: load_state_dict placed the step counts for it.)"""
    asked = [{key: group[key] for key in ("lr", "betas", "eps", "weight_decay")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, hyper in zip(optimizer.param_groups, asked):
        group.update(hyper)


@torch.no_grad()
def normalize_grad_rms(params):
    """Rescale all gradients together so their global RMS (L2 norm / sqrt(#params)) is 1."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    rms = norm / math.sqrt(sum(g.numel() for g in grads))
    torch._foreach_mul_(grads, 1.0 / (rms + 1e-12))
    return rms


def optimizer_step(model, optimizer, step, cfg, scaler=None):
    """Everything after backward: grad-RMS normalization, the Adam step at the sharkfin LR, then
    the weight top-k projection at the annealed L0. model is the raw (unwrapped) GPT."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    normalize_grad_rms(model.parameters())
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    frac = l0_at(step + 1, cfg)   # the fraction the weights must have from here on
    if frac < 1.0:
        model.project_weights(frac)
    return lr, frac


def autocast_for(cfg):
    """Mixed precision on CUDA when dtype asks for it; the CPU always trains in float32."""
    if cfg.device.startswith("cuda") and cfg.dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, cfg.dtype))
    return nullcontext()


def batch_for(tokens, step, micro, cfg, rank=0):
    """The batch of (step, micro-step, rank) depends on nothing else, so a resumed run sees
    exactly the data the uninterrupted one would have."""
    gen = torch.Generator().manual_seed((((cfg.seed * 1_000_003 + step) * 1009 + micro) * 101 + rank) % 2**63)
    return data.get_batch(tokens, cfg.batch_size, cfg.block_size, gen)


@torch.no_grad()
def estimate_loss(model, splits, cfg, autocast):
    """Mean loss over eval_iters fixed batches per split (the same batches at every evaluation)."""
    model.eval()
    out = {}
    for name, tokens in splits.items():
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(tokens, cfg.batch_size, cfg.block_size, gen)
            with autocast:
                losses.append(model(x.to(cfg.device), y.to(cfg.device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def sparsity_report(model, frac):
    """(parameters at exactly their target nonzeros, parameters, fewest nonzeros in any row, the L0
    reached: nonzeros over sparsifiable weights, above frac where rows keep min_per_channel)."""
    exact, params, fewest, nonzeros, numel = 0, 0, None, 0, 0
    for _, p in model.sparse_params():
        target = target_nonzeros(p.shape, frac, model.config.min_per_channel)
        kept = int(torch.count_nonzero(p))
        exact += kept == target
        params, nonzeros, numel = params + 1, nonzeros + kept, numel + p.numel()
        if p.dim() == 2:
            row_min = int((p != 0).sum(1).min())
            fewest = row_min if fewest is None else min(fewest, row_min)
    return exact, params, fewest, nonzeros / numel


def abstopk_setting(config):
    """AbsTopK as a start line names it: its fraction, or off (afrac 1, or no sparse_sites)."""
    return f"{config.afrac:g}" if config.abstopk_widths() else "off"


def is_dense(train_config):
    """A dense model, by its saved settings: no weight sparsity, no AbsTopK (the dense twin)."""
    return train_config.get("l0_frac", 1.0) >= 1.0 and train_config.get("afrac", 1.0) >= 1.0


def check_finite(loss, step, ckpt_path, saved_step):
    """A diverged run stops rather than save a nan model over the last good one. Checked on the
    evaluation's losses, which every DDP rank computes alike (same weights, same batches), so all
    ranks stop together."""
    if not math.isfinite(loss):
        kept = f"{ckpt_path} keeps step {saved_step}" if saved_step else "no checkpoint was written"
        raise UserError(f"training diverged: loss {loss} at step {step} (try a lower --learning_rate); {kept}")


CHECKPOINT_FORMAT = "sparse-circuits/2"   # /1 saved the device resolved, not as asked


def save_checkpoint(path, model, optimizer, scaler, step, settings, extra):
    """Atomic: write a temp file, then rename over the old checkpoint. settings: the run's, as asked
    (device "auto", not the device it resolved to here), so a resume chooses as the run did."""
    ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "train_config": settings, "model_config": dataclasses.asdict(model.config), **extra}
    with atomic_file(path, "wb") as f:
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:   # Ctrl-C inside torch.save comes out as its zip writer's error
            if isinstance(e.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise

# -----------------------------------------------------------------------------
# configuration from the command line

def preset_asked(argv):
    """The --preset given, the last if several (parse_args keeps the last of a repeated key)."""
    return next((a.split("=", 1)[1] for a in reversed(argv) if a.startswith("--preset=")), None)


def resumed_config(cls, argv, saved, fixed_keys, ckpt_path):
    """The checkpoint's saved settings as the base, then --key=value; fixed_keys (what shapes the
    loaded tensors) may not change, and some step must be left to run."""
    settings = saved["train_config"]
    if saved.get("format") != CHECKPOINT_FORMAT:   # an older one: its device was resolved, auto is likelier
        settings = {**settings, "device": "auto"}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise UserError(f"{ckpt_path} was saved with settings this {cls.__name__} lacks ({', '.join(unknown)}): "
                        "it is from another version of this code")
    base = {**{name: default_of(f) for name, f in fields.items()}, **settings, "resume": True, "stop_iter": 0}
    values = parse_values(cls, argv, base)
    try:   # checked with --key=value applied, so that an argument can mend a saved value this code refuses
        cfg = parse_args(cls, [], base=values)
    except UserError as e:
        raise UserError(f"{e} (resuming {ckpt_path}: its saved settings, with --key=value applied)")
    if not any(a.startswith("--device=") for a in argv):
        try:
            resolve_device(cfg.device)
        except UserError as e:   # the saved device, which this machine may lack
            raise UserError(f"{e} ({ckpt_path} was run with --device={cfg.device}; --device=auto picks this machine's)")
    changed = [k for k in fixed_keys if getattr(cfg, k) != base[k]]
    if changed:
        raise UserError(f"--resume cannot change the model or bridge shape ({', '.join(changed)}) of {ckpt_path}")
    if saved["step"] >= (cfg.stop_iter or cfg.max_iters):
        limit = (f"--stop_iter={cfg.stop_iter}" if cfg.stop_iter else f"max_iters={cfg.max_iters} (raise it to "
                 "train on; the L0 anneal and the learning rate then follow the new length)")
        raise UserError(f"{ckpt_path} is already at step {saved['step']}; nothing to do up to {limit}")
    return cfg


def config_from_args(argv):
    """Defaults -> preset (cpu, or gpu when CUDA is there) -> --key=value. With --resume=True the
    checkpoint's saved settings are the base instead, and the model shape may not change."""
    preset = preset_asked(argv) or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise UserError(f"--preset={preset} is unknown; allowed: {', '.join(PRESETS)}")
    base = TrainConfig(preset=preset, **PRESETS[preset])
    asked = parse_values(TrainConfig, argv, base)   # checked together below: a resumed run's on its saved settings
    ckpt_path = os.path.join(asked["out_dir"], "ckpt.pt")
    if not asked["resume"]:
        cfg = parse_args(TrainConfig, argv, base)
        if os.path.exists(ckpt_path):
            raise UserError(f"{ckpt_path} exists: pass --resume=True to continue it, or pick another --out_dir")
        return cfg
    saved = load_checkpoint(ckpt_path)
    if "train_config" not in saved or "dense" in saved["train_config"]:
        raise UserError(f"{ckpt_path} is not a train.py checkpoint" + (" (bridge.py's: resume it with "
                        "bridge.py --resume=True)" if "train_config" in saved else " (no train_config)"))
    if preset_asked(argv) not in (None, saved["train_config"].get("preset")):
        raise UserError(f"--preset={preset_asked(argv)}: {ckpt_path} is a {saved['train_config'].get('preset')} run, "
                        "and a resumed run keeps its saved settings (choose the run by --out_dir)")
    cfg = resumed_config(TrainConfig, argv, saved, MODEL_KEYS, ckpt_path)
    if not data.same_data_dir(cfg.data_dir, saved["train_config"]["data_dir"]):
        raise UserError(f"--data_dir={cfg.data_dir} differs from the one {ckpt_path} trained on "
                        f"({saved['train_config']['data_dir'] or 'the standard library'}), whose tokenizer "
                        "the model's embeddings are in; start a new run in another --out_dir")
    return cfg


def ranks_agree(model, world):
    """Whether every DDP rank holds the same weights: gather them all and compare."""
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# -----------------------------------------------------------------------------
# the run

def train(cfg):
    """Train (or resume) per cfg; returns [(step, train loss)] of the steps this call ran."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    settings = dataclasses.asdict(cfg)   # as asked: saved with the checkpoint
    cfg.device = resolve_device(cfg.device)
    check_abstopk_by(cfg)             # before the data is built, not after
    check_writable("out_dir", cfg.out_dir)
    rank, world = 0, 1
    if ddp:
        gpus, per_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if cfg.device.startswith("cuda") and per_node > gpus:   # else a rank asks for a GPU that is not there
            raise UserError(f"torchrun --nproc_per_node={per_node} on a machine with {gpus} visible GPU(s): one "
                            f"process per GPU, so --nproc_per_node={gpus} at most, or --device=cpu")
        dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)

    start, ckpt_path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, cfg.device) if cfg.resume else None
    folder = (data.data_folder(ckpt, cfg.data_dir, verbose=master) if ckpt   # the tokenizer it trained with
              else data.prepare(data.DataConfig(data_dir=cfg.data_dir), verbose=master))
    enc, data_record = data.get_encoding(folder), data.checkpoint_record(folder)   # the record: in every checkpoint
    train_tokens, val_tokens = data.load_tokens(folder, "train"), data.load_tokens(folder, "val")
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < cfg.block_size + 2:   # get_batch draws windows of block_size + 1 tokens
            raise UserError(f"the {split} split of {cfg.data_dir or data.default_data_dir()} has {len(tokens)} tokens, "
                            f"too few for --block_size={cfg.block_size} (needs {cfg.block_size + 2}): give a folder "
                            "with more .py files" + (" or a smaller --block_size" if len(tokens) >= 3 else ""))
    try:
        prompts = tasks.make_prompts(cfg.eval_task, enc, 128, seed=0, split="test") if cfg.eval_task else []
    except UserError as e:   # e.g. a corpus of its own whose tokenizer splits the task's answer
        raise UserError(f"{e}; pass --eval_task= to train without a task loss, or another task")
    task_prompts = [p for p in prompts if len(p.ids) <= cfg.block_size]   # a short context sees fewer
    if prompts and not task_prompts:
        raise UserError(f"--block_size={cfg.block_size} is shorter than every {cfg.eval_task} test prompt (the "
                        f"shortest has {min(len(p.ids) for p in prompts)} tokens); pass --eval_task= for no task "
                        "loss, or a larger --block_size")
    if len(task_prompts) < len(prompts):   # its loss is then on the rest: not comparable with a longer context's
        log(f"note: {len(prompts) - len(task_prompts)} of the {len(prompts)} {cfg.eval_task} test prompts are longer "
            f"than --block_size={cfg.block_size}: the task loss leaves them out")

    model = make_model(cfg)
    optimizer = make_optimizer(model, cfg)
    use_scaler = cfg.dtype == "float16" and cfg.device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    if cfg.resume:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
        log(f"resuming {ckpt_path} at step {start}")
        saved, was = ckpt["train_config"], copy.copy(cfg)   # was: the schedules as the run had them
        changed = [key for key in SCHEDULE_KEYS if saved.get(key, getattr(cfg, key)) != getattr(cfg, key)]
        for key in changed:   # set, not dataclasses.replace: that would check the mix of old and new anew
            setattr(was, key, saved[key])
        if changed:
            log(f"note: {', '.join(f'--{k}={getattr(cfg, k)}' for k in changed)} changed on resume: the L0 anneal and "
                f"learning rate follow the new values (at step {start}: L0 {l0_at(start, cfg):.4f}, lr "
                f"{lr_at(start, cfg):.2e}, where the run was at L0 {l0_at(start, was):.4f}, lr "
                f"{lr_at(start, was):.2e}); not its continuation")
    elif master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    if master:
        write_atomic(os.path.join(cfg.out_dir, "config.json"), json.dumps(settings, indent=1))
    n_sparse = sum(p.numel() for _, p in model.sparse_params())
    log(f"model: {model.num_params():,} parameters, {n_sparse:,} sparsifiable; target L0 {cfg.l0_frac:g}, "
        f"AbsTopK {abstopk_setting(model.config)}; {world} process(es) on {cfg.device}")
    if cfg.dtype != "float32" and not cfg.device.startswith("cuda"):
        log(f"note: --dtype={cfg.dtype} is autocast on CUDA only; on {cfg.device} this run computes in float32")
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world
    passes = tokens_per_step * cfg.max_iters / len(train_tokens)
    if passes > 50:   # above the gpu preset's ~30 passes over our stdlib, far below a small folder's hundreds
        log(f"note: {cfg.max_iters} steps of {tokens_per_step:,} tokens read the train split ({len(train_tokens):,} "
            f"tokens) {passes:.0f} times over: a model learns such a small corpus by heart; give a folder with "
            "more .py files, or fewer --max_iters")

    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if cfg.device.startswith("cuda") else None)
    autocast = autocast_for(cfg)
    stop = cfg.stop_iter or cfg.max_iters
    history, t0, saved_step = [], time.time(), start
    t_log, steps_since = t0, start   # for the rate since the last progress line

    for step in range(start, stop):
        # one step: accumulate gradients over micro-batches (DDP syncs on the last one only)
        loss_sum = torch.zeros((), device=cfg.device)   # a tensor: no host-device sync inside the step
        for micro in range(cfg.gradient_accumulation_steps):
            x, y = batch_for(train_tokens, step, micro, cfg, rank)
            x, y = x.to(cfg.device), y.to(cfg.device)
            last = micro == cfg.gradient_accumulation_steps - 1
            with (model.no_sync() if ddp and not last else nullcontext()), autocast:
                _, loss = model(x, y)
                loss = loss / cfg.gradient_accumulation_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += loss.detach().float()
        lr, frac = optimizer_step(raw, optimizer, step, cfg, scaler)
        history.append((step, loss_sum))

        done = step + 1
        if done % cfg.log_interval == 0 or done == stop:
            dt, t_log, steps_since = (time.time() - t_log) / (done - steps_since), time.time(), done
            logged = loss_sum.clone()
            if ddp:   # the step's loss over every rank's batch, not rank 0's alone
                dist.all_reduce(logged)
                logged /= world
            log(f"step {done:5d} | loss {logged.item():.4f} | lr {lr:.2e} | L0 {frac:.4f} | "
                f"{tokens_per_step / dt:7.0f} tok/s | {dt * 1000:6.1f} ms/step")
        if done % cfg.eval_interval == 0 or done == stop:
            losses = estimate_loss(raw, {"train": train_tokens, "val": val_tokens}, cfg, autocast)
            check_finite(losses["train"] + losses["val"], done, ckpt_path, saved_step)   # the same on every DDP rank
            line = f"eval {done}: train {losses['train']:.4f} | val {losses['val']:.4f}"
            if task_prompts:   # the behaviour pruning needs, watched as it is learned
                losses["task"], losses["task_acc"] = tasks.evaluate(raw, task_prompts, cfg.device)
                line += f" | {cfg.eval_task} {losses['task']:.3f} (acc {losses['task_acc']:.2f}, {len(task_prompts)} prompts)"
            log(line)
            if master and cfg.sample_tokens:
                prompt = torch.tensor([enc.encode("def ")], device=cfg.device)
                torch.manual_seed(cfg.seed + done)
                sample = raw.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=50)
                log("sample: " + repr(enc.decode(sample[0].tolist()))[:400])
            if master:
                save_checkpoint(ckpt_path, raw, optimizer, scaler, done, settings,
                                {"val_loss": losses["val"], "task_loss": losses.get("task"), **data_record})
            saved_step = done
            t_log, steps_since = time.time(), done   # the next ms/step leaves the evaluation out
    if ddp:
        log(f"ddp: weights {'identical' if ranks_agree(raw, world) else 'DIFFER'} on all {world} ranks")
    if master:
        frac = l0_at(stop, cfg)
        exact, params, fewest, reached = sparsity_report(raw, frac)
        more = "" if f"{reached:.4f}" == f"{frac:.4f}" else f", {frac:.4f} asked"   # e.g. min_per_channel keeps more
        if reached == 1:
            log("sparsity: none (L0 1: dense weights)")
        else:
            log(f"sparsity: {exact}/{params} sparse parameters at exactly their target nonzeros (L0 {reached:.4f}"
                f"{more}); fewest nonzeros in a row: {fewest} (min {cfg.min_per_channel})")
        log(f"done: {len(history)} steps in {time.time() - t0:.0f}s; checkpoint {ckpt_path}")
    if ddp:
        dist.destroy_process_group()
    losses = torch.stack([loss for _, loss in history]).tolist() if history else []   # one sync, at the end
    return [(step, loss) for (step, _), loss in zip(history, losses)]


def main(argv):
    cfg = config_from_args(argv)
    why = ("asked for" if preset_asked(argv) else "the checkpoint's" if cfg.resume
           else "CUDA found" if cfg.preset == "gpu" else "no CUDA")
    master = int(os.environ.get("RANK", "0")) == 0   # under torchrun: rank 0 speaks for every process
    if master:
        print(f"preset {cfg.preset} ({why})\nsettings: " + json.dumps(dataclasses.asdict(cfg)))
    try:
        train(cfg)
    except KeyboardInterrupt:   # Ctrl-C: say what is on disk and how to go on, not a traceback
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if master:
            saved = (f"{path} holds step {load_checkpoint(path)['step']}: continue with --out_dir={cfg.out_dir} "
                     "--resume=True" if os.path.exists(path) else f"no checkpoint yet (one every --eval_interval="
                     f"{cfg.eval_interval} steps)")
            print(f"interrupted; {saved}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(main)
