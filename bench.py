"""
Speed and memory of weight-sparse training against dense training of the same shape, measured in
one run on whatever device is here, for the CPU and GPU preset shapes.

    python bench.py                          # both shapes; out/bench/<device>.json
    python bench.py --shapes=cpu --steps=20 --rounds=20   # one shape, more timed steps, more turns
    python bench.py --prune_ckpt=out/cpu45/ckpt.pt   # also time prune.py on one task of that model
    python bench.py --help                   # every setting

What it measures, per shape (random tokens: speed does not depend on the text):
- ms/step, tokens/s and peak memory of a training step (forward, backward, grad-RMS normalization,
  Adam, top-k projection) for four variants, each in its own process so peak memory is its own:
  dense (l0_frac=1, afrac=1), sparse (the preset), sparse without AbsTopK (afrac=1), and sparse with
  AbsTopK's selection skipped (a fixed random mask of k per row at each site: what AbsTopK costs
  apart from choosing); on a CPU also sparse under glibc's default allocator, for what keeping
  freed memory buys (every script does, config.keep_freed_memory). The step is taken at an L0 past
  the anneal, as for most of a run. The variants take turns, a share of the steps each in every
  round, and each ratio is the median over rounds of the ratio within a round: a shared host's
  speed drifts between minutes by tens of percent. The variants' processes live together: a run
  holds the sum of their peak memory.
- the share of a sparse step spent in the weight top-k projection (timed alone), in AbsTopK (sparse
  step minus the same step without AbsTopK) and in its selection (minus the step with fixed masks),
  and our projection against a naive reference that sorts every matrix fully. AbsTopK's forward is
  also timed alone on the sites' shapes as the preset selects in eager calls (our Triton kernel, as
  in its compiled step, with the GPU preset on a GPU; numpy's partition on a CPU), against topk on
  |x| and a scatter.
- MFU: model FLOPs per token (6 N + 12 L d T, N = matmul weights) times tokens/s, over the peak
  matmul rate measured here in the dtype the shape trains in (fp32 on a CPU): in every round, after
  the variants' turns, and each round's steps against that round's peak (the median over rounds).
  The sparse model runs the same dense matmuls, so its FLOPs are counted as dense.
- forward time with no hook against recording one site, in turns too; the time to prune one task (if
  given a checkpoint that solves it; timed first, so a model that does not solve it ends the run at
  once).
- where the preset compiles (the GPU preset on a GPU; --cpu_compile=True): dense and sparse eager
  too, for what torch.compile buys, and sparse with AbsTopK another way (the GPU preset selects by our
  Triton kernel, abstopk_by=triton; the variant sparse_radix by the radix select compile fuses).
"""

import dataclasses
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from statistics import median

try:
    import resource             # POSIX only: peak memory where /proc is not there (macOS)
except ImportError:
    resource = None             # Windows: peak memory is not measured (nan)

import torch

from config import (UserError, check_out_dir, check_writable, keep_freed_memory, parse_args, resolve_device, run_main,
                    write_atomic)
from sparse_gpt import GPT, abstopk_function, target_nonzeros
from tasks import get_task
from train import PRESETS, TrainConfig, autocast_for, l0_at, make_model, make_optimizer, optimizer_step


@dataclass
class BenchConfig:
    shapes: str = "cpu,gpu"          # presets whose shapes to measure (comma-separated)
    steps: int = 10                  # timed training steps per variant, after the warmup
    rounds: int = 10                 # the variants take turns: a round times each one's share of the steps,
                                     # after one untimed step (so 10 steps in 10 rounds run 20)
    warmup: int = 2                  # untimed steps first (torch.compile compiles here on GPU)
    cpu_batch_gpu_shape: int = 4     # the gpu preset's batch of 64 takes minutes per step on a CPU
    cpu_compile: bool = False        # torch.compile on a CPU too (inductor builds C++ kernels: needs a compiler)
    prune_ckpt: str = ""             # a checkpoint solving prune_task: time prune.py on it ("" = skip)
    prune_task: str = "single_double_quote"
    out_dir: str = "out/bench"
    device: str = "auto"             # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        shapes = self.shapes.split(",")
        for shape in shapes:
            if shape not in PRESETS:
                raise UserError(f"--shapes={self.shapes}: {shape!r} is unknown; allowed: {', '.join(PRESETS)}")
        if len(set(shapes)) < len(shapes):
            raise UserError(f"--shapes={self.shapes} names a shape twice: give each once")
        get_task(self.prune_task)   # its name first: a misspelled task needs more than a checkpoint
        if self.prune_task != BenchConfig.prune_task and not self.prune_ckpt:
            raise UserError(f"--prune_task={self.prune_task} needs --prune_ckpt=<a checkpoint that solves it>")
        if self.steps <= 0 or self.rounds <= 0 or self.warmup < 0:
            raise UserError(f"--steps={self.steps}, --rounds={self.rounds}, --warmup={self.warmup}: "
                            "need steps > 0, rounds > 0 and warmup >= 0")
        if self.cpu_batch_gpu_shape < 1:
            raise UserError(f"--cpu_batch_gpu_shape={self.cpu_batch_gpu_shape} must be positive")
        check_out_dir("out_dir", self.out_dir)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def seconds_per_call(fn, n, device):
    fn()                              # untimed: on a GPU the first call loads kernels and allocates workspaces
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n

