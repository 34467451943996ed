#!/usr/bin/env python3
"""The GPU check: one command that tests this project on a GPU machine and measures what the GPU tables need.

    python gpu_check.py --cifar100-pack gpu_pack/cifar100        # on a GPU machine: at most --budget (540 s)
    python gpu_check.py --tiny                                    # rehearsal of every part on the CPU (~1-2 min)

It runs five parts in this order, each as subprocesses with its own time limit; a part that runs out of time
is stopped and marked "timeout", and the next part runs. OUT/summary.md and OUT/summary.json are written at
the start and rewritten after every part (and on SIGTERM/SIGINT), so they are there however the check ends.

  env         GPU, driver (nvidia-smi), torch, CUDA, cuDNN, Python, CPU cores, pytest-xdist, a C++ compiler
  cuda_tests  the CUDA tests of test_methods.py (test_cuda_*: bf16 against fp32 per method, CUDA's sync
              detector around the step, on-device crop/flip against the CPU's, resume, --compile, peak memory
              per method): passed / failed / skipped, the failures' names, the recorded measurements
  tests       the rest of the suite (pytest -n auto when pytest-xdist is installed)
  bench       every method's --bench at the protocol's shapes (resnet32, CIFAR-100, batch 128, bf16), eager and
              --compile: ms/step, images/s, cost relative to the baseline, peak GPU memory, and the projected
              time of the 300-epoch protocol run (ms/step x 117,300 steps; evaluation and checkpoints not
              counted). All bench processes start together and warm up side by side (the compiled ones compile
              in parallel, sharing the cores), then each is timed alone while the others wait (common's
              OKD_BENCH_READY / OKD_BENCH_GO). Then k = 2, 4, 8 copies of one method timed at once: whether
              several runs at once use the GPU better than one.
  real        every method on CIFAR-100 (--cifar100-pack: the pack unpacked in the background while the tests
              run; or --data-dir), resnet32, the protocol with --epochs E scaled down, E the most epochs that the
              time left allows, computed from the measured step times and the concurrency that fits most
              epochs; SOKD's teacher is this comparison's baseline run. Run records (run.json, log.csv,
              final.json) are copied into OUT/real/<method>/.

--tiny rehearses all of it on the CPU (CUDA hidden): resnet8, a few steps, fake data, three methods, a quick
test selection, and --compile through dynamo's "eager" backend (OKD_COMPILE_BACKEND) instead of inductor.
Only torch, torchvision (its Pillow reads the pack), numpy and the standard library are used. Run it from the
repository root; OUT and its logs are printed at the start and the end.
"""
import argparse
import importlib.util
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ["baseline", "dml", "kdcl", "one", "ffl", "pcl", "mcl", "sokd", "cl", "okddip", "ffsd", "oeckd", "kd",
           "reviewkd"]
OFFLINE = ("sokd", "kd", "reviewkd")  # distil from a teacher: in the real-data part, that part's baseline run
TINY_METHODS = ["baseline", "pcl", "sokd"]  # plain, multi-view with EMA teachers, a teacher from the baseline run
PROTOCOL_STEPS = 300 * math.ceil(50_000 / 128)  # 117,300: the 300-epoch CIFAR protocol at batch 128
PARTS = ["env", "cuda_tests", "tests", "bench", "real"]
LIMITS = {"env": 30, "cuda_tests": 120, "tests": 150, "bench": 240, "real": None}  # seconds; None: what is left
TINY_LIMITS = {"env": 30, "cuda_tests": 90, "tests": 90, "bench": 150, "real": None}
RESERVE = 8  # seconds of the budget kept for the last summary
LIVE = set()  # processes started and not yet reaped: stopped on the way out


# ---- processes ----------------------------------------------------------------------------------------------

STOPS = {signal.SIGTERM, signal.SIGINT}


def start(cmd, log, env):
    """A process in its own session (so that it can be stopped with everything it started), output to `log`.
    SIGTERM/SIGINT wait until it is in LIVE: a stop that came between its start and LIVE.add would miss it and
    leave it running (seen: a SIGTERM just after the bench's first log file appeared). The child unblocks them."""
    f = open(log, "w")
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=HERE, env=env,
                             start_new_session=True,
                             preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS))
        p.logfile = f
        LIVE.add(p)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # a stop that came meanwhile is handled now
    return p


def stop(p):
    """SIGTERM to the process group, SIGKILL after 3 s; reaped."""
    if p.poll() is None:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reap(p)


def reap(p):
    p.poll()
    p.logfile.close()
    LIVE.discard(p)


