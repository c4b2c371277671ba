"""
The 20 binary next-token tasks on Python code (docs/METHOD.md section 4): prompt generators, the task
loss, evaluation, and the bracket-counting context-dilution probe.

    python tasks.py                                        # the tasks, their rules, one example each
    python tasks.py --ckpt=out/cpu/ckpt.pt                 # loss and accuracy on every task (test prompts)
    python tasks.py --ckpt=out/cpu/ckpt.pt --task=single_double_quote --n_prompts=512
    python tasks.py --ckpt=out/cpu/ckpt.pt --probe=bracket_dilution   # P(]]) against nested-list length
    python tasks.py --help                                 # every setting

A task is a function (rng, label) -> (prompt, correct answer, alternative answer): label 0 or 1
picks which of its two classes to draw, so a prompt set alternates them and is exactly balanced.
Both answers must be single tokens of our tokenizer (data.py's BPE learns each one, whatever the
corpus; WORD_STARTS are answered by their first token), and the prompt must end where the tokenizer
would split it from the answer: make_prompts checks this for every prompt and raises at once if
not. A prompt's split (train or test) is a hash of its text, so the splits never share a prompt.
A model whose context (block_size) is shorter than a task's longest prompt is not asked that task:
a one-line error names the task, the prompt's length and the block_size (prompts are not dropped,
so every model is measured on the same prompts). A model is read with the tokenizer it was trained
with: the data folder its checkpoint records.
To add a task: write one function next to the others (its docstring's first line is the rule
`python tasks.py` lists) and add it to TASKS. An answer after indentation carries the last space
(` x` after N-1 spaces: see var_if). The tokenizer learns every task's answers (tasks.answers()), so
the data cache is built anew, once, under a new name; a model trained before keeps its own and cannot
be asked an answer that its tokenizer splits.
"""

import functools
import random
import zlib
from collections import namedtuple
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
from config import UserError, parse_args, resolve_device, run_main
from sparse_gpt import load_checkpoint, model_in


@dataclass
class TaskConfig:
    ckpt: str = ""              # model to evaluate; empty = list the tasks with one example each
    task: str = "all"           # one task name, or all
    probe: str = ""             # bracket_dilution: P(]]) against nested-list length (needs --ckpt)
    split: str = "test"         # train | test
    n_prompts: int = 256        # per task; even, half of each class
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"        # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        if self.task != "all":
            get_task(self.task)
        if self.split not in ("train", "test"):
            raise UserError(f"--split={self.split} is unknown; allowed: train, test")
        if self.n_prompts <= 0 or self.n_prompts % 2:
            raise UserError(f"--n_prompts={self.n_prompts} must be positive and even (half of each class)")
        if self.batch_size <= 0:
            raise UserError(f"--batch_size={self.batch_size} must be positive")
        if self.probe not in ("", "bracket_dilution"):
            raise UserError(f"--probe={self.probe} is unknown; allowed: bracket_dilution")
        if self.probe and not self.ckpt:
            raise UserError("--probe needs a model: add --ckpt=PATH")
        if self.probe:   # it makes its own prompts: a setting of the tasks' prompts would be silently ignored
            unused = [key for key in ("task", "split", "n_prompts", "batch_size")
                      if getattr(self, key) != getattr(TaskConfig, key)]
            if unused:
                raise UserError(f"--{unused[0]}={getattr(self, unused[0])} is not used by --probe={self.probe}, "
                                "which makes its own prompts (it takes --seed and --device)")

# -----------------------------------------------------------------------------
# pieces of realistic code: identifiers, literals and surrounding lines the tasks draw from

# names whose ' name' is one token, so they can be answers (checked in test_all.py)
NAMES = ("name", "path", "key", "value", "data", "item", "node", "size", "mode", "text", "line",
         "count", "result", "start", "end", "root", "source", "prefix", "encoding", "filename",
         "config", "message", "handler", "parser", "stream", "width", "state", "default", "action",
         "args", "child", "code", "context", "event", "frame", "func", "group", "header", "match",
         "method", "module", "obj", "option", "output", "pattern", "pos", "spec", "string", "url",
         "user", "version")