# -----------------------------------------------------------------------------
# the pieces measured

def variant(shape, device, batch_size, cpu_compile=False, **overrides):
    """The TrainConfig of a preset shape, with overrides (l0_frac, afrac)."""
    cfg = TrainConfig(preset=shape, **{**PRESETS[shape], "device": device, "batch_size": batch_size})
    compile = cfg.compile if device.startswith("cuda") else cpu_compile   # the GPU preset compiles
    by = cfg.abstopk_by if compile else "topk"
    if by == "triton" and not device.startswith("cuda"):   # the GPU preset compiled on a CPU: the kernel is a GPU's
        by = "radix"
    return dataclasses.replace(cfg, compile=compile, abstopk_by=by, **overrides)


def training_worker(conn, cfg, warmup, keep_memory=True, fixed_masks=False):
    """In its own process, so that its peak memory is its own: when the parent says "build", build
    cfg's training step and warm it up, then time as many steps as the parent asks, each time it asks,
    until it asks for 0; then send peak memory and the projection timed alone. keep_memory: the
    allocator setting every script runs with (config.keep_freed_memory); False is glibc's default.
    fixed_masks: cfg's step with AbsTopK's selection skipped (fixed_mask_hooks)."""
    if keep_memory:
        keep_freed_memory()
    conn.recv()                       # "build": one worker at a time, so a compile tunes on an idle device
    torch.manual_seed(0)
    model = raw = make_model(dataclasses.replace(cfg, afrac=1.0) if fixed_masks else cfg)
    hooks = fixed_mask_hooks(raw, cfg) if fixed_masks else {}   # in AbsTopK's place, at its sites
    optimizer = make_optimizer(raw, cfg)
    if cfg.compile:
        model = torch.compile(model)
    autocast = autocast_for(cfg)
    x, y = torch.randint(cfg.model_config().vocab_size, (2, cfg.batch_size, cfg.block_size), device=cfg.device)
    step = cfg.max_iters - 1          # past the anneal: the L0 of most of a run (lr is irrelevant here)

    def train_step():                 # train.py's step, one micro-batch, one process
        with autocast, raw.hooks(hooks):
            _, loss = model(x, y)
        loss.backward()
        optimizer_step(raw, optimizer, step, cfg)

    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(cfg.device)
    for _ in range(warmup):
        train_step()
    conn.send("ready")
    timed = 0
    while steps := conn.recv():
        conn.send(seconds_per_call(train_step, steps, cfg.device))
        timed += steps
    peak = torch.cuda.max_memory_allocated(cfg.device) if cfg.device.startswith("cuda") else peak_rss()   # training's
    frac = l0_at(step + 1, cfg)
    proj = 0.0
    if frac < 1:                      # one more step, unprojected: the weights the projection gets in a step
        with autocast, raw.hooks(hooks):
            model(x, y)[1].backward()
        optimizer_step(raw, optimizer, step, dataclasses.replace(cfg, l0_frac=1.0))
        proj = projection_seconds(raw, lambda: raw.project_weights(frac), timed, cfg.device)
    conn.send({"projection_ms": proj * 1e3, "peak_mem_mb": peak / 2**20})