def finish(p, deadline):
    """The exit code, or None when the deadline came first (the process is stopped)."""
    try:
        rc = p.wait(timeout=max(0.01, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop(p)
        return None
    reap(p)
    return rc


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ---- the check ----------------------------------------------------------------------------------------------

class Check:
    def __init__(self, a):
        self.a, self.t0 = a, time.monotonic()
        self.out, self.logs = a.out, os.path.join(a.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.work = a.work or tempfile.mkdtemp(prefix="gpu_check-")
        os.makedirs(self.work, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if a.tiny:  # a CPU rehearsal, also on a machine with a GPU; --compile through dynamo only
            self.env.update(CUDA_VISIBLE_DEVICES="", OKD_COMPILE_BACKEND="eager")
        self.parts = {p: {"status": "skipped" if p in a.skip else "pending"} for p in PARTS}
        self.md = {p: [] for p in PARTS}
        self.current, self.unpack = None, None
        self.info = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "out": os.path.abspath(self.out),
                     "work": self.work, "tiny": a.tiny, "budget_s": a.budget,
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}

    def left(self):
        return self.a.budget - (time.monotonic() - self.t0)

    def log(self, name):
        return os.path.join(self.logs, name + ".log")

    def run(self, name, fn):
        rec = self.parts[name]
        if rec["status"] == "skipped":
            rec["why"] = "--skip"
            return self.write()
        limit = self.a.limits.get(name) or (LIMITS if not self.a.tiny else TINY_LIMITS)[name]
        limit = min(limit, self.left() - RESERVE) if limit else self.left() - RESERVE
        if limit <= 0:
            rec.update(status="skipped", why="no time left in the budget")
            return self.write()
        t = time.monotonic()
        rec.update(status="running", limit_s=round(limit, 1))
        self.current = name
        self.write()
        print(f"gpu_check: {name} (at most {limit:.0f} s) ...", flush=True)
        try:
            status, data = fn(t + limit)
        except Exception:
            status, data = "error", {"traceback": traceback.format_exc()}
            self.md[name].append("```\n" + data["traceback"][-3000:] + "```")
        rec.update(status=status, seconds=round(time.monotonic() - t, 1), **data)
        self.current = None
        self.write()
        print(f"gpu_check: {name}: {status} in {rec['seconds']:.0f} s", flush=True)

    def write(self):
        self.info["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        summary = {**self.info, "parts": self.parts}
        atomic_text(os.path.join(self.out, "summary.json"), json.dumps(summary, indent=1, default=str))
        atomic_text(os.path.join(self.out, "summary.md"), self.markdown())

    def markdown(self):
        i = self.info
        lines = [f"# GPU check{' (tiny rehearsal on the CPU)' if i['tiny'] else ''}", "",
                 f"`{i['command']}`: started {i['started']} on {i['host']}, {i['elapsed_s']:.0f} s of a "
                 f"{i['budget_s']:.0f} s budget. Logs: `{os.path.join(i['out'], 'logs')}`.", "",
                 "| part | status | seconds | limit (s) |", "|---|---|---|---|"]
        for p in PARTS:
            r = self.parts[p]
            status = r["status"] + (f" ({r['why']})" if r.get("why") else "")
            lines.append(f"| {p} | {status} | {r.get('seconds', '')} | {r.get('limit_s', '')} |")
        for p in PARTS:
            if self.md[p]:
                lines += ["", f"## {p}", "", *self.md[p]]
        return "\n".join(lines) + "\n"

    def stop_all(self, signum, _frame):
        """SIGTERM / SIGINT: the running part is marked "killed", every child stopped, the summary written."""
        for p in list(LIVE):
            stop(p)
        if self.current:
            self.parts[self.current].update(status="killed", why=f"signal {signum}")
        self.write()
        print(f"gpu_check: stopped by signal {signum}; summary in {self.out}", flush=True)
        sys.exit(128 + signum)


def atomic_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows)]


# ---- env ------------------------------------------------------------------------------------------------------

ENV_CODE = r"""
import json, os, platform, shutil, importlib.util
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_cores": os.cpu_count(), "cpu": platform.processor(),
        "pytest_xdist": importlib.util.find_spec("xdist") is not None,
        "cxx": shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")}
try:
    with open("/proc/cpuinfo") as f:
        info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), info["cpu"])
except OSError:
    pass
try:
    import torchvision
    info["torchvision"] = torchvision.__version__
except ImportError:
    info["torchvision"] = None
if torch.cuda.is_available():
    info["cudnn"] = torch.backends.cudnn.version()
    info["bf16"] = torch.cuda.is_bf16_supported()
    info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                     "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                     "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                    for i in range(torch.cuda.device_count())]
print("ENV " + json.dumps(info))
"""


def part_env(c, deadline):
    p = start([sys.executable, "-c", ENV_CODE], c.log("env"), c.env)
    rc = finish(p, deadline)
    if rc is None:
        return "timeout", {}
    line = next((ln for ln in open(c.log("env")) if ln.startswith("ENV ")), None)
    if rc != 0 or line is None:
        c.md["env"].append("```\n" + tail(c.log("env")) + "```")
        return "failed", {}
    info = json.loads(line[4:])
    smi = shutil.which("nvidia-smi")
    if smi and not c.a.tiny:
        try:
            r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=max(1, min(15, deadline - time.monotonic())))
            info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"failed: {e}"
    else:
        info["nvidia_smi"] = None
    gpus = "; ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in info.get("gpus", [])) \
        or "none (CUDA not available" + (": hidden by --tiny)" if c.a.tiny else ")")
    c.md["env"] += table(["what", "value"], [
        ["GPU", gpus], ["driver (nvidia-smi)", info["nvidia_smi"] or "no nvidia-smi"],
        ["torch / CUDA / cuDNN", f"{info['torch']} / {info['cuda']} / {info.get('cudnn')}"],
        ["torchvision", info["torchvision"]], ["Python", info["python"]],
        ["CPU", f"{info['cpu']}, {info['cpu_cores']} cores"],
        ["pytest-xdist / C++ compiler", f"{info['pytest_xdist']} / {info['cxx']}"]])
    c.machine = info
    return "ok", {"env": info}


