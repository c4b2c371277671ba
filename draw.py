"""
Pictures of a circuit record (prune.py's <task>.json) as SVG text, no plotting library: the circuit
(sites in layer order, nodes as labeled dots, edges colored by sign and weighted by |w|) and the
task loss against the number of kept nodes. Open them in a browser; hover a dot or a line for its
numbers.

    python draw.py --circuit=out/circuits/single_double_quote.json   # (re)writes the two .svg beside it
"""

import html
import json
import math
import os
from dataclasses import dataclass

from config import UserError, parse_args, run_main, write_atomic


@dataclass
class DrawConfig:
    circuit: str = "out/circuits/single_double_quote.json"   # a record written by prune.py


RECORD_KEYS = ("task", "nodes", "edges", "n_nodes", "n_edges", "losses", "curve", "settings", "model_config")
RESIDUAL = ("attn.act_in", "attn.resid_delta", "mlp.act_in", "mlp.resid_delta")   # residual-stream channels
COLORS = {"attn.act_in": "#888", "attn.q": "#e08214", "attn.k": "#1b9e77", "attn.v": "#7570b3",
          "attn.resid_delta": "#222", "mlp.act_in": "#888", "mlp.post_act": "#0a7d8c", "mlp.resid_delta": "#222"}
SVG_HEAD = ('<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">\n'
            '<rect width="{w}" height="{h}" fill="white"/>')


def node_label(site, i, d_head):
    """r<channel> on the residual stream, h<head>.<dim> for q/k/v, n<index> for a neuron."""
    kind = site.split(".", 1)[1]
    if kind in ("attn.q", "attn.k", "attn.v"):
        return f"h{i // d_head}.{i % d_head}"
    return f"n{i}" if kind == "mlp.post_act" else f"r{i}"


def text(x, y, s, size=11, anchor="start", color="#222"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}">'
            f'{html.escape(s)}</text>')


def line(x1, y1, x2, y2, color, extra="", title=""):
    title = f"<title>{html.escape(title)}</title>" if title else ""
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" {extra}>{title}</line>'


def circuit_svg(rec):
    """One row per site with kept nodes, layer 0 at the bottom (the computation flows up). A residual
    channel keeps its column in every residual row, so a dashed vertical line is the residual stream
    carrying it; a q/k/v channel or neuron sits over the mean of its neighbours. Edges: blue w > 0,
    red w < 0, width ~ |w|. Hover a node or an edge for its numbers."""
    nodes, edges, d_head = rec["nodes"], rec["edges"], rec["model_config"]["d_head"]
    rows = list(dict.fromkeys(n["site"] for n in nodes))                   # in the model's site order
    by_row = {s: sorted(n["index"] for n in nodes if n["site"] == s) for s in rows}
    is_resid = lambda s: s.split(".", 1)[1] in RESIDUAL
    resid = sorted({i for s in rows if is_resid(s) for i in by_row[s]})
    dx, dy, x0, y0 = 46, 64, 170, 70
    row_y = {s: y0 + (len(rows) - 1 - r + 0.5) * dy for r, s in enumerate(rows)}
    col = {i: x0 + (c + 0.5) * dx for c, i in enumerate(resid)}
    pos = {(s, i): (col[i], row_y[s]) for s in rows if is_resid(s) for i in by_row[s]}
    near = {}                                 # every edge joins a residual node and a q/k/v channel or neuron
    for e in edges:
        a, b = (e["src"], e["i"]), (e["dst"], e["j"])
        near.setdefault(b if a in pos else a, []).append(pos[a if a in pos else b][0])
    want = {key: sum(xs) / len(xs) for key, xs in near.items()}
    for s in (s for s in rows if not is_resid(s)):
        x = x0 - dx / 2
        for i in sorted(by_row[s], key=lambda i: want.get((s, i), math.inf)):
            x = max(x + dx, want.get((s, i), 0))   # over its neighbours' mean, at least dx after the last
            pos[s, i] = (x, row_y[s])
    width, height = max([x for x, _ in pos.values()] + [x0 + 6 * dx]) + dx, y0 + max(1, len(rows)) * dy + 20
    L = rec["losses"]
    out = [SVG_HEAD.format(w=f"{width:.0f}", h=height),
           text(10, 20, f"{rec['task']}: {rec['n_nodes']} nodes, {rec['n_edges']} edges", 15),
           text(10, 38, f"test loss: circuit {L['circuit']:.3f} (target {rec['settings']['target_loss']}), "
                f"full model {L['full']:.3f}, circuit ablated {L['circuit_ablated']:.3f} (chance 0.693)"),
           text(10, 54, "edges: blue w > 0, red w < 0, width ~ |w|; dashed: the residual stream (same channel); "
                "hover for details", 10, color="#666")]
    for s in rows:
        out += [line(x0 - 10, row_y[s], width - 10, row_y[s], "#eee"),
                text(10, row_y[s] + 4, f"{s} ({len(by_row[s])})", 12, color=COLORS[s.split('.', 1)[1]])]
    for i in resid:   # one dashed line per residual channel, from its lowest to its highest kept node
        ys = [pos[s, i][1] for s in rows if (s, i) in pos and is_resid(s)]
        out.append(line(col[i], min(ys), col[i], max(ys), "#bbb", 'stroke-dasharray="4 3"'))
    wmax = max([abs(e["w"]) for e in edges] + [1e-12])
    for e in edges:
        (x1, y1), (x2, y2) = pos[e["src"], e["i"]], pos[e["dst"], e["j"]]
        out.append(line(x1, y1, x2, y2, "#2166ac" if e["w"] > 0 else "#b2182b",
                        f'stroke-width="{0.5 + 3.5 * abs(e["w"]) / wmax:.2f}" stroke-opacity="0.75"',
                        f'{e["src"]}[{e["i"]}] -> {e["dst"]}[{e["j"]}]: w = {e["w"]:.4g}'))
    for n in nodes:
        (x, y), label = pos[n["site"], n["index"]], node_label(n["site"], n["index"], d_head)
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{COLORS[n["site"].split(".", 1)[1]]}"><title>'
                f'{n["site"]}[{n["index"]}] ({label}): mean {n["mean"]:.4g}, tau {n["tau"]:.3f}</title></circle>',
                text(x, y + 18, label, 9, "middle")]
    if not nodes:
        out.append(text(x0, y0 + dy / 2, "empty circuit: the fully ablated model meets the target", 13))
    return "\n".join(out + ["</svg>"]) + "\n"