def fixed_mask_hooks(model, cfg):
    """AbsTopK's cost apart from choosing, for a model built without AbsTopK: hooks at the sites where
    cfg's AbsTopK selects that keep k random places per row, drawn once, in the form AbsTopK takes on
    this device (x times a float mask on a CPU, as abstopk; a bool mask on a GPU, as our kernel). The
    step still pays the output, the mask kept for the backward and the masked gradient; it skips the
    selection, the making of each step's mask included."""
    c = cfg.model_config()
    widths = dict(zip(c.sparse_sites, c.abstopk_widths()))   # none when afrac = 1
    # a generator of its own: the global random stream, and so the worker's tokens, stay the sparse variant's
    generator = torch.Generator(cfg.device).manual_seed(0)
    masks = {}
    for name, site in model.sites.items():
        if site.kind in widths:
            shape = (cfg.batch_size, cfg.block_size, widths[site.kind])
            noise = torch.rand(shape, generator=generator, device=cfg.device)
            keep = noise.topk(int(c.afrac * widths[site.kind]), dim=-1).indices      # k, as Site has it
            masks[name] = torch.zeros_like(noise, dtype=torch.bool).scatter_(-1, keep, True)
            if cfg.device == "cpu":   # the CPU trains in fp32 (autocast_for)
                masks[name] = masks[name].float()

    def keep_fixed_places(x, name):
        mask = masks[name]
        return torch.where(mask, x, 0) if mask.dtype == torch.bool else x * mask
    return dict.fromkeys(masks, keep_fixed_places)


def peak_rss():
    """This process's peak resident memory in bytes. Linux's VmHWM starts afresh in a spawned process;
    ru_maxrss (the fallback elsewhere) can carry the parent's peak over; it counts kilobytes, on macOS bytes."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        if resource is None:
            return float("nan")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def time_in_turns(variants, steps, rounds, warmup, each_round):
    """{name: (TrainConfig, training_worker's keyword options)} -> ({name: ms/step of each round,
    tokens/s, projection_ms, peak_mem_mb}, [each_round() of each round]). Each variant is built and warmed up once, in its own
    process (spawned, so CUDA works); then, round after round, each times its share of the steps in
    turn while the rest wait, and then this process runs each_round (bench_shape: the matmul peak).
    A shared machine speeds up and slows down by tens of percent within minutes: taken in turns, that
    moves every variant of a round alike, and a ratio is taken within each round."""
    context, workers = multiprocessing.get_context("spawn"), {}   # rounds <= steps (bench.py's main sees to it)
    shares = [steps // rounds + (r < steps % rounds) for r in range(rounds)]   # 10 in 4: 3, 3, 2, 2
    try:
        for name, (cfg, options) in variants.items():
            conn, child_conn = context.Pipe()
            process = context.Process(target=training_worker, args=(child_conn, cfg, warmup), kwargs=options)
            process.start()
            child_conn.close()        # ours closed: a worker that dies ends its pipe (EOFError below)
            workers[name] = process, conn
        for name in workers:          # started together (their imports overlap), built and warmed up in turn
            ask(name, *workers[name], "build")
        ms, measured = {name: [] for name in variants}, []
        for r, share in enumerate(shares):
            for name in list(workers)[::1 if r % 2 == 0 else -1]:   # every other round the other way round
                ms[name].append(ask(name, *workers[name], share) * 1e3)
            measured.append(each_round())
        runs = {}
        for name, (process, conn) in workers.items():
            cfg, ms_per_step = variants[name][0], median(ms[name])
            runs[name] = {"ms_per_step": ms_per_step, "ms_per_round": ms[name],
                          "tokens_per_s": cfg.batch_size * cfg.block_size / ms_per_step * 1e3,
                          **ask(name, process, conn, 0)}
            process.join()
        return runs, measured
    finally:
        for process, _ in workers.values():
            process.kill()            # a no-op for those that have exited; the rest, on an error here
            process.join()


def ask(name, process, conn, message=None):
    """Send a worker message (if any) and return its answer; if it has died, say which and how."""
    try:
        if message is not None:
            conn.send(message)
        return conn.recv()
    except (EOFError, OSError):       # its end of the pipe closed (OSError: BrokenPipeError and kin)
        process.join(10)
        raise RuntimeError(f"bench.py's process timing {name} stopped with exit code {process.exitcode} "
                           "(a Python error is printed above; a negative code is a signal, -9 a kill, "
                           "e.g. for want of memory)") from None


@torch.no_grad()
def projection_seconds(model, project, reps, device):
    """Seconds per call of project() on the sparse parameters as they are now, put back before each
    call (as Adam leaves them in a step: not yet projected; the time to put them back is taken off)."""
    params = [p for _, p in model.sparse_params()]
    before = [p.detach().clone() for p in params]
    put_back = lambda: torch._foreach_copy_(params, before)
    seconds = seconds_per_call(lambda: (put_back(), project()), reps, device) - seconds_per_call(put_back, reps, device)
    put_back()                        # the weights as they came: the next timing starts from them too
    return seconds


@torch.no_grad()
def naive_project(model, frac):
    """Reference projection: sort every parameter fully, O(n log n), keep the top k with each row's
    top min_per_channel first (found by topk, as ours does; ties in the sort: the first index, as ours
    on a CPU; on CUDA ours keeps the same count, ties as topk picks). Same result, the slow way."""
    m = model.config.min_per_channel
    for _, p in model.sparse_params():
        k = target_nonzeros(p.shape, frac, m)
        if k >= p.numel():
            continue
        score = p.abs().float()
        if p.dim() == 2:
            score.scatter_(1, score.topk(min(m, p.shape[1]), dim=1).indices, float("inf"))
        keep = torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
        keep[score.flatten().argsort(descending=True, stable=True)[:k]] = 1
        p.mul_(keep.view_as(p))


def flops_per_token(model, block_size):
    """6 N + 12 L d T [PaLM, appendix B]: N = matmul weights (blocks and unembedding; the embedding
    and bigram tables are lookups), plus attention scores and the weighted sum, forward and backward."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and name.startswith(("blocks", "lm_head")))
    c = model.config
    return 6 * n + 12 * c.n_layer * c.d_model * block_size