# ---- test suite -----------------------------------------------------------------------------------------------

OUTCOME = re.compile(r"(test_methods\.py::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
                     r"|(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(test_methods\.py::\S+)")


def read_junit(path):
    """{nodeid: (outcome, message)} and {nodeid: {property: value}} from pytest's junit XML."""
    results, props = {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        node = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            e = case.find(tag)
            if e is not None:
                outcome, msg = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], e.get("message", "")
                break
        results[node] = (outcome, msg)
        for pr in case.iter("property"):
            props.setdefault(node, {})[pr.get("name")] = pr.get("value")
    return results, props


def read_verbose_log(path):
    """{nodeid: (outcome, "")} from pytest -v output: what a run stopped by its time limit got through."""
    results = {}
    for line in open(path, errors="replace"):
        m = OUTCOME.search(line)
        if m:
            node, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            results[node] = (outcome.lower(), "")
    return results


def part_pytest(c, name, select, deadline):
    xml = os.path.join(c.out, f"{name}.xml")
    if os.path.exists(xml):
        os.remove(xml)
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "test_methods.py", "-k", select]
    xdist = importlib.util.find_spec("xdist") is not None
    if xdist and not c.a.tiny:
        cmd += ["-n", "auto"]
    p = start(cmd, c.log(name), c.env)
    rc = finish(p, deadline)
    results, props = read_junit(xml) if rc is not None and os.path.exists(xml) else (read_verbose_log(c.log(name)), {})
    counts = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    failures = {n: m[:300] for n, (o, m) in results.items() if o in ("failed", "error")}
    skips = {}
    for o, m in results.values():
        if o == "skipped":
            skips[m] = skips.get(m, 0) + 1
    status = "timeout" if rc is None else "ok" if rc == 0 else "failed" if rc == 1 else f"error (pytest exit {rc})"
    md = c.md[name]
    md.append("`python " + " ".join(f"'{x}'" if " " in x else x for x in cmd[1:]) + "`")
    md.append("")
    md.append((", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no test result read")
              + (f" (stopped at its time limit: the tests that finished before it, read from {c.log(name)})"
                 if rc is None else ""))
    if skips:
        md += ["", "Skipped: " + "; ".join(f"{n} x {m or '(no reason)'}" for m, n in skips.items())]
    if failures:
        md += ["", "Failed:", *(f"- `{n}`: {m}" for n, m in failures.items())]
    if rc not in (0, 1, None):
        md += ["", "```", tail(c.log(name)), "```"]
    if props:
        mem = [(n.split("[")[-1].rstrip("]"), v["peak_memory_mib"]) for n, v in props.items() if "peak_memory_mib" in v]
        if mem:
            md += ["", "Peak GPU memory of three bf16 training steps, resnet32, batch 128 (test_cuda_peak_memory_per_method):",
                   "", *table(["method", "peak MiB"], mem)]
        other = {n: v for n, v in props.items() if "peak_memory_mib" not in v}
        for n, v in other.items():
            md += ["", f"`{n}`: " + ", ".join(f"{k} = {x}" for k, x in v.items())]
    return status, {"counts": counts, "failures": failures, "skipped": skips, "properties": props,
                    "exit_code": rc, "junit": xml if os.path.exists(xml) else None}


# ---- bench ------------------------------------------------------------------------------------------------------

def method_args(c, m):
    """The options of a method's runs here beyond the shared ones: the teacher architecture of SOKD, KD, ReviewKD."""
    return ["--teacher-arch", c.arch, "--teacher", ""] if m in OFFLINE else []  # --bench: a random teacher


