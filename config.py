"""
nanoGPT's `--key=value` overrides, parsed against a settings dataclass (no exec), the one-line
error every script gives for a user mistake (and the checks settings share: check_positive,
check_not_negative, check_seed, check_out_dir, check_writable), atomic writes (atomic_file,
write_atomic), and what every script's process starts with (set_up_process: keep_freed_memory, the
allocator setting for faster CPU steps, and stdout written line by line).

    cfg = parse_args(TrainConfig, sys.argv[1:])   # --help lists the fields and their defaults
"""

import contextlib
import ctypes
import dataclasses
import difflib
import errno
import inspect
import math
import os
import re
import secrets
import sys
import time

import torch

try:
    import fcntl                # POSIX file locks: how a dead writer's temp file is told from a live one's
except ImportError:             # Windows
    fcntl = None


class UserError(ValueError):
    """A mistake in the user's input: reported as one line and exit code 2, never a traceback."""


def parse_value(text, default, key):
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is tuple:
            return tuple(s for s in text.split(",") if s)
        if kind is str:
            return os.path.expanduser(text)   # --out_dir=~/x: a shell leaves a ~ after "=" alone
        return kind(text)
    except ValueError:
        raise UserError(f"--{key}={text} is not a valid {kind.__name__} (default {default!r})")


def as_arg(value):
    """A setting's value as --key=value takes it back: tuples comma-separated, text unquoted."""
    return ",".join(value) if isinstance(value, tuple) else str(value)


def parse_args(cls, argv, base=None):
    """Apply ['--key=value', ...] to base (default: cls(); or a dict of settings, checked only with the
    arguments applied); unknown keys and bad types are UserErrors, and so is what cls's checks refuse."""
    try:
        return cls(**parse_values(cls, argv, base))
    except (TypeError, ValueError) as e:
        raise UserError(str(e))


