"""
The paper's headline (docs/METHOD.md section 6): at equal pretraining loss, circuits pruned from a
weight-sparse model are many times smaller than circuits from a dense one. Given sparse models and
dense models of several widths (train.py checkpoints), this picks for each sparse model the dense
model whose val loss is closest to its own, prunes both (prune.py) on every task both solve, and
prints task | sparse edges | dense edges | ratio, with the geometric means and their ratio; it also
draws val loss against circuit size, one point per model. The README has the commands that make
the models.

    python headline.py                   # out/cpu45 against out/dense16 and out/dense32 (the README's 90-minute run)
    python headline.py --dense=out/dense16/ckpt.pt,out/dense32/ckpt.pt,out/dense48/ckpt.pt --k_coefs=1e-4,1e-3,3e-3
    python headline.py --sparse=out/cpu45/ckpt.pt,out/cpu45_l32/ckpt.pt --dense=...   # a table per sparse model
    python headline.py --jobs=8          # 8 prune runs at once (on a GPU: small models leave it idle)
    python headline.py --prune_seeds=0,1,2   # the search over 3 draws of prune.py's seed too
    python headline.py --help            # every setting

Each circuit is the smallest (fewest edges) over prune.py runs at several node penalties k_coef
(and seeds, --prune_seeds), as the authors take the best circuit of a hyperparameter search: at one
k_coef the mask search settles on a set of nodes whose size the penalty decides, and bisection
cannot shrink it (its loss-vs-k curve is a cliff). Circuits are cached:
out/headline/circuits/<model>/k_coef=<v>[_seed=<s>]/<task>.json is reused when it was pruned from
the same checkpoint file (path, mtime and size: a retrained one is pruned again) with the same
prune.py settings (target, steps, test prompts, k_coef, seed, and prune.py's defaults for the rest;
not the device or the batching). <model> is the checkpoint's folder (out/cpu45/ckpt.pt
-> cpu45), with a hash of its path where two checkpoints of a run would share it. A task solved on
the test prompts but without a circuit at the target is left out of its comparison, and a model
without a circuit for a plotted task is left off the plot, each with a printed note; a row's note
names a circuit that misses the target on the test prompts and an empty one. The table and the
plot: out/headline/headline{.json,.svg}.
"""

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass

import data
import prune
from config import (UserError, check_out_dir, check_positive, check_writable, parse_args, resolve_device,
                    run_main, set_up_process, write_atomic)
from draw import SVG_HEAD, line, text
from sparse_gpt import load_checkpoint
from tasks import TASKS, evaluate, get_task, load_model, make_prompts
from train import is_dense


@dataclass
class HeadlineConfig:
    sparse: str = "out/cpu45/ckpt.pt"   # comma-separated: each gets its own matched dense model and table
    dense: str = "out/dense16/ckpt.pt,out/dense32/ckpt.pt"   # comma-separated
    target_loss: float = 0.15
    prune_steps: int = 800           # prune.py's mask steps, the same for every model
    k_coefs: str = "1e-4,3e-3"       # prune.py's node penalty: each is tried, the smallest circuit kept
    tasks: str = ""                  # comma-separated subset of the 20 tasks to consider (empty = all)
    n_test: int = 256                # test prompts per task to decide which tasks a model solves
    prune_seeds: str = "0"           # prune.py's --seed (train prompts, mask init, batches): each is tried too
    jobs: int = 1                    # prune runs at once, each in its own process (small models leave a GPU idle)
    out_dir: str = "out/headline"
    device: str = "auto"

    def __post_init__(self):
        for name in self.tasks.split(","):
            if name:
                get_task(name)        # an unknown task: a one-line UserError listing the known ones
        check_positive("target_loss", self.target_loss)   # as prune.py checks it
        for key in ("prune_steps", "jobs"):
            if getattr(self, key) <= 0:
                raise UserError(f"--{key}={getattr(self, key)} must be positive")
        if self.n_test <= 0 or self.n_test % 2:
            raise UserError(f"--n_test={self.n_test} must be positive and even (half of each class)")
        check_out_dir("out_dir", self.out_dir)
        self.search_grid()

    def search_grid(self):
        """The (k_coef, seed) pairs each circuit is searched over."""
        k_coefs = number_list(self.k_coefs, float, "k_coefs", "1e-4,1e-3")
        seeds = number_list(self.prune_seeds, int, "prune_seeds", "0,1,2", signed=True)   # as prune.py's --seed
        return [(k_coef, seed) for k_coef in k_coefs for seed in seeds]