# names of the surrounding code: never an answer, so the filler cannot hand a task its answer
LOCALS = ("offset", "length", "parts", "entry", "fields", "limit", "total", "index", "chunk", "flags",
          "extra", "target", "buf", "tmp", "lineno", "timeout", "options", "cache", "level", "status")
NOUNS = ("header", "name", "entry", "config", "line", "token", "record", "value", "path", "item",
         "field", "block", "option", "file", "mode", "module", "argument", "address", "timeout")
VERBS = ("get", "check", "make", "find", "format", "update", "handle", "process", "build", "convert", "split")
CLASSES = ("Parser", "Reader", "Handler", "Entry", "Config", "Node", "Request", "Record", "Formatter",
           "Loader", "Archive", "Connection", "Message", "Stream")
BASES = ("", "(object)", "(Base)", "(Exception)", "(dict)", "(unittest.TestCase)")
# every phrase ends in a letter, so a closing quote or brace after it is a token of its own
PHRASES = ("cannot open {a}", "invalid {a} for {b}", "expected {a}", "unknown {a}", "{a} must not be empty",
           "missing {a} in {b}", "bad {a}", "{a} is not supported", "unexpected end of {a}", "no such {a}")
DOCS = ("Return the {a} of the {b}.", "Parse the {a} and its {b}.", "Check that the {a} is valid.",
        "Convert the {a} to a {b}.", "Build the {a} from the {b}.", "Handle one {a}.")
FILLER = ("{a} = {b}.get({s})", "{a} = len({b})", "{a} = {b}.{c}", "{a}.update({b})", "{a}.append({b})",
          "{a} = {b}[{n}:]", "{a} += {n}", "{a} = os.path.join({b}, {s})", "# {p}", "{a} = {b} or {c}",
          "if {a} is None:\n    {a} = {s}", "{a} = {s}")


def phrase(rng, templates=PHRASES):
    return rng.choice(templates).format(a=rng.choice(NOUNS), b=rng.choice(NOUNS))


def quoted(rng):
    q = rng.choice("\"'")   # both quote styles, as in the standard library
    return f"{q}{phrase(rng)}{q}"


def filler(rng, ind, k):
    """k ordinary statements at indentation ind (each string closed, each bracket balanced)."""
    out = ""
    for _ in range(k):
        a, b, c = rng.sample(LOCALS, 3)
        stmt = rng.choice(FILLER).format(a=a, b=b, c=c, n=rng.randint(1, 9), s=quoted(rng), p=phrase(rng))
        out += "".join(" " * ind + line + "\n" for line in stmt.split("\n"))
    return out


def head(rng, params=None, method=None, name=None):
    """Start of a function: a def line (a method, sometimes under its class line, or a module-level
    function), maybe a docstring, then 0-3 filler statements. -> (text, body indentation)"""
    method = rng.random() < 0.5 if method is None else method
    params = tuple(rng.sample(LOCALS, rng.randint(0, 2)) if params is None else params)
    text, ind = "", 8 if method else 4
    if method and rng.random() < 0.5:
        text += f"class {rng.choice(CLASSES)}{rng.choice(BASES)}:\n"
    name = name or f"{rng.choice(('', '_'))}{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    text += " " * (ind - 4) + f"def {name}({', '.join(('self',) * method + params)}):\n"
    if rng.random() < 0.5:
        text += " " * ind + f'"""{phrase(rng, DOCS)}"""\n'
    return text + filler(rng, ind, rng.randint(0, 3)), ind


def pick(label, first, second):
    """(correct, alternative): label 0 is the class whose answer is `first`."""
    return (first, second) if label == 0 else (second, first)

# -----------------------------------------------------------------------------
# the tasks: docstring line 1 is the rule, line 2 an example `prompt end -> correct | alternative`

def single_double_quote(rng, label):
    """The quote that opened the string closes it: `")` | `')`.
    raise ValueError("unknown option  ->  `")` | `')`"""
    text, ind = head(rng)
    call = rng.choice(("raise ValueError", "raise TypeError", "print", "warnings.warn", "parser.error", "log.debug"))
    q = ('"', "'")[label]
    return f"{text}{' ' * ind}{call}({q}{phrase(rng)}", *pick(label, '")', "')")


