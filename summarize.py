"""Tools over run folders: tables, figures, the commands behind a table, and a speed check.
No method imports this file; every run writes its own record (run.json, log.csv, final.json).

    python summarize.py runs/                  # one Markdown row per experiment: mean ± std over the seeds
    python summarize.py runs/ --csv            # the same rows as CSV
    python summarize.py runs/ --by-machine     # runs of different machines (CPU/GPU, torch, threads) apart
    python summarize.py figures results/laptop # curves.png (test top-1 per epoch) and seeds.png
    python summarize.py readme [--check]       # README's generated tables, rewritten (or compared) from results/
    python summarize.py grid laptop            # the commands behind the laptop table, one per line
    python summarize.py grid speed | bash      # every method's --bench, for README's speed table (idle machine)
    python summarize.py results/speed          # the speed table over bench records (bench.json)
    python summarize.py speed [--out F.json]   # on-device data pipeline vs DataLoader; channels_last

A table in README.md is the output of `python summarize.py FOLDER` pasted unchanged between the lines
`<!-- summarize.py FOLDER -->` and `<!-- end -->`; `readme --check` (and a test) keeps the two equal.
"""
import argparse
import csv
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import common

HERE = os.path.dirname(os.path.abspath(__file__))

# settings that do not make two runs different experiments: the seed, how they were run, what was derived
# (and a teacher's checkpoint path: the teacher's architecture, teacher_arch, stays a setting)
NOT_SETTINGS = common.RUN_CONTROL | {"seed", "scaled", "extended_from", "resolved", "devices", "teacher",
                                     "machine", "data"}


# =================================================================================================
# Reading run folders
# =================================================================================================

def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _lock_held(folder):
    """True while a run holds the folder's lock (common._lock_run_dir): running, not stopped."""
    path = os.path.join(folder, ".lock")
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _read_record(path, kind, check=None):
    """The JSON dict at path, with a "method"; check(r) may raise for what else it must hold. None, after a
    warning on stderr naming the file, when it cannot be read or fails a check (the row is skipped)."""
    try:
        with open(path) as f:
            r = json.load(f)
        if not isinstance(r, dict) or not isinstance(r.get("method"), str):
            raise ValueError("no method")
        if check:
            check(r)
        return r
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"warning: skipped {path}: not a readable {kind} file ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _deploy_number(r):
    if not _number(r["last"][r["deploy"]]):  # the one number the table needs
        raise ValueError(f"last[{r['deploy']!r}] = {r['last'][r['deploy']]!r} is not a number")


def _positive_rates(b):
    for k in ("seconds_per_step", "images_per_second"):
        if not _number(b.get(k)) or b[k] <= 0:
            raise ValueError(f"{k} = {b.get(k)!r} is not a positive number")


def read_runs(root):
    """(finished final.json dicts, unfinished run.json dicts) of the run folders directly under root.
    An unfinished record gets "state": "running" (its lock is held) or "stopped". A file that cannot be
    read, or a final.json whose deployable top-1 is not a number, is skipped with a warning on stderr."""
    done, unfinished = [], []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        final, started = os.path.join(folder, "final.json"), os.path.join(folder, "run.json")
        path = final if os.path.isfile(final) else started if os.path.isfile(started) else None
        if path is None:
            continue
        r = _read_record(path, "run", _deploy_number if path == final else None)
        if r is None:
            continue
        r["folder"] = name
        if path == final:
            done.append(r)
        else:
            r["state"] = "running" if _lock_held(folder) else "stopped"
            unfinished.append(r)
    return done, unfinished


def _settings(r):
    a = r.get("args", r)  # final.json keeps the arguments under "args"; run.json is the arguments
    return {k: v for k, v in a.items() if k not in NOT_SETTINGS and k != "folder" and k != "state"}


def _data_key(r):
    """What identifies the data (recorded since run.json/final.json have "data"): runs on other data are
    other experiments, whatever their options say."""
    d = r.get("data") or {}
    return {k: d[k] for k in ("train_images", "labels_sha256") if k in d}


def _machine_key(r):
    m = r.get("machine") or {}
    return {"device": m.get("device", r.get("device")), "torch": m.get("torch"), "threads": m.get("threads")}


def _device(r):
    return (r.get("machine") or {}).get("device") or r.get("device")