def part_bench(c, deadline):
    a = c.a
    t_start = time.monotonic()
    root = os.path.join(c.work, "bench")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    jobs = [{"name": f"{m}-{mode}", "method": m, "mode": mode, "group": None}
            for mode in ("eager", "compile") for m in c.methods]
    ks = [k for k in a.concurrency if k > 1]
    jobs += [{"name": f"{a.concurrency_method}-x{k}-{i}", "method": a.concurrency_method, "mode": "eager", "group": k}
             for k in ks for i in range(k)]
    n_compile = sum(j["mode"] == "compile" for j in jobs)
    threads = str(max(1, math.ceil(2 * (os.cpu_count() or 1) / max(1, n_compile))))
    for j in jobs:
        d = os.path.join(root, j["name"])
        j.update(dir=d, ready=d + ".ready", go=d + ".go" if j["group"] is None else os.path.join(root, f"x{j['group']}.go"))
        env = dict(c.env, OKD_BENCH_READY=j["ready"], OKD_BENCH_GO=j["go"])
        if j["mode"] == "compile":
            env["TORCHINDUCTOR_COMPILE_THREADS"] = threads  # many compiles side by side: the cores shared out
        cmd = [sys.executable, f"{j['method']}.py", "--arch", c.arch, "--dataset", "cifar100", "--batch-size", c.batch,
               "--gpus", c.gpus, "--bench", a.bench_steps, "--out", d, *method_args(c, j["method"])]
        if j["mode"] == "compile":
            cmd.append("--compile")
        j["proc"] = start(cmd, c.log("bench-" + j["name"]), env)
    # 1. every process warms up (and compiles) side by side, until ready or gone; at most 70% of the part's time
    warm_deadline = t_start + 0.7 * (deadline - t_start)
    while time.monotonic() < warm_deadline and not all(os.path.exists(j["ready"]) or j["proc"].poll() is not None
                                                       for j in jobs):
        time.sleep(0.1)
    warmed = time.monotonic() - t_start
    for j in jobs:
        if not os.path.exists(j["ready"]):
            if j["proc"].poll() is None:
                stop(j["proc"])
                j["status"] = "timeout (warm-up)"
            else:
                reap(j["proc"])
                j["status"] = f"failed (exit {j['proc'].returncode})"

    def timed(group):  # release the group, wait for its bench.json files (the processes exit on their own)
        if time.monotonic() >= deadline:
            return
        for j in group:
            open(j["go"], "w").close()
        for j in group:
            path = os.path.join(j["dir"], "bench.json")
            while not os.path.exists(path) and j["proc"].poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if os.path.exists(path):
                j["bench"], j["status"] = json.load(open(path)), "ok"
            elif j["proc"].poll() is not None:
                j["status"] = f"failed (exit {j['proc'].returncode})"
            else:
                j["status"] = "timeout"
    # 2. each method alone, eager then compiled; 3. the concurrency groups, one group at a time
    for j in jobs:
        if j["group"] is None and "status" not in j:
            timed([j])
    for k in ks:
        group = [j for j in jobs if j["group"] == k and "status" not in j]
        if group:
            timed(group)
    for j in jobs:
        if "status" not in j:
            j["status"] = "timeout"
        if j["proc"].poll() is None:
            finish(j["proc"], min(deadline, time.monotonic() + 10))
        else:
            reap(j["proc"])
    for j in jobs:
        if j.get("bench"):
            shutil.copy(os.path.join(j["dir"], "bench.json"), os.path.join(c.out, "bench", j["name"] + ".json"))

    # results
    res = {m: {} for m in c.methods}
    for j in jobs:
        if j["group"] is None:
            b = j.get("bench") or {}
            res[j["method"]][j["mode"]] = {"status": j["status"], "ms_per_step": round(1000 * b["seconds_per_step"], 2)
                                           if b else None, "images_per_second": b.get("images_per_second"),
                                           "peak_mib": round(b["peak_memory_bytes"] / 2**20) if b else None,
                                           "warmup_s": b.get("warmup_seconds"), "loop_over_bare": b.get("loop_over_bare"),
                                           # the baseline's step timed inside the same process (eager only)
                                           "cost_same_run": b.get("cost_vs_baseline")}
    for mode in ("eager", "compile"):
        base = (res.get("baseline", {}).get(mode) or {}).get("ms_per_step")
        for m in c.methods:
            r = res[m].get(mode)
            if r and r["ms_per_step"]:
                r["vs_baseline"] = round(r["ms_per_step"] / base, 2) if base else None
                r["protocol_hours"] = round(r["ms_per_step"] * PROTOCOL_STEPS / 3.6e6, 2)
    single = (res.get(a.concurrency_method, {}).get("eager") or {}).get("ms_per_step")
    conc = {1: {"ms_per_step": single, "speedup": 1.0 if single else None}}
    for k in ks:
        bs = [j["bench"] for j in jobs if j["group"] == k and j.get("bench")]
        if len(bs) == k and single:
            ms = 1000 * sum(b["seconds_per_step"] for b in bs) / k
            conc[k] = {"ms_per_step": round(ms, 2), "speedup": round(k * single / ms, 2),
                       "images_per_second": round(sum(b["images_per_second"] for b in bs), 1)}
        else:
            conc[k] = {"ms_per_step": None, "speedup": None, "status": "incomplete"}
    c.bench, c.concurrency = res, conc

    md = c.md["bench"]
    benches = [j["bench"] for j in jobs if j.get("bench")]
    amp = any(b.get("amp") for b in benches)
    on_cpu = any(b.get("device") == "cpu" for b in benches)
    peak = "peak RSS MiB" if on_cpu else "peak MiB"
    md += [f"{c.arch}, CIFAR-100 shapes (100 classes, 32x32), batch {c.batch}, "
           f"{benches[0]['device'] if benches else '--gpus ' + c.gpus}, --bench "
           f"{a.bench_steps} (ms/step: the loop's path, drawing and augmenting each batch on the device), "
           f"{'bf16 autocast' if amp else 'fp32'}; "
           f"projection: ms/step x {PROTOCOL_STEPS:,} steps (300 epochs), evaluation and checkpoints not counted. "
           f"All {len(jobs)} processes warmed up side by side ({warmed:.0f} s; the compiled ones compiling in "
           f"parallel, {threads} compile thread(s) each), then each was timed alone."
           + (" --compile here: dynamo's eager backend (no inductor), a rehearsal." if a.tiny else ""), ""]
    rows = []
    for m in c.methods:
        row = [m]
        for mode in ("eager", "compile"):
            r = res[m].get(mode) or {}
            if r.get("ms_per_step"):
                row += [r["ms_per_step"], r["images_per_second"], r.get("vs_baseline"),
                        *([r.get("cost_same_run")] if mode == "eager" else []), r["peak_mib"], r["protocol_hours"]]
            else:
                row += [r.get("status", "-"), "", "", *([""] if mode == "eager" else []), "", ""]
        row.append((res[m].get("compile") or {}).get("warmup_s"))
        rows.append(row)
    md += table(["method", "eager ms/step", "img/s", "x baseline", "x baseline, same process", peak, "300 ep (h)",
                 "compiled ms/step", "img/s",
                 "x compiled baseline", peak, "300 ep (h)", "warm-up incl. compile (s), side by side"], rows)
    md += ["", f"Several runs at once: k copies of `{a.concurrency_method}` (eager) timed together; speedup = k x "
               f"(ms/step alone) / (ms/step of each of the k).", "",
           *table(["k", "ms/step (each)", "speedup"], [[k, v["ms_per_step"], v["speedup"]] for k, v in conc.items()])]
    failed = [j["name"] for j in jobs if j["status"] != "ok"]
    if failed:
        md += ["", "Not measured: " + ", ".join(f"{n} ({j['status']}, log {c.log('bench-' + n)})"
                                               for n, j in ((j["name"], j) for j in jobs if j["status"] != "ok"))]
    status = "ok" if not failed else "timeout" if time.monotonic() >= deadline or any(
        j["status"].startswith("timeout") for j in jobs) else "failed"
    return status, {"bench": res, "concurrency": {str(k): v for k, v in conc.items()}, "warmup_s": round(warmed, 1)}