def bracket_counting(rng, label):
    """A flat list closes with `]`, a list of lists with `]]`.
    x = [[1, 2], [3, 4  ->  `]]` | `]`"""
    text, ind = head(rng)
    ints = lambda k: ", ".join(str(rng.randint(0, 999)) for _ in range(k))
    if label == 0:
        body = ints(rng.randint(1, 8))
    else:
        body = ", ".join(f"[{ints(rng.randint(1, 4))}]" for _ in range(rng.randint(1, 5)))[:-1]
    return f"{text}{' ' * ind}{rng.choice(LOCALS)} = [{body}", *pick(label, "]", "]]")


def set_or_string(rng, label, var=None):
    """A variable made by `set()` grows with `.add`, one made by `""` with ` +=`.
    seen = set() ... for ch in text: seen  ->  `.add` | ` +=`"""
    var = var or rng.choice(("seen", "result", "out", "found", "chars", "acc", "collected", "keys", "letters"))
    src, ch = rng.choice(NAMES), rng.choice(("ch", "c", "char", "part", "word", "x", "s"))
    text, ind = head(rng, params=(src,))
    sp = " " * ind
    init = "set()" if label == 0 else rng.choice(('""', "''"))
    text += f"{sp}{var} = {init}\n" + filler(rng, ind, rng.randint(0, 2)) + f"{sp}for {ch} in {src}:\n"
    if rng.random() < 0.5:
        text += f"{sp}    if {rng.choice((f'{ch} not in {rng.choice(LOCALS)}', f'not {ch}.isspace()', f'{ch}'))}:\n"
        sp += "    "
    return f"{text}{sp}    {var}", *pick(label, ".add", " +=")


def set_or_string_fixedvarname(rng, label):
    """set_or_string with the variable always named `current`, so its name tells nothing.
    current = "" ... for ch in text: current  ->  ` +=` | `.add`"""
    return set_or_string(rng, label, var="current")


RESOURCES = ("open({p})", "open({p}, 'rb')", "open({p}, encoding='utf-8')", "gzip.open({p})", "tarfile.open({p})",
             "zipfile.ZipFile({p})", "sqlite3.connect({p})", "socket.create_connection(({p}, port))",
             "urllib.request.urlopen({p})", "os.scandir({p})", "self._open({p})")


def with_as(rng, label):
    """A `with` line names its context manager with ` as`; the same call assigned ends the line.
    with gzip.open(path)  ->  ` as` | `\\n`"""
    text, ind = head(rng)
    call = rng.choice(RESOURCES).format(p=rng.choice(NAMES))
    var = rng.choice(("f", "fp", "fh", "conn", "sock", "archive", "src", "it"))
    line = f"with {call}" if label == 0 else f"{var} = {call}"
    return f"{text}{' ' * ind}{line}", *pick(label, " as", "\n")


def with_open(rng, label):
    """A function that reads (by its name) opens its file with `r`, one that writes with `w`.
    def load_config(self, path): ... with open(path, '  ->  `r` | `w`   (our `'r'` is 3 tokens)"""
    verb = rng.choice(("read", "load", "parse", "scan") if label == 0 else ("write", "save", "dump", "store"))
    p = rng.choice(("path", "filename", "file", "fn", "name"))
    extra = rng.sample(("data", "encoding", "text", "obj", "lines"), rng.randint(0, 1))
    text, ind = head(rng, params=(p, *extra), name=f"{rng.choice(('', '_'))}{verb}_{rng.choice(NOUNS)}")
    return f"{text}{' ' * ind}with {rng.choice(('open', 'io.open', 'codecs.open'))}({p}, '", *pick(label, "r", "w")


def for_while(rng, label):
    """`for x` goes on with ` in`, `while x` with `:`.
    for node  ->  ` in` | `:`"""
    text, ind = head(rng)
    var = rng.choice(("node", "stack", "queue", "line", "data", "chunk", "item", "todo", "pending", "child", "rest"))
    return f"{text}{' ' * ind}{('for', 'while')[label]} {var}", *pick(label, " in", ":")