def _mean_std(vals):
    """(mean, sample std, n) of a list; std None for one value (no spread measured), (None, None, 0) for none."""
    if not vals:
        return None, None, 0
    return (round(float(np.mean(vals)), 2), round(float(np.std(vals, ddof=1)), 2) if len(vals) > 1 else None,
            len(vals))


def groups(done, unfinished, by_machine=False):
    """Runs that differ only in the seed and in how they were run, as {key: group}; a group holds its
    settings, its finished records and its unfinished ones. Different data (number of training images,
    label checksum) always makes a different group; with by_machine, so does the machine."""
    out = {}
    for kind, records in (("done", done), ("unfinished", unfinished)):
        for r in records:
            ident = {**_settings(r), "data": _data_key(r)}
            if by_machine:
                ident["machine"] = _machine_key(r)
            key = json.dumps(ident, sort_keys=True, default=str)
            out.setdefault(key, {"settings": ident, "done": [], "unfinished": []})[kind].append(r)
    return out


def _varying(gs):
    """The settings that differ between groups of one method, arch and dataset: the table's extra columns."""
    families = {}
    for g in gs:
        families.setdefault(tuple(g["settings"].get(k) for k in ("method", "arch", "dataset")), []).append(g)
    keys = sorted({k for g in gs for k in g["settings"]} - {"method", "arch", "dataset"})
    return [k for k in keys if any(len({json.dumps(g["settings"].get(k), sort_keys=True, default=str) for g in fam}) > 1
                                   for fam in families.values())]


def _cell(v):
    if isinstance(v, dict):  # data / machine identities: their values, compactly
        return " ".join(str(x) for x in v.values() if x is not None)
    return "" if v is None else str(v)


# =================================================================================================
# The table
# =================================================================================================

def rows(root, by_machine=False):
    """One row per experiment (see groups): the deployable head's last-epoch top-1 as mean, sample std and
    n over the finished seeds, the "ensemble" head, the deployable head's training top-1 (final.json's
    train_last), parameters, training seconds per run (and with the teacher's, for a run distilled from
    a teacher whose run folder is under root), device, and the unfinished runs (running/stopped)."""
    if not os.path.isdir(root):
        common.fail(f"{root}: no such folder (give the folder that holds the run folders, e.g. runs/)")
    done, unfinished = read_runs(root)
    if not done and not unfinished:
        common.fail(f"{root} holds no run folders (a run folder has run.json or final.json; "
                    f"give the folder above them, e.g. runs/ or results/laptop)")
    gs = list(groups(done, unfinished, by_machine).values())
    varying = _varying(gs)
    teacher_seconds = _teacher_seconds(root, done)
    table = []
    for g in sorted(gs, key=lambda g: json.dumps([g["settings"].get(k) for k in
                                                  ("method", "arch", "dataset", *varying)], default=str)):
        done_, first, st = g["done"], (g["done"][0] if g["done"] else {}), g["settings"]
        dep = _mean_std([r["last"][r["deploy"]] for r in done_])
        ens = _mean_std([r["last"]["ensemble"] for r in done_ if _number(r["last"].get("ensemble"))])
        train = _mean_std([r["train_last"][r["deploy"]] for r in done_
                           if isinstance(r.get("train_last"), dict) and _number(r["train_last"].get(r["deploy"]))])
        secs = [r.get("seconds") for r in done_]
        with_teacher = [s + teacher_seconds[id(r)] for s, r in zip(secs, done_) if id(r) in teacher_seconds and _number(s)]
        table.append({
            "method": st.get("method"), "arch": st.get("arch"), "dataset": st.get("dataset"),
            **{k: st.get(k) for k in varying}, "deploy": first.get("deploy", ""),
            "deploy_mean": dep[0], "deploy_std": dep[1], "n": dep[2],
            "ensemble_mean": ens[0], "ensemble_std": ens[1], "train_top1_mean": train[0],
            "params": (first.get("params") or {}).get(first["deploy"]) if done_ else None,
            "seconds_per_run": round(float(np.mean(secs))) if secs and all(_number(s) for s in secs) else None,
            "seconds_with_teacher": round(float(np.mean(with_teacher))) if with_teacher else None,
            "device": _device(first) if done_ else None,
            "running": sum(r["state"] == "running" for r in g["unfinished"]),
            "stopped": sum(r["state"] == "stopped" for r in g["unfinished"])})
    return table, varying


