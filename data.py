"""
The Python-code corpus, our 2048-token byte-level BPE (served by tiktoken), and token batches.

    python data.py                       # build the cache for the standard library corpus
    python data.py --data_dir=~/code     # any folder of .py files

Corpus: every .py file under the running interpreter's standard library (site-packages left
out), in sorted path order, documents joined by <|endoftext|>. About 2% of files, picked by a
hash of their path, form the validation split. The tokenizer is trained on a deterministic sample
of the training files, written as a tiktoken ranks file, and loaded into tiktoken.Encoding. It
holds every task answer (tasks.py) as one token: where a corpus leaves some split, BPE learns
them first (other Pythons' standard libraries; ours holds them all, so nothing changes for it).
Everything lives in out/data/<key>/, where key hashes the inputs; a change of inputs rebuilds.
"""

import base64
import dataclasses
import hashlib
import heapq
import json
import os
import stat
import sysconfig
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import regex  # installed with tiktoken (its own dependency): \p{L} classes like tiktoken's patterns
import tiktoken

from config import UserError, atomic_file, check_out_dir, check_writable, parse_args, run_main, write_atomic

VOCAB_SIZE = 2048
EOT = "<|endoftext|>"
# GPT-4-style split, for code: identifiers (letters and _) with one leading non-letter, 1-3 digits,
# punctuation runs (newlines never glued to them), newlines with the whitespace before them,
# indentation runs. No English contraction rule: in code `'s'` is a string, not "it's".
SPLIT_PATTERN = r"""[^\r\n\p{L}\p{N}_]?[\p{L}_]+|\p{N}{1,3}| ?[^\s\p{L}\p{N}_]+|\s*[\r\n]+|\s+(?!\S)|\s+"""


@dataclass
class DataConfig:
    """The other scripts build their data with data_dir alone and these defaults for the rest; other
    values here make a cache of their own, to look at (main says so)."""
    data_dir: str = ""             # folder of .py files; empty = this Python's standard library
    cache_dir: str = "out/data"
    tokenizer_sample_bytes: int = 3_000_000  # BPE trains on this many bytes of training files
    val_every: int = 50            # about 1 in val_every files goes to validation

    def __post_init__(self):
        self.data_dir = user_dir(self.data_dir)
        check_out_dir("cache_dir", self.cache_dir)
        if self.val_every < 2:
            raise UserError(f"--val_every={self.val_every} must be at least 2 (1 would leave no training files)")
        if self.tokenizer_sample_bytes <= 0:
            raise UserError(f"--tokenizer_sample_bytes={self.tokenizer_sample_bytes} must be positive")

# -----------------------------------------------------------------------------
# corpus

def default_data_dir():
    return sysconfig.get_paths()["stdlib"]


def user_dir(path):
    """A data_dir as given (on the command line or in code: ~ too) -> absolute: the split (paths
    relative to the folder) and meta.json must not depend on the working directory. "" stays ""."""
    return os.path.abspath(os.path.expanduser(path)) if path else ""


def same_data_dir(a, b):
    """Whether two data_dir settings name the same folder ("" is the standard library's)."""
    return os.path.realpath(user_dir(a) or default_data_dir()) == os.path.realpath(user_dir(b) or default_data_dir())


def list_py_files(data_dir):
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir={data_dir} is not a folder")
    files, seen = [], set()
    for root, dirs, names in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for path in (os.path.join(root, n) for n in sorted(names) if n.endswith(".py")):
            try:
                st = os.stat(path)     # through a link: its file
            except OSError:
                continue               # a dangling link
            # a file under two names (a symbolic or hard link) once, by the first name in walk order: read
            # twice, it could land in both splits (st_ino 0: the file system gives no identity)
            identity = (st.st_dev, st.st_ino) if st.st_ino else path
            if stat.S_ISREG(st.st_mode) and identity not in seen:
                seen.add(identity)
                files.append(path)
    if not files:
        raise UserError(f"data_dir={data_dir} holds no .py files")
    return files


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def is_val(relpath, val_every):
    return zlib.crc32(relpath.encode()) % val_every == 0


def val_flags(relpaths, sizes, val_every):
    """is_val of each file; a folder of 2+ files where the hash picked no file with text (none, or
    only empty __init__.py files) gives validation the nonempty file nearest to being picked (smallest
    hash remainder), so the split always has text and stays deterministic. Folders that already have
    a nonempty validation file are split exactly as before."""
    flags = [is_val(r, val_every) for r in relpaths]
    if len(relpaths) > 1 and not any(flag and size for flag, size in zip(flags, sizes)):
        nonempty = [i for i, size in enumerate(sizes) if size] or range(len(relpaths))
        flags[min(nonempty, key=lambda i: zlib.crc32(relpaths[i].encode()) % val_every)] = True
    return flags