def else_elif(rng, label):
    """`elif` goes on with the variable the chain tests, `else` with `:`.
    if mode == 'r': ... elif  ->  ` mode` | `:`"""
    text, ind = head(rng)
    var = rng.choice(NAMES)
    for i in range(rng.randint(1, 3)):
        test = rng.choice((f"{var} == {quoted(rng)}", f"{var} is None", f"{var} < {rng.randint(0, 9)}",
                           f"{var} in ({quoted(rng)}, {quoted(rng)})"))
        body = filler(rng, ind + 4, rng.randint(1, 2))
        if all(line.lstrip().startswith("#") for line in body.splitlines()):   # comments alone are no block
            body += " " * (ind + 4) + "pass\n"                               # no draw: the rng goes on as before
        text += f"{' ' * ind}{'elif' if i else 'if'} {test}:\n" + body
    return f"{text}{' ' * ind}{('elif', 'else')[label]}", *pick(label, " " + var, ":")


def conditions(rng):
    x, y = rng.sample(NAMES, 2)
    return rng.choice((f"{x} is None", f"{x} is not None", f"not {x}", x, f"self.{x}", f"{x} in {y}"))


def if_ternary(rng, label):
    """An `if` statement's condition ends with `:`, a conditional expression's with ` else`.
    if value is None  ->  `:` | ` else`"""
    text, ind = head(rng)
    lead = "if" if label == 0 else f"{rng.choice((rng.choice(LOCALS) + ' =', 'return'))} {rng.choice(NAMES)} if"
    return f"{text}{' ' * ind}{lead} {conditions(rng)}", *pick(label, ":", " else")


def if_equals(rng, label):
    """A name in an `if` condition is compared with ` ==`; at the start of a line assigned with ` =`.
    if self.mode  ->  ` ==` | ` =`"""
    text, ind = head(rng)
    x, y = rng.sample(NAMES, 2)
    lhs = rng.choice((x, f"self.{x}", f"self._{x}", f"{x}.{y}"))
    return f"{text}{' ' * ind}{'if ' if label == 0 else ''}{lhs}", *pick(label, " ==", " =")


def fstring_brace(rng, label):
    """`{name` in an f-string is a placeholder closed by `}`; in code it opens a dict, key then `:`.
    msg = f"cannot open {path  ->  `}` | `:`"""
    text, ind = head(rng)
    x, y = rng.sample(NAMES, 2)
    expr = rng.choice((x, f"self.{x}", f"{x}.{y}"))
    lead = rng.choice(("return ", "yield ", f"{rng.choice(LOCALS)} = "))
    q = rng.choice("\"'")
    body = f"f{q}{phrase(rng).capitalize()} {{{expr}" if label == 0 else f"{{{expr}"
    return f"{text}{' ' * ind}{lead}{body}", *pick(label, "}", ":")


def bracket_brace(rng, label):
    """In a dict literal a key is followed by `:`, in a list literal an item by `,`.
    codes = {errno.BAD_FILE: 'bad file', errno.NOT_OPEN  ->  `:` | `,`"""
    text, ind = head(rng)
    mod = rng.choice(("errno.", "stat.", "socket.", "signal.", "token.", ""))
    keys = [mod + "_".join(w.upper() for w in rng.sample(NOUNS, rng.randint(1, 2)))
            for _ in range(rng.randint(2, 6))]
    items = [f"{k}: {rng.choice((quoted(rng), str(rng.randint(0, 99)), rng.choice(NAMES)))}" if label == 0 else k
             for k in keys[:-1]] + [keys[-1]]
    sep = f",\n{' ' * (ind + 4)}" if rng.random() < 0.5 else ", "
    opening = "{" if label == 0 else "["
    if sep != ", ":
        opening += "\n" + " " * (ind + 4)
    return f"{text}{' ' * ind}{rng.choice(LOCALS)} = {opening}{sep.join(items)}", *pick(label, ":", ",")


PAIRS = (("a", "b"), ("x", "y"), ("i", "j"), ("start", "end"), ("key", "value"), ("node", "child"),
         ("u", "v"), ("p", "q"), ("m", "n"), ("s", "t"), ("name", "value"), ("line", "text"), ("source", "output"))


def var_swap(rng, label):
    """A swap names its targets again in reverse order: `i, j = j,` goes on with ` i`, not ` j`.
    i, j = j,  ->  ` i` | ` j`"""
    text, ind = head(rng)
    a, b = rng.choice(PAIRS)[::1 if label == 0 else -1]   # label: which name of the pair comes first
    if rng.random() < 0.6:
        text += f"{' ' * ind}if {a} > {b}:\n"
        ind += 4
    return f"{text}{' ' * ind}{a}, {b} = {b},", " " + a, " " + b