def _teacher_seconds(root, done):
    """{id(run): its teacher's training seconds} for the offline runs (SOKD, KD, ReviewKD) whose --teacher
    checkpoint lies in a finished run folder under root: a student distilled from a teacher costs both."""
    out = {}
    for r in done:
        path = (r.get("args") or {}).get("teacher")
        if not path:
            continue
        final = os.path.join(root, os.path.basename(os.path.dirname(os.path.normpath(path))), "final.json")
        try:
            with open(final) as f:
                seconds = json.load(f).get("seconds")
        except (OSError, ValueError, AttributeError):
            continue
        if _number(seconds):
            out[id(r)] = seconds
    return out


def markdown(table, varying):
    """The rows as a Markdown table (what README pastes)."""
    fmt = lambda m, s, n: "" if m is None else f"{m:.2f}" + ("" if s is None else f" ± {s:.2f}") + \
        (f" (n={n})" if n is not None else "")
    unfinished = any(r["running"] or r["stopped"] for r in table)
    teacher = any(r["seconds_with_teacher"] is not None for r in table)
    cols = ["method", "arch", "dataset", *varying, "deploy", "top-1 (deploy)", "ensemble", "train top-1",
            "params", "s/run (train)"] + (["s/run + teacher"] if teacher else []) + ["device"] + \
        (["running", "stopped"] if unfinished else [])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in table:
        cells = [r["method"], r["arch"], r["dataset"], *[r[k] for k in varying], r["deploy"],
                 fmt(r["deploy_mean"], r["deploy_std"], r["n"]), fmt(r["ensemble_mean"], r["ensemble_std"], None),
                 None if r["train_top1_mean"] is None else f"{r['train_top1_mean']:.2f}", r["params"],
                 r["seconds_per_run"]] + ([r["seconds_with_teacher"]] if teacher else []) + [r["device"]] + \
            ([r["running"] or "", r["stopped"] or ""] if unfinished else [])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def summarize(root, as_csv=False, plot=True, by_machine=False):
    """Print the table of the runs under root (Markdown, or CSV) and, with plot, write its figures. A folder
    of bench records (bench.json, no run records) prints the speed table instead, and draws nothing."""
    if os.path.isfile(root):  # a `speed --out` record
        print(pipeline_markdown(root))
        return []
    if os.path.isdir(root) and is_bench_folder(root):
        table, varying, plot = bench_rows(root), None, False
    else:
        table, varying = rows(root, by_machine)
        benches = [n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, "bench.json"))
                   and not os.path.isfile(os.path.join(root, n, "run.json"))]
        if benches:
            print(f"warning: {len(benches)} bench record(s) under {root} left out ({', '.join(sorted(benches)[:3])}"
                  f"{', ...' if len(benches) > 3 else ''}): the speed table reads a folder of bench records only",
                  file=sys.stderr)
    if as_csv:
        w = csv.DictWriter(sys.stdout, fieldnames=list(table[0]) if table else ["method"])
        w.writeheader()
        w.writerows({k: _cell(v) if isinstance(v, dict) else v for k, v in r.items()} for r in table)
    else:
        print(markdown(table, varying) if varying is not None else bench_markdown(table))
    if plot:
        figures(root)
    return table


# =================================================================================================
# The speed table: the bench.json records of `--bench` runs
# =================================================================================================