# -----------------------------------------------------------------------------
# byte-level BPE, trained in pure Python

def train_bpe(text_chunks, vocab_size=VOCAB_SIZE, verbose=False):
    """Byte-level BPE: returns tiktoken mergeable ranks {token bytes: rank} with vocab_size - 1
    entries (the last id is left for <|endoftext|>). Works on the unique pre-tokenized chunks with
    incremental pair counts, so each merge touches only the chunks that contain its pair, and finds
    the most frequent pair on a heap (ties to the pair counted first), not by a scan of all pairs."""
    words = [list(w.encode("utf-8")) for w in text_chunks]  # unique chunks as symbol-id lists
    counts = list(text_chunks.values())
    vocab = {i: bytes([i]) for i in range(256)}
    ranks = {bytes([i]): i for i in range(256)}
    pair_counts = defaultdict(int)
    where = defaultdict(set)                                 # pair -> indices of words holding it
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += counts[wi]
            where[pair].add(wi)
    first_seen = {pair: i for i, pair in enumerate(pair_counts)}
    # (-count, first seen, pair): ties to the pair counted first, as a scan in dict order gave them (the
    # same tokenizer); a count that changes is pushed anew, and its old entry skipped when popped
    heap = [(-count, first_seen[pair], pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    next_id = 256
    while len(ranks) < vocab_size - 1 and heap:
        minus_count, _, best = heapq.heappop(heap)
        if pair_counts.get(best) != -minus_count:           # stale: its count has changed since
            continue
        if minus_count >= 0:
            break
        new_bytes = vocab[best[0]] + vocab[best[1]]
        vocab[next_id] = new_bytes
        if new_bytes not in ranks:   # two merge orders can make the same bytes: one rank for them
            ranks[new_bytes] = len(ranks)
        changed = set()
        for wi in where.pop(best):
            w, c = words[wi], counts[wi]
            for pair in zip(w, w[1:]):                       # retract this word's old pairs
                pair_counts[pair] -= c
                changed.add(pair)
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    merged.append(next_id)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[wi] = merged
            for pair in zip(merged, merged[1:]):             # and count its new ones
                pair_counts[pair] += c
                where[pair].add(wi)
                first_seen.setdefault(pair, len(first_seen))
                changed.add(pair)
        del pair_counts[best]
        changed.discard(best)
        for pair in changed:
            heapq.heappush(heap, (-pair_counts[pair], first_seen[pair], pair))
        next_id += 1
        if verbose and len(ranks) % 256 == 0:
            print(f"bpe: {len(ranks)} tokens")
    return ranks


def write_ranks(ranks, path):
    """tiktoken's own format: one 'base64(token bytes) rank' line per token."""
    write_atomic(path, "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                               for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])))


def read_ranks(path):
    # parsed here rather than with tiktoken.load.load_tiktoken_bpe, which caches by path in /tmp
    # and would serve a stale file after a rebuild
    with open(path) as f:
        return {base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())}


def encoding(ranks):
    return tiktoken.Encoding(name="sparse_circuits_py2048", pat_str=SPLIT_PATTERN,
                             mergeable_ranks=ranks, special_tokens={EOT: VOCAB_SIZE - 1})


def make_encoding(ranks_path):
    ranks = read_ranks(ranks_path)
    if len(ranks) != VOCAB_SIZE - 1:
        raise UserError(f"{ranks_path} has {len(ranks)} tokens, not {VOCAB_SIZE - 1}: " + (
            "the data folder holds too little text to train the tokenizer" if len(ranks) < VOCAB_SIZE - 1 else
            f"not a tokenizer of this data.py (the id {VOCAB_SIZE - 1} is <|endoftext|>)"))
    return encoding(ranks)


def task_answers():
    import tasks   # here, not at the top: tasks.py imports this module
    return tasks.answers()


def learn_tokenizer(chunks):
    """BPE ranks of the corpus' chunks that hold every task answer (tasks.answers) as one token. A
    corpus that leaves some split (another Python's standard library: ` config`, `]]`) is learned
    again with every answer counted as often as all its chunks together, so that BPE merges them
    first (the split ones alone would move other merges and could split another answer).
    -> (ranks, the answers the corpus left split)"""
    answers = task_answers()
    cut = [a for a in answers if regex.findall(SPLIT_PATTERN, a) != [a]]
    if cut:   # the split pattern cuts it before BPE: no merge can make one token of it
        raise UserError(f"task answer(s) {', '.join(map(repr, cut))} (tasks.py) cannot be one token: the "
                        "tokenizer's split pattern cuts each in two; give the task another answer")
    ranks = train_bpe(chunks)
    if len(ranks) < VOCAB_SIZE - 1:   # too little text: prepare says so, on the corpus alone
        return ranks, []
    enc = encoding(ranks)
    split = [a for a in answers if len(enc.encode_ordinary(a)) > 1]
    if split:
        ranks = train_bpe(chunks + Counter(dict.fromkeys(answers, sum(chunks.values()))))
    return ranks, split

# -----------------------------------------------------------------------------
# the cache: tokenizer and token bins

def cache_key(data_dir, files, cfg):
    h = hashlib.sha256()   # data_dir too: the validation split hashes paths relative to it
    h.update(json.dumps([SPLIT_PATTERN, VOCAB_SIZE, cfg.tokenizer_sample_bytes, cfg.val_every,
                         os.path.realpath(data_dir), task_answers()]).encode())
    with open(__file__, "rb") as f:   # this code makes the tokenizer and the split: an edit builds anew
        h.update(f.read())
    for path in files:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def cache_is_complete(folder):
    """meta.json is written last, so it marks a finished cache; the files it describes must still be
    as written (not cut short by a copy, or deleted), else the cache is built again."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        return ((meta["val_tokens"] > 0 or meta["files"] < 2)   # else built before val_flags
                and all(os.path.getsize(os.path.join(folder, f"{split}.bin")) == 2 * meta[f"{split}_tokens"]
                        for split in ("train", "val"))
                and meta.get("tokenizer") in (None, tokenizer_id(folder)))   # None: older caches lack it
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare(cfg=None, verbose=True):
    """Build (or find) the cache; returns its folder, holding tokenizer.tiktoken, train.bin, val.bin."""
    if cfg is None:
        cfg = DataConfig()
    data_dir = cfg.data_dir or default_data_dir()
    files = list_py_files(data_dir)
    folder = os.path.abspath(os.path.join(cfg.cache_dir, cache_key(data_dir, files, cfg)))   # checkpoints record it
    if cache_is_complete(folder):
        return folder
    check_writable("cache_dir", cfg.cache_dir)
    os.makedirs(folder, exist_ok=True)
    t0 = time.time()
    flags = val_flags([os.path.relpath(p, data_dir) for p in files], [os.path.getsize(p) for p in files], cfg.val_every)
    train_files = [p for p, v in zip(files, flags) if not v]
    val_files = [p for p, v in zip(files, flags) if v]
    # tokenizer: train on every k-th training file until the byte budget is met (deterministic)
    stride = max(1, sum(os.path.getsize(p) for p in train_files) // cfg.tokenizer_sample_bytes)
    splitter, chunks = regex.compile(SPLIT_PATTERN), Counter()
    for p in train_files[::stride]:
        chunks.update(splitter.findall(read_text(p)))
    ranks, learned = learn_tokenizer(chunks)
    ranks_path = os.path.join(folder, "tokenizer.tiktoken")
    if len(ranks) != VOCAB_SIZE - 1:   # too few distinct pairs left to merge
        raise UserError(f"data_dir={data_dir} holds too little text to train a {VOCAB_SIZE}-token tokenizer "
                        f"({len(ranks) + 1} tokens learned): give a folder with more .py files")
    write_ranks(ranks, ranks_path)
    enc = make_encoding(ranks_path)
    if verbose:
        print(f"data: {len(files)} files in {data_dir}; tokenizer trained in {time.time() - t0:.1f}s"
              + (f" (learned again with the task answers this corpus split: {', '.join(map(repr, learned))})"
                 if learned else ""))
    meta = {"data_dir": data_dir, "files": len(files), "val_files": len(val_files), "tokenizer": tokenizer_id(folder),
            "answers_learned": learned}
    for split, paths in (("train", train_files), ("val", val_files)):
        docs = enc.encode_ordinary_batch([read_text(p) for p in paths])
        ids = np.fromiter((t for d in docs for t in d + [enc.eot_token]), dtype=np.uint16)
        with atomic_file(os.path.join(folder, f"{split}.bin"), "wb") as f:   # DDP ranks may build it at once
            ids.tofile(f)
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_bytes"] = sum(os.path.getsize(p) for p in paths)
    write_atomic(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1))   # written last: marks the cache done
    if verbose:
        print(f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
              f"({meta['train_bytes'] / meta['train_tokens']:.2f} bytes/token) in {time.time() - t0:.1f}s -> {folder}")
    return folder


def get_encoding(folder):
    return make_encoding(os.path.join(folder, "tokenizer.tiktoken"))


def tokenizer_id(folder):
    """A fingerprint of a data folder's tokenizer, saved in checkpoints beside the folder's path."""
    with open(os.path.join(folder, "tokenizer.tiktoken"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def checkpoint_record(folder):
    """What a checkpoint saves of its data: the folder and its tokenizer's id (data_folder reads them)."""
    return {"data": folder, "tokenizer": tokenizer_id(folder)}


def data_folder(ckpt, data_dir=None, verbose=False):
    """The data folder (tokenizer, tokens) a checkpoint's model was trained with: the one it records,
    while it is complete and data_dir (default: the checkpoint's) is the folder it was trained on; else
    the one of data_dir, built now if need be."""
    saved_dir = ckpt.get("train_config", {}).get("data_dir", "")
    data_dir = saved_dir if data_dir is None else data_dir
    recorded, same_dir = ckpt.get("data"), same_data_dir(data_dir, saved_dir)
    if recorded and same_dir and cache_is_complete(recorded):
        return os.path.abspath(recorded)   # (older checkpoints saved it relative to where they ran)
    if recorded and same_dir and not os.path.isdir(user_dir(data_dir) or default_data_dir()):
        raise UserError(f"the model's data folder {recorded} is gone or incomplete, and so is data_dir={data_dir}, "
                        "the folder of .py files it was trained on, to build it again")
    folder = prepare(DataConfig(data_dir=data_dir), verbose)
    if recorded and same_dir and os.path.basename(os.path.normpath(recorded)) != os.path.basename(folder):
        # the inputs changed since training: data_dir's files, data.py, or (the standard library) Python
        if ckpt.get("tokenizer") and ckpt["tokenizer"] != tokenizer_id(folder):
            raise UserError(f"the model's data folder {recorded} is gone or incomplete, and the tokenizer built "
                            f"now from data_dir={data_dir or default_data_dir()} ({folder}) is not the model's: its "
                            "files, data.py, the task answers (tasks.py) or the Python changed since; restore the "
                            "folder or what changed")
        same = ("with the model's tokenizer" if ckpt.get("tokenizer")
                else "(its tokenizer differs if the files, data.py, the task answers or Python changed)")
        print(f"note: the model's data folder {recorded} is gone or incomplete; using {folder}, built from the same "
              f"data_dir now {same}; its train/val tokens differ if the files changed since training")
    return folder


def load_tokens(folder, split):
    path = os.path.join(folder, f"{split}.bin")
    if os.path.getsize(path) == 0:   # an empty split (a one-file folder has no validation): mmap refuses it
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(tokens, batch_size, block_size, generator):
    """Random windows of block_size+1 tokens; the torch.Generator makes the order reproducible. The
    starts are 0 .. len - block_size - 2: the last possible one is never drawn (one start of each split;
    kept so, since the README's runs drew these batches)."""
    ix = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator)
    x = np.stack([tokens[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64)
    x = torch.from_numpy(x)
    return x[:, :-1], x[:, 1:]


def main(argv):
    cfg = parse_args(DataConfig, argv)
    folder = prepare(cfg)
    default = dataclasses.replace(DataConfig(), data_dir=cfg.data_dir, cache_dir=os.path.abspath(DataConfig.cache_dir))
    changed = [f"--{k}" for k, v in dataclasses.asdict(cfg).items()
               if (os.path.abspath(v) if k == "cache_dir" else v) != getattr(default, k)]
    if changed:
        print(f"note: with {', '.join(changed)} this cache is not the one train.py, tasks.py and prune.py use: "
              "they build theirs with data_dir alone")
    enc = get_encoding(folder)
    sample = "def greet(name):\n    print(f\"héllo {name}!\")\n"
    print(f"vocab {enc.n_vocab}; {sample!r} -> {[enc.decode([t]) for t in enc.encode(sample)]}")


if __name__ == "__main__":
    run_main(main)