def var_if(rng, label):
    """The body of `if x is None:` assigns x, not the other optional parameter.
    def f(self, data, mode=None, encoding=None): ... if encoding is None:\\n(11 spaces)  ->  ` encoding` | ` mode`"""
    first, a, b = rng.sample(NAMES, 3)
    text, ind = head(rng, params=(first, f"{a}=None", f"{b}=None"))
    x, other = pick(label, a, b)                 # label: the first or the second optional parameter
    # the body's indentation is one token of ind+3 spaces: the last space goes with ` name`
    return f"{text}{' ' * ind}if {x} is None:\n{' ' * (ind + 3)}", " " + x, " " + other


def indent_for(rng, label):
    """The line after a `for` at 4 spaces starts with the 7-space token, after one at 8 with 11.
    (4 spaces)for line in lines:\\n  ->  7 spaces | 11 spaces   (the 8th space goes with ` name`)"""
    method = label == 1 and rng.random() < 0.5
    text, ind = head(rng, method=method)
    if label == 1 and not method:   # a function's `for` at 8 spaces: inside a block
        text += f"{' ' * ind}{rng.choice((f'if {conditions(rng)}:', f'while {conditions(rng)}:', 'try:'))}\n"
        ind += 4
    x, src = rng.sample(NAMES, 2)
    return f"{text}{' ' * ind}for {x} in {src}:\n", *pick(label, " " * 7, " " * 11)


def while_return_true(rng, label):
    """`while True` is followed by `:`, `return True` by the end of the line.
    while True  ->  `:` | `\\n`"""
    text, ind = head(rng)
    if rng.random() < 0.6:
        text += f"{' ' * ind}if {conditions(rng)}:\n"
        ind += 4
    return f"{text}{' ' * ind}{('while', 'return')[label]} True", *pick(label, ":", "\n")


def lambda_func(rng, label):
    """`lambda x` goes on with `:`, `def name` with `(` (then a name like `item`, not one token `(x`).
    key = lambda item  ->  `:` | `("""
    text, ind = head(rng)
    name = rng.choice(("key", "sort_key", "callback", "_filter", "check", "wrapper", "inner", "predicate"))
    arg = rng.choice(("item", "k", "v", "key", "line", "args", "entry", "record"))
    line = f"{name} = lambda {arg}" if label == 0 else f"def {name}"
    return f"{text}{' ' * ind}{line}", *pick(label, ":", "(")


def enumerate_range(rng, label):
    """`for i, x in` goes on with ` enumerate`, `for i in` with ` range`: the first token of each.
    for i, line in  ->  ` en` | ` range`   (our ` enumerate` is ` en` `um` `er` `ate`)"""
    text, ind = head(rng)
    i, x = rng.choice(("i", "n", "idx", "index", "pos", "lineno", "j", "k")), rng.choice(NAMES)
    target = f"{i}, {x}" if label == 0 else i
    return f"{text}{' ' * ind}for {target} in", *pick(label, " enumerate", " range")


def final_kwarg(rng, label):
    """After a parameter with a default the last one needs one too (`=None`); with none, `):`.
    def open(self, path, mode=None, encoding  ->  `=None` | `):`"""
    text, ind = head(rng)                       # the function before this one, with a body
    text += f"{' ' * ind}return {rng.choice(NAMES)}\n"
    *names, last = rng.sample(NAMES, rng.randint(3, 5))
    plain = rng.randint(1, len(names) - 1) if label == 0 else len(names)   # label 0: >= 1 default
    params = names[:plain] + [f"{n}={rng.choice(('None', 'None', 'False', '0'))}" for n in names[plain:]] + [last]
    method = ind == 8 and rng.random() < 0.8   # the next method of the class, or a module function
    fname = f"{rng.choice(('', '_'))}{rng.choice(VERBS)}_{rng.choice(NOUNS)}"
    sig = ", ".join(["self"] * method + params)
    return f"{text}\n{'    ' * method}def {fname}({sig}", *pick(label, "=None", "):")