def matmul_peak(device, dtype):
    """FLOP/s of a large square matmul in the dtype a shape trains in (fp32 on a CPU)."""
    n, dtype = (2048 if device == "cpu" else 8192), getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = max(3, int(0.5 / seconds_per_call(lambda: a @ b, 1, device)))    # about half a second
    flops = 2 * n ** 3 / seconds_per_call(lambda: a @ b, reps, device)
    del a, b
    if device.startswith("cuda"):
        torch.cuda.empty_cache()      # timed between the steps' turns: hand the memory back to the variants
    return flops


@torch.no_grad()
def hook_overhead(cfg, reps, rounds):
    """Forward ms with no hook, and with one site recorded (the mechanism pruning and bridges use):
    the medians over rounds that time both in turns, as the training steps are."""
    model = GPT(cfg.model_config()).to(cfg.device).eval()
    x = torch.randint(model.config.vocab_size, (cfg.batch_size, cfg.block_size), device=cfg.device)
    forwards = {"plain": lambda: model(x), "recorded": lambda: model.run_with_cache(x, ["1.mlp.post_act"])}
    ms = {name: [] for name in forwards}
    with autocast_for(cfg):
        for r in range(rounds):
            for name in list(forwards)[::1 if r % 2 == 0 else -1]:
                ms[name].append(seconds_per_call(forwards[name], reps // rounds, cfg.device) * 1e3)
    return median(ms["plain"]), median(ms["recorded"])


def other_abstopk(cfg):
    """AbsTopK's other way in a compiled step, timed for comparison: our kernel against the radix select
    inductor fuses, and that against topk."""
    return {"triton": "radix", "radix": "topk", "topk": "radix"}[cfg.abstopk_by]


def abstopk_alone_ms(cfg, reps):
    """ms per step in AbsTopK's forward alone at every sparse site, as cfg's sites select in eager
    calls (abstopk_by radix: by topk), and the plain way: topk on |x|, then a scatter into zeros.
    (ours, plain)"""
    c, rows = cfg.model_config(), cfg.batch_size * cfg.block_size
    low = getattr(torch, cfg.dtype) if cfg.device.startswith("cuda") else torch.float32   # autocast's dtype
    # what each site sees: a matmul's or GELU's output in autocast's dtype, RMSNorm's (the *_in sites) in fp32
    shapes = Counter((width, torch.float32 if kind.endswith("_in") else low)
                     for kind, width in zip(c.sparse_sites, c.abstopk_widths()))

    def plain_abstopk(x, k):
        idx = x.abs().topk(k, dim=-1, sorted=False).indices
        return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))

    select, ours, plain = abstopk_function(cfg.abstopk_by), 0.0, 0.0
    for (width, dtype), per_layer in shapes.items():
        sites, k = c.n_layer * per_layer, int(c.afrac * width)
        x = torch.randn(rows, width, device=cfg.device, dtype=dtype)
        ours += sites * seconds_per_call(lambda: select(x, k), reps, cfg.device)
        plain += sites * seconds_per_call(lambda: plain_abstopk(x, k), reps, cfg.device)
    return ours * 1e3, plain * 1e3