def read_benches(root):
    """The bench.json dicts of the folders directly under root (a file that cannot be read is skipped
    with a warning on stderr), each with its "folder"."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "bench.json")
        if not os.path.isfile(path):
            continue
        b = _read_record(path, "bench", _positive_rates)
        if b is None:
            continue
        out.append({**b, "folder": name})
    return out


def _bench_options(benches):
    """{folder: "--peers 3 ..."}: the settings in which a bench differs from the other benches of its method."""
    by_method, out = {}, {}
    for b in benches:
        by_method.setdefault(b["method"], []).append(b)
    for fam in by_method.values():
        sets = [{k: v for k, v in (b.get("args") or {}).items() if k not in NOT_SETTINGS} for b in fam]
        keys = sorted(k for k in {k for s in sets for k in s}
                      if len({json.dumps(s.get(k), default=str) for s in sets}) > 1)
        for b, s in zip(fam, sets):
            flags = []
            for k in keys:
                v, flag = s.get(k), "--" + k.replace("_", "-")
                if v is None or v is False:
                    continue
                flags.append(flag if v is True else f"{flag} {' '.join(map(str, v))}".rstrip()
                             if isinstance(v, list) else f"{flag} {v}")
            out[b["folder"]] = " ".join(flags)
        alike = lambda b: (out[b["folder"]], json.dumps(_machine_key(b), sort_keys=True, default=str))
        ids = [alike(b) for b in fam]
        for b, k in zip(fam, ids):  # still alike on one machine (no args recorded, or they differ only in
            if ids.count(k) > 1:    # how they ran): the folder tells them apart
                out[b["folder"]] = f"{out[b['folder']]} ({b['folder']})".strip()
    return out


def bench_rows(root):
    """One row per bench record under root, by machine, then in LAPTOP_METHODS' order: step time, images/s,
    the cost relative to the baseline's step, trained parameters, the loop's images/s over the bare
    step's, peak memory, where it ran and the 1-minute load at its start.
    The cost is the record's own `cost_vs_baseline` (a plain net of the same arch timed in the same run,
    in alternating chunks); a record without it (older, --compile, DDP) is divided by the baseline bench of
    the same arch, dataset, image size, batch, machine, AMP and compile setting under root, if there is
    one, and marked "(across runs)"."""
    benches = read_benches(root)
    same = lambda b: json.dumps([b.get("arch"), (b.get("args") or {}).get("dataset"), (b.get("args") or {}).get(
        "image_size"), b.get("batch_size"), _machine_key(b), b.get("amp"), b.get("compile")], default=str)
    base = {same(b): b["seconds_per_step"] for b in benches if b["method"] == "baseline"}
    options = _bench_options(benches)
    order = {m: i for i, m in enumerate(LAPTOP_METHODS)}
    table = []
    for b in sorted(benches, key=lambda b: (same(b), order.get(b["method"], len(order)), b["method"], options[b["folder"]])):
        a, ms = b.get("args") or {}, 1000 * b["seconds_per_step"]
        load = (b.get("load_average") or {}).get("before")
        in_run = b.get("cost_vs_baseline")
        table.append({
            "method": b["method"], "options": options[b["folder"]], "arch": b.get("arch"),
            "teacher": a.get("teacher_arch") or "", "batch": b.get("batch_size"), "params": b.get("params_trained"),
            "ms_per_step": round(ms), "images_per_second": round(b["images_per_second"]),
            "cost": round(in_run, 2) if _number(in_run) else
            round(b["seconds_per_step"] / base[same(b)], 2) if same(b) in base else None,
            "cost_across_runs": not _number(in_run) and same(b) in base,
            "loop_over_bare": b.get("loop_over_bare"), "peak_gb": round(b["peak_memory_bytes"] / 2**30, 1)
            if _number(b.get("peak_memory_bytes")) else None,
            "device": _device(b), "threads": _machine_key(b)["threads"] or b.get("threads"),
            "load": load[0] if load else None, "commit": (b.get("machine") or {}).get("commit")})
    return table


def bench_markdown(table):
    cols = ["method", "options", "arch", "teacher", "batch", "params trained", "ms/step", "img/s", "cost vs baseline",
            "loop / bare (img/s)", "peak memory", "device", "threads", "load (1 min)"]
    keys = ["method", "options", "arch", "teacher", "batch", "params", "ms_per_step", "images_per_second", "cost",
            "loop_over_bare", "peak_gb", "device", "threads", "load"]
    fmt = {"peak_gb": lambda v, r: f"{v:.1f} GB", "load": lambda v, r: f"{v:.2f}",
           "loop_over_bare": lambda v, r: f"{v:.3f}",
           "cost": lambda v, r: f"{v:.2f}x" + (" (across runs)" if r["cost_across_runs"] else "")}
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in table:
        lines.append("| " + " | ".join("" if r[k] is None else fmt[k](r[k], r) if k in fmt else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines)


def is_bench_folder(root):
    """True when root holds bench records (bench.json) and no run records: the speed table's folder."""
    names = [n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))]
    has = lambda n, f: os.path.isfile(os.path.join(root, n, f))
    return any(has(n, "bench.json") for n in names) and not any(has(n, "run.json") or has(n, "final.json")
                                                              for n in names)