def class_init(rng, label):
    """`self.x =` in `__init__` copies the parameter named x.
    def __init__(self, name, size): ... self.size =  ->  ` size` | ` name`"""
    params = rng.sample(NAMES, rng.randint(2, 4))
    x, other = pick(label, params[0], params[-1])  # label: the first or the last parameter
    text = f"class {rng.choice(CLASSES)}{rng.choice(BASES)}:\n"
    if rng.random() < 0.5:
        text += f'    """{phrase(rng, DOCS)}"""\n\n'
    text += f"    def __init__(self, {', '.join(params)}):\n"
    done = [p for p in params if p != x and rng.random() < 0.5]   # some assigned already, any order
    rng.shuffle(done)
    text += "".join(f"        self.{rng.choice(('', '_'))}{p} = {p}\n" for p in done)
    return f"{text}        self.{rng.choice(('', '_'))}{x} =", " " + x, " " + other


TASKS = {f.__name__: f for f in (
    single_double_quote, bracket_counting, set_or_string, set_or_string_fixedvarname, with_as, with_open,
    for_while, else_elif, if_ternary, if_equals, fstring_brace, bracket_brace, var_swap, var_if,
    indent_for, while_return_true, lambda_func, enumerate_range, final_kwarg, class_init)}

# -----------------------------------------------------------------------------
# prompt sets

Prompt = namedtuple("Prompt", "ids correct alt label")   # prompt token ids, answer token ids, class 0/1
MAX_PROMPT_TOKENS = 255                                  # prompt + answer fit block_size 256
# answers whose first token is the answer: the tokenizer splits a word as its corpus taught it (ours
# ` en` `um` `er` `ate`, Python 3.12's ` enum` `er` `ate`), and the model predicts that first piece
WORD_STARTS = (" enumerate",)


@functools.cache
def answers():
    """Every answer the tasks ask for as one token (all but WORD_STARTS), read off 200 drawn prompts
    of each class of each task: data.py makes each one a token where its corpus leaves one split."""
    drawn = set()
    for task in TASKS.values():
        for i in range(400):
            drawn.update(task(random.Random(f"answers/{i}"), i % 2)[1:])
    return tuple(sorted(drawn - set(WORD_STARTS)))


def get_task(name):
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def split_of(prompt):
    """train or test by a hash of the text alone: disjoint splits for any seeds and sizes."""
    return "test" if zlib.crc32(prompt.encode()) % 2 else "train"


def encode_example(enc, name, prompt, correct, alt):
    """(prompt ids, correct id, alt id). Raises unless each answer is one token that the tokenizer
    would also split off from prompt + answer (else the model never sees that token there); of an
    answer in WORD_STARTS, its first token, which must differ from the other answer's."""
    ids = enc.encode_ordinary(prompt)
    if len(ids) > MAX_PROMPT_TOKENS:
        raise UserError(f"task {name}: a prompt of {len(ids)} tokens (at most {MAX_PROMPT_TOKENS})")
    if correct == alt:
        raise UserError(f"task {name}: both answers are {correct!r}")
    answer_ids = []
    for answer in (correct, alt):
        full = enc.encode_ordinary(prompt + answer)
        one_token = len(full) == len(ids) + 1 or answer in WORD_STARTS and len(full) > len(ids)
        if full[:len(ids)] != ids or not one_token:
            pieces = [enc.decode([t]) for t in enc.encode_ordinary(answer)]
            raise UserError(f"task {name}: answer {answer!r} ({pieces} alone) is not one token after the prompt "
                            f"ending {prompt[-30:]!r} (a tokenizer of another corpus, or from before this task?)")
        answer_ids.append(full[len(ids)])
    if answer_ids[0] == answer_ids[1]:
        raise UserError(f"task {name}: answers {correct!r} and {alt!r} begin with the same token")
    return ids, answer_ids[0], answer_ids[1]