# ---- real data ----------------------------------------------------------------------------------------------

def unpack_cifar100(pack, dst):
    """The CIFAR-100 pack (MANIFEST.json, labels.npz, meta, mosaics of 100 x 100 images of 32 x 32) as torchvision's
    cifar-100-python/{train,test,meta}; lossless splits checked against the manifest's sha256. Pillow: torchvision's."""
    import hashlib
    from PIL import Image
    man = json.load(open(os.path.join(pack, "MANIFEST.json")))
    lab = np.load(os.path.join(pack, "labels.npz"))
    out = os.path.join(dst, "cifar-100-python")
    os.makedirs(out, exist_ok=True)
    for split in ("train", "test"):
        parts = []
        for name in man[split]["files"]:
            m = np.asarray(Image.open(os.path.join(pack, name)).convert("RGB"))
            rows = m.shape[0] // 32
            parts.append(m.reshape(rows, 32, 100, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 100, 32, 32, 3))
        x = np.concatenate(parts)[:man[split]["n"]]
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072))
        if man[split].get("lossless") and hashlib.sha256(x.tobytes()).hexdigest() != man[split]["sha256"]:
            raise SystemExit(f"{split}: pixels do not match the manifest's sha256 (corrupt pack?)")
        d = {"batch_label": f"{split}ing batch 1 of 1", "fine_labels": lab[f"{split}_fine"].tolist(),
             "coarse_labels": lab[f"{split}_coarse"].tolist(), "data": x}
        with open(os.path.join(out, split + ".tmp"), "wb") as f:
            pickle.dump(d, f, protocol=2)
        os.replace(os.path.join(out, split + ".tmp"), os.path.join(out, split))
        print(f"{out}/{split}: {len(x)} images", flush=True)
    shutil.copy(os.path.join(pack, "meta"), os.path.join(out, "meta"))