def prune_time(ckpt, task, device, out_dir):
    """Seconds for prune.py's whole pipeline on one task (masks, bisection, checks; the pretraining
    means too on the first run, then they come from prune.py's cache under out_dir)."""
    import prune   # prune imports tasks and data: only needed here
    t0 = time.perf_counter()
    prune.main([f"--ckpt={ckpt}", f"--task={task}", f"--device={device}", f"--out_dir={os.path.join(out_dir, 'circuits')}"])
    seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.empty_cache()   # run first: hand its memory back before the training steps are timed
    return seconds

# -----------------------------------------------------------------------------

def bench_shape(shape, bc, device):
    batch = PRESETS[shape].get("batch_size", TrainConfig.batch_size)
    if device == "cpu" and shape != "cpu":
        batch = bc.cpu_batch_gpu_shape
    sparse = variant(shape, device, batch, bc.cpu_compile)
    dense = variant(shape, device, batch, bc.cpu_compile, l0_frac=1.0, afrac=1.0)
    no_abstopk = variant(shape, device, batch, bc.cpu_compile, afrac=1.0)
    variants = [("dense", dense), ("sparse", sparse), ("sparse_no_abstopk", no_abstopk), ("sparse_fixed_masks", sparse)]
    if sparse.compile:                # the GPU preset compiles: what that buys against eager, and AbsTopK fused
        eager_by = "topk" if sparse.abstopk_by == "radix" else sparse.abstopk_by   # radix is compiled code's
        variants += [(name + "_eager", dataclasses.replace(cfg, compile=False, abstopk_by=eager_by))
                     for name, cfg in variants[:2]]
        other = other_abstopk(sparse)
        variants.append((f"sparse_{other}", dataclasses.replace(sparse, abstopk_by=other)))
    if device == "cpu" and keep_freed_memory():   # what it buys (CPU tensors only; 0 where it does nothing)
        variants.append(("sparse_glibc_malloc", sparse))
    dtype = sparse.dtype if device.startswith("cuda") else "float32"   # MFU against the peak of what it trains in
    # variants of the sparse config told apart by how their process runs it
    options = {"sparse_glibc_malloc": {"keep_memory": False}, "sparse_fixed_masks": {"fixed_masks": True}}
    runs, peaks = time_in_turns({name: (cfg, options.get(name, {})) for name, cfg in variants},
                                bc.steps, bc.rounds, bc.warmup, lambda: matmul_peak(device, dtype))
    for name, r in runs.items():
        print(f"  {shape} {name:<18} {r['ms_per_step']:9.1f} ms/step {r['tokens_per_s']:9.0f} tok/s "
              f"{r['peak_mem_mb']:8.0f} MB   rounds: {' '.join(f'{ms:.0f}' for ms in r['ms_per_round'])}")
    print(f"  matmul peak {median(peaks) / 1e9:.0f} GFLOP/s ({dtype}; by round: "
          f"{' '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    model = GPT(sparse.model_config()).to(device)
    fpt = flops_per_token(model, sparse.block_size)
    flops_per_step = fpt * batch * sparse.block_size
    for r in runs.values():   # each round's steps against the peak measured in that round, as the ratios are
        r["mfu"] = median(flops_per_step / (ms / 1e3) / peak for ms, peak in zip(r["ms_per_round"], peaks))
    frac = l0_at(sparse.max_iters, sparse)
    ours = projection_seconds(model, lambda: model.project_weights(frac), bc.steps, device)   # on dense weights
    naive = projection_seconds(model, lambda: naive_project(model, frac), bc.steps, device)
    plain_ms, recorded_ms = hook_overhead(sparse, bc.steps, bc.rounds)
    abstopk_ms, abstopk_plain_ms = abstopk_alone_ms(sparse, bc.steps)
    # a ratio of two variants is the median over rounds of their ratio within a round (None: one is absent)
    per_round = lambda a, b: [x / y for x, y in zip(runs[a]["ms_per_round"], runs[b]["ms_per_round"])]
    ratio = lambda a, b: median(per_round(a, b)) if a in runs and b in runs else None
    s = runs["sparse"]["ms_per_step"]
    return {"batch_size": batch, "block_size": sparse.block_size, "flops_per_token": fpt, "dtype": dtype,
            "matmul_peak_flops": median(peaks), "matmul_peak_rounds": peaks, "runs": runs,
            "sparse_over_dense_step": ratio("sparse", "dense"),
            "sparse_over_dense_rounds": per_round("sparse", "dense"),
            "projection_share": runs["sparse"]["projection_ms"] / s,
            "abstopk_share": max(0.0, 1 - ratio("sparse_no_abstopk", "sparse")),   # (sparse - no AbsTopK) / sparse
            "abstopk_selection_share": max(0.0, 1 - ratio("sparse_fixed_masks", "sparse")),
            "fixed_masks_over_dense_step": ratio("sparse_fixed_masks", "dense"),   # sparse/dense with a free selection
            "abstopk_forward_ms": abstopk_ms, "abstopk_forward_share": abstopk_ms / s,
            "abstopk_plain_over_ours": abstopk_plain_ms / abstopk_ms if abstopk_ms else None,
            "naive_over_ours_projection": naive / ours,
            "projection_ms": ours * 1e3, "naive_projection_ms": naive * 1e3,
            "forward_ms": plain_ms, "forward_recording_ms": recorded_ms,
            "compile_speedup": {v: ratio(v + "_eager", v) for v in ("dense", "sparse") if v + "_eager" in runs},
            "allocator_speedup": ratio("sparse_glibc_malloc", "sparse"),
            "abstopk_by": sparse.abstopk_by, "other_abstopk": other_abstopk(sparse),
            "other_abstopk_over_preset_step": ratio(f"sparse_{other_abstopk(sparse)}", "sparse")}


def main(argv):
    bc = parse_args(BenchConfig, argv)
    check_writable("out_dir", bc.out_dir)
    if bc.rounds > bc.steps:          # a round times at least one step of each variant
        print(f"note: --rounds={bc.rounds} is more than --steps={bc.steps}: {bc.steps} round(s) of one step")
        bc.rounds = bc.steps
    print("settings: " + json.dumps(dataclasses.asdict(bc)))
    device = resolve_device(bc.device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"device {name}")
    result = {"device": name, "settings": dataclasses.asdict(bc), "shapes": {}}
    if bc.prune_ckpt:                 # first: a typo or a task the model does not solve ends the run at once
        result["prune_seconds"] = prune_time(bc.prune_ckpt, bc.prune_task, device, bc.out_dir)
        print(f"prune {bc.prune_task} on {bc.prune_ckpt}: {result['prune_seconds']:.0f} s")
    for shape in bc.shapes.split(","):
        result["shapes"][shape] = r = bench_shape(shape, bc, device)
        lo, hi = min(r["sparse_over_dense_rounds"]), max(r["sparse_over_dense_rounds"])
        print(f"{shape}: sparse/dense step {r['sparse_over_dense_step']:.2f} (rounds {lo:.2f}-{hi:.2f}) | "
              f"projection {r['projection_share']:.1%} of a step | AbsTopK {r['abstopk_share']:.1%} "
              f"(its selection {r['abstopk_selection_share']:.1%}: with fixed masks sparse/dense "
              f"{r['fixed_masks_over_dense_step']:.2f}; its forward alone, eager, {r['abstopk_forward_share']:.1%}"
              + (f"; topk and a scatter {r['abstopk_plain_over_ours']:.2f}x as long" if r["abstopk_plain_over_ours"] else "")
              + f") | naive/ours projection {r['naive_over_ours_projection']:.1f}x "
              f"({r['naive_projection_ms']:.1f} vs {r['projection_ms']:.1f} ms) | MFU sparse "
              f"{r['runs']['sparse']['mfu']:.1%} dense {r['runs']['dense']['mfu']:.1%} | forward "
              f"{r['forward_ms']:.1f} ms, recording a site {r['forward_recording_ms']:.1f} ms"
              + "".join(f" | compiled {v} {x:.2f}x eager" for v, x in r["compile_speedup"].items())
              + (f" | sparse step with glibc's default allocator: {r['allocator_speedup']:.2f}x as long"
                 if r["allocator_speedup"] else "")
              + (f" | sparse step with AbsTopK by {r['other_abstopk']}: {r['other_abstopk_over_preset_step']:.2f}x "
                 f"the one by {r['abstopk_by']}" if r["other_abstopk_over_preset_step"] else ""))
    os.makedirs(bc.out_dir, exist_ok=True)
    path = os.path.join(bc.out_dir, f"{device.replace(':', '')}.json")
    write_atomic(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