def make_prompts(name, enc, n, seed=0, split="train", block_size=None):
    """n distinct prompts of a task from one split, alternating the two classes (n/2 each).
    The same (name, n, seed, split) gives the same prompts on every machine. A task that cannot be
    posed (to a model of this block_size, with this tokenizer) is a one-line UserError."""
    task = get_task(name)
    if n <= 0 or n % 2 or split not in ("train", "test"):
        raise UserError(f"n={n} must be positive and even and split={split!r} train or test")
    rng = random.Random(f"{name}/{seed}")   # a str seed goes through sha512: no hash randomization
    prompts, seen = [], set()
    for _ in range(100 * n):
        if len(prompts) == n:
            break
        label = len(prompts) % 2
        prompt, correct, alt = task(rng, label)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        prompts.append(Prompt(*encode_example(enc, name, prompt, correct, alt), label))
    if len(prompts) < n:
        raise UserError(f"task {name}: only {len(prompts)} distinct {split} prompts in {100 * n} draws")
    longest = max(len(p.ids) for p in prompts)
    if block_size is not None and longest > block_size:
        raise UserError(f"task {name}: a {split} prompt of {longest} tokens does not fit the model's "
                        f"block_size={block_size}")
    return prompts

# -----------------------------------------------------------------------------
# loss and evaluation

def logit_diff(logits_last, correct, alt):
    """Correct minus alternative logit per prompt, (N,): all that the two-way softmax depends on."""
    return (logits_last.gather(1, correct[:, None]) - logits_last.gather(1, alt[:, None]))[:, 0]


def task_loss(logits_last, correct, alt):
    """(loss, accuracy) from logits at the last position (N, vocab) and answer ids (N,), (N,).
    Loss: binary cross-entropy over just the two answer logits, -log softmax([l_c, l_a])[0] =
    softplus(l_a - l_c), AVERAGED over prompts, not summed over the pair of answers (the authors'
    stored task losses are doubled: halve them to compare). Accuracy: l_c > l_a."""
    diff = logit_diff(logits_last, correct, alt).float()
    return F.softplus(-diff).mean(), (diff > 0).float().mean()


def prompt_losses(logits_last, correct, alt):
    """The task loss of each prompt, (N,): softplus(l_a - l_c)."""
    return F.softplus(-logit_diff(logits_last, correct, alt).float())


def answer_ids(prompts, device="cpu"):
    """Correct and alternative answer ids, (N,) and (N,)."""
    return (torch.tensor([p.correct for p in prompts], device=device),
            torch.tensor([p.alt for p in prompts], device=device))


def collate(prompts, device):
    """Right-padded batch: idx (B, T), each prompt's last position (B,), answer ids (B,), (B,).
    Right padding is exact for a causal model: the padding comes after the position we read, and
    AbsTopK acts within a position. (Left padding would shift the prompt and add attended tokens.)"""
    idx = torch.zeros(len(prompts), max(len(p.ids) for p in prompts), dtype=torch.long)  # pad id 0: never read
    for i, p in enumerate(prompts):
        idx[i, :len(p.ids)] = torch.tensor(p.ids)
    last = torch.tensor([len(p.ids) - 1 for p in prompts])
    return idx.to(device), last.to(device), *answer_ids(prompts, device)