def number_list(text, kind, key, example, signed=False):
    """Comma-separated numbers of one kind (float or int) in [0, 2**63), or [-2**63, 2**63) if
    signed, else a one-line UserError (outside 64 bits: beyond what torch takes as a seed)."""
    lowest, shown = (-2**63, "-2**63") if signed else (0, "0")
    try:
        values = [kind(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or not all(lowest <= v < 2**63 for v in values):   # nan fails this too
        raise UserError(f"--{key}={text!r}: need comma-separated {kind.__name__}s in [{shown}, 2**63), e.g. {example}")
    return values


def checkpoint_paths(text):
    """'a.pt,~/b.pt' -> ['a.pt', '/home/.../b.pt']: parse_args expands only a leading ~."""
    return [os.path.expanduser(p) for p in text.split(",") if p]


def model_names(cfg):
    """{checkpoint: name} for the tables and the cache folders: its folder (out/cpu45/ckpt.pt -> cpu45;
    out/cpu45/step800.pt -> cpu45_step800), plus a hash of its path where two files would share one."""
    def short(path):
        folder, file = os.path.split(os.path.abspath(path))
        return os.path.basename(folder) + ("" if file == "ckpt.pt" else "_" + os.path.splitext(file)[0])
    paths = checkpoint_paths(f"{cfg.sparse},{cfg.dense}")
    taken = Counter(short(f) for f in {os.path.abspath(p) for p in paths})   # a file named twice is one model
    hashed = lambda p: hashlib.sha256(os.path.abspath(p).encode()).hexdigest()[:6]
    return {p: short(p) if taken[short(p)] == 1 else f"{short(p)}_{hashed(p)}" for p in paths}


def check_models(sparse_paths, dense_paths):
    """Each model in its role, read from its saved settings before any model is evaluated: --sparse
    weight-sparse, --dense dense (train.is_dense), and one data_dir and tokenizer (the id a checkpoint
    records) for all: one validation set, and one block_size, so that their val losses (which match
    the models) are over contexts of one length. A setting a checkpoint does not record is not judged.
    Val losses over other val batches (eval_iters, batch_size, seed) still compare, more noisily: a note."""
    data_dirs, tokenizers, contexts, val_batches = {}, {}, {}, {}
    for kind, path in [("sparse", p) for p in sparse_paths] + [("dense", p) for p in dense_paths]:
        ckpt = load_checkpoint(path)
        tc = ckpt.get("train_config", {})
        if kind == "sparse" and tc.get("l0_frac", 0.0) >= 1.0:
            raise UserError(f"--sparse={path} is not weight-sparse (l0_frac={tc['l0_frac']}); give a model "
                            "trained with --l0_frac < 1")
        if kind == "dense" and not is_dense(tc):
            raise UserError(f"--dense={path} is a sparse model (l0_frac={tc.get('l0_frac')}, afrac={tc.get('afrac')}); "
                            "give a dense one (trained with --l0_frac=1 --afrac=1)")
        data_dirs[path], contexts[path] = tc.get("data_dir", ""), ckpt["model_config"].get("block_size")
        batches = tuple(tc.get(key) for key in ("eval_iters", "batch_size", "seed"))   # estimate_loss's
        if None not in batches:
            val_batches[path] = batches
        if ckpt.get("tokenizer"):
            tokenizers[path] = ckpt["tokenizer"]
    first = next(iter(data_dirs))
    for path, data_dir in data_dirs.items():
        if not data.same_data_dir(data_dir, data_dirs[first]):
            raise UserError(f"{path} was trained on data_dir={data_dir or 'the standard library'} but {first} "
                            f"on {data_dirs[first] or 'the standard library'}: the models must share one tokenizer "
                            "and validation set")
    for path, block_size in contexts.items():
        # a longer context predicts better (the cpu model: 3.74 against 3.78 nats at 256 and 64)
        if block_size != contexts[first]:
            raise UserError(f"{path} has block_size={block_size} but {first} {contexts[first]}: val losses over "
                            "contexts of different lengths do not compare, so the models must share one block_size")
    one_per_tokenizer = {tokenizer: path for path, tokenizer in tokenizers.items()}
    if len(one_per_tokenizer) > 1:          # one data_dir, whose files changed between two models' runs
        a, b = list(one_per_tokenizer.values())[:2]
        raise UserError(f"{a} and {b} were trained with different tokenizers (their data_dir's files changed "
                        "between the runs): the models must share one tokenizer and validation set")
    if len(set(val_batches.values())) > 1:
        print("note: the models' val losses, which pair them, are over different val batches (eval_iters, "
              "batch_size, seed: " + "; ".join(f"{p} {v}" for p, v in val_batches.items()) + ")")


def load(path, device):
    """(model, val loss, tokenizer) of a train.py checkpoint: the tokenizer it was trained with."""
    model, ckpt, folder = load_model(path, device)
    if "val_loss" not in ckpt:
        raise UserError(f"{path} has no val_loss: is it a train.py checkpoint?")
    return model, ckpt["val_loss"], data.get_encoding(folder)


def solved_tasks(model, enc, names, cfg, device):
    """{task: full-model test loss} of the tasks (of names) the model solves at the target."""
    out = {}
    for name in names:
        try:
            prompts = make_prompts(name, enc, cfg.n_test, 0, "test", model.config.block_size)
        except ValueError as e:     # another tokenizer (an answer of two tokens), a shorter context
            print(f"  skipped {name}: {e}")
            continue
        loss, _ = evaluate(model, prompts, device)
        if loss <= cfg.target_loss:
            out[name] = loss
    return out


# prune.py settings that do not change the circuit: where it runs and reads, how it batches and logs
NOT_IN_RECORD_KEY = ("ckpt", "task", "out_dir", "device", "micro_batches", "eval_batch_size", "log_interval", "nonsense")


def record_key(rec):
    """What a record was pruned from and with: the checkpoint file and every other prune.py setting.
    A setting the record lacks is from before prune.py had it, when it ran as its default does now
    (records hold all the settings, failures too, since this key took them all)."""
    s = rec["settings"]
    defaults = {f.name: f.default for f in dataclasses.fields(prune.PruneConfig) if f.name not in NOT_IN_RECORD_KEY}
    return [rec.get("checkpoint_key")] + [s.get(key, default) for key, default in sorted(defaults.items())]


def circuit(path, task, k_coef, seed, cfg, device):
    """prune.py's record of task on the checkpoint at path with this k_coef and seed: read from the
    cache, or pruned now. None when no circuit meets the target on the bisection prompts."""
    folder = f"k_coef={k_coef:g}" + (f"_seed={seed}" if seed else "")   # seed 0 keeps the folders it always had
    out_dir = os.path.join(cfg.out_dir, "circuits", model_names(cfg)[path], folder)
    record = os.path.join(out_dir, task + ".json")
    argv = [f"--ckpt={path}", f"--task={task}", f"--out_dir={out_dir}", f"--target_loss={cfg.target_loss}",
            f"--steps={cfg.prune_steps}", f"--n_test={cfg.n_test}", f"--k_coef={k_coef}", f"--seed={seed}",
            f"--device={device}"]
    settings = dataclasses.asdict(parse_args(prune.PruneConfig, argv))   # all prune.py will run with, as it records
    key = record_key({"checkpoint_key": prune.checkpoint_key(path), "settings": settings})
    if os.path.exists(record):
        with open(record) as f:
            rec = json.load(f)
        newer = os.path.getmtime(record) > os.path.getmtime(path)
        if "checkpoint_key" not in rec and rec["checkpoint"] == path and newer:   # a record from before the key,
            rec["checkpoint_key"] = key[0]                 # written after the checkpoint was: pruned from this one
        if record_key(rec) == key:
            return rec if rec["n_nodes"] is not None else None
    try:
        prune.main(argv)
    except prune.NoCircuit as e:            # no circuit at this k_coef: remembered, so not searched again
        print(f"  k_coef {k_coef:g}, seed {seed}: {e}")
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(record, json.dumps({"checkpoint": path, "checkpoint_key": key[0], "n_nodes": None,
                                         "error": str(e), "settings": settings}))
        return None
    with open(record) as f:
        return json.load(f)


def smallest_circuit(path, task, cfg, device):
    """The paper's search: prune at every k_coef (and seed) and keep the circuit with the fewest edges
    (chosen by what the bisection prompts allow; every reported loss is still on the test prompts)."""
    records = [circuit(path, task, k_coef, seed, cfg, device) for k_coef, seed in cfg.search_grid()]
    found = [rec for rec in records if rec is not None]
    if not found:
        raise prune.NoCircuit(f"{path}: no circuit for {task} meets --target_loss={cfg.target_loss} at any of "
                              f"--k_coefs={cfg.k_coefs} with --prune_seeds={cfg.prune_seeds}")
    return min(found, key=lambda rec: rec["n_edges"])


def plot_svg(points):
    """Val loss (x) against the geometric mean of circuit edges (y, log scale), one labeled dot per model."""
    w, h, pad = 560, 380, 60
    xs, ys = [p["val_loss"] for p in points], [math.log10(max(1.0, p["geomean_edges"])) for p in points]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0 = math.floor(min(ys))
    y1 = max(y0 + 1, math.ceil(max(ys)))
    px = lambda x: pad + (x - x0) / (x1 - x0) * (w - 2 * pad)
    py = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)
    out = [SVG_HEAD.format(w=w, h=h), line(pad, h - pad, w - pad, h - pad, "#222"), line(pad, pad, pad, h - pad, "#222"),
           text(w / 2, h - 15, "pretraining val loss (nats/token)", anchor="middle"),
           text(15, pad - 20, "circuit edges, geometric mean over tasks (log)")]
    for e in range(y0, y1 + 1):
        out += [line(pad - 4, py(e), pad, py(e), "#222"), text(pad - 8, py(e) + 4, f"1e{e}", anchor="end")]
    for x in (x0 + 0.05, (x0 + x1) / 2, x1 - 0.05):
        out += [line(px(x), h - pad, px(x), h - pad + 4, "#222"), text(px(x), h - pad + 18, f"{x:.2f}", anchor="middle")]
    for p, y in zip(points, ys):
        color = "#d62728" if p["kind"] == "sparse" else "#1f77b4"
        out += [f'<circle cx="{px(p["val_loss"]):.1f}" cy="{py(y):.1f}" r="6" fill="{color}"/>',
                text(px(p["val_loss"]) + 9, py(y) + 4, f'{p["name"]} ({p["kind"]})', color=color)]
    return "\n".join(out + ["</svg>"])


def closest_dense(sparse_path, dense_paths, models):
    return min(dense_paths, key=lambda p: abs(models[p]["val_loss"] - models[sparse_path]["val_loss"]))


def solved_by_all(paths, models):
    return [t for t in TASKS if all(t in models[p]["solved"] for p in paths)]


def prune_in_parallel(sparse_paths, dense_paths, models, cfg, device):
    """Fill the circuit cache with every run the tables and the plot need, cfg.jobs processes at a
    time; main then reads them back in order, as if it had pruned them itself."""
    pairs = [(s, closest_dense(s, dense_paths, models)) for s in sparse_paths]
    plot_tasks = solved_by_all([p for pair in pairs for p in pair], models)   # what main's plot_tasks will be
    runs = [(p, t) for pair in pairs for t in solved_by_all(pair, models) for p in pair]
    runs += [(p, t) for p in models if all(t in models[p]["solved"] for t in plot_tasks) for t in plot_tasks]
    args = [(p, t, k, seed, cfg, device) for p, t in dict.fromkeys(runs) for k, seed in cfg.search_grid()]
    print(f"pruning {len(args)} runs, {cfg.jobs} at a time")
    # spawn: CUDA works in the children; they start outside run_main, so they set themselves up
    with multiprocessing.get_context("spawn").Pool(cfg.jobs, initializer=set_up_process) as pool:
        pool.starmap(circuit, args, chunksize=1)


def compare(sparse_path, dense_paths, models, cfg, device):
    """One sparse model against the dense model of the closest val loss, on every task both solve."""
    sparse = models[sparse_path]
    match = closest_dense(sparse_path, dense_paths, models)
    gap = models[match]["val_loss"] - sparse["val_loss"]
    print(f"\n{sparse['name']}: matched dense model {match} (val loss {models[match]['val_loss']:.4f}, "
          f"{gap:+.4f} from the sparse model's {sparse['val_loss']:.4f})")
    common = solved_by_all([sparse_path, match], models)
    if not common:
        raise UserError(f"no task is solved at --target_loss={cfg.target_loss} by both {sparse_path} and {match}; "
                        "try models trained on more text or a higher --target_loss")
    rows = []
    for task in common:
        try:
            s, d = smallest_circuit(sparse_path, task, cfg, device), smallest_circuit(match, task, cfg, device)
        except prune.NoCircuit as e:   # solved on the test prompts, yet no circuit at the target on the bisection ones
            print(f"  {task} left out: {e}")
            continue
        rows.append({"task": task, "sparse_edges": s["n_edges"], "dense_edges": d["n_edges"],
                     "sparse_nodes": s["n_nodes"], "dense_nodes": d["n_nodes"],
                     "sparse_circuit_loss": s["losses"]["circuit"], "dense_circuit_loss": d["losses"]["circuit"],
                     "sparse_k_coef": s["settings"]["k_coef"], "dense_k_coef": d["settings"]["k_coef"],
                     "sparse_seed": s["settings"]["seed"], "dense_seed": d["settings"]["seed"]})
    if not rows:
        raise UserError(f"no task has a circuit at --target_loss={cfg.target_loss} in both {sparse_path} and {match}")
    gs, gd = prune.geomean([r["sparse_edges"] for r in rows]), prune.geomean([r["dense_edges"] for r in rows])
    return {"sparse": sparse_path, "matched_dense": match, "val_loss_gap": gap, "rows": rows,
            "geomean_sparse": gs, "geomean_dense": gd, "ratio": gd / gs}


def print_table(c, models, target_loss):
    print(f"\n{models[c['sparse']]['name']} vs {models[c['matched_dense']]['name']}")
    print(f"{'task':<28} {'sparse edges':>12} {'dense edges':>12} {'ratio':>7}  note")
    for r in c["rows"]:
        print(f"{r['task']:<28} {r['sparse_edges']:>12} {r['dense_edges']:>12} "
              f"{max(1, r['dense_edges']) / max(1, r['sparse_edges']):>7.1f}  "   # empty: 1, as in geomean
              + "; ".join(row_notes(r, target_loss)))
    print(f"{'geometric mean':<28} {c['geomean_sparse']:>12.1f} {c['geomean_dense']:>12.1f} {c['ratio']:>7.1f}")
    print(f"val loss: sparse {models[c['sparse']]['val_loss']:.4f} | dense "
          f"{models[c['matched_dense']]['val_loss']:.4f}; {len(c['rows'])} task(s)")


def row_notes(r, target_loss):
    """What the edge counts alone hide: a circuit chosen on the bisection prompts that misses the
    target on the test prompts, and an empty one (the bigram table alone, never ablated, is enough),
    which counts as 1 edge and so pulls its side's geometric mean down."""
    notes = []
    for side in ("sparse", "dense"):
        if r[f"{side}_circuit_loss"] > target_loss:
            notes.append(f"{side} test loss {r[f'{side}_circuit_loss']:.3f} > target")
        if r[f"{side}_nodes"] == 0:
            notes.append(f"{side} circuit empty")
    return notes


def main(argv):
    cfg = parse_args(HeadlineConfig, argv)
    check_writable("out_dir", cfg.out_dir)
    print("settings: " + json.dumps(dataclasses.asdict(cfg)))
    prune.chance_note(cfg.target_loss)
    device = resolve_device(cfg.device)
    sparse_paths, dense_paths = checkpoint_paths(cfg.sparse), checkpoint_paths(cfg.dense)
    if not sparse_paths or not dense_paths:
        raise UserError(f"--sparse={cfg.sparse!r} --dense={cfg.dense!r}: give one or more checkpoints to each, comma-separated")
    check_models(sparse_paths, dense_paths)
    names = [t for t in cfg.tasks.split(",") if t] or list(TASKS)
    models, short = {}, model_names(cfg)
    for kind, path in [("sparse", p) for p in sparse_paths] + [("dense", p) for p in dense_paths]:
        model, val, enc = load(path, device)
        models[path] = {"kind": kind, "name": short[path], "val_loss": val,
                        "solved": solved_tasks(model, enc, names, cfg, device)}
        print(f"{kind:<6} {path}: val loss {val:.4f}, solves {len(models[path]['solved'])} task(s) at "
              f"{cfg.target_loss}: {', '.join(models[path]['solved']) or 'none'}")
    if cfg.jobs > 1:
        prune_in_parallel(sparse_paths, dense_paths, models, cfg, device)
    comparisons = [compare(p, dense_paths, models, cfg, device) for p in sparse_paths]
    # the plot: a point per model, over the tasks of every comparison, for each model that solves them all
    plot_tasks = [t for t in TASKS if all(t in {r["task"] for r in c["rows"]} for c in comparisons)]
    points = []
    for path, m in models.items():
        if plot_tasks and all(t in m["solved"] for t in plot_tasks):
            try:
                edges = [smallest_circuit(path, t, cfg, device)["n_edges"] for t in plot_tasks]
            except prune.NoCircuit as e:   # a model only on the plot, without a circuit for a task: off the plot
                print(f"plot: {m['name']} left out: {e}")
                continue
            points.append({"name": m["name"], "kind": m["kind"], "val_loss": m["val_loss"],
                           "geomean_edges": prune.geomean(edges)})
    for c in comparisons:
        print_table(c, models, cfg.target_loss)
    print(f"plot: geometric mean of edges over {', '.join(plot_tasks) or 'no task common to every comparison'}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    result = {"settings": dataclasses.asdict(cfg), "models": models, "comparisons": comparisons,
              "plot_tasks": plot_tasks, "points": points}
    outputs = [("headline.json", json.dumps(result, indent=1))] + ([("headline.svg", plot_svg(points))] if points else [])
    for name, body in outputs:
        write_atomic(os.path.join(cfg.out_dir, name), body)
    print("wrote " + ", ".join(os.path.join(cfg.out_dir, name) for name, _ in outputs))


if __name__ == "__main__":
    run_main(main)