def table_markdown(root, by_machine=False):
    """What `python summarize.py ROOT` prints: the pipeline table of a `speed --out` record (a file), the
    speed table over bench records, else the runs' table."""
    if os.path.isfile(root):
        return pipeline_markdown(root)
    if os.path.isdir(root) and is_bench_folder(root):
        return bench_markdown(bench_rows(root))
    return markdown(*rows(root, by_machine))


# =================================================================================================
# Figures (matplotlib, optional)
# =================================================================================================

def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: `pip install matplotlib` to get the figures", file=sys.stderr)
        return None


# ten well-separated hues (matplotlib's tab10), then the same hues dashed, dotted, dash-dotted
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
LINES = ["-", "--", ":", "-."]


def _style(i):
    """Colour and line style of the i-th experiment: neighbours always differ in colour."""
    return PALETTE[i % len(PALETTE)], LINES[(i // len(PALETTE)) % len(LINES)]


def _label(g, varying):
    st = g["settings"]
    extra = [f"{k}={_cell(st.get(k))}" for k in varying if k not in ("data", "machine") and st.get(k) is not None]
    return " ".join([st["method"], st.get("arch", "")] + extra)


def figures(root, out=None):
    """curves.png and seeds.png for the runs under root (into out, default root). Returns their paths."""
    plt = _pyplot()
    if plt is None:
        return []
    done, _ = read_runs(root)
    if not done:
        return []
    out = out or root
    return [p for p in (plot_curves(plt, curve_series(root, done), out), plot_seeds(plt, done, out)) if p]


def curve_series(root, done):
    """What curves.png draws: one series per finished run, [{label, colour, line, x, y}], the deployable
    head's test top-1 at every evaluated epoch (log.csv). One colour/line style per experiment (group)
    and one label per experiment, so that runs of different settings never share a colour."""
    gs = sorted(groups(done, []).values(), key=lambda g: _label(g, []))
    varying = _varying(gs)
    series = []
    for i, g in enumerate(gs):
        colour, line = _style(i)
        first = True
        for r in sorted(g["done"], key=lambda r: r.get("seed", 0)):
            try:
                with open(os.path.join(root, r["folder"], "log.csv")) as f:
                    log = [row for row in csv.DictReader(f) if row.get(r["deploy"]) not in ("", None)]
                x, y = [int(row["epoch"]) for row in log], [float(row[r["deploy"]]) for row in log]
            except (OSError, ValueError, KeyError):
                continue
            series.append({"label": f"{_label(g, varying)} (n={len(g['done'])})" if first else None,
                           "group": i, "colour": colour, "line": line, "x": x, "y": y})
            first = False
    return series


def _save(plt, fig, out, name):
    """Write a figure to out/name (PNG, 110 dpi), close it, say so on stderr; return the path."""
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)
    return path


def plot_curves(plt, series, out):
    """curves.png: every series drawn with markers, so that a run evaluated once is a visible point; the
    right panel repeats the last third of training, where the methods separate."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.3]})
    last = max((x for s in series for x in s["x"]), default=1)
    for ax, lo in zip(axes, (0, 0.65 * last)):
        for s in series:
            keep = [i for i, x in enumerate(s["x"]) if x >= lo]
            ax.plot([s["x"][i] for i in keep], [s["y"][i] for i in keep], color=s["colour"], linestyle=s["line"],
                    marker="o", markersize=3, linewidth=1.2, alpha=0.85, label=s["label"] if lo else None)
        epochs = sorted({x for s in series for x in s["x"] if x >= lo})
        if len(epochs) <= 15:
            ax.set_xticks(epochs)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 % (deployable head)")
    axes[1].set_title("the last third of training", fontsize=9)
    axes[1].legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, out, "curves.png")


def plot_seeds(plt, done, out):
    """seeds.png: per experiment of the most common (arch, dataset), the deployable head's last-epoch
    top-1 of every seed (dots) and their mean (dash), beside the baseline's range (band) and mean (line)."""
    gs = sorted(groups(done, []).values(), key=lambda g: _label(g, []))
    colour = {id(g): _style(i)[0] for i, g in enumerate(gs)}  # the colours of curves.png
    shape = max({(g["settings"].get("arch"), g["settings"].get("dataset")) for g in gs},
                key=lambda s: sum((g["settings"].get("arch"), g["settings"].get("dataset")) == s for g in gs))
    gs = [g for g in gs if (g["settings"].get("arch"), g["settings"].get("dataset")) == shape]
    varying = _varying(gs)
    accs = lambda g: [r["last"][r["deploy"]] for r in g["done"]]
    gs.sort(key=lambda g: float(np.mean(accs(g))))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    base = [g for g in gs if g["settings"]["method"] == "baseline"]
    if base:
        b = accs(base[0])
        ax.axhspan(min(b), max(b), color="0.85", label=f"baseline: range of its {len(b)} run(s)")
        ax.axhline(float(np.mean(b)), color="0.4", linestyle="--", linewidth=1, label="baseline: mean")
    for i, g in enumerate(gs):
        a = accs(g)
        ax.hlines(float(np.mean(a)), i - 0.3, i + 0.3, color="0.2", linewidth=1.5, zorder=2,
                  label="mean of the seeds" if i == 0 else None)
        ax.scatter([i] * len(a), a, color=colour[id(g)], zorder=3, s=22)
    ax.set_xticks(range(len(gs)))
    ax.set_xticklabels([_label(g, varying).replace(f" {shape[0]}", "") for g in gs], rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylabel("test top-1 % at the last epoch")
    ax.set_title(f"{shape[0]} on {shape[1]}: every seed (dots) and their mean (dash), methods by mean", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(plt, fig, out, "seeds.png")


# =================================================================================================
# README's generated tables
# =================================================================================================

MARK = re.compile(r"<!-- summarize\.py ([^>]*?) -->\n(.*?)<!-- end -->", re.S)


def readme(check=False, path=os.path.join(HERE, "README.md")):
    """Rewrite every block `<!-- summarize.py ARGS -->` ... `<!-- end -->` of README with the table that
    `python summarize.py ARGS` prints (ARGS: a folder relative to the repository, optionally --by-machine).
    check: change nothing; return the list of blocks that differ."""
    with open(path) as f:
        text = f.read()
    stale = []

    def regenerate(m):
        a = m.group(1).split()
        new = table_markdown(os.path.join(HERE, a[0]), by_machine="--by-machine" in a) + "\n"
        if new != m.group(2):
            stale.append(m.group(1))
        return f"<!-- summarize.py {m.group(1)} -->\n{new}<!-- end -->"

    updated = MARK.sub(regenerate, text)
    if not check and updated != text:
        with open(path, "w") as f:
            f.write(updated)
    return stale


# =================================================================================================
# The commands behind a table (and a SLURM array over them: slurm_grid.sh)
# =================================================================================================

LAPTOP = "--dataset cifar10 --data-dir data --epochs 60 --eval-every 10 --gpus cpu --resume"
LAPTOP_METHODS = ["baseline", "dml", "kdcl", "one", "ffl", "pcl", "mcl", "cl", "okddip", "ffsd", "oeckd", "sokd", "kd",
                  "reviewkd"]
# rows of a method with another setting: name -> (method, options)
LAPTOP_VARIANTS = {"okddip-detached": ("okddip", "--detach-targets")}
TEACHER = "--teacher runs/laptop/teacher-resnet14-s0/checkpoint.pt --teacher-arch resnet14"


# the speed table: every method's --bench at the protocol's shapes (resnet32, CIFAR-100, batch 128) on the CPU,
# one after the other on an idle machine; the offline methods time a randomly initialised teacher of their
# default architecture (no checkpoint needed)
SPEED = "--arch resnet32 --bench 20 --gpus cpu"
SPEED_VARIANTS = {"dml-p3": ("dml", "--peers 3"), "dml-p4": ("dml", "--peers 4")}


def grid(name):
    """[(stage, run name, command)] of a table: stage "teachers" runs first, "students" may need them;
    the speed table's benches are stage "benches" (run them one at a time, on an idle machine)."""
    if name == "speed":
        cmds = [("benches", m, f"python {m}.py {SPEED}") for m in LAPTOP_METHODS]
        cmds += [("benches", v, f"python {m}.py {SPEED} {options}") for v, (m, options) in SPEED_VARIANTS.items()]
        return [(stage, run, f"{cmd} --out runs/speed/{run}") for stage, run, cmd in cmds]
    if name != "laptop":
        common.fail(f"unknown grid {name!r}; known: laptop, speed")
    cmds = [("teachers", "teacher-resnet14-s0", f"python baseline.py {LAPTOP} --arch resnet14 --seed 0")]
    for seed in (0, 1, 2):
        for m in LAPTOP_METHODS:
            extra = f" {TEACHER}" if m in ("sokd", "kd", "reviewkd") else ""
            cmds.append(("students", f"{m}-s{seed}", f"python {m}.py {LAPTOP} --arch resnet8 --seed {seed}{extra}"))
        for variant, (m, options) in LAPTOP_VARIANTS.items():
            cmds.append(("students", f"{variant}-s{seed}",
                         f"python {m}.py {LAPTOP} --arch resnet8 --seed {seed} {options}"))
    return [(stage, run, f"{cmd} --out runs/{name}/{run}") for stage, run, cmd in cmds]


# =================================================================================================
# Speed of the data pipeline and of the memory layout
# =================================================================================================

def speed(batch_size=128, batches=30, device="cpu", out=None, arch="resnet32"):
    """Measured in one run: images/s of common's on-device pipeline against torchvision's DataLoader
    with the usual PIL transforms (2 workers), and a training step of `arch` with and without
    channels_last. Synthetic CIFAR-shaped images; no dataset needed. out: also write the record there
    (JSON: the numbers, the machine, the load averages before and after; README's table is made from it)."""
    load_before = common.load_average()
    import torchvision.transforms as T
    from PIL import Image
    n = batch_size * batches
    x = np.random.RandomState(0).randint(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = np.random.RandomState(1).randint(0, 100, n)
    mean, std = common.DATASETS["cifar100"][5:7]

    class PILSet(torch.utils.data.Dataset):  # what torchvision.datasets.CIFAR100.__getitem__ does
        tf = T.Compose([T.RandomCrop(32, 4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

        def __len__(self):
            return n

        def __getitem__(self, i):
            return self.tf(Image.fromarray(x[i])), int(y[i])

    def rate(it):
        t0 = time.perf_counter()
        m = sum(len(b[1]) for b in it)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return m / (time.perf_counter() - t0)

    loader = common.Loader(x.transpose(0, 3, 1, 2), y, mean, std, device, batch_size, True)
    rate(loader.epoch(0))  # warm-up
    ours = rate(loader.epoch(1))
    dl = torch.utils.data.DataLoader(PILSet(), batch_size=batch_size, shuffle=True, num_workers=2,
                                     pin_memory=device.startswith("cuda"), persistent_workers=True)
    rate(dl)
    theirs = rate((xb.to(device), yb.to(device)) for xb, yb in dl)
    print(f"data pipeline, batch {batch_size}, {device}: on-device {ours:.0f} img/s, "
          f"DataLoader+PIL (2 workers) {theirs:.0f} img/s, ratio {ours / theirs:.1f}x")
    del dl  # stop the workers before timing the model
    res = {False: [], True: []}
    for _ in range(3):  # alternate the two layouts, keep the median of three rounds each
        for cl in (False, True):
            torch.manual_seed(0)
            fmt = torch.channels_last if cl else torch.contiguous_format
            net = common.build_model(arch, 100).to(device).to(memory_format=fmt)
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            xb = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
            yb = torch.randint(0, 100, (batch_size,), device=device)

            def steps(k):
                for _ in range(k):
                    loss = F.cross_entropy(net(xb), yb)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
            steps(2)
            t0 = time.perf_counter()
            steps(10)
            res[cl].append(10 * batch_size / (time.perf_counter() - t0))
    res = {k: float(np.median(v)) for k, v in res.items()}
    print(f"{arch} training step, batch {batch_size}, {device}: contiguous {res[False]:.0f} img/s, "
          f"channels_last {res[True]:.0f} img/s, ratio {res[True] / res[False]:.2f}")
    if out:
        common.atomic_json({"pipeline": {"batch_size": batch_size, "batches": batches, "device": device, "arch": arch,
                                         "on_device_images_per_second": round(ours, 1),
                                         "dataloader_images_per_second": round(theirs, 1),
                                         "contiguous_images_per_second": round(res[False], 1),
                                         "channels_last_images_per_second": round(res[True], 1)},
                            "machine": common.machine_info(device),
                            "load_average": {"before": load_before, "after": common.load_average()}}, out)
        print(f"record -> {out}")
    return ours, theirs, res


def pipeline_markdown(path):
    """The table of a `speed --out` record: what README pastes for the data pipeline and the memory layout."""
    try:
        with open(path) as f:
            r = json.load(f)
        p = r["pipeline"]
        on, dl = p["on_device_images_per_second"], p["dataloader_images_per_second"]
        c, cl = p["contiguous_images_per_second"], p["channels_last_images_per_second"]
        if not all(_number(v) and v > 0 for v in (on, dl, c, cl)):
            raise ValueError("a rate that is not a positive number")
    except (OSError, ValueError, KeyError, TypeError) as e:
        common.fail(f"{path}: not a record of `summarize.py speed --out` ({type(e).__name__}: {e})")
    m, load = r.get("machine") or {}, (r.get("load_average") or {}).get("before")
    return "\n".join([
        "| measured in one run | result |", "|---|---|",
        f"| on-device crop + flip + normalise vs torchvision DataLoader with PIL transforms (RandomCrop(32, 4), "
        f"flip, ToTensor, Normalize; 2 workers), batch {p.get('batch_size')} | {on:,.0f} vs {dl:,.0f} img/s: "
        f"**{on / dl:.1f}x** |",
        f"| {p.get('arch', 'resnet32')} training step on {p.get('device')}, channels_last vs contiguous (median of 3 alternating rounds) | "
        f"{cl:,.0f} vs {c:,.0f} img/s: **{cl / c:.2f}x** |",
        f"| where | {m.get('device')}, torch {m.get('torch')}, {m.get('threads')} threads, commit {m.get('commit')}, "
        f"load (1 min) {load[0] if load else 'not recorded'} |"])


# =================================================================================================
# Command line
# =================================================================================================

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv and argv[0] in ("figures", "readme", "grid", "speed") else "table"
    p = argparse.ArgumentParser(prog=f"python summarize.py{'' if cmd == 'table' else ' ' + cmd}",
                                description=__doc__.split("\n\n")[0])
    rest = argv if cmd == "table" else argv[1:]
    if cmd == "table":
        p.add_argument("root", nargs="?", default="runs", help="the folder that holds the run folders (or the bench "
                       "folders: the speed table; or a `speed --out` record)")
        p.add_argument("--csv", action="store_true", help="CSV on stdout instead of Markdown")
        p.add_argument("--by-machine", action="store_true", help="runs of different machines in different rows")
        p.add_argument("--no-plot", action="store_true", help="do not write curves.png and seeds.png")
        a = p.parse_args(rest)
        summarize(a.root, a.csv, plot=not a.no_plot, by_machine=a.by_machine)
    elif cmd == "figures":
        p.add_argument("root")
        p.add_argument("--out", help="folder for the PNGs (default: root)")
        a = p.parse_args(rest)
        rows(a.root)  # the same one-line errors as the table
        figures(a.root, a.out)
    elif cmd == "readme":
        p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
        a = p.parse_args(rest)
        stale = readme(check=a.check)
        for s in stale:
            print(f"README.md: the table of `summarize.py {s}` " + ("differs from its records" if a.check
                                                                     else "was regenerated"), file=sys.stderr)
        sys.exit(1 if a.check and stale else 0)
    elif cmd == "grid":
        p.add_argument("name", help="the table: laptop or speed")
        p.add_argument("--stage", choices=["teachers", "students", "benches"], help="only this stage's commands")
        p.add_argument("--index", type=int, help="only the i-th command (0-based) of the selection")
        p.add_argument("--count", action="store_true", help="print how many commands the selection has")
        a = p.parse_args(rest)
        cmds = [c for s, _, c in grid(a.name) if a.stage in (None, s)]
        if a.count:
            print(len(cmds))
        elif a.index is not None:
            if not 0 <= a.index < len(cmds):
                common.fail(f"--index {a.index}: the selection has {len(cmds)} commands (0..{len(cmds) - 1})")
            print(cmds[a.index])
        else:
            print("\n".join(cmds))
    else:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--out", help="also write the record here (JSON), e.g. results/speed/pipeline.json")
        a = p.parse_args(rest)
        speed(device=a.device, out=a.out)


if __name__ == "__main__":
    main()