@torch.no_grad()
def last_logits(model, prompts, device, batch_size=64):
    """Logits at each prompt's last position, (N, vocab), in prompt order. Batches hold prompts of
    similar length (sorted), so there is little padding to compute."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids))
    out = torch.empty(len(prompts), model.config.vocab_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        idx, last, _, _ = collate([prompts[i] for i in chunk], device)
        out[chunk] = model(idx, last=last)[0].float().cpu()
    return out


def evaluate(model, prompts, device, batch_size=64):
    """(task loss, accuracy) of the model on the prompts, as floats."""
    loss, acc = task_loss(last_logits(model, prompts, device, batch_size), *answer_ids(prompts))
    return loss.item(), acc.item()


@torch.no_grad()
def bracket_dilution(model, enc, device, seed=0, samples=32):
    """The paper's context dilution (docs/METHOD.md section 6): bracket counting averages an open-bracket
    detector over the context, so a long list of lists dilutes the depth signal and the model
    closes it with `]` instead of `]]`. Two layouts of n integers: n/2 inner lists of two
    (`x = [[1, 2], [3, 4], ..., [5, 6`) and one long inner list (`x = [[1, 2, 3, ..., 9`).
    Prints P(`]]`) in the full softmax over the vocabulary and within the two-way softmax ]] vs ]."""
    rng = random.Random(seed)
    ints = lambda k: ", ".join(str(rng.randint(0, 99)) for _ in range(k))
    layouts = {"pairs": lambda n: ", ".join(f"[{ints(2)}]" for _ in range(n // 2))[:-1],
               "one list": lambda n: f"[{ints(n)}"}
    print(f"P(]]) after a list of lists, mean of {samples} prompts; full = softmax over all tokens, "
          "2-way = ]] vs ]")
    print(f"{'ints':>5}" + "".join(f" | {name + ': tokens':>16} {'full':>6} {'2-way':>6}" for name in layouts))
    for n in (2, 4, 8, 12, 16, 24, 32, 48, 64):   # 64 integers: about 230 tokens
        row = f"{n:>5}"
        for make in layouts.values():
            texts = [f"{rng.choice(LOCALS)} = [{make(n)}" for _ in range(samples)]
            prompts = [Prompt(*encode_example(enc, "bracket_dilution", t, "]]", "]"), 1) for t in texts]
            if max(len(p.ids) for p in prompts) > model.config.block_size:   # a shorter context: stop here
                print(f"{n:>5} | and up: prompts longer than the model's block_size={model.config.block_size}")
                return
            logits = last_logits(model, prompts, device)                      # (N, vocab)
            full = logits.softmax(-1)[:, prompts[0].correct].mean()
            two_way = torch.sigmoid(logit_diff(logits, *answer_ids(prompts))).mean()
            tokens = sum(len(p.ids) for p in prompts) / len(prompts)
            row += f" | {tokens:>16.0f} {full:>6.3f} {two_way:>6.3f}"
        print(row)

# -----------------------------------------------------------------------------
# a trained model and its tokenizer

def load_model(path, device):
    """(model in eval mode, checkpoint, data folder) of a train.py checkpoint."""
    ckpt = load_checkpoint(path, device)
    return model_in(ckpt, path).to(device).eval(), ckpt, data.data_folder(ckpt)

# -----------------------------------------------------------------------------
# the script

def main(argv):
    cfg = parse_args(TaskConfig, argv)
    names = list(TASKS) if cfg.task == "all" else [cfg.task]
    cfg.device = resolve_device(cfg.device)   # also when it lists the tasks: a bad --device is a mistake there too
    if not cfg.ckpt:   # each task's rule (its docstring's first line) and one example
        enc = data.get_encoding(data.prepare(data.DataConfig()))   # prepare says so if it builds the cache
        for name in names:
            p, rule = make_prompts(name, enc, 2, cfg.seed, "train")[0], (TASKS[name].__doc__ or "(no docstring)")
            print(f"{name}: {rule.splitlines()[0]}\n    ...{enc.decode(p.ids)[-60:]!r}  ->  "
                  f"{enc.decode([p.correct])!r} | {enc.decode([p.alt])!r}")
        return
    model, _, folder = load_model(cfg.ckpt, cfg.device)
    enc = data.get_encoding(folder)
    if cfg.probe == "bracket_dilution":
        bracket_dilution(model, enc, cfg.device, cfg.seed)
        return
    print(f"{cfg.ckpt}: {cfg.split} prompts, seed {cfg.seed}; loss = two-way cross-entropy, mean over prompts")
    print(f"{'task':<28} {'prompts':>7} {'loss':>7} {'acc':>6}")
    results = []
    for name in names:
        try:
            prompts = make_prompts(name, enc, cfg.n_prompts, cfg.seed, cfg.split, model.config.block_size)
        except UserError as e:   # one task the model cannot be asked: the others still get their row
            if len(names) == 1:
                raise
            print(f"{name:<28} skipped: {e}")
            continue
        loss, acc = evaluate(model, prompts, cfg.device, cfg.batch_size)
        results.append((loss, acc))
        print(f"{name:<28} {len(prompts):>7} {loss:>7.4f} {acc:>6.3f}")
    if len(results) > 1:   # over the tasks that got a row
        mean_loss, mean_acc = (sum(column) / len(results) for column in zip(*results))
        print(f"{'mean':<28} {'':>7} {mean_loss:>7.4f} {mean_acc:>6.3f}")
        print(f"solved (loss <= 0.15, what pruning needs): {sum(loss <= 0.15 for loss, _ in results)}/{len(results)}")


if __name__ == "__main__":
    run_main(main)