def curve_svg(rec):
    """Task loss on the fixed bisection batches against kept nodes (log axis), with the target, the
    full model's loss and the chosen circuit marked."""
    pts = sorted((c["nodes"], c["loss"]) for c in rec["curve"])
    width, height, left, right, top, bottom = 640, 400, 60, 20, 50, 50
    full, target, chosen = pts[-1][1], rec["settings"]["target_loss"], rec["n_nodes"]   # all kept = the full model
    worst = max(max(l for _, l in pts), target, math.log(2))
    step = 0.1 if worst <= 1 else 0.25 if worst <= 2.5 else 1.0
    ymax, xmax = step * math.ceil(worst / step + 0.01), max(1.0, math.log10(1 + pts[-1][0]))
    fx = lambda n: left + (width - left - right) * math.log10(1 + n) / xmax
    fy = lambda l: height - bottom - (height - top - bottom) * min(l, ymax) / ymax
    loss = "calibrated task loss" if rec["settings"].get("calibrate") else "task loss"   # what k was bisected on
    out = [SVG_HEAD.format(w=width, h=height),
           text(10, 20, f"{rec['task']}: {loss} against kept nodes (the bisection prompts: fixed, not the masks' own)",
                14),
           line(left, height - bottom, width - right, height - bottom, "#222"),
           line(left, top, left, height - bottom, "#222"),
           text((left + width) / 2, height - 12, "kept nodes (log scale)", 12, "middle")]
    for tick in [0] + [10 ** p for p in range(int(xmax) + 1)]:
        out += [line(fx(tick), height - bottom, fx(tick), height - bottom + 5, "#222"),
                text(fx(tick), height - bottom + 18, str(tick), 10, "middle")]
    for i in range(round(ymax / step) + 1):
        out += [line(left - 5, fy(i * step), left, fy(i * step), "#222"),
                text(left - 8, fy(i * step) + 4, f"{i * step:.2f}", 10, "end")]
    for y, color, dash, label in ((target, "#b2182b", "6 4", f"target {target}"),
                                  (full, "#1b9e77", "2 3", f"full model {full:.3f}")):
        out += [line(left, fy(y), width - right, fy(y), color, f'stroke-dasharray="{dash}"'),
                text(width - right - 4, fy(y) - 4, label, 10, "end", color)]
    out += [line(fx(chosen), top, fx(chosen), height - bottom, "#7570b3", 'stroke-dasharray="4 3"'),
            text(fx(chosen) + 4, top + 12, f"circuit: {chosen} nodes", 10, color="#7570b3"),
            '<polyline fill="none" stroke="#2166ac" stroke-width="1.5" points="'
            + " ".join(f"{fx(n):.1f},{fy(l):.1f}" for n, l in pts) + '"/>']
    out += [f'<circle cx="{fx(n):.1f}" cy="{fy(l):.1f}" r="3" fill="#2166ac"><title>{n} nodes: loss {l:.4f}</title>'
            '</circle>' for n, l in pts]
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv):
    cfg = parse_args(DrawConfig, argv)
    try:
        with open(cfg.circuit) as f:
            rec = json.load(f)
    except FileNotFoundError:
        task = os.path.splitext(os.path.basename(cfg.circuit))[0]
        raise UserError(f"{cfg.circuit} does not exist: python prune.py --task={task} writes it; "
                        "or pass --circuit=PATH")
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.circuit} is not a readable circuit record ({type(e).__name__})")
    if isinstance(rec, dict) and rec.get("n_nodes", 0) is None:   # headline.py's cache of a failed search
        raise UserError(f"{cfg.circuit} is headline.py's record of a search that found no circuit: {rec.get('error')}")
    missing = [k for k in RECORD_KEYS if k not in rec] if isinstance(rec, dict) else list(RECORD_KEYS)
    if missing:
        raise UserError(f"{cfg.circuit} is not a circuit record of prune.py (no {', '.join(missing)})")
    try:
        pictures = circuit_svg(rec), curve_svg(rec)
    except (TypeError, LookupError, ValueError, AttributeError, ArithmeticError) as e:   # a record edited by hand
        raise UserError(f"{cfg.circuit} is a damaged circuit record ({type(e).__name__}: {e})")
    base = os.path.splitext(cfg.circuit)[0]
    for path, svg in zip((base + ".svg", base + "_loss.svg"), pictures):
        write_atomic(path, svg)
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