def fake_cifar100(root, n_train, n_test, seed=0):
    """A CIFAR-100 folder of random images whose class shows as brightness (--tiny has no real data)."""
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    rng = np.random.RandomState(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        y = rng.randint(0, 100, n)
        x = (rng.rand(n, 3072) * 40 + (y[:, None] % 5) * 50).astype(np.uint8)
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({"data": x, "fine_labels": y.tolist()}, f)
    return root


def schedule(durations, slots, order, after):
    """Makespan of jobs run `slots` at a time in `order` (a job starts on the earliest free slot, not before the
    job it comes `after` has finished), and each job's (start, end)."""
    free, times = [0.0] * slots, {}
    for m in order:
        i = min(range(slots), key=free.__getitem__)
        t = max(free[i], times[after[m]][1] if m in after and after[m] in times else 0.0)
        times[m] = (t, t + durations[m])
        free[i] = times[m][1]
    return max((e for _, e in times.values()), default=0.0), times


def plan_real(c, seconds, n_train, n_test, mode):
    """(epochs, slots, estimates): the most epochs E (up to --max-epochs) for which every method's run, with the
    measured step times, `slots` runs at once (each slowed by k / speedup_k, as measured), fits in `seconds`; the
    slots among the measured concurrencies that allow the most epochs (fewer slots on a tie)."""
    ms = {m: ((c.bench.get(m) or {}).get(mode) or {}).get("ms_per_step") for m in c.methods}
    known = [v for v in ms.values() if v]
    if not known:
        return None, None, "no step time was measured (bench)"
    ms = {m: v or max(known) for m, v in ms.items()}  # not measured: the slowest measured method's time
    steps, tests = math.ceil(n_train / c.batch), math.ceil(n_test / c.batch)
    fits = math.ceil(min(n_train, 10_000) / c.batch)  # the last pass over the training images (train_last)
    order = sorted(c.methods, key=lambda m: (m != "baseline", -ms[m]))  # the baseline first: SOKD's teacher
    after = {m: "baseline" for m in OFFLINE if m in c.methods} if "baseline" in c.methods else {}
    best = (0, 1, None)
    for k, v in sorted((c.concurrency or {1: {"speedup": 1.0}}).items()):
        if not v.get("speedup") or k > len(c.methods):
            continue
        slow = k / v["speedup"]

        def span(E):
            # per run: start-up, E epochs of training steps and test passes, and the last pass over training
            # images; a forward pass taken as half a training step per batch of the training size
            d = {m: c.startup + slow * ms[m] / 1000 * (E * steps + 0.5 * (E * tests + fits)) for m in c.methods}
            return schedule(d, k, order, after)[0]
        E = 0
        while E < c.a.max_epochs and span(E + 1) <= seconds:
            E += 1
        if E > best[0]:
            best = (E, k, f"{E} epoch(s) of every method, {k} at once (each run slowed x{slow:.2f}, as measured), "
                          f"estimated {span(E):.0f} s of the {seconds:.0f} s planned for")
    E, k, est = best
    return E, k, est or "one epoch of every method does not fit in the time left"


def part_real(c, deadline):
    a = c.a
    t_start = time.monotonic()
    # data: an unpacked folder (--data-dir), the pack unpacked in the background, or (--tiny) fake images
    if c.unpack is not None:
        rc = finish(c.unpack, deadline)
        if rc != 0:
            c.md["real"].append(f"unpacking {a.cifar100_pack} failed: see {c.log('unpack')}")
            return ("timeout" if rc is None else "failed"), {}
        data, what = os.path.join(c.work, "data"), "real CIFAR-100 (pack; training images JPEG q93, test images exact)"
    elif a.data_dir:
        data, what = a.data_dir, f"CIFAR-100 from {a.data_dir}"
    elif a.tiny:
        data, what = fake_cifar100(os.path.join(c.work, "data"), 128, 64), "fake CIFAR-100 (--tiny: random images)"
    else:
        c.parts["real"]["why"] = "no data: give --cifar100-pack PACK or --data-dir DIR"
        return "skipped", {}
    with open(os.path.join(data, "cifar-100-python", "train"), "rb") as f:
        n_train = len(pickle.load(f, encoding="latin1")["fine_labels"])
    with open(os.path.join(data, "cifar-100-python", "test"), "rb") as f:
        n_test = len(pickle.load(f, encoding="latin1")["fine_labels"])
    mode = "compile" if a.real_compile else "eager"
    if not getattr(c, "bench", None):
        c.md["real"].append("no bench results (the bench part did not run): nothing to plan with")
        return "skipped", {}
    left = deadline - time.monotonic() - 5
    E, k, est = plan_real(c, 0.9 * left, n_train, n_test, mode)  # 10% margin on the estimate
    if not E:
        if not a.tiny and left < 60:
            c.md["real"].append(f"not run: {est} ({left:.0f} s left)")
            return "skipped", {"plan": est}
        E, k = 1, k or 1  # run one epoch anyway: what finishes in time is kept
    root = os.path.join(c.work, "real")
    shutil.rmtree(root, ignore_errors=True)
    ms = {m: ((c.bench.get(m) or {}).get(mode) or {}).get("ms_per_step") or 0 for m in c.methods}
    order = sorted(c.methods, key=lambda m: (m != "baseline", -ms[m]))
    runs = {m: {"status": "waiting"} for m in order}
    running = []
    while time.monotonic() < deadline:
        for m in order:
            r = runs[m]
            if r["status"] != "waiting" or len(running) >= k:
                continue
            extra = []
            if m in OFFLINE:
                if runs.get("baseline", {}).get("status") in ("waiting", "running"):
                    continue
                teacher = os.path.join(root, "baseline", "checkpoint.pt")
                if runs.get("baseline", {}).get("status") != "ok":
                    r["status"] = "skipped (no teacher: the baseline run did not finish)"
                    continue
                extra = ["--teacher", teacher]
            cmd = [sys.executable, f"{m}.py", "--arch", c.arch, "--dataset", "cifar100", "--data-dir", data,
                   "--epochs", E, "--gpus", c.gpus, "--seed", 0, "--out", os.path.join(root, m), *extra]
            if c.a.tiny:
                cmd += ["--batch-size", c.batch]
            if a.real_compile:
                cmd.append("--compile")
            r.update(status="running", proc=start(cmd, c.log("real-" + m), c.env), t0=time.monotonic())
            running.append(m)
        for m in list(running):
            p = runs[m]["proc"]
            if p.poll() is not None:
                reap(p)
                runs[m].update(status="ok" if p.returncode == 0 else f"failed (exit {p.returncode})",
                               seconds=round(time.monotonic() - runs[m]["t0"], 1))
                running.remove(m)
        if all(r["status"] not in ("waiting", "running") for r in runs.values()):
            break
        time.sleep(0.2)
    for m in running:
        stop(runs[m]["proc"])
        runs[m].update(status="timeout", seconds=round(time.monotonic() - runs[m]["t0"], 1))
    for m, r in runs.items():
        if r["status"] == "waiting":
            r["status"] = "not started (time)"
        r.pop("proc", None)
        src, dst = os.path.join(root, m), os.path.join(c.out, "real", m)
        for name in ("run.json", "log.csv", "final.json"):
            if os.path.exists(os.path.join(src, name)):
                os.makedirs(dst, exist_ok=True)
                shutil.copy(os.path.join(src, name), dst)
        fin = os.path.join(dst, "final.json")
        if os.path.exists(fin):
            f = json.load(open(fin))
            r.update(deploy=f["deploy"], top1=f["last"][f["deploy"]], ensemble=f["last"].get("ensemble"),
                     train_top1=(f.get("train_last") or {}).get(f["deploy"]), train_s=f["seconds"],
                     images_per_second=f["images_per_second"], epochs=f["epochs"])
        elif os.path.exists(os.path.join(dst, "log.csv")):
            r["epochs"] = sum(1 for _ in open(os.path.join(dst, "log.csv"))) - 1
    md = c.md["real"]
    md += [f"{what}: {n_train} training / {n_test} test images, {c.arch}, the protocol scaled to --epochs {E} "
           f"(schedule and ramp-ups scaled, README \"Shorter runs\"), seed 0, {mode}, {k} run(s) at once; "
           f"planned from the bench's step times: {est}. SOKD's teacher: this comparison's baseline run "
           f"({c.arch}, the same epochs). Records: {os.path.join(c.out, 'real')}/<method>/.", ""]
    md += table(["method", "status", "epochs", "deployed head", "top-1 % (last)", "ensemble", "train top-1",
                 "train s", "img/s", "wall s"],
                [[m, r["status"], r.get("epochs"), r.get("deploy"), r.get("top1"), r.get("ensemble"), r.get("train_top1"),
                  r.get("train_s"), r.get("images_per_second"), r.get("seconds")] for m, r in runs.items()])
    bad = [m for m, r in runs.items() if r["status"] != "ok"]
    status = "ok" if not bad else "timeout" if any(runs[m]["status"] in ("timeout", "not started (time)") for m in bad) \
        else "failed"
    return status, {"epochs": E, "slots": k, "plan": est, "data": what, "n_train": n_train, "n_test": n_test,
                    "mode": mode, "runs": runs, "seconds_total": round(time.monotonic() - t_start, 1)}


# ---- main ---------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=None, help="output folder (default runs/gpu_check, --tiny: runs/gpu_check-tiny)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default 540; --tiny 600)")
    p.add_argument("--tiny", action="store_true", help="rehearse every part on the CPU in a minute or two")
    p.add_argument("--cifar100-pack", default=None, metavar="PACK", help="the CIFAR-100 pack folder (MANIFEST.json, ...), "
                   "unpacked into the work folder in the background")
    p.add_argument("--data-dir", default=None, help="a folder that holds cifar-100-python/ (instead of a pack)")
    p.add_argument("--methods", default=None, help=f"comma list (default: all {len(METHODS)}; --tiny: {','.join(TINY_METHODS)})")
    p.add_argument("--bench-steps", type=int, default=None, help="--bench N of every bench process (default 30; --tiny 2)")
    p.add_argument("--concurrency", default=None, help="copies timed at once (default 2,4,8; --tiny 2)")
    p.add_argument("--concurrency-method", default=None, help="the method those copies run (default dml; --tiny baseline)")
    p.add_argument("--real-compile", action="store_true", help="the real-data runs with --compile (default eager: no "
                   "compile time per run)")
    p.add_argument("--max-epochs", type=int, default=None, help="at most this many epochs per real-data run (default 300; --tiny 2)")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                   help=f"a part's time limit (parts: {', '.join(PARTS)}; defaults {LIMITS})")
    p.add_argument("--skip", action="append", default=[], choices=PARTS, help="leave a part out")
    p.add_argument("--work", default=None, help="scratch folder: unpacked data, bench and run folders (default: a new temp folder)")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join("runs", "gpu_check-tiny" if a.tiny else "gpu_check")
    a.budget = a.budget or (600.0 if a.tiny else 540.0)
    a.bench_steps = a.bench_steps or (2 if a.tiny else 30)
    a.concurrency = [int(k) for k in (a.concurrency or ("2" if a.tiny else "2,4,8")).split(",")]
    a.concurrency_method = a.concurrency_method or ("baseline" if a.tiny else "dml")
    a.max_epochs = a.max_epochs or (2 if a.tiny else 300)
    a.limits = {}
    for item in a.limit:
        name, _, sec = item.partition("=")
        if name not in PARTS:
            p.error(f"--limit {item}: the parts are {', '.join(PARTS)}")
        try:
            a.limits[name] = float(sec)
        except ValueError:
            p.error(f"--limit {item}: SECONDS must be a number")
    methods = (a.methods.split(",") if a.methods else TINY_METHODS if a.tiny else METHODS)
    unknown = [m for m in methods + [a.concurrency_method] if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if a.cifar100_pack and not os.path.isfile(os.path.join(a.cifar100_pack, "MANIFEST.json")):
        p.error(f"--cifar100-pack {a.cifar100_pack}: no MANIFEST.json there")
    if a.data_dir and not os.path.isdir(os.path.join(a.data_dir, "cifar-100-python")):
        p.error(f"--data-dir {a.data_dir}: no cifar-100-python/ there")

    c = Check(a)
    c.methods = methods
    c.arch, c.batch, c.gpus = ("resnet8", 16, "cpu") if a.tiny else ("resnet32", 128, "0")
    c.startup = 8.0 if a.tiny else 20.0  # seconds a real-data run spends before its first step (imports, data, cudnn)
    c.bench, c.concurrency = {}, {}
    os.makedirs(os.path.join(c.out, "bench"), exist_ok=True)
    signal.signal(signal.SIGTERM, c.stop_all)
    signal.signal(signal.SIGINT, c.stop_all)
    print(f"gpu_check: writing {os.path.join(c.out, 'summary.md')} and summary.json (logs in {c.logs}; "
          f"scratch {c.work}); budget {a.budget:.0f} s", flush=True)
    c.write()
    if a.cifar100_pack and "real" not in a.skip:  # unpacked while the tests run (one core)
        c.unpack = start([sys.executable, os.path.abspath(__file__), "unpack", a.cifar100_pack,
                          os.path.join(c.work, "data")], c.log("unpack"), c.env)
    c.run("env", lambda d: part_env(c, d))
    c.run("cuda_tests", lambda d: part_pytest(c, "cuda_tests", "test_cuda_", d))
    c.run("tests", lambda d: part_pytest(c, "tests", ("test_crop_is_a_window or test_ramp_up_values") if a.tiny
                                         else "not test_cuda_", d))
    c.run("bench", lambda d: part_bench(c, d))
    c.run("real", lambda d: part_real(c, d))
    for proc in list(LIVE):
        stop(proc)
    c.write()
    print(f"gpu_check: done in {time.monotonic() - c.t0:.0f} s: "
          + ", ".join(f"{k} {v['status']}" for k, v in c.parts.items())
          + f"\ngpu_check: {os.path.abspath(os.path.join(c.out, 'summary.md'))} and summary.json", flush=True)
    return 0 if all(v["status"] in ("ok", "skipped") for v in c.parts.values()) else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["unpack"]:  # the background unpacking of --cifar100-pack
        unpack_cifar100(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