def parse_values(cls, argv, base=None):
    """parse_args's settings as a dict, each parsed by its type but not yet checked together."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # what --help shows and "did you mean" offers: not the settings a subclass refuses (bridge.py's)
    offered = [name for name in fields if name not in getattr(cls, "refused_settings", ())]
    given = dict(base) if isinstance(base, dict) else dataclasses.asdict(base) if base is not None else {}
    if "--help" in argv or "-h" in argv:
        # the defaults as written: cls() would show what its checks rewrite (a path made absolute)
        shown = {**{name: default_of(field) for name, field in fields.items()}, **given}
        print(f"{cls.__name__} settings (override with --key=value):")
        args = {name: f"--{name}={as_arg(shown[name])}" for name in offered}
        notes, width = setting_comments(cls), min(40, max(map(len, args.values())))
        for name, arg in args.items():
            print(f"  {arg:<{width}}  # {notes[name]}" if name in notes else f"  {arg}")
        raise SystemExit(0)
    values = dict(given)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument {arg!r} is not of the form --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in fields:
            close = difflib.get_close_matches(key, offered, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise UserError(f"unknown setting --{key}{hint}; see --help")
        default = given[key] if key in given else default_of(fields[key])
        values[key] = parse_value(text, default, key)
    return values


def setting_comments(cls):
    """{setting: the comment beside it in the source of cls, a class it builds on, or a class named in
    its comments_from (where the same settings are defined again, e.g. the model's)}: what --help says."""
    notes = {}
    for klass in [*getattr(cls, "comments_from", ()), *reversed(cls.__mro__)]:   # cls's own comment wins
        with contextlib.suppress(OSError, TypeError):   # no source to read (object, a frozen app): no comments
            name = None
            for line in inspect.getsource(klass).splitlines():
                field = re.match(r"    (\w+): [^#]*#\s*(.+)$", line)   # a field of the class body, commented
                more = re.match(r" {5,}#\s*(.+)$", line)               # its comment going on, indented past it
                if field:
                    name, notes[field[1]] = field[1], field[2]
                elif more and name:
                    notes[name] += " " + more[1]
                else:
                    name = None
    return notes


def default_of(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def check_positive(key, value):
    """A setting that must be > 0 and finite; written so that nan fails too."""
    if not 0.0 < value < math.inf:
        raise UserError(f"--{key}={value} must be positive and finite")


def check_not_negative(key, value):
    """A setting that must be >= 0 and finite (nan fails)."""
    if not 0.0 <= value < math.inf:
        raise UserError(f"--{key}={value} must be finite and not negative")


def check_seed(value):
    if not -2**63 <= value < 2**63:   # torch's generators take 64 bits
        raise UserError(f"--seed={value} is outside [-2**63, 2**63)")


def nearest_existing(path):
    """path, or the nearest folder above it that exists ("" for a relative path none of which does)."""
    part = path                                     # not normalized: a/../b needs a to be a folder too
    while not os.path.exists(part) and os.path.dirname(part) not in ("", part):
        part = os.path.dirname(part)
    return part if os.path.exists(part) else ""


def check_out_dir(key, path):
    """A folder setting (out_dir, cache_dir) must name a folder, existing or not: checked with the
    other settings, not found out when the first output is written after the work is done."""
    if not path:
        raise UserError(f"--{key} is empty; give a folder")
    part = nearest_existing(path)                   # the nearest part of it that exists must be a folder
    if part and not os.path.isdir(part):
        where = "is a file" if part == path else f"is inside a file ({part})"
        raise UserError(f"--{key}={path} {where}, not a folder")


def check_writable(key, path):
    """Called by a script about to write in the folder path (which need not exist yet), before its
    work: a read-only mount or a folder not ours is found now, not at the first write after it. Not
    in check_out_dir: steering only reads a bridge run's folder, and a complete data cache is only read."""
    folder = nearest_existing(path) or "."
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--{key}={path} cannot be written: {os.path.abspath(folder)} does not let us write in it")


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """A temp file to write path's new contents to; on success it is synced to disk and renamed
    over path, so a reader, or a crash, sees the old file or the new one, never half of one."""
    folder, name = os.path.split(path)
    remove_dead_writers_files(folder or ".", name)
    # a name of its own, so parallel writers (DDP ranks) never share one; 12 hex digits, as the cleanup matches
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, mode.replace("w", "x")) as f:     # x: made by this call, not an existing file truncated
            if fcntl:                                    # held while writing: what marks a live writer's file
                with contextlib.suppress(OSError):       # (a filesystem without locks: then no cleanup either)
                    fcntl.flock(f, fcntl.LOCK_EX)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError in the OSError's wake
        if {errno.ENOSPC, errno.EDQUOT} & {getattr(e, "errno", None), getattr(e.__context__, "errno", None)}:
            raise UserError(f"no space left on the device to write {path} (its old version, if any, is kept): "
                            "free some space and run again") from e
        raise
    finally:
        if os.path.exists(tmp):         # the write failed: leave no temp file behind
            os.remove(tmp)


def remove_dead_writers_files(folder, name):
    """A writer killed outright (kill -9, power cut) cannot clean up after itself; the OS does
    release its lock. So a temp file of name whose lock is free, and that is over a minute old (a
    new one's writer may not hold its lock yet), is removed by the next write of name. Best effort:
    it never fails the write. Not on Windows (no flock), where such files stay."""
    if fcntl is None:
        return
    ours = re.compile(re.escape(name) + r"\.[0-9a-f]{12}\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:                              # an unreadable folder: nothing to clean
        return
    for other in [os.path.join(folder, n) for n in names if ours.fullmatch(n)]:
        try:
            if time.time() - os.path.getmtime(other) < 60:
                continue
            with open(other, "r+b") as f:        # r+: an exclusive lock on NFS needs a writable file
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)   # BlockingIOError: a live writer holds it
                os.remove(other)
        except OSError:                          # held, gone meanwhile, a folder of that name: leave it
            pass


def write_atomic(path, text):
    with atomic_file(path) as f:
        f.write(text)


def resolve_device(name):
    """'auto' -> cuda when there is a GPU, else cpu; any other name must be a device this machine has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    mps = torch.backends.mps.is_available()   # Apple GPUs; offered only where there is one
    if not re.fullmatch(r"cpu|cuda|cuda:\d+" + ("|mps" if mps else ""), name):
        raise UserError(f"--device={name} is unknown; allowed: auto, cpu, cuda, cuda:N" + (", mps" if mps else ""))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available; use --device=cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device={name} but this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    return name


def keep_freed_memory():
    """Have glibc keep big freed blocks for reuse instead of handing them back to the OS. By default
    each big tensor is a fresh mmap that the kernel page-faults and zeroes on first touch: on a 2-core
    CPU that was 16-24% of a sparse training step (bench.py times both allocators). PyTorch's
    CPU tuning guide preloads jemalloc or tcmalloc for the same reason; this is glibc's own knob, so no
    new dependency. Returns the mmap threshold set, in bytes (1 GB; 32 MB on older glibc), or 0 where
    the C library is not glibc (macOS, Windows, musl). Called by set_up_process (run_main, headline.py's
    pool) and by bench.py's timed processes: remove those calls to turn it off (bench.py's main calls it
    only to see whether to time the sparse step without it)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return 0
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's malloc.h
    for threshold in (1 << 30, 32 << 20):           # older glibc refuses over 32 MB: bigger tensors map afresh there
        if mallopt(M_MMAP_THRESHOLD, threshold):
            # the trim threshold only with it: either one alone turns off glibc's adaptive thresholds
            return threshold if mallopt(M_TRIM_THRESHOLD, 1 << 30) else 0
    return 0


def set_up_process():
    """What every script's process runs with, a pool's workers too: freed memory kept, and stdout
    written line by line (else progress in `> log` or `| tee log` comes in 8 KB bursts)."""
    keep_freed_memory()
    if hasattr(sys.stdout, "reconfigure"):   # a notebook's stdout has no reconfigure
        sys.stdout.reconfigure(line_buffering=True)


def run_main(main):
    """Run main(argv) in a set-up process; a UserError becomes 'error: ...' on stderr and exit code 2,
    Ctrl-C 'interrupted' and exit code 130, and output piped into a reader that stops (`| head`) ends
    the run quietly, exit code 1."""
    set_up_process()
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:   # Ctrl-C: no traceback (train.py's main says what its checkpoint holds instead)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:   # `| head` stopped reading: end quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's own flush at exit would fail again
        sys.exit(1)
