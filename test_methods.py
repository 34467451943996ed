"""Tests: CPU, tiny fake CIFAR folders, tiny architectures. Run: python -m pytest -q test_methods.py

Contents (each part starts with a line "# N. NAME"; search for it):
   0. Imports, helpers and fixtures: running a script and reading its run folder, the method scripts found on
      disk (METHODS), a method's arguments from its own parser (method_args, method_model), fake data and
      teachers, hand-computed references, every fixture
   1. BACKBONES (common.py part 1): parameter counts, shapes, split_model, initialisation, torchvision's nets,
      RepDistiller's zoo
   2. DATA (part 2): crop and flip, Loader, CIFAR files, normalisation, ImageNet folders
   3. LOOP (part 3): the step (host syncs, a non-finite loss), ramp-ups, logging and evaluation, resume,
      amp and compile, DDP, CUDA (skipped, visibly, without it)
   4. OPTIONS (part 4): bad values, protocol defaults and --epochs scaling, --recipe paper, stored settings
   5. RUN FOLDER (part 5): the lock, atomic writes and checkpoints, --force, Ctrl-C and signals, the
      run-folder invariants
   6. BENCH (part 6)
   7. TOOLS: summarize.py and slurm_grid.sh, cifar10_from_jpeg.py, gpu_check.py
   8. EVERY METHOD: the scripts found against README's table, the kd() copies, each file next to common.py
      alone, no name of this file defined twice, one loss convention, the method files' skeleton, common.py's
      layout and imports
   9-22. One part per method, in README's order: BASELINE, DML, CL, KDCL, ONE, OKDDIP, FFL, PCL, MCL, SOKD,
      FFSD, OECKD, KD, REVIEWKD. Each has the sub-sections it needs, in this order: loss by hand, gradient
      flow, counts and structure, end to end (with its options, host syncs and refusals), resume, DDP.
      Tests over every method (amp, CUDA, --recipe paper, host syncs, DDP of the stateful methods) live in
      the common part they test and take their methods from METHODS.
"""
import argparse
import ast
import contextlib
import copy
import csv
import errno
import importlib
import inspect
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import cl
import common
import dml
import ffl
import ffsd
import kd
import kdcl
import mcl
import oeckd
import okddip
import one
import pcl
import reviewkd
import sokd
import summarize

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)
# A suite started in the background by a script (`cmd &`) inherits SIGINT ignored, and so would every run it
# starts (common.py leaves an ignored signal ignored, as nohup wants): the Ctrl-C tests need it delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# =================================================================================================
# 0. HELPERS AND FIXTURES
# =================================================================================================

# ---- running a script, reading its run folder

TINY = ["--arch", "resnet8", "--batch-size", "64", "--gpus", "cpu", "--lr", "0.05"]
SMALL_RUN = [*TINY, "--batch-size", 16, "--epochs", 2, "--schedule", 1]  # with small_data: 2 steps per epoch
PCL_RUN = [*SMALL_RUN, "--ema-decay", 0.999]  # the paper's decay: left out, 4 steps would make the horizon 1 step


def fake_cifar(root, dataset="cifar100", n_train=256, n_test=128):
    """Write a tiny CIFAR folder in torchvision's layout: the class shows as image brightness, so a
    few steps can learn something."""
    folder, train_files, test_files, key, nc = common.DATASETS[dataset][:5]
    d = os.path.join(root, folder)
    os.makedirs(d, exist_ok=True)
    rng = np.random.RandomState(0)
    for files, n in ((train_files, n_train), (test_files, n_test)):
        for name in files:
            m = n // len(files)
            y = rng.randint(0, nc, m)
            x = (rng.rand(m, 3072) * 40 + (y[:, None] % 5) * 50).astype(np.uint8)
            with open(os.path.join(d, name), "wb") as f:
                pickle.dump({"data": x, key: y.tolist()}, f)
    return str(root)


def run_main(script, *argv):
    """Run a method script's main() in this process, as `python script.py argv...`."""
    mod = importlib.import_module(script)
    old = sys.argv
    sys.argv = [script + ".py"] + [str(a) for a in argv]
    try:
        mod.main()
    finally:
        sys.argv = old


def assert_refused(script, argv, msg, out, capsys):
    """`python script.py argv --out out` ends in one error line containing msg, exit 2, and writes no run folder."""
    with pytest.raises(SystemExit) as e:
        run_main(script, *argv, "--out", out)
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not os.path.exists(out)


def cpu_env(**extra):
    """The environment of a CPU test's subprocess, also on a machine with GPUs: CUDA hidden (so that '--gpus 0,1'
    means two gloo processes on the CPU, as without CUDA), and this process's thread count (float sums, hence
    weights, depend on it: a resume in a subprocess must match a run in here), unless `extra` says otherwise."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "CUDA_VISIBLE_DEVICES": "", **extra}


def run_cli(script, *argv, timeout=300, env=None):
    """Run `python script.py argv...` in a subprocess (env: cpu_env() unless given); returns CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, script + ".py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE, env=env or cpu_env())


def read_final(out):
    with open(os.path.join(out, "final.json")) as f:
        return json.load(f)


def read_log(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def assert_continued_after_epoch_1(stdout, out):
    """A resume that continued (a silent restart would give the same weights on the CPU): the message and
    one log row per epoch."""
    assert f"resumed {out} from the checkpoint of epoch 1: continuing with epoch 2" in stdout
    assert [int(r["epoch"]) for r in read_log(out)] == [1, 2]


def _weights(out):
    return common.load_checkpoint(os.path.join(out, "checkpoint.pt"))["model"]


# ---- the method scripts, and a method's arguments from its own parser

def _is_method_script(path):
    """A method script: a .py file at the top level whose main() hands its options to common.parse and
    common.run (common.py, summarize.py, gpu_check.py, cifar10_from_jpeg.py and the tests are not)."""
    name = os.path.basename(path)
    if not name.endswith(".py") or name.startswith("test_") or \
            name in ("common.py", "summarize.py", "gpu_check.py", "cifar10_from_jpeg.py"):
        return False
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    mains = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    calls = {ast.unparse(c.func) for m in mains for c in ast.walk(m) if isinstance(c, ast.Call)}
    return {"common.parse", "common.run"} <= calls


# every method script, found on disk: a new method file is in every test over all methods (amp, CUDA, peak
# memory, --recipe paper, a file next to common.py alone) without a line here; README's table must list it
METHODS = sorted(f[:-3] for f in os.listdir(HERE) if _is_method_script(os.path.join(HERE, f)))


def _source(script):
    with open(os.path.join(HERE, script + ".py"), encoding="utf-8") as f:
        return f.read()


# the offline methods: they read a baseline.py checkpoint (their parser has --teacher)
TEACHER_SCRIPTS = tuple(s for s in METHODS if '"--teacher"' in _source(s))
BUILD = {s: ["--teacher-arch", "resnet8", "--teacher", "absent.pt"]  # with --bench: a random teacher
         for s in TEACHER_SCRIPTS}


def script_args(script, *argv):
    """(args, model class) that `python script.py argv...` hands to common.run, without running it: the
    script's own parser (its defaults, the protocol's, --recipe, a resumed run's stored settings)."""
    box, real = {}, common.run
    common.run = lambda args, Method: box.update(args=args, Method=Method)
    try:
        run_main(script, *argv)
    finally:
        common.run = real
    return box["args"], box["Method"]


def parsed_args(script, *argv):
    """The args a method script would run with (its own options included), without running it."""
    return script_args(script, *argv)[0]


def _method(script, **overrides):
    """(args, model class) of `python script.py --arch resnet8` (BUILD's options for a teacher script), with
    `overrides` set on the args; torch's random state left as it was."""
    extra = [*BUILD[script], "--bench", 1] if script in BUILD else []
    # the random state as it was (reviewkd.py's main() builds nets to check them); no note on --bench
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        args, Method = script_args(script, "--arch", "resnet8", "--gpus", "cpu", *extra)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args, Method


def method_args(script, **overrides):
    """What the tests build a method's model from: the arguments `python script.py --arch resnet8` runs with
    (the script's own parser's defaults, never a hand copy of them), then `overrides` (--lambda:
    **{"lambda": value})."""
    return _method(script, **overrides)[0]


def method_model(script, nc=10, seed=0, **overrides):
    """The model of `script` built from method_args(script, **overrides) after torch.manual_seed(seed) (seed
    None: the random state as it is)."""
    args, Method = _method(script, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return Method(args, nc)


def small_batch(B=4, nc=10):
    """B random 16x16 images (the nets pool globally: 16x16 is enough, and FFSD's decoders keep ratios) and
    the labels 0, 1, ... modulo nc."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 16, 16, generator=g), torch.arange(B) % nc


def fake_teacher(path, arch="resnet8", dataset="cifar100", seed=0):
    """A baseline.py-format checkpoint of an untrained `arch` with made-up BN statistics."""
    torch.manual_seed(seed)
    net = common.build_model(arch, common.DATASETS[dataset][4])
    for m in net.modules():  # non-trivial running statistics, so that a BN update would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"model": {"net." + k: v for k, v in net.state_dict().items()}, "epoch": 1,
                "history": [{"epoch": 1, "net": 1.0}],
                "args": {"arch": arch, "dataset": dataset, "method": "baseline", "epochs": 1}}, path)
    return str(path)


# red and green fixed by the class (labels can be read off the pixels), blue a horizontal ramp (crops differ)
IMAGENET_RED = (20, 100, 180)


def fake_image_folder(root, n_train=8, n_val=4, classes=3):
    """A tiny ImageFolder tree root/train/classK/*.png, root/val/classK/*.png of 40x36 images."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = np.zeros((36, 40, 3), np.uint8)
                img[..., 0], img[..., 1], img[..., 2] = IMAGENET_RED[c], 200 - 60 * c, np.arange(40) * 5 + 5 * i
                Image.fromarray(img).save(os.path.join(d, f"{i}.png"))
    return str(root)


# ---- references computed by hand (plain Python, independent of torch's losses)

def _hand_softmax(v, T=1.0):
    e = [math.exp(a / T) for a in v]
    return [x / sum(e) for x in e]


def _hand_kd(student, teacher, T):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) averaged over rows (lists of lists)."""
    total = 0.0
    for s, t in zip(student, teacher):
        ps, pt = _hand_softmax(s, T), _hand_softmax(t, T)
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return T * T * total / len(student)


def _hand_ce(z, y):
    return sum(-math.log(_hand_softmax(row)[c]) for row, c in zip(z, y)) / len(z)


def _oneffl_kd(s, t, T):
    """T^2 * KL(softmax(t/T) || softmax(s/T)) per row, batch mean, in plain Python (independent of F.kl_div)."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps = [math.exp(v / T) for v in srow]
        pt = [math.exp(v / T) for v in trow]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    return T * T * total / len(s)


def _oneffl_ce(z, y):
    total = 0.0
    for row, c in zip(z.tolist(), y.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[c]
    return total / len(z)


# fixed small logits (3 nets x 2 samples x 3 classes) and labels shared by the hand-computed loss tests; Z1, Z2,
# Z3, Y: the same as tensors
HAND_Z = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]],
          [[2.0, -1.0, 0.0], [1.5, 0.5, -0.5]],
          [[0.0, 0.0, 4.0], [-2.0, 1.0, 1.0]]]
HAND_Y = [1, 2]
Z1, Z2, Z3 = (torch.tensor(z) for z in HAND_Z)
Y = torch.tensor(HAND_Y)


# ---- fixtures: data folders and runs that several tests read (every fixture of this file)

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Fake CIFAR-100, 256 training and 128 test images: the folder most runs here read."""
    return fake_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """32 training and 32 test images (SMALL_RUN: 2 steps per epoch), for the methods whose step costs several
    baseline steps (PCL: 3 views and a mean teacher; OKDDip, OEC-KD)."""
    return fake_cifar(tmp_path_factory.mktemp("small_cifar"), n_train=32, n_test=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A fake ImageFolder tree (--dataset imagenet): 3 classes, 8 training and 4 validation images each."""
    return fake_image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def offline_teacher(tmp_path_factory):
    """(data folder, checkpoint, last test top-1) of a 1-epoch baseline.py resnet8: the teacher of the
    kd.py and reviewkd.py runs below (half the shared fixture's images: two nets train per run)."""
    root = tmp_path_factory.mktemp("offline")
    data = fake_cifar(root / "cifar", n_train=128, n_test=64)
    out = root / "teacher"
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", out)
    return data, out / "checkpoint.pt", read_final(out)["last"]["net"]


@pytest.fixture(scope="module")
def inv_data(tmp_path_factory):
    """64 training and 32 test images: with INV (batch 32), 2 steps per epoch."""
    return fake_cifar(tmp_path_factory.mktemp("inv_cifar"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def inv_templates(inv_data, tmp_path_factory):
    """Run folders in the states a run goes through: checkpointed (1 of 2 epochs), finished (2 of 2),
    extended (a finished 2-epoch run extended to 4, stopped after 3: its final.json retired)."""
    root = tmp_path_factory.mktemp("inv_templates")
    base = [*INV, "--data-dir", inv_data]
    run_main("baseline", *base, "--epochs", 2, "--out", root / "checkpointed", "--halt-after", 1)
    shutil.copytree(root / "checkpointed", root / "finished")
    run_main("baseline", *base, "--epochs", 2, "--out", root / "finished", "--resume")
    shutil.copytree(root / "finished", root / "extended")
    run_main("baseline", *base, "--epochs", 4, "--out", root / "extended", "--resume", "--halt-after", 3)
    assert sorted(os.listdir(root / "extended")) == [".lock", "checkpoint.pt", "final-2-epochs.json", "log.csv",
                                                     "run.json"]
    return root


@pytest.fixture(scope="module")
def inv_uninterrupted(inv_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("inv_ref") / "r"
    run_main("baseline", *INV, "--data-dir", inv_data, "--epochs", 2, "--out", out)
    return _weights(out)


@pytest.fixture(scope="module")
def pcl_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pcl") / "r"
    run_main("pcl", *PCL_RUN, "--data-dir", small_data, "--out", out)
    return out


@pytest.fixture(scope="module")
def okddip_run(small_data, tmp_path_factory):
    """A subprocess, like the halted and resumed runs below: common.py locks a run folder for the life
    of the process that opened it, so halt and resume cannot share one process."""
    out = tmp_path_factory.mktemp("okddip") / "r"
    r = run_cli("okddip", *SMALL_RUN, "--data-dir", small_data, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def oeckd_run(small_data, tmp_path_factory):
    """A subprocess, like the halted and resumed runs below (a run folder is locked for its process's life)."""
    out = tmp_path_factory.mktemp("oeckd") / "r"
    r = run_cli("oeckd", *SMALL_RUN, "--data-dir", small_data, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def kd_run(offline_teacher, tmp_path_factory):
    data, teacher, _ = offline_teacher
    out = tmp_path_factory.mktemp("kd") / "a"
    run_main("kd", *TINY, "--data-dir", data, "--teacher", teacher, "--epochs", 2, "--schedule", 1, "--out", out)
    return out


@pytest.fixture(scope="module")
def reviewkd_run(offline_teacher, tmp_path_factory):
    data, teacher, _ = offline_teacher
    out = tmp_path_factory.mktemp("reviewkd") / "a"
    run_main("reviewkd", *TINY, "--data-dir", data, "--teacher", teacher, "--epochs", 2, "--schedule", 1,
             "--out", out)
    return out


# =================================================================================================
# 1. BACKBONES (common.py part 1): parameter counts, shapes, split_model, initialisation, torchvision, the zoo
# =================================================================================================

# parameter counts with a CIFAR-100 head: the numbers of the ResNet, WRN and online-KD papers' tables, within 1%
LITERATURE = {"resnet32": 0.47e6, "resnet56": 0.86e6, "resnet110": 1.73e6, "resnet110b": 1.17e6,
              "wrn_16_2": 0.70e6, "wrn_40_2": 2.26e6, "wrn_28_10": 36.5e6, "wrn_20_8": 6.87e6}


@pytest.mark.parametrize("arch", sorted(LITERATURE))
def test_param_counts_match_literature(arch):
    n = common.count_params(common.build_model(arch, 100))
    assert abs(n - LITERATURE[arch]) / LITERATURE[arch] < 0.01, n


@pytest.mark.parametrize("arch", [a for a in common.ARCHS
                                  if a not in ("wrn_28_10", "vgg16", "vgg16_2x2", "vgg16_mcl", "resnet32x4")])
def test_backbone_shapes(arch):
    net = common.build_model(arch, 10).eval()
    z, feat, fmap = net(torch.randn(2, 3, 32, 32), features=True)
    assert z.shape == (2, 10)
    assert feat.shape == (2, net.fc.in_features)
    assert fmap.shape[:2] == (2, net.fc.in_features)
    assert torch.allclose(feat, fmap.mean((2, 3)))


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown arch 'resnet33'"):
        common.build_model("resnet33", 10)


@pytest.mark.parametrize("arch,at", [("resnet8", -1), ("resnet8", -2), ("wrn_16_1", -1), ("vgg8", -1),
                                     ("densenet40_12", -1), ("mobilenetv2", -2)])
def test_split_reproduces_the_whole_net(arch, at):
    """trunk + a branch with the whole net's weights computes exactly the whole net."""
    torch.manual_seed(0)
    net = common.build_model(arch, 10).eval()
    trunk, branches = common.split_model(arch, 10, at, 2)
    assert len(list(trunk.children())) == len(net.stages) + at
    # same total size: trunk + one branch = whole net
    assert common.count_params(trunk) + common.count_params(branches[0]) == common.count_params(net)
    sd = net.state_dict()
    k = len(net.stages) + at
    trunk.load_state_dict({n[len("stages."):]: v for n, v in sd.items()
                           if n.startswith("stages.") and int(n.split(".")[1]) < k})
    branch_sd = {}
    for n, v in sd.items():
        if n.startswith("stages."):
            i = int(n.split(".")[1])
            if i >= k:
                branch_sd["stages." + str(i - k) + n[len("stages.") + len(str(i)):]] = v
        else:
            branch_sd[n] = v
    branches[0].load_state_dict(branch_sd)
    trunk.eval(), branches.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(branches[0](trunk(x)), net(x), atol=1e-5)


def test_branches_start_independent():
    _, branches = common.split_model("resnet8", 10, -1, 3)
    w = [b.fc.weight for b in branches]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


# ---- initialisation as the references do it

CONV_FAMILIES = ["resnet8", "resnet110b", "wrn_16_2", "wrn_20_8", "vgg8", "densenet40_12", "mobilenetv2"]


@pytest.mark.parametrize("arch", CONV_FAMILIES)
def test_init_is_the_references_he_normal_fan_out(arch):
    """Every conv's weights: std sqrt(2 / (k*k*out)) within sampling error; BN 1/0; the classifier per family."""
    torch.manual_seed(0)
    net = common.build_model(arch, 100)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 2000:
            k = m.kernel_size[0] * m.kernel_size[1]
            target = math.sqrt(2.0 / (k * m.out_channels))
            # the sample std of n normal draws has relative error about 1/sqrt(2n): allow 6 of those
            assert abs(m.weight.std().item() / target - 1) < 6 / math.sqrt(2 * m.weight.numel()), m
            # normal, not uniform with the same std: ~4.55% of draws lie beyond 2 std (uniform: none), mean ~0
            w = m.weight.flatten() / target
            assert 0.03 < (w.abs() > 2).float().mean().item() < 0.062 and abs(w.mean().item()) < 0.15, m
        elif isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    fc = net.fc
    if arch in ("vgg8", "mobilenetv2"):
        assert torch.all(fc.bias == 0) and abs(fc.weight.std().item() - 0.01) < 0.001
    elif arch == "wrn_16_2":
        assert torch.all(fc.bias == 0) and fc.weight.abs().max() <= 1 / math.sqrt(fc.in_features)
    else:  # PyTorch's default: uniform in +-1/sqrt(fan_in), bias too
        assert fc.bias.abs().max() > 0 and fc.weight.abs().max() <= 1 / math.sqrt(fc.in_features)


def test_init_reaches_extra_modules_and_leaves_torchvision_alone():
    torch.manual_seed(0)
    model = ffl.FFL(method_args("ffl", arch="resnet32", branches=3), 100)
    conv = model.fusion.stages[1][0]  # the 1x1 to C: He-normal too
    assert abs(conv.weight.std().item() / math.sqrt(2.0 / conv.out_channels) - 1) < 0.1
    torch.manual_seed(0)
    ours = common.build_model("resnet18", 10)
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(weights=None, num_classes=10)
    assert torch.equal(ours.stages[0][0].weight, theirs.conv1.weight)


# ---- torchvision backbones cut into stages

@pytest.mark.parametrize("arch,tv", [("resnet18", "resnet18"), ("resnet50", "resnet50"),  # resnet34: as resnet18
                                     ("mobilenet_v2_imagenet", "mobilenet_v2")])
def test_imagenet_stages_reproduce_torchvision(arch, tv):
    """Net(stages, fc) with torchvision's weights computes exactly torchvision's network."""
    torch.manual_seed(0)
    net = common.build_model(arch, 10).eval()
    ref = getattr(torchvision.models, tv)(num_classes=10).eval()
    assert isinstance(net, common.Net) and len(net.stages) == 5 and isinstance(net.fc, torch.nn.Linear)
    sd, ref_sd = net.state_dict(), ref.state_dict()
    assert len(sd) == len(ref_sd)  # same tensors in the same order (mobilenet's dropout has none)
    assert all(a.shape == b.shape for a, b in zip(sd.values(), ref_sd.values()))
    net.load_state_dict(dict(zip(sd, ref_sd.values())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)
        sizes, h = [], x
        for s in net.stages:
            h = s(h)
            sizes.append(h.shape[-1])
    assert sizes == ([16, 16, 8, 4, 2] if "resnet" in arch else [32, 16, 8, 4, 2])  # stem, then one halving each
    assert h.shape[1] == net.fc.in_features == {"resnet50": 2048, "mobilenet_v2_imagenet": 1280}.get(arch, 512)


@pytest.mark.parametrize("arch,at", [("resnet18", -1), ("mobilenet_v2_imagenet", -2)])
def test_imagenet_split_reproduces_the_whole_net(arch, at):
    test_split_reproduces_the_whole_net(arch, at)  # the CIFAR nets' check, on 32x32 inputs


# ---- RepDistiller's zoo (vgg, mobilenetv2_half, shufflev1/v2)
# The KD tables' networks as HobbitLong/RepDistiller defines them (models/vgg.py, mobilenetv2.py,
# ShuffleNetv1.py, ShuffleNetv2.py), and this repo's VGGs before issue 26 under their new names.

# parameter counts with a CIFAR-100 head, computed with RepDistiller's own classes (vggN = vggN_bn,
# mobilenetv2_half = mobile_half, shufflev1/v2 = ShuffleV1/ShuffleV2)
ZOO_REPDISTILLER = {"vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436,
                    "mobilenetv2_half": 812_836, "shufflev1": 949_258, "shufflev2": 1_355_528}
# what vgg8..vgg16 built before issue 26 (no conv bias: 1,472 .. 4,224 fewer), and the untouched MobileNetV2
ZOO_OLD_NAMES = {"vgg8_2x2": 3_963_556, "vgg11_2x2": 9_274_532, "vgg13_2x2": 9_459_236,
                 "vgg16_2x2": 14_770_212, "mobilenetv2": 2_353_060}
# (channels of the last map, map size after every stage) on a 32x32 input
ZOO_MAPS = {"vgg8": (512, [32, 16, 8, 4, 4]), "vgg13": (512, [32, 16, 8, 4, 4]), "vgg8_2x2": (512, [32, 16, 8, 4, 2]),
            "mobilenetv2_half": (1280, [16, 16, 8, 4, 2]), "shufflev1": (960, [32, 16, 8, 4]),
            "shufflev2": (1024, [32, 16, 8, 4])}


def _zoo_maps(net, size=32):
    x, sizes = torch.randn(2, 3, size, size), []
    for stage in net.stages:
        x = stage(x)
        sizes.append(x.shape[-1])
    return x, sizes


@pytest.mark.parametrize("arch", sorted({**ZOO_REPDISTILLER, **ZOO_OLD_NAMES}))
def test_zoo_param_counts_equal_the_references(arch):
    assert common.count_params(common.build_model(arch, 100)) == {**ZOO_REPDISTILLER, **ZOO_OLD_NAMES}[arch]


@pytest.mark.parametrize("arch", sorted(ZOO_MAPS))
def test_zoo_output_shape_and_map_sizes(arch):
    """RepDistiller's VGG pools before blocks 1-3 only: its last block runs at 4x4 on 32x32 (the old one at 2x2)."""
    torch.manual_seed(0)
    net = common.build_model(arch, 100).eval()
    with torch.no_grad():
        fmap, sizes = _zoo_maps(net)
        z = net(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 100) and fmap.shape == (2, ZOO_MAPS[arch][0], sizes[-1], sizes[-1])
    assert sizes == ZOO_MAPS[arch][1]


def test_zoo_vgg_pools_before_its_last_block_on_64x64_inputs_only():
    """RepDistiller's `if h == 64: x = self.pool3(x)`: at 64x64 the last block runs at 4x4 as well."""
    net = common.build_model("vgg8", 10).eval()
    with torch.no_grad():
        assert _zoo_maps(net, 64)[1] == [64, 32, 16, 8, 4]
    assert all(m.bias is not None and torch.all(m.bias == 0) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(m.bias is None for m in common.build_model("vgg8_2x2", 10).modules() if isinstance(m, torch.nn.Conv2d))


def test_vgg16_mcl_is_mcl_okds_vgg16_op_for_op():
    """`vgg16_mcl` = winycg/MCL-OKD's VGG-16 (models/vgg.py): 13 convs with bias, each + BN + ReLU, a max-pool
    after every block (after convs 2, 4, 7, 10 and 13), the 1x1 map flattened into the FC. Its forward, written
    out here with the model's own weights, equals the model's; the parameters equal vgg16's (same layers);
    MCL shares blocks 0-2 (7 convs) and gives each branch blocks 3-4 (6 convs) + FC, as mcl_okd_vgg.py."""
    torch.manual_seed(0)
    net = common.build_model("vgg16_mcl", 100).eval()
    assert common.count_params(net) == ZOO_REPDISTILLER["vgg16"] == 14_774_436
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 13 and all(c.bias is not None and torch.all(c.bias == 0) for c in convs)
    for bn in bns:  # non-trivial running statistics, so that eval-mode BN is checked too
        bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    h = x
    for i, (c, bn) in enumerate(zip(convs, bns)):
        h = F.relu(F.batch_norm(F.conv2d(h, c.weight, c.bias, padding=1), bn.running_mean, bn.running_var,
                                bn.weight, bn.bias, False, 0.0, bn.eps))
        if i + 1 in (2, 4, 7, 10, 13):
            h = F.max_pool2d(h, 2)
    assert h.shape == (2, 512, 1, 1)
    with torch.no_grad():
        assert torch.allclose(net(x), F.linear(h.flatten(1), net.fc.weight, net.fc.bias), atol=1e-5)
    trunk, branches = common.split_model("vgg16_mcl", 100, -2, 4)
    n_convs = lambda m: sum(isinstance(k, torch.nn.Conv2d) for k in m.modules())
    assert n_convs(trunk) == 7 and [n_convs(b) for b in branches] == [6] * 4


def test_zoo_init_as_repdistiller():
    """mobile_half: He-normal fan_out convs, FC N(0, 0.01) bias 0; ShuffleV1/V2 initialise nothing in
    RepDistiller, so every conv keeps PyTorch's uniform in +-1/sqrt(fan_in) (He-normal with fan_out would
    leave those bounds) and the classifier a non-zero bias."""
    torch.manual_seed(0)
    mob = common.build_model("mobilenetv2_half", 100)
    conv = mob.stages[3][0].f[0][0]  # the first 1x1 expansion at 8x8: 16 -> 96
    assert abs(conv.weight.std().item() / math.sqrt(2.0 / conv.out_channels) - 1) < 0.1
    assert torch.all(mob.fc.bias == 0) and abs(mob.fc.weight.std().item() - 0.01) < 0.001
    for arch in ("shufflev1", "shufflev2"):
        net = common.build_model(arch, 100)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                assert m.weight.abs().max().item() <= 1 / math.sqrt(fan_in), (arch, m)
        assert net.fc.bias.abs().max() > 0


def _zoo_method(method, arch, nc):
    """A small model of `method` on `arch`: two branches, peers or heads where the method has a number of them."""
    small = {"one": dict(branches=2), "ffl": dict(branches=2), "pcl": dict(peers=2, ema_decay=0.999),
             "mcl": dict(branches=2, feat_dim=16, nce_k=4, batch_size=2), "cl": {}, "okddip": dict(peers=2)}
    return method_model(method, nc, None, arch=arch, **small[method])


@pytest.mark.parametrize("arch", ["vgg8", "mobilenetv2_half", "shufflev1", "shufflev2"])
@pytest.mark.parametrize("method", ["one", "ffl", "pcl", "mcl", "cl", "okddip"])
def test_zoo_every_method_that_splits_networks_trains_them(method, arch):
    """Each new net is stages + pool + FC like the others, so every method that cuts networks at a stage
    (split_model at -1 or -2) builds and takes a step on it: finite loss, gradient in the trunk, every head."""
    torch.manual_seed(0)
    nc = 5
    model = _zoo_method(method, arch, nc)
    if hasattr(model, "on_data"):
        model.on_data(torch.arange(8) % nc)
    g = torch.Generator().manual_seed(1)
    views = getattr(model, "views", 1)
    xs = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(views)]
    y, idx = torch.tensor([0, 1]), torch.tensor([3, 6])
    loss, terms = model(tuple(xs) if views > 1 else xs[0], y, idx, 0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    trunk = model.trunk
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trunk.parameters())
    with torch.no_grad():
        heads = model.eval().heads(xs[0])
    assert all(z.shape == (2, nc) for z in heads.values()) and model.deploy in heads


@pytest.mark.parametrize("arch", ["vgg8", "mobilenetv2_half", "shufflev1", "shufflev2"])
def test_zoo_sokd_bridge_and_ffsd_decoders_fit_the_new_nets(tmp_path, arch):
    """SOKD's bridge is split_model(teacher, -1) and FFSD decodes every stage's map: both take the new nets."""
    model = _sokd_model(fake_teacher(tmp_path / "t.pt", arch), arch="resnet8")
    t = model.teacher
    assert common.count_params(model.bridge) == common.count_params(t.stages[-1], t.fc)
    m = method_model("ffsd", arch=arch, students=2)
    with torch.no_grad():
        _, maps = ffsd.stage_maps(m.leader.eval(), torch.randn(2, 3, 32, 32))
        assert [o.shape for o in ffsd.decode(m.decoders[0].eval(), maps[-1])] == [f.shape for f in maps[:-1]]


# =================================================================================================
# 2. DATA (common.py part 2): crop and flip, Loader, CIFAR files, normalisation, ImageNet folders
# =================================================================================================

def test_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy = torch.tensor([0, 8, 4, 1, 7, 3])
    dx = torch.tensor([8, 0, 4, 2, 6, 5])
    flip = torch.tensor([False, True, False, True, True, False])
    out = common.crop_flip(x, dy, dx, flip)
    xp = F.pad(x, (4, 4, 4, 4))
    for i in range(6):
        win = xp[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], win.flip(-1) if flip[i] else win)
    # dy = dx = 4, no flip: the image itself
    assert torch.equal(out[2], x[2])


def test_reflect_padding_is_torchvisions_random_crop_window_for_window():
    import torchvision.transforms.functional as TF
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5])
    ours = common.crop_flip(x, dy, dx, torch.zeros(3, dtype=torch.bool), padding="reflect")
    for i in range(3):  # RandomCrop(32, 4, padding_mode="reflect") pads, then takes the window at (dy, dx)
        padded = TF.pad(x[i], [4], padding_mode="reflect")
        assert torch.equal(ours[i], padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32])
    zeros = common.crop_flip(x, dy, dx, torch.zeros(3, dtype=torch.bool))
    assert zeros[0, :, :4].eq(0).all() and not ours[0, :, :4].eq(0).all()  # zeros stays the default
    flip = torch.tensor([True, False, True])  # then RandomHorizontalFlip mirrors the window
    flipped = common.crop_flip(x, dy, dx, flip, padding="reflect")
    for i in range(3):
        window = TF.pad(x[i], [4], padding_mode="reflect")[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(flipped[i], TF.hflip(window) if flip[i] else window)


def test_loader_labels_stay_aligned_views_differ_and_seed_repeats():
    x = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 32, 32).contiguous()
    y = torch.arange(20)
    mean, std = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # normalize(x) = x, to read images back
    L = common.Loader(x, y, mean, std, "cpu", 8, True, views=2, seed=3)
    batches = list(L.epoch(0))
    seen = torch.cat([b[2] for b in batches])
    assert sorted(seen.tolist()) == list(range(20))                # a permutation of the split
    for (v1, v2), yb, idx in batches:
        assert torch.equal(yb, idx)                                # labels follow their images
        assert v1.amax((1, 2, 3)).long().tolist() == idx.tolist()  # image content follows too
        assert len(v1) == len(yb)
    v1 = torch.cat([b[0][0] for b in batches])
    v2 = torch.cat([b[0][1] for b in batches])
    assert not torch.equal(v1, v2)                                 # two independent augmentations
    again = list(common.Loader(x, y, mean, std, "cpu", 8, True, views=2, seed=3).epoch(0))
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[2], b[2]) for a, b in zip(batches, again))
    other = list(L.epoch(1))
    assert not torch.equal(torch.cat([b[2] for b in other]), seen)  # a new epoch, a new order


def test_loader_ddp_shares_one_global_permutation():
    x = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    y = torch.arange(40)
    full = list(common.Loader(x, y, (0,) * 3, (1,) * 3, "cpu", 10, True, seed=1).epoch(2))
    r0 = list(common.Loader(x, y, (0,) * 3, (1,) * 3, "cpu", 10, True, seed=1, rank=0, world=2).epoch(2))
    r1 = list(common.Loader(x, y, (0,) * 3, (1,) * 3, "cpu", 10, True, seed=1, rank=1, world=2).epoch(2))
    for f, a, b in zip(full, r0, r1):
        assert sorted(torch.cat([a[2], b[2]]).tolist()) == sorted(f[2].tolist())
        assert torch.equal(a[0], f[0][0::2]) and torch.equal(b[0], f[0][1::2])  # same augmentation too


def test_loader_normalizes_with_dataset_stats(data):
    tx, ty, vx, vy = common.load_cifar("cifar100", data)
    assert tx.dtype == np.uint8 and tx.shape == (256, 3, 32, 32) and ty.shape == (256,)
    mean, std = common.DATASETS["cifar100"][5:7]
    L = common.Loader(vx, vy, mean, std, "cpu", 50, False)
    xb, yb, _ = next(L.epoch())
    expect = (torch.as_tensor(vx[:50]).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(xb, expect, atol=1e-5)
    assert L.x.dtype == torch.uint8


def test_norm_cifar10_uses_cifar10_statistics_on_cifar100():
    args = argparse.Namespace(dataset="cifar100", norm="cifar10")
    assert common.dataset_info(args)[1:] == common.DATASETS["cifar10"][5:7]
    args.norm = "dataset"
    assert common.dataset_info(args)[1:] == common.DATASETS["cifar100"][5:7]


def test_padding_option_reaches_the_training_loader(data, tmp_path, monkeypatch):
    seen = []
    crop_flip = common.crop_flip

    def spy(*a, **k):
        seen.append(k.get("padding"))
        return crop_flip(*a, **k)
    monkeypatch.setattr(common, "crop_flip", spy)
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--padding", "reflect",
             "--out", tmp_path / "r")
    assert seen and set(seen) == {"reflect"}


# ---- CIFAR files: the layouts, a missing or corrupt folder

def test_cifar10_layout_reads(tmp_path):
    fake_cifar(tmp_path, "cifar10", n_train=100, n_test=20)
    tx, ty, vx, vy = common.load_cifar("cifar10", str(tmp_path))
    assert tx.shape == (100, 3, 32, 32) and vx.shape == (20, 3, 32, 32) and ty.max() < 10


def test_missing_data_names_the_folder_and_layout(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--data-dir", tmp_path / "nodata", "--out", out)
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and str(tmp_path / "nodata") in err and err.count("\n") == 1
    assert not out.exists()


def _corrupt(root, kind):
    fake_cifar(root)
    path = os.path.join(root, "cifar-100-python", "train")
    if kind == "truncated":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:len(raw) // 2])
    else:
        d = pickle.load(open(path, "rb"))
        if kind == "shape":
            d["data"] = d["data"][:, :1000]
        else:
            d["fine_labels"][0] = 100
        pickle.dump(d, open(path, "wb"))


@pytest.mark.parametrize("kind,msg", [("truncated", "cannot read"), ("shape", "expected uint8 data of shape"),
                                      ("labels", "labels must lie in [0, 100)")])
def test_corrupt_data_is_a_clear_error(kind, msg, tmp_path):
    _corrupt(str(tmp_path), kind)
    with pytest.raises(common.DataError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        common.load_cifar("cifar100", str(tmp_path))


# ---- ImageNet-style folders: the folder loader, the holdout, the errors

def _norm_red(c):
    return (IMAGENET_RED[c] / 255 - common.IMAGENET_MEAN[0]) / common.IMAGENET_STD[0]


def test_imagenet_folder_loader_interface_and_sharding(folder):
    tr, va = common.load_image_folders(folder)
    kw = dict(size=32, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, device="cpu", batch_size=8)
    L = common.FolderLoader(tr, train=True, views=2, seed=1, workers=1, **kw)
    assert torch.equal(L.y, torch.tensor([c for c in range(3) for _ in range(8)])) and len(L) == 3
    batches = list(L.epoch(0))
    for x, y, idx in batches:
        assert isinstance(x, tuple) and len(x) == 2 and x[0].shape == (8, 3, 32, 32) and x[0].dtype == torch.float32
        assert torch.equal(y, L.y[idx])
        for v in x:  # red stays flat under crop and flip and tells the class; ImageNet's normalisation
            assert torch.allclose(v[:, 0], torch.tensor([_norm_red(c) for c in y])[:, None, None], atol=0.03)
        assert not torch.equal(x[0][:, 2], x[1][:, 2])  # the views are independent draws
    assert sorted(torch.cat([i for _, _, i in batches]).tolist()) == list(range(24))
    again = list(L.epoch(0))  # an epoch depends on (seed, epoch) only
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[0][1], b[0][1]) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat([i for _, _, i in L.epoch(1)]), torch.cat([i for _, _, i in batches]))
    # two ranks: disjoint halves of the epoch, batch_size // world each
    shards = [list(common.FolderLoader(tr, train=True, seed=1, rank=r, world=2, workers=0, **kw).epoch(0))
              for r in range(2)]
    i0, i1 = (torch.cat([i for _, _, i in s]) for s in shards)
    assert len(shards[0][0][2]) == 4 and not set(i0.tolist()) & set(i1.tolist()) and len(i0) + len(i1) == 24
    # evaluation: center crop, rank::world, in order
    V = common.FolderLoader(va, train=False, rank=1, world=2, workers=0, **kw)
    batches = list(V.epoch())
    assert [len(i) for _, _, i in batches] == [4, 2] and batches[0][0].shape == (4, 3, 32, 32)
    assert torch.cat([i for _, _, i in batches]).tolist() == list(range(1, 12, 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, V.epoch()))  # no randomness


def test_imagenet_holdout_comes_off_the_training_folder(folder):
    args = argparse.Namespace(dataset="imagenet", data_dir=folder, image_size=32, workers=0, batch_size=8, seed=0)
    data = common.load_image_folders(folder)
    train, test, hold = common.folder_loaders(args, data, 1, 5, "cpu", 0, 1)
    assert len(hold.y) == 5 and len(train.y) == 19 and len(test.y) == 12
    held = {p for p, _ in hold.dl.dataset.samples}
    assert not held & {p for p, _ in train.dl.dataset.samples} and held <= {p for p, _ in data[0]}
    assert common.folder_loaders(args, data, 1, 0, "cpu", 0, 1)[2] is None
    with pytest.raises(common.DataError, match="leaves nothing"):
        common.folder_loaders(args, data, 1, 24, "cpu", 0, 1)


@pytest.mark.parametrize("layout,msg", [
    ("none", "missing {d}/train; --dataset imagenet expects {d}/train/<class>/<image> and {d}/val/<class>/<image>"),
    ("train", "missing {d}/val; --dataset imagenet expects"),
    ("flat_val", "{d}/val: Couldn't find any class folder"),
    ("other_classes", "{d}/val has other class folders than {d}/train (2 vs 3)"),
])
def test_imagenet_missing_folder_is_a_one_line_error(tmp_path, capsys, layout, msg):
    d = tmp_path / "data"
    os.makedirs(d)
    if layout != "none":
        fake_image_folder(d, n_train=2, n_val=1)
        shutil.rmtree(d / "val")
        if layout == "flat_val":
            os.makedirs(d / "val")
            Image.new("RGB", (8, 8)).save(d / "val" / "0.png")
        if layout == "other_classes":
            fake_image_folder(d, n_train=2, n_val=1, classes=2)
    with pytest.raises(SystemExit) as e:
        run_main("baseline", "--dataset", "imagenet", "--data-dir", d, "--gpus", "cpu", "--out", tmp_path / "r")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg.format(d=d) in err, err
    assert not os.path.exists(tmp_path / "r")


# =================================================================================================
# 3. LOOP (common.py part 3): the step, ramp-ups, logging, resume, amp and compile, DDP, CUDA
# =================================================================================================

# ---- the step: no host sync, a non-finite loss

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def count_syncs_in_steps(monkeypatch, script, *argv):
    """Run `script --bench` and count host syncs (Tensor.item, .tolist, .cpu, ...) inside train_step."""
    counts, inside = {"n": 0, "what": []}, {"on": False}
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            if inside["on"]:
                counts["n"] += 1
                counts["what"].append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    real_step = common.train_step

    def step(*a, **k):
        inside["on"] = True
        try:
            return real_step(*a, **k)
        finally:
            inside["on"] = False
    monkeypatch.setattr(common, "train_step", step)
    run_main(script, *argv)
    return counts


@pytest.mark.parametrize("script,extra", [("dml", []), ("pcl", []), ("mcl", []), ("kdcl", ["--variant", "linear"]),
                                          ("cl", []), ("okddip", []), ("ffsd", []),
                                          ("sokd", ["--teacher-arch", "resnet8", "--teacher", "absent.pt"])])
def test_training_step_has_no_host_sync(script, extra, monkeypatch, tmp_path):
    """The step (forward, backward, SGD, after_step: EMA teachers, memory banks) never waits for the device."""
    c = count_syncs_in_steps(monkeypatch, script, *TINY, "--batch-size", 16, "--bench", 2, "--out", tmp_path / "b",
                             *extra)
    assert c["n"] == 0, c["what"]


def test_sync_counter_detects_a_sync(monkeypatch, tmp_path):
    """The counter above can fail: a method that calls .item() in its step is caught."""
    import baseline
    real = baseline.Baseline.forward

    def syncing(self, x, y, idx, epoch):
        loss, terms = real(self, x, y, idx, epoch)
        loss.item()
        return loss, terms
    monkeypatch.setattr(baseline.Baseline, "forward", syncing)
    c = count_syncs_in_steps(monkeypatch, "baseline", *TINY, "--bench", 2, "--out", tmp_path / "b")
    assert c["n"] > 0


def test_nan_loss_stops_naming_epoch_step_and_term(data, tmp_path, monkeypatch, capsys):
    import baseline
    calls = {"n": 0}
    real = baseline.Baseline.forward

    def poisoned(self, x, y, idx, epoch):
        loss, terms = real(self, x, y, idx, epoch)
        calls["n"] += 1
        if epoch == 1 and calls["n"] >= 6:  # 4 steps per epoch: the 2nd step of the 2nd epoch goes bad
            loss = loss * float("nan")
            terms = {"ce": terms["ce"] * float("nan")}
        return loss, terms
    monkeypatch.setattr(baseline.Baseline, "forward", poisoned)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        run_main("baseline", *TINY, "--data-dir", data, "--epochs", 3, "--schedule", 2, "--out", out)
    assert e.value.code == 3
    assert "non-finite loss at epoch 2 step 2 in term(s) loss, ce" in capsys.readouterr().err
    assert common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1  # the last good epoch


def test_ramp_up_values():
    assert common.ramp_up(0) == pytest.approx(math.exp(-5))
    assert common.ramp_up(40) == pytest.approx(math.exp(-5 * 0.25))
    assert common.ramp_up(80) == 1.0 and common.ramp_up(200) == 1.0
    assert common.ramp_up(3, 0) == 1.0


# ---- logging and evaluation

def test_first_log_line_run_json_and_final_json_state_the_schedule(data, tmp_path, capsys):
    out = tmp_path / "p"
    run_main("pcl", *TINY, "--data-dir", data, "--epochs", 2, "--out", out)
    log = capsys.readouterr().out
    assert "recipe protocol: 2 epochs, batch 64, lr 0.05 x0.1 at epochs 1, wd 0.0005, Nesterov, zeros padding, " \
           "dataset statistics, --rampup 1, ema_decay 0.0 (scaled to --epochs: schedule, rampup, ema_decay)" in log
    assert "\r" not in log  # not a terminal: no progress line, only the epoch rows
    started, fin = json.loads((out / "run.json").read_text()), read_final(out)
    for d in (started, fin["args"]):
        assert d["schedule"] == [1] and d["rampup"] == 1 and d["scaled"] == ["schedule", "rampup"]
    assert started["resolved"] == fin["resolved"] == {"ema_decay": 0.0}


def test_progress_line_counts_steps_rate_and_time_left(monkeypatch, capsys):
    clock = iter([100.0, 101.0, 101.2, 102.0])
    monkeypatch.setattr(common.time, "time", lambda: next(clock))
    p = common.Progress(steps=10, batch_size=64)
    p.step(0, 5, 1)  # starts the clock
    p.step(0, 5, 3)  # 2 steps of 64 in 1 s
    p.step(0, 5, 4)  # within 0.5 s of the last line: not printed
    p.step(0, 5, 5)
    p.clear()
    out = capsys.readouterr().out
    assert "\r  epoch 1/5: step 3/10, 128 img/s, 4 s left " in out   # 7 steps x 64 / 128 img/s
    assert "step 4/10" not in out and "step 5/10, 128 img/s, 2 s left" in out and out.endswith("\r\033[K")


def test_eval_every_tests_some_epochs_and_always_the_last(data, tmp_path, capsys):
    out = tmp_path / "e"
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 3, "--schedule", "--eval-every", 2, "--out", out)
    rows = read_log(out)
    assert [r["net"] != "" for r in rows] == [False, True, True]
    fin = read_final(out)
    assert fin["last"]["net"] == float(rows[-1]["net"]) and fin["best"]["net"][1] in (2, 3)
    assert 0 <= fin["train_last"]["net"] <= 100  # top-1 on the (un-augmented) training images


# ---- resume
# (each method's part resumes a halted run bit-identically; a bare --resume and its stored settings: 4. OPTIONS)

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the garbage starts like a pickle
def test_resume_without_checkpoint_starts_the_run_and_garbage_is_a_clear_error(data, tmp_path, capsys):
    out = tmp_path / "r"  # no folder yet: --resume starts it (the reproduction loop always passes --resume)
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", out, "--resume")
    assert read_final(out)["epochs"] == 1 and len(read_log(out)) == 1
    out = tmp_path / "g"
    os.makedirs(out)
    (out / "checkpoint.pt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--data-dir", data, "--out", out, "--resume")
    assert "cannot load checkpoint" in capsys.readouterr().err


# ---- one mixed-precision path on every device; torch.compile

# bf16 autocast against fp32 on the same weights and batch (resnet8 at its initialisation, batch 16, every KD
# weight ramped up): the loss within 2e-3 of itself, every term within 2e-2 of itself (plus 1e-4 of the loss, for
# terms near 0). Measured on the CPU over 6 seeds: the loss within 1.8e-4, every term within 4.9e-3 (FFSD's
# fuse_l; most within 1e-3). bf16 keeps 8 significant bits (2^-9 = 2e-3 per rounding), and the losses themselves
# are computed in fp32: the margin is ~10x on the loss, ~4x on the worst term. Bounds this wide cannot tell an
# fp32 island from a bf16 one (OKDDip's attention in bf16 moved its "kd" by 0.1% to 5% depending on the batch):
# test_fp32_islands_are_computed_exactly_as_without_autocast checks those bit for bit.
AMP_LOSS_RTOL, AMP_TERM_RTOL, AMP_TERM_ATOL = 2e-3, 2e-2, 1e-4


def build_method(script, *argv, device="cpu", num_classes=10, n_train=32, seed=0):
    """(model, args, optimizers, training labels) of a method script as its main() and the loop build them, without
    a dataset: channels_last on `device`, on_data given n_train random labels, SGD over its param_groups (and its
    extra optimizer). Options: TINY (resnet8), BUILD's for the script, then argv."""
    args, Method = script_args(script, *TINY, "--bench", 1, *BUILD.get(script, []), *argv)
    torch.manual_seed(seed)
    model = Method(args, num_classes).to(device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (n_train,), generator=torch.Generator().manual_seed(seed)).to(device)
    if hasattr(model, "on_data"):
        model.on_data(labels)
    groups = model.param_groups(args.wd) if hasattr(model, "param_groups") else \
        [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": args.wd}]
    opts = [torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov)]
    if hasattr(model, "extra_optimizer"):
        opts.append(model.extra_optimizer())
    return model, args, opts, labels


def method_loaders(model, labels, device, batch_size=16, seed=1):
    """(training Loader, test Loader) on `device` over random uint8 images: the loop's crop, flip, normalisation,
    channels_last and `views` views."""
    tx = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    mean, std = common.DATASETS["cifar100"][5:7]
    kw = dict(mean=mean, std=std, device=device, batch_size=batch_size, channels_last=True)
    return (common.Loader(tx, labels, train=True, views=getattr(model, "views", 1), seed=seed, **kw),
            common.Loader(tx, labels, train=False, **kw))


def losses_fp32_and_bf16(model, batch, device_type, epoch=299):
    """[(loss, terms) in fp32, (loss, terms) under bf16 autocast], each from its own copy of the model (BN
    statistics, banks and stashes untouched) and the same random state (MCL's negatives). Epoch 299: every
    ramp-up and warm-up at full weight."""
    out = []
    for amp in (False, True):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        with torch.autocast(device_type, torch.bfloat16, enabled=amp):
            out.append(m(*batch, epoch))
    return out


def assert_bf16_close(fp32, bf16):
    (l0, t0), (l1, t1) = fp32, bf16
    dtypes = {k: v.dtype for k, v in {"loss": l1, **t1}.items() if v.dtype != torch.float32}
    assert not dtypes, f"not fp32 under autocast: {dtypes}"
    assert torch.isfinite(l1) and all(torch.isfinite(v) for v in t1.values())
    l0, l1 = float(l0.detach()), float(l1.detach())
    assert abs(l1 - l0) <= AMP_LOSS_RTOL * abs(l0), (l0, l1)
    for k in t0:
        a, b = float(t0[k].detach()), float(t1[k].detach())
        assert abs(b - a) <= AMP_TERM_RTOL * abs(a) + AMP_TERM_ATOL * abs(l0), (k, a, b)


def assert_fp32_state(model):
    """Every floating tensor of the model's state (weights, BN statistics, PCL's mean teachers, MCL's banks,
    SOKD's teacher, KDCL's weights) is fp32: autocast never changes what is stored."""
    bad = {k: v.dtype for k, v in model.state_dict().items() if v.is_floating_point() and v.dtype != torch.float32}
    assert not bad, bad


def check_amp_step_and_evaluation(script, device):
    """One method under bf16 autocast on `device`: its loss against fp32, two steps of the loop's train_step
    (finite fp32 terms), every stored tensor still fp32, and the evaluation of every head."""
    model, _, opts, labels = build_method(script, device=device)
    train, test = method_loaders(model, labels, device)
    batch = next(train.epoch(0))
    assert_bf16_close(*losses_fp32_and_bf16(model, batch, torch.device(device).type))
    for x, y, idx in list(train.epoch(1))[:2]:
        names, vals = common.train_step(model, model, opts, x, y, idx, 299, True)
        assert vals.dtype == torch.float32 and torch.isfinite(vals).all(), dict(zip(names, vals.tolist()))
    assert_fp32_state(model)
    acc = common.evaluate(model, test, True)
    assert set(acc) == set(model.head_params()) and all(0 <= a <= 100 for a in acc.values()), acc


@pytest.mark.parametrize("script", METHODS)
def test_bf16_autocast_on_the_cpu_keeps_losses_and_state_fp32(script):
    check_amp_step_and_evaluation(script, "cpu")


def test_fp32_islands_are_computed_exactly_as_without_autocast():
    """What the docstrings call "in fp32 under autocast" gives the same bits with and without bf16 autocast:
    OKDDip's projections, attention and targets, MCL's NCE scores, FFSD's attention maps; MCL's embedding is fp32."""
    model, *_ = build_method("okddip")
    g = torch.Generator().manual_seed(0)
    c = model.leader.fc.in_features
    feats = [torch.randn(4, c, generator=g).bfloat16() for _ in range(3)]  # pooled features as bf16 branches give them
    logits = [torch.randn(4, 10, generator=g) for _ in range(3)]
    with torch.autocast("cpu", torch.bfloat16):
        alpha = model.attention_weights(feats)
        t = okddip.peer_targets(logits, alpha)
    assert alpha.dtype == t.dtype == torch.float32
    assert torch.equal(alpha, model.attention_weights(feats)) and torch.equal(t, okddip.peer_targets(logits, alpha))
    mem = F.normalize(torch.randn(4, 32, 16, generator=g), dim=2)
    emb = F.normalize(torch.randn(4, 8, 16, generator=g), dim=2)
    idx, neg = torch.arange(8), torch.randint(0, 32, (8, 5), generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        nce = mcl.nce_loss(mem, emb, idx, neg, 0.1)
    assert nce.dtype == torch.float32 and torch.equal(nce, mcl.nce_loss(mem, emb, idx, neg, 0.1))
    f = torch.randn(2, 8, 4, 4, generator=g).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        a = ffsd.attention(f)
    assert a.dtype == torch.float32 and torch.equal(a, ffsd.attention(f.float()))
    model, _, _, labels = build_method("mcl")
    x, y, idx = next(method_loaders(model, labels, "cpu")[0].epoch(0))
    with torch.autocast("cpu", torch.bfloat16):
        model(x, y, idx, 0)
    assert model._stash[0].dtype == torch.float32  # the embeddings that scores and bank updates read


def test_amp_option_turns_bf16_on_on_the_cpu_and_off_is_the_cpu_default(tmp_path, capsys):
    small = fake_cifar(tmp_path / "data", n_train=64, n_test=32)
    args = [*TINY, "--data-dir", small, "--epochs", 1, "--schedule"]
    run_main("baseline", *args, "--out", tmp_path / "off")
    assert "device cpu x1, amp off" in capsys.readouterr().out
    run_main("baseline", *args, "--out", tmp_path / "on", "--amp")
    assert "device cpu x1, amp bf16" in capsys.readouterr().out
    fin = read_final(tmp_path / "on")
    assert fin["args"]["amp"] is True and math.isfinite(float(read_log(tmp_path / "on")[0]["loss"]))
    assert common.use_amp(argparse.Namespace(amp=False, no_amp=False), "cuda:0")  # CUDA: on unless --no-amp
    assert not common.use_amp(argparse.Namespace(amp=False, no_amp=True), "cuda:0")
    with pytest.raises(SystemExit) as e:
        run_main("baseline", *args, "--out", tmp_path / "never", "--amp", "--no-amp")
    assert e.value.code == 2 and "give one of them" in capsys.readouterr().err


def _cxx():
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _compile_counters():
    """dynamo's counters, cleared: (graphs compiled, graphs that inductor compiled or loaded from its cache)."""
    from torch._dynamo.utils import counters
    return lambda: (counters["stats"]["unique_graphs"],
                    counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"])


@pytest.mark.skipif(_cxx() is None, reason="torch.compile (inductor) needs a C++ compiler on the CPU")
def test_compile_end_to_end_on_the_cpu(tmp_path, monkeypatch):
    """--compile through inductor, the real path (on a cold cache ~40 s of CPU): the run compiles its step,
    trains, tests and writes final.json; its first epoch's loss equals the eager run's within 1e-4."""
    import torch._dynamo
    import torch._inductor.config
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no pool of compile worker processes
    small = fake_cifar(tmp_path / "data", n_train=64, n_test=32)
    args = [*TINY, "--batch-size", 32, "--data-dir", small, "--epochs", 1, "--schedule"]
    run_main("baseline", *args, "--out", tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        run_main("baseline", *args, "--out", tmp_path / "compiled", "--compile")
        graphs, inductor = _compile_counters()()
    finally:
        torch._dynamo.reset()
    assert graphs >= 1 and inductor >= 1, dict(counters)
    fin = read_final(tmp_path / "compiled")
    assert fin["args"]["compile"] is True and set(fin["last"]) == {"net"}
    a, b = (float(read_log(tmp_path / o)[0]["loss"]) for o in ("eager", "compiled"))
    assert abs(a - b) <= 1e-4 * abs(a), (a, b)


@pytest.mark.parametrize("script,ramp", [("one", "--rampup"), ("ffsd", "--warmup")])
def test_compile_traces_once_not_once_per_epoch_of_a_ramp_up(script, ramp, tmp_path, monkeypatch):
    """A ramp-up weight traced into the graph would be a constant guarded on: one recompilation per epoch of the
    ramp, then eager mode after dynamo's 8. common.ramp_up enters the graph as an input instead: no graph is
    compiled after the second epoch. dynamo only (backend "eager": what recompiles is the same with inductor)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setenv("OKD_COMPILE_BACKEND", "eager")
    small = fake_cifar(tmp_path / "data", n_train=16, n_test=16)
    seen, real = [], common._set_lr
    count = _compile_counters()
    monkeypatch.setattr(common, "_set_lr", lambda *a: seen.append(count()[0]) or real(*a))  # at each epoch's start
    torch._dynamo.reset()
    counters.clear()
    try:
        run_main(script, *TINY, "--batch-size", 16, "--data-dir", small, "--epochs", 5, "--schedule", ramp, 4,
                 "--compile", "--out", tmp_path / "r")
        seen.append(count()[0])
    finally:
        torch._dynamo.reset()
    assert seen[0] == 0 and seen[2] == seen[-1] > 0, seen  # graphs before epochs 1..5, then at the end


# ---- DDP: two gloo processes, through --gpus 0,1 (mp.spawn) and through torchrun
# (baseline's: 9. BASELINE; OEC-KD's, KD's and ReviewKD's: their parts; below, the methods with state beyond
# the weights: EMA teachers, memory banks, holdout weights)

@pytest.mark.parametrize("script,extra", [("pcl", []), ("mcl", []), ("kdcl", ["--variant", "general", "--val-size", 64]),
                                          ("cl", []), ("okddip", []), ("ffsd", [])])
def test_ddp_methods_keep_ranks_identical(script, extra, data, tmp_path):
    out = tmp_path / script
    r = run_cli(script, "--arch", "resnet8", "--batch-size", 64, "--gpus", "0,1", "--data-dir", data,
                "--epochs", 1, "--schedule", "--out", out, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broadcast_buffers" not in r.stderr, r.stderr[-2000:]  # no deprecated DDP option (torch warns on it)
    fin = read_final(out)
    # weights (PCL's mean teachers included: they are parameters) identical on both ranks
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert set(fin["last"]) == set(fin["params"])


def test_ddp_keeps_batchnorm_statistics_per_rank(tmp_path):
    """The loop's DDP never syncs buffers in forward: each rank keeps its own BatchNorm statistics, under
    whichever name this torch has for it (forward_sync_buffers=False, or broadcast_buffers=False before it)."""
    import torch.distributed as dist
    from types import SimpleNamespace
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = common._step_model(SimpleNamespace(batch_size=4, compile=False), common.build_model("resnet8", 10), 2)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        sync = ddp.forward_sync_buffers if hasattr(ddp, "forward_sync_buffers") else ddp.broadcast_buffers
        assert sync is False
    finally:
        dist.destroy_process_group()


def test_ddp_rank_failure_ends_every_rank(data, tmp_path):
    import time
    t0 = time.time()
    env = cpu_env(OKD_FAIL_RANK="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "baseline.py"), "--arch", "resnet8", "--gpus", "0,1",
                        "--data-dir", data, "--epochs", "2", "--schedule", "1", "--out", str(tmp_path / "r")],
                       cwd=HERE, capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode != 0
    assert "failure injected" in p.stderr
    assert time.time() - t0 < 120


IMAGENET_TINY = ["--dataset", "imagenet", "--image-size", 32, "--batch-size", 8, "--workers", 1,
                 "--epochs", 1, "--schedule"]


def _torchrun(script, *argv, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(HERE, script + ".py"), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env=cpu_env(OMP_NUM_THREADS="1"))


def test_imagenet_baseline_under_torchrun_two_processes(folder, tmp_path):
    out = tmp_path / "b"
    r = _torchrun("baseline", *IMAGENET_TINY, "--arch", "resnet18", "--data-dir", folder, "--gpus", "cpu",
                  "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    fin = read_final(out)
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert fin["dataset"] == "imagenet" and set(fin["last"]) == {"net"}
    assert fin["params"]["net"] == common.count_params(torchvision.models.resnet18(num_classes=3))  # 3 class folders
    a = fin["args"]  # the ImageNet protocol where not given: lr 0.1 x 8/256, wd 1e-4
    assert a["lr"] == 0.1 * 8 / 256 and a["wd"] == 1e-4 and a["image_size"] == 32 and a["schedule"] == []
    assert "24 training images" in r.stdout


def test_imagenet_one_two_gloo_processes(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a shared CPU: no OpenMP oversubscription
    out = tmp_path / "one"
    r = run_cli("one", *IMAGENET_TINY, "--arch", "resnet8", "--data-dir", folder, "--gpus", "0,1", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    fin = read_final(out)
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert set(fin["last"]) == {"branch1", "branch2", "branch3", "ensemble"} and fin["deploy"] == "branch1"
    assert fin["params"]["branch1"] == common.count_params(common.build_model("resnet8", 3))
    assert len(read_log(out)) == 1


# ---- CUDA: every test below runs where CUDA exists (gpu_check.py runs them) and is skipped elsewhere

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("script", METHODS)
def test_cuda_bf16_step_matches_fp32(script, monkeypatch):
    """As on the CPU, on CUDA: the loss under bf16 autocast against true fp32 (TF32 off) within the same bounds,
    two steps of train_step, fp32 state, evaluation of every head."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    check_amp_step_and_evaluation(script, "cuda")


@needs_cuda
@pytest.mark.parametrize("script,extra", [*(pytest.param(m, [], id=m) for m in METHODS),
                                          pytest.param("kdcl", ["--variant", "linear"], id="kdcl-linear"),
                                          pytest.param("kdcl", ["--variant", "naive"], id="kdcl-naive"),
                                          pytest.param("cl", ["--sharing", "simple"], id="cl-simple")])
def test_cuda_training_step_has_no_host_sync(script, extra, tmp_path, monkeypatch):
    """CUDA's own sync detector (torch.cuda.set_sync_debug_mode("error")) around every training step of --bench
    after the first two (cudnn autotuning): the loop's step, forward to after_step, never waits for the GPU."""
    real, calls = common.train_step, {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] <= 2:
            return real(*a, **k)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    monkeypatch.setattr(common, "train_step", step)
    run_main(script, *TINY, "--gpus", "0", "--batch-size", 16, "--bench", 4, "--out", tmp_path / "b",
             *BUILD.get(script, []), *extra)
    assert calls["n"] == 3 + 3 + 2 * 4  # warm-up: 3 bare + 3 loop steps; then 4 of each, timed
    assert json.load(open(tmp_path / "b" / "bench.json"))["amp"] is True


@needs_cuda
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_cuda_crop_flip_and_normalisation_equal_the_cpus(padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flip = torch.rand(64, generator=g) < 0.5
    cpu = common.crop_flip(x, dy, dx, flip, padding=padding)
    gpu = common.crop_flip(x.cuda(), dy.cuda(), dx.cuda(), flip.cuda(), padding=padding)
    assert torch.equal(gpu.cpu(), cpu)
    mean, std = common.DATASETS["cifar100"][5:7]
    n_cpu = common._DeviceNormalize(mean, std, "cpu", True).normalize(cpu)
    n_gpu = common._DeviceNormalize(mean, std, "cuda", True).normalize(gpu)
    torch.testing.assert_close(n_gpu.cpu(), n_cpu, rtol=0, atol=1e-6)  # IEEE subtract and divide: at most a rounding
    # the draws come from the device's generator (other numbers than the CPU's), the same for the same (seed, epoch)
    y = torch.arange(64)
    a, b = (list(common.Loader(x, y, mean, std, "cuda", 16, True, views=2, seed=3).epoch(1)) for _ in range(2))
    assert all(torch.equal(u[0][0], v[0][0]) and torch.equal(u[0][1], v[0][1]) and torch.equal(u[2], v[2])
               for u, v in zip(a, b))


@needs_cuda
def test_cuda_resume_matches_an_uninterrupted_run_up_to_cudas_own_nondeterminism(data, tmp_path, record_property):
    """Each run in its own process, as in use. On the CPU a resume is bit-exact. On CUDA, cudnn.benchmark picks
    convolution algorithms per process by timing them, and some accumulate in an order that varies, so two
    uninterrupted runs may already differ: the resumed run must not differ from one more than 10x what a second
    uninterrupted run differs (bit-exact when that is 0). Both differences are recorded (junit properties)."""
    args = ["--arch", "resnet8", "--batch-size", 64, "--gpus", "0", "--data-dir", data, "--epochs", 2,
            "--schedule", 1, "--lr", 0.05]
    env = dict(os.environ)  # CUDA visible
    runs = {}
    for name, extra in (("a", []), ("c", []), ("b", ["--halt-after", 1]), ("b", ["--resume"])):
        r = run_cli("baseline", *args, "--out", tmp_path / name, *extra, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = r
    assert_continued_after_epoch_1(runs["b"].stdout, tmp_path / "b")
    wa, wb, wc = (_weights(tmp_path / n) for n in "abc")
    diff = lambda u, v: max(float((u[k].double() - v[k].double()).abs().max()) for k in u if u[k].is_floating_point())
    d_resume, d_rerun = diff(wa, wb), diff(wa, wc)
    record_property("resume_max_abs_diff", d_resume)
    record_property("rerun_max_abs_diff", d_rerun)
    print(f"CUDA resume: max |w_resumed - w_uninterrupted| = {d_resume:.3g}; two uninterrupted runs: {d_rerun:.3g}")
    assert d_resume <= 10 * d_rerun, (d_resume, d_rerun)
    assert read_final(tmp_path / "b")["device"] == torch.cuda.get_device_name(0)


@needs_cuda
def test_cuda_compile_end_to_end(tmp_path):
    """--compile on CUDA through inductor: the step compiles, trains and tests; its first epoch's loss is the eager
    run's within the bf16 bound (both under autocast; inductor fuses and rounds in another order)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    small = fake_cifar(tmp_path / "data", n_train=128, n_test=64)
    args = ["--arch", "resnet8", "--batch-size", 32, "--gpus", "0", "--lr", 0.05, "--data-dir", small,
            "--epochs", 2, "--schedule"]
    run_main("baseline", *args, "--out", tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        run_main("baseline", *args, "--out", tmp_path / "compiled", "--compile")
        graphs, inductor = _compile_counters()()
    finally:
        torch._dynamo.reset()
    assert graphs >= 1 and inductor >= 1, dict(counters)
    a, b = (float(read_log(tmp_path / o)[0]["loss"]) for o in ("eager", "compiled"))
    assert abs(a - b) <= AMP_TERM_RTOL * abs(a), (a, b)
    assert read_final(tmp_path / "compiled")["args"]["compile"] is True


@needs_cuda
@pytest.mark.parametrize("script", METHODS)
def test_cuda_peak_memory_per_method(script, record_property):
    """Peak GPU memory of three bf16 training steps at the protocol's shapes (resnet32, CIFAR-100, batch 128),
    above what this process held before: recorded (junit property peak_memory_mib, printed by gpu_check.py)."""
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    extra = ["--teacher-arch", "resnet32"] if script == "sokd" else []
    model, _, opts, labels = build_method(script, "--arch", "resnet32", "--batch-size", 128, *extra, device="cuda",
                                          num_classes=100, n_train=3 * 128)
    train, _ = method_loaders(model, labels, "cuda", batch_size=128)
    for x, y, idx in train.epoch(0):
        common.train_step(model, model, opts, x, y, idx, 0, True)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    record_property("peak_memory_mib", round(peak, 1))
    print(f"{script}: peak {peak:.0f} MiB (resnet32, batch 128, bf16)")
    del model, opts
    torch.cuda.empty_cache()
    assert 0 < peak < 40 * 1024


# ---- a loss term given as a plain number: one line, not a traceback

class _Terms(torch.nn.Module):
    """A linear model whose forward returns `extra` as one more loss term."""

    def __init__(self, extra):
        super().__init__()
        self.fc, self.extra = torch.nn.Linear(4, 3), extra

    def forward(self, x, y, idx, epoch):
        ce = F.cross_entropy(self.fc(x), y)
        return ce, {"ce": ce, "off": self.extra}


def _step(extra):
    model = _Terms(extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    return common.train_step(model, model, [opt], x, y, torch.arange(8), 0, False)


@pytest.mark.parametrize("extra", [0.0, 0, 1.5])
def test_train_step_names_a_term_given_as_a_plain_number(extra):
    with pytest.raises(ValueError) as e:
        _step(extra)
    msg = str(e.value)
    assert "\n" not in msg and "_Terms.forward" in msg and "'off'" in msg and repr(extra) in msg
    assert "not a tensor" in msg and "torch.tensor(0.0, device=y.device)" in msg


def test_train_step_stacks_tensor_terms_as_before():
    names, vals = _step(torch.tensor(0.25))
    assert names == ["loss", "ce", "off"] and vals.dtype == torch.float32 and vals.shape == (3,)
    assert vals[0] == vals[1] and vals[2] == 0.25


def test_a_plain_number_term_ends_the_run_in_one_line(data, tmp_path, monkeypatch, capsys):
    real = dml.DML.forward

    def forward(self, x, y, idx, epoch):
        loss, terms = real(self, x, y, idx, epoch)
        return loss, {**terms, "kd": 0.0}  # as a method with its weight off might write it
    monkeypatch.setattr(dml.DML, "forward", forward)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        run_main("dml", *TINY, "--data-dir", data, "--epochs", 1, "--out", out)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == common.EXIT_ERROR and len(lines) == 1 and "Traceback" not in err
    assert "DML.forward returned the loss term 'kd' as 0.0 (a float), not a tensor" in lines[0]
    assert not out.exists()  # nothing was kept: the start was undone


# ---- the lr schedule, written once

@pytest.mark.parametrize("cosine,schedule", [(False, [2, 4]), (True, [])])
def test_lr_factor_is_the_loops_schedule_and_the_ffsd_decoders_follow_it(cosine, schedule):
    """common.lr_factor is the schedule _set_lr applies (bit for bit), and FFSD's decoders get --decoder-lr x it."""
    args = argparse.Namespace(cosine=cosine, schedule=schedule, lr=0.1, epochs=6)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    m = method_model("ffsd", schedule=schedule or [2, 4], epochs=6, cosine=cosine)
    adam = m.extra_optimizer()
    for e in range(6):
        assert common._set_lr(opt, args, e) == args.lr * common.lr_factor(args, e)
        m.on_epoch(e, None)
        assert adam.param_groups[0]["lr"] == m.args.decoder_lr * common.lr_factor(m.args, e)


# =================================================================================================
# 4. OPTIONS (common.py part 4): bad values, protocol defaults, --epochs scaling, --recipe paper, stored settings
# =================================================================================================

# ---- the parser and its checks: one clear line, nothing written

@pytest.mark.parametrize("bad,msg", [
    (["--arch", "resnet33"], "invalid choice: 'resnet33'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--schedule", "20", "10"], "milestones must increase"),
    (["--schedule", "400"], "milestones must increase and lie in"),
    (["--batch-size", "0"], "must be positive"),
    (["--epochs", "-1"], "must be positive"),
    (["--gpus", "x"], "expected GPU indices"),
])
def test_bad_arguments_give_one_clear_error_and_no_run_folder(bad, msg, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        run_main("baseline", "--data-dir", tmp_path, "--out", out, *bad)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("script,bad,msg", [
    ("dml", ["--lr", "nan"], "argument --lr: nan is not a finite number"),
    ("dml", ["--lr", "inf"], "argument --lr: inf is not a finite number"),
    ("dml", ["--wd", "-1"], "argument --wd: -1.0 must be non-negative"),
    ("dml", ["--wd", "-1e-5"], "argument --wd: -1e-05 must be non-negative"),
    ("ffl", ["--fusion-wd", "-.5E-3"], "argument --fusion-wd: -0.0005 must be non-negative"),
    ("dml", ["--momentum", "-5"], "argument --momentum: -5.0 must lie in [0, 1)"),
    ("dml", ["--T", "-1"], "argument --T: -1.0 must be positive"),
    ("dml", ["--peers", "1"], "argument --peers: 1 must be at least 2"),
    ("mcl", ["--nce-m", "1"], "argument --nce-m: 1.0 must lie in [0, 1)"),
    ("pcl", ["--ema-decay", "nan"], "argument --ema-decay: nan is not a finite number"),
    ("one", ["--rampup", "-3"], "argument --rampup: -3 must be non-negative"),
    ("baseline", ["--eval-every", "0"], "argument --eval-every: 0 must be positive"),
    ("baseline", ["--resume", "--force"], "give one of them"),
])
def test_every_bad_value_is_caught_before_anything_is_written(script, bad, msg, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        run_main(script, "--data-dir", tmp_path, "--out", out, *bad)
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not out.exists()


def test_unknown_variant_lists_the_valid_ones(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        run_main("kdcl", "--variant", "best", "--data-dir", tmp_path, "--out", out)
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "invalid choice: 'best'" in err and all(v in err for v in ("naive", "linear", "minlogit", "general"))


def test_gpus_that_do_not_exist_and_no_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert common._devices("0,1") == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match=r"--gpus 0,5: no GPU 5 \(this machine has 2: 0..1\)"):
        common._devices("0,5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common._devices("0,1") == ["cpu", "cpu"]  # CPU, as many gloo processes
    assert "CUDA is not available; training on the CPU" in capsys.readouterr().err


def test_limits_that_depend_on_the_data_leave_no_half_made_folder(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "k"  # fake CIFAR-100 has 256 training images: a holdout of 300 leaves none
    with pytest.raises(SystemExit):
        run_main("kdcl", *TINY, "--data-dir", data, "--variant", "general", "--val-size", 300, "--out", out)
    err = capsys.readouterr().err  # refused before the run folder is made (issue 29)
    assert "a holdout of 300 images leaves 0 of the 256 training images, less than one batch of 64" in err
    assert "classes of cifar100" in err  # the fake folder lacks some of the 100 classes: warned
    assert not out.exists()

    def fails(self, labels):
        raise ValueError("MCL needs training images of at least two classes to draw negatives")
    monkeypatch.setattr(mcl.MCL, "on_data", fails)
    with pytest.raises(SystemExit):
        run_main("mcl", *TINY, "--data-dir", data, "--out", out)
    assert "at least two classes" in capsys.readouterr().err and not out.exists()


# ---- protocol defaults; lengths that scale with --epochs

def test_schedule_and_rampups_scale_with_epochs_unless_given(monkeypatch):
    a = parsed_args("one")  # the protocol's own length: nothing changes
    assert (a.epochs, a.schedule, a.rampup, a.scaled) == (300, [150, 225], 80, [])
    a = parsed_args("one", "--epochs", 10)  # 150/300, 225/300 and 80/300 of 10 epochs
    assert (a.schedule, a.rampup, a.scaled) == ([5, 8], 3, ["schedule", "rampup"])
    a = parsed_args("one", "--epochs", 2)  # the ramp-up lasts at least one epoch
    assert (a.schedule, a.rampup) == ([1], 1)
    a = parsed_args("pcl", "--epochs", 10, "--schedule", 7, "--rampup", 0)  # given: they win
    assert (a.schedule, a.rampup, a.scaled) == ([7], 0, [])
    a = parsed_args("ffl", "--dataset", "imagenet", "--epochs", 45, "--bench", 1)
    assert (a.schedule, a.rampup) == ([15, 30, 40], 40)  # imagenet: fractions of its 90-epoch protocol


def _parsed(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["x.py", *map(str, argv)])
    return common.parse(common.parser("x"), "x")


def test_imagenet_protocol_defaults(monkeypatch, capsys):
    a = _parsed(monkeypatch, "--gpus", "cpu")  # CIFAR: exactly the old defaults
    assert (a.epochs, a.lr, a.batch_size, a.wd, a.schedule, a.image_size) == (300, 0.1, 128, 5e-4, [150, 225], None)
    a = _parsed(monkeypatch, "--gpus", "cpu", "--dataset", "imagenet")
    assert (a.epochs, a.lr, a.batch_size, a.wd, a.schedule, a.image_size) == (90, 0.1, 256, 1e-4, [30, 60, 80], 224)
    a = _parsed(monkeypatch, "--gpus", "cpu", "--dataset", "imagenet", "--batch-size", 1024, "--wd", 5e-5)
    assert (a.lr, a.wd, a.workers) == (0.4, 5e-5, 8)  # linear scaling with the batch; given values win
    assert _parsed(monkeypatch, "--gpus", "cpu", "--dataset", "imagenet", "--lr", 0.2, "--batch-size", 512).lr == 0.2
    for argv, msg in ((["--dataset", "imagenet", "--epochs", 50, "--schedule", 30, 60, 80], "lie in (0, --epochs=50)"),
                      (["--image-size", 64], "--image-size applies to --dataset imagenet only")):
        with pytest.raises(SystemExit):
            _parsed(monkeypatch, "--gpus", "cpu", *argv)
        assert msg in capsys.readouterr().err


# ---- --recipe paper

PAPER_RECIPES = {  # what --recipe paper must give (README table), the rest being the protocol's
    "one": dict(wd=1e-4, no_nesterov=True, schedule=[151, 225], norm="cifar10-legacy", epochs=300),
    "ffl": dict(wd=1e-4, fusion_wd=1e-5, epochs=301, schedule=[150, 225], padding="reflect"),
    "mcl": dict(batch_size=64, lr=0.05, cosine=True, epochs=300),
    "sokd": dict(epochs=200, schedule=[100, 150], no_nesterov=True, padding="reflect", norm="cifar10"),
    "baseline": dict(epochs=200, schedule=[100, 150], no_nesterov=True, padding="reflect", norm="cifar10"),
    "dml": dict(batch_size=64, epochs=200, schedule=[60, 120, 180], padding="reflect"),
    "okddip": dict(schedule=[149, 224], wd=5e-4),
    "ffsd": dict(wd=1e-4, epochs=299, schedule=[150, 225], padding="reflect"),
    "pcl": dict(wd=5e-4, epochs=300, schedule=[150, 225], padding="zeros", norm="dataset", batch_size=128),
    "kdcl": dict(wd=5e-4, epochs=300, schedule=[150, 225], padding="zeros", batch_size=128),
    "cl": dict(wd=5e-4, epochs=300, schedule=[150, 225], padding="zeros", batch_size=128),
    "oeckd": dict(optimizer="adam", lr=1e-3, wd=1e-5, batch_size=128, epochs=350, schedule=[200, 300], norm="none",
                  init="xavier"),
    "kd": dict(batch_size=64, epochs=240, lr=0.05, schedule=[150, 180, 210], no_nesterov=True),
    "reviewkd": dict(epochs=240, batch_size=128, lr=0.1, schedule=[151, 181, 211], wd=5e-4, norm="cifar10"),
}


# --recipe paper --epochs 200: the paper's milestones scaled from the paper's own epochs (by hand:
# ONE 151*200/300 = 100.7 -> 101; OKDDip 149*200/300 = 99.3 -> 99; FFSD 225*200/299 = 150.5 -> 151),
# the protocol's where the paper has none (150, 225 of 300), unchanged where 200 is the paper's length
PAPER_AT_200 = {"one": [101, 150], "okddip": [99, 149], "ffsd": [100, 151], "ffl": [100, 150],
                "dml": [60, 120, 180], "sokd": [100, 150], "baseline": [100, 150], "mcl": [100, 150],
                "pcl": [100, 150], "kdcl": [100, 150], "cl": [100, 150],
                "oeckd": [114, 171], "kd": [125, 150, 175], "reviewkd": [126, 151, 176]}  # 200*200/350 = 114.3, ...


@pytest.mark.parametrize("script", METHODS)
def test_recipe_paper_sets_the_official_values_and_given_options_win(script, monkeypatch):
    extra = ["--teacher-arch", "resnet8", "--bench", 1] if script in TEACHER_SCRIPTS else []
    a = parsed_args(script, "--recipe", "paper", *extra)
    for k, v in PAPER_RECIPES[script].items():
        assert getattr(a, k) == v, k
    a = parsed_args(script, *extra)  # the default stays the protocol
    assert (a.recipe, a.wd, a.epochs, a.padding, a.norm, a.no_nesterov) == ("protocol", 5e-4, 300, "zeros", "dataset", False)
    a = parsed_args(script, "--recipe", "paper", "--wd", 3e-4, "--epochs", 200, *extra)
    assert a.wd == 3e-4 and a.epochs == 200 and a.schedule == PAPER_AT_200[script]  # milestones follow --epochs


def test_every_method_runs_end_to_end_with_recipe_paper(data, tmp_path, capsys):
    teacher = tmp_path / "t"
    common_args = [*TINY, "--batch-size", 32, "--data-dir", data, "--epochs", 1, "--recipe", "paper"]
    run_main("baseline", *common_args, "--out", teacher)
    scripts = [s for s in METHODS if s != "baseline"]
    for script in scripts:
        extra = ["--teacher", teacher / "checkpoint.pt"] if script in TEACHER_SCRIPTS else []
        if script == "kd":  # this teacher has baseline's paper recipe (SOKD's: CIFAR-10 statistics); RepDistiller's
            extra += ["--norm", "cifar10"]  # normalises both nets alike, and another --norm is refused
        run_main(script, *common_args, "--out", tmp_path / script, *extra)
        fin = read_final(tmp_path / script)
        assert fin["args"]["recipe"] == "paper" and set(fin["last"]) == set(fin["params"]), script
    assert capsys.readouterr().out.count("recipe paper: 1 epochs") == len(scripts) + 1
    with pytest.raises(SystemExit):  # --resume refuses another recipe
        run_main("one", *common_args[:-2], "--recipe", "protocol", "--out", tmp_path / "one", "--resume")
    assert "--recipe 'paper' (checkpoint) vs 'protocol' (now)" in capsys.readouterr().err


# ---- stored settings: a bare --resume, a resume with other settings

def test_bare_resume_uses_the_stored_settings_and_a_larger_epochs_extends(data, tmp_path, capsys):
    out = tmp_path / "r"
    run_main("dml", *TINY, "--data-dir", data, "--dataset", "cifar100", "--epochs", 3, "--schedule", 2,
             "--T", 2, "--out", out, "--halt-after", 1)
    capsys.readouterr()
    run_main("dml", "--out", out, "--resume")  # no --data-dir, --arch, --T ...: the run's own
    stdout = capsys.readouterr().out
    assert "resumed" in stdout and "epoch      lr" in stdout  # the column names again after a resume
    fin = read_final(out)
    assert fin["args"]["T"] == 2 and fin["args"]["lr"] == 0.05 and [int(r["epoch"]) for r in read_log(out)] == [1, 2, 3]
    run_main("dml", "--out", out, "--resume")  # finished: left as it is
    assert "is finished" in capsys.readouterr().out and len(read_log(out)) == 3
    run_main("dml", "--out", out, "--resume", "--epochs", 4)
    assert "extending the run from 3 epochs" in capsys.readouterr().out
    assert read_final(out)["epochs"] == 4 and [int(r["epoch"]) for r in read_log(out)] == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        run_main("dml", "--out", out, "--resume", "--epochs", 2)
    assert "--epochs 4 (checkpoint) vs 2 (now)" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused_naming_the_mismatch(data, tmp_path, capsys):
    out = tmp_path / "r"
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 2, "--schedule", 1, "--out", out, "--halt-after", 1)
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY[:-1], "0.1", "--data-dir", data, "--epochs", 2, "--schedule", 1, "--out", out,
                 "--resume")
    err = capsys.readouterr().err
    assert "--lr 0.05 (checkpoint) vs 0.1 (now)" in err
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--arch", "resnet14", "--data-dir", data, "--epochs", 2, "--schedule", 1,
                 "--out", out, "--resume")
    assert "--arch 'resnet8' (checkpoint) vs 'resnet14' (now)" in capsys.readouterr().err


# ---- one load_teacher, in common.py

def test_teacher_loading_lives_in_common_only():
    for mod in (kd, sokd, reviewkd):
        assert not hasattr(mod, "load_teacher") and not hasattr(mod, "_train_teacher_hint"), mod.__name__
        assert "common.load_teacher(" in _source(mod.__name__)


@pytest.mark.parametrize("default", ["resnet110", "wrn_40_2"])
def test_load_teacher_names_the_default_teacher_when_no_arch_is_given(default, tmp_path):
    kw = {} if default == "resnet110" else {"default_arch": default}
    with pytest.raises(ValueError) as e:
        common.load_teacher(str(tmp_path / "nope.pt"), None, "cifar100", 100, **kw)
    msg = str(e.value)
    assert "nope.pt" in msg and f"python baseline.py --arch {default} --dataset cifar100" in msg
    assert f"runs/baseline-{default}-cifar100-s0/checkpoint.pt" in msg and "--teacher PATH" in msg


# =================================================================================================
# 5. RUN FOLDER (common.py part 5): the lock, atomic writes, --force, Ctrl-C and signals, invariants
# =================================================================================================

# ---- the lock; --force

def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(data, tmp_path):
    import time
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "baseline.py"), *map(str, TINY), "--data-dir", data,
                          "--epochs", "200", "--schedule", "--out", str(out)], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "run.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        for flag in ("--resume", "--force"):
            r = run_cli("baseline", *TINY, "--data-dir", data, "--epochs", 200, "--schedule", "--out", out, flag)
            assert r.returncode == 2 and f"in use by another process (pid {p.pid})" in r.stderr, r.stderr
        assert (out / "run.json").exists()  # --force removed nothing
    finally:
        p.kill()
        p.wait()
    # killed: the OS released the lock, so the run resumes (no stale lock)
    r = run_cli("baseline", "--out", out, "--resume", "--epochs", 200, "--halt-after", 1)
    assert r.returncode == 0 and "in use" not in r.stderr, r.stderr


def test_existing_run_folder_is_refused_then_force_restarts(data, tmp_path, capsys):
    out = tmp_path / "r"
    args = [*TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", out]
    run_main("baseline", *args)
    stamp = os.path.getmtime(out / "final.json")
    with pytest.raises(SystemExit):
        run_main("baseline", *args)
    assert "exists; pass --resume" in capsys.readouterr().err
    assert os.path.getmtime(out / "final.json") == stamp  # untouched
    capsys.readouterr()
    run_main("baseline", *args, "--force")
    assert "--force: starting over in" in capsys.readouterr().out
    assert len(read_log(out)) == 1 and os.path.getmtime(out / "final.json") != stamp  # a new run wrote it


def test_force_starts_over_only_in_a_run_folder_and_says_what_it_removes(data, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", thesis, "--force")
    assert "not a run folder of this repo" in capsys.readouterr().err
    assert (thesis / "chapter1.tex").read_text() == "years of work"
    runs = tmp_path / "runs"  # a folder of runs is not a run either
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", runs / "a")
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", runs, "--force")
    assert "not a run folder of this repo" in capsys.readouterr().err
    assert (runs / "a" / "final.json").exists()
    (runs / "a" / "notes.txt").write_text("mine")  # a run folder: only the run's own files go
    capsys.readouterr()
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", runs / "a", "--force")
    assert "--force: starting over in" in capsys.readouterr().out
    assert (runs / "a" / "notes.txt").read_text() == "mine" and len(read_log(runs / "a")) == 1


# ---- atomic writes and checkpoints: a full disk, a kill while saving, the umask, unsafe pickles

def _enospc(monkeypatch, when):
    """Make atomic_write raise ENOSPC when when(path) is true, as a full disk would, mid-file."""
    import errno
    real = common.atomic_write

    def writer(path, write, size_hint=0):
        if when(path):
            def full(f):
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, full, size_hint)
        return real(path, write, size_hint)
    monkeypatch.setattr(common, "atomic_write", writer)


def test_disk_full_while_checkpointing_keeps_log_and_checkpoint_in_step(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    args = [*TINY, "--data-dir", data, "--epochs", 3, "--schedule", "--out", out]
    saves = {"n": 0}

    def second_checkpoint(path):
        saves["n"] += path.endswith("checkpoint.pt")
        return path.endswith("checkpoint.pt") and saves["n"] == 2
    _enospc(monkeypatch, second_checkpoint)
    with pytest.raises(SystemExit):
        run_main("baseline", *args)
    err = capsys.readouterr().err
    err = "\n".join(line for line in err.splitlines() if not line.startswith("warning:"))  # the fake data's classes
    assert err.count("\n") == 0 and "disk full while writing" in err and str(out) in err and "MiB free" in err
    assert "the checkpoint of epoch 1 is intact" in err
    assert common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1 and len(read_log(out)) == 1
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    monkeypatch.undo()
    run_main("baseline", *args, "--resume")
    assert [int(r["epoch"]) for r in read_log(out)] == [1, 2, 3]


def test_disk_full_while_writing_final_json_leaves_no_empty_file(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    _enospc(monkeypatch, lambda path: path.endswith("final.json"))
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", out)
    assert "disk full while writing" in capsys.readouterr().err
    assert not (out / "final.json").exists() and common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1
    monkeypatch.undo()
    run_main("baseline", "--out", out, "--resume")  # the finished checkpoint: final.json written, no training
    assert read_final(out)["epochs"] == 1 and len(read_log(out)) == 1


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    common.atomic_save({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        common.atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert common.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind


def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "c.pt")
    code = ("import sys, torch, common\n"
            "common.atomic_save({'i': 0, 'w': torch.zeros(1)}, sys.argv[1])\n"
            "print('ready', flush=True)\n"
            "i = 0\n"
            "while True:\n"
            "    i += 1\n"
            "    common.atomic_save({'i': i, 'w': torch.randn(3_000_000)}, sys.argv[1])\n")
    p = subprocess.Popen([sys.executable, "-c", code, path], cwd=HERE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    import time
    time.sleep(1.5)
    p.kill()
    p.wait()
    ck = common.load_checkpoint(path)
    assert ck["i"] >= 0 and (ck["i"] == 0 or ck["w"].numel() == 3_000_000)


def test_files_respect_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", tmp_path / "r")
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "final.json", "log.csv", "run.json"):
        assert os.stat(tmp_path / "r" / name).st_mode & 0o777 == 0o644, name


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + _Evil.marker,))


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(RuntimeError, match="unsafe to unpickle"):
        common.load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


# ---- Ctrl-C and signals

def test_interrupt_messages_tell_the_truth():
    stop = common.Interrupt()
    import io as _io
    import contextlib
    for done, says in ((0, "no epoch is complete yet, so there is no checkpoint: --resume starts the run over"),
                       (3, "--resume continues from the checkpoint of epoch 3")):
        stop.hit, stop.done = False, done
        buf = _io.StringIO()
        with contextlib.redirect_stdout(buf):
            stop._handle()
        assert says in buf.getvalue()
    with pytest.raises(KeyboardInterrupt):  # the second one stops at once
        stop._handle()
    stop.restore()  # SIGINT, SIGTERM and SIGHUP as they were


def test_two_ctrl_c_stop_at_once_without_a_traceback(data, tmp_path):
    """Two SIGINTs inside one step (sent by the step itself, so the timing is exact): the second stops at
    once through run()'s KeyboardInterrupt path, not through the first one's end-of-step stop."""
    out = tmp_path / "r"
    code = (
        "import os, signal, sys\n"
        "import baseline\n"
        "calls = [0]\n"
        "forward = baseline.Baseline.forward\n"
        "def twice(self, *a, **k):\n"
        "    calls[0] += self.training\n"
        "    if self.training and calls[0] == 2:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return forward(self, *a, **k)\n"
        "baseline.Baseline.forward = twice\n"
        f"sys.argv = ['baseline.py', *{[str(a) for a in TINY]!r}, '--data-dir', {str(data)!r}, '--epochs', '3',\n"
        f"            '--schedule', '--batch-size', '8', '--out', {str(out)!r}]\n"
        "baseline.main()\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr
    said = p.stdout + p.stderr
    assert "Ctrl-C again stops at once" in said and "stopped at once (second Ctrl-C)" in said, said
    assert "stopped in epoch" not in said  # the first Ctrl-C's path did not get to run
    assert not (out / "checkpoint.pt").exists()  # stopped inside epoch 1: no epoch was kept


def test_sigint_stops_at_a_safe_point_and_resume_matches_uninterrupted(data, tmp_path):
    import signal
    import time
    args = [*TINY, "--data-dir", data, "--epochs", 4, "--schedule", 3]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main("baseline", *args, "--out", a)
    # the same number of threads as this process: float sums (hence weights) depend on it
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "baseline.py"), *map(str, args), "--out", str(b)],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.time() + 120
    while not (b / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    assert "stopped in epoch" in out and not (b / "final.json").exists()
    kept = common.load_checkpoint(str(b / "checkpoint.pt"))["epoch"]
    assert 1 <= kept < 4
    run_main("baseline", *args, "--out", b, "--resume")
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- run-folder invariants (issue 29)
# A run folder is what this repository made; nothing stale or partial is left in it; every way a run
# ends is one true line with its own exit code; every refusal is one line before anything is written;
# --resume continues the same experiment (README "When things go wrong", the rows from "a folder this
# repository did not make" on).

INV = ["--arch", "resnet8", "--batch-size", "32", "--gpus", "cpu", "--lr", "0.05", "--schedule"]  # 2 steps/epoch


def _call(capsys, script, *argv):
    """(exit code, stdout, stderr) of `python script.py argv` run in this process; stderr without the
    fake data's warning about missing classes."""
    capsys.readouterr()
    code = 0
    try:
        run_main(script, *argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    got = capsys.readouterr()
    err = "\n".join(ln for ln in got.err.splitlines() if not ln.startswith("warning: the training labels"))
    return code, got.out, err


def _snapshot(path):
    """Every file of a folder and its bytes (None: nothing there)."""
    if not os.path.lexists(path):
        return None
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def _assert_one_line(err):
    assert len(err.strip().splitlines()) == 1, err
    for text in ("Traceback", "torch.", "numpy", "Error:", "Exception"):  # no library's words
        assert text not in err, err


def _assert_consistent(out):
    """The run folder after any command: ours, no temp file, no empty file, every file whole, the log
    matching the checkpoint, final.json only for a finished run of the checkpoint's epochs."""
    names = os.listdir(out)
    assert common.classify_run_dir(str(out))[0] == "ours", names
    assert not [n for n in names if n.startswith(".tmp-")], names
    assert all(os.path.getsize(os.path.join(out, n)) > 0 for n in names if n != ".lock"), names
    run = json.load(open(os.path.join(out, "run.json"))) if "run.json" in names else None
    if run is not None:
        assert run["made_by"] == common.MARKER["made_by"]
    if "checkpoint.pt" in names:
        ck = common.load_checkpoint(os.path.join(out, "checkpoint.pt"))
        assert ck["made_by"] == common.MARKER["made_by"] and ck["data"]["train_images"] == 64
        assert [int(r["epoch"]) for r in read_log(out)] == list(range(1, ck["epoch"] + 1))
        if "final.json" in names:
            fin = read_final(out)
            assert fin["made_by"] == common.MARKER["made_by"] and fin["epochs"] == ck["epoch"] == run["epochs"]
    else:
        assert "final.json" not in names and "log.csv" not in names


def _strip_marker(out):
    """What an earlier version of common.py wrote: no marker in run.json or the checkpoint, no data in it."""
    p = os.path.join(out, "run.json")
    if os.path.exists(p):
        rec = json.load(open(p))
        json.dump({k: v for k, v in rec.items() if k not in common.MARKER}, open(p, "w"))
    ck = common.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    torch.save({k: v for k, v in ck.items() if k not in (*common.MARKER, "data")}, os.path.join(out, "checkpoint.pt"))


INV_FOREIGN = ("user_log", "user_run_json")
INV_RUNS = ("started", "checkpointed", "finished", "extended", "record", "legacy", "legacy_checkpoint_only")


def _make_state(state, tpl, out):
    """A run folder in `state`; every state but new and the user's own folders also holds a user's file,
    a temp file of a writer that was killed, and a lock file no process holds."""
    if state == "new":
        return
    os.makedirs(out)
    if state == "user_log":
        (out / "log.csv").write_text("my own,log\n1,2\n")
        return
    if state == "user_run_json":
        (out / "run.json").write_text('{"epochs": 5, "note": "another program\'s run"}')
        (out / "log.csv").write_text("step,loss\n1,0.5\n")
        return
    if state == "started":
        shutil.copy(tpl / "checkpointed" / "run.json", out)
    elif state in ("checkpointed", "finished", "extended"):
        shutil.copytree(tpl / state, out, dirs_exist_ok=True)
    elif state == "record":  # a finished run kept without its weights, as results/ keeps them
        shutil.copytree(tpl / "finished", out, dirs_exist_ok=True)
        os.remove(out / "checkpoint.pt")
    elif state == "legacy":
        shutil.copytree(tpl / "checkpointed", out, dirs_exist_ok=True)
        _strip_marker(out)
    elif state == "legacy_checkpoint_only":
        shutil.copy(tpl / "checkpointed" / "checkpoint.pt", out)
        _strip_marker(out)
    if state != "empty":
        (out / "notes.txt").write_text("the user's")
    (out / ".tmp-checkpoint.pt-k1lled00").write_bytes(b"half a checkpoint")
    (out / ".lock").write_text("12345")


@pytest.mark.parametrize("state", ["new", "empty", *INV_FOREIGN, *INV_RUNS])
def test_invariant_every_command_on_every_run_folder_state(state, inv_data, inv_templates, tmp_path, capsys):
    """Property: for each state a folder can be in and each command (a plain start, --force, --resume,
    --bench): a folder this repository did not make is refused and left byte for byte; a run folder is
    refused by a plain start, and after any command it holds no temp file, no empty file, a log matching
    the checkpoint, final.json only for a finished run, and the user's own file untouched."""
    epochs = 4 if state == "extended" else 2
    for cmd, flags in (("start", []), ("force", ["--force"]), ("resume", ["--resume"]), ("bench", ["--bench", 1])):
        out = tmp_path / cmd / state
        os.makedirs(out.parent, exist_ok=True)
        _make_state(state, inv_templates, out)
        before = _snapshot(out)
        code, stdout, err = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--epochs", epochs,
                                  "--out", out, *flags)
        said = f"{state} / {cmd}: {stdout}{err}"
        if state in INV_FOREIGN:
            assert code == 2 and "not a run folder of this repository" in err, said
            _assert_one_line(err)
            assert _snapshot(out) == before, said
            continue
        if cmd == "start" and state in INV_RUNS:
            assert code == 2 and "exists; pass --resume to continue it or --force to start over" in err, said
            assert _snapshot(out) == before, said
            continue
        if cmd == "resume" and state in ("finished", "record"):  # --epochs 2: nothing to do
            assert code == 0 and "is finished" in stdout and _snapshot(out) == before, said
            code, stdout, err = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--epochs", 3, "--out", out,
                                      "--resume")  # to extend it, the weights are needed
            if state == "record":
                assert code == 2 and "without its checkpoint.pt" in err and _snapshot(out) == before, stdout + err
                continue
            assert code == 0 and read_final(out)["epochs"] == 3, stdout + err
            _assert_consistent(out)
            continue
        assert code == 0, said
        after = _snapshot(out)
        if state not in ("new", "empty"):
            assert after["notes.txt"] == b"the user's", said
        if cmd == "bench":
            bench = json.loads(after.pop("bench.json"))
            assert bench["made_by"] == common.MARKER["made_by"] and bench["steps"] == 1
            keep = {n: b for n, b in (before or {}).items() if n not in (".lock", ".tmp-checkpoint.pt-k1lled00")}
            assert {n: b for n, b in after.items() if n != ".lock"} == keep, said  # nothing else touched
            assert common.classify_run_dir(str(out))[0] == "ours"
            continue
        _assert_consistent(out)
        assert read_final(out)["epochs"] == epochs, said
        if cmd == "force" and state in INV_RUNS:
            assert "--force: starting over" in stdout and "final-2-epochs.json" not in after, said
        if cmd == "resume" and state in ("checkpointed", "legacy", "legacy_checkpoint_only", "extended"):
            assert "resumed" in stdout, said


def test_invariant_a_folder_of_runs_or_a_file_is_never_a_run_folder(inv_data, inv_templates, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(inv_templates / "finished", runs / "a")
    before = _snapshot(runs / "a")
    for flags in (["--force"], ["--resume"], ["--bench", 1]):
        code, _, err = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--epochs", 2, "--out", runs, *flags)
        assert code == 2 and "not a run folder of this repository" in err and "a" in err
    assert sorted(os.listdir(runs)) == ["a"] and _snapshot(runs / "a") == before
    (tmp_path / "f").write_text("mine")
    for flags in ([], ["--bench", 1]):
        code, _, err = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--out", tmp_path / "f", *flags)
        assert code == 2 and "is a file, not a folder" in err
        _assert_one_line(err)
    assert (tmp_path / "f").read_text() == "mine"


# ---- invariants: nothing stale or partial

INV_KILL_SCRIPT = """
import os, signal, sys
import common
import baseline
k, calls = int(sys.argv[1]), [0]
real = common._open_temp
def dying(fd):  # the k-th write of the run: half of it reaches the disk, then the process is killed
    calls[0] += 1
    f = real(fd)
    if calls[0] == k:
        f.write(b"half")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return f
common._open_temp = dying
sys.argv = ['baseline.py', *sys.argv[2:]]
baseline.main()
"""


def _killed_at_write(k, *argv):
    return subprocess.run([sys.executable, "-c", INV_KILL_SCRIPT, str(k), *map(str, argv)], cwd=HERE, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})


# the writes of a 2-epoch run: run.json, checkpoint 1, log.csv 1, checkpoint 2, log.csv 2, final.json
@pytest.mark.parametrize("k", range(1, 7))
def test_invariant_killed_at_each_write_leaves_a_whole_folder_and_resume_ends_identical(
        k, inv_data, inv_uninterrupted, tmp_path, capsys):
    out = tmp_path / "r"
    p = _killed_at_write(k, *INV, "--data-dir", inv_data, "--epochs", 2, "--out", out)
    assert p.returncode == -9, p.stderr
    temps = [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert len(temps) == 1, os.listdir(out)  # the killed writer's, next to whole files only
    for n in os.listdir(out):
        if n.endswith(".json"):
            json.load(open(out / n))
    if (out / "checkpoint.pt").exists():  # the log never runs ahead of the checkpoint
        rows = len(read_log(out)) if (out / "log.csv").exists() else 0
        assert rows <= common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"]
    code, stdout, err = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--epochs", 2, "--out", out,
                              "--resume")
    assert code == 0, stdout + err
    _assert_consistent(out)
    w = _weights(out)
    assert all(torch.equal(w[n], inv_uninterrupted[n]) for n in w)


def test_invariant_an_extension_killed_midway_is_not_shown_finished(inv_data, inv_templates, tmp_path, capsys):
    out = tmp_path / "runs" / "r"
    shutil.copytree(inv_templates / "finished", out)
    p = _killed_at_write(2, *INV, "--data-dir", inv_data, "--epochs", 3, "--out", out, "--resume")  # 2: checkpoint
    assert p.returncode == -9, p.stdout + p.stderr
    assert not (out / "final.json").exists()
    assert json.load(open(out / "final-2-epochs.json"))["epochs"] == 2  # the record kept, under another name
    assert common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 2
    done, unfinished = summarize.read_runs(str(out.parent))
    assert not done and unfinished[0]["epochs"] == 3 and unfinished[0]["state"] == "stopped"
    code, stdout, _ = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--epochs", 3, "--out", out, "--resume")
    assert code == 0 and read_final(out)["epochs"] == 3
    _assert_consistent(out)


class _FullDisk(io.RawIOBase):
    """A temp file on a disk that fills after its first 10 bytes."""

    def __init__(self, f):
        super().__init__()
        self.f, self.n = f, 0

    def writable(self):
        return True

    def write(self, b):
        b = bytes(b)
        if self.n + len(b) > 10:
            self.f.write(b[:10 - self.n])
            self.n = 10
            raise OSError(errno.ENOSPC, "No space left on device")
        self.n += len(b)
        return self.f.write(b)

    def fileno(self):
        return self.f.fileno()

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()
        super().close()


def _disk_fills_at(monkeypatch, target, nth):
    """The nth write of `target` (through atomic_write, torch.save included) meets a full disk."""
    real, seen = common._open_temp, {"n": 0}

    def open_temp(fd):
        f = real(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".tmp-{target}-"):
            seen["n"] += 1
            if seen["n"] == nth:
                return _FullDisk(f)
        return f
    monkeypatch.setattr(common, "_open_temp", open_temp)


# (file, which of its writes, exit code, epochs in the checkpoint after it, rows in log.csv after it)
@pytest.mark.parametrize("target,nth,code,kept,rows", [
    ("run.json", 1, 2, None, None), ("checkpoint.pt", 1, 4, None, None), ("log.csv", 1, 4, 1, None),
    ("checkpoint.pt", 2, 4, 1, 1), ("log.csv", 2, 4, 2, 1), ("final.json", 1, 4, 2, 2), ("bench.json", 1, 2, None, None)])
def test_invariant_a_full_disk_at_any_write_leaves_no_partial_file(target, nth, code, kept, rows, inv_data, tmp_path,
                                                                   monkeypatch, capsys):
    out = tmp_path / "r"
    args = [*INV, "--data-dir", inv_data, "--epochs", 2, "--out", out]
    _disk_fills_at(monkeypatch, target, nth)
    got, stdout, err = _call(capsys, "baseline", *args, *(["--bench", 1] if target == "bench.json" else []))
    assert got == code and "disk full while writing" in err and target in err and "MiB free" in err, stdout + err
    _assert_one_line(err)
    monkeypatch.undo()
    if kept is None:  # no checkpoint: what the start made is removed
        assert not out.exists() and "removed" in err
        return
    assert sorted(n for n in os.listdir(out) if n.startswith(".tmp-")) == []
    assert all(os.path.getsize(out / n) > 0 for n in os.listdir(out) if n != ".lock")
    assert common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == kept and not (out / "final.json").exists()
    assert (len(read_log(out)) if (out / "log.csv").exists() else None) == rows  # whole rows, or no file
    got, stdout, err = _call(capsys, "baseline", *args, "--resume")
    assert got == 0 and read_final(out)["epochs"] == 2, stdout + err
    _assert_consistent(out)


# ---- invariants: every way a run ends is one true line with its own exit code

def _signal_at(monkeypatch, moment, signum):
    """Send `signum` to this process at a moment of a 2-epoch baseline run (2 steps per epoch)."""
    import baseline
    send = lambda: os.kill(os.getpid(), signum)
    if moment == "startup":
        real_load = common.load_cifar
        monkeypatch.setattr(common, "load_cifar", lambda *a: (send(), real_load(*a))[1])
        return
    if moment == "final":  # evaluations 1 and 2 test the epochs; the 3rd is the final training top-1
        real_eval, n = common.evaluate, {"calls": 0}

        def evaluate(*a, **k):
            n["calls"] += 1
            if n["calls"] == 3:
                send()
            return real_eval(*a, **k)
        monkeypatch.setattr(common, "evaluate", evaluate)
        return
    real, n = baseline.Baseline.forward, {"steps": 0}
    at = {"epoch1": 1, "epoch2": 3, "again": 3}[moment]

    def forward(self, *a):
        n["steps"] += 1
        if n["steps"] == at:
            send()
            if moment == "again":
                send()
        return real(self, *a)
    monkeypatch.setattr(baseline.Baseline, "forward", forward)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("moment", ["startup", "epoch1", "epoch2", "again", "final"])
def test_invariant_every_stop_is_one_true_line_with_the_signals_exit_code(moment, signame, inv_data, tmp_path,
                                                                          monkeypatch, capsys):
    signum = getattr(signal, signame)
    name = "Ctrl-C" if signame == "SIGINT" else signame
    out = tmp_path / "r"
    args = [*INV, "--data-dir", inv_data, "--epochs", 2, "--out", out]
    _signal_at(monkeypatch, moment, signum)
    old = signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
    try:  # run() answers a signal left at its default (one inherited as ignored, e.g. under nohup, stays so)
        code, stdout, err = _call(capsys, "baseline", *args)
    finally:
        signal.signal(signum, old)
    monkeypatch.undo()
    assert code == 128 + signum and "Traceback" not in err, stdout + err
    last = stdout.strip().splitlines()[-1]
    if moment == "startup":
        assert last == f"stopped ({name}) during start-up: nothing was written" and not out.exists()
        return
    if moment == "epoch1":
        assert last == f"stopped in epoch 1 ({name}): there is no checkpoint (nothing was kept: {out} removed): " \
                       f"the next start begins at epoch 1" and not out.exists()
        return
    if moment == "epoch2":
        assert last == f"stopped in epoch 2 ({name}): the checkpoint of epoch 1 is kept in {out}: --resume continues from it"
    elif moment == "again":
        assert last == f"stopped at once (second {name}): the checkpoint of epoch 1 is kept in {out}: --resume continues from it"
    else:
        assert last.startswith(f"stopped ({name}) during the final evaluation: final.json was not written; "
                               f"the checkpoint of epoch 2 (the last) is kept")
    assert not (out / "final.json").exists()
    kept = common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"]
    assert kept == (2 if moment == "final" else 1) and len(read_log(out)) == kept
    assert summarize.read_runs(str(tmp_path))[1][0]["state"] == "stopped"  # not finished, not running
    code, stdout, err = _call(capsys, "baseline", *args, "--resume")
    assert code == 0 and f"from the checkpoint of epoch {kept}" in stdout and read_final(out)["epochs"] == 2
    _assert_consistent(out)


INV_STARTUP_CTRL_C = """
import importlib.abc, os, runpy, signal, sys
class CtrlC(importlib.abc.MetaPathFinder):  # Ctrl-C while common.py imports numpy (torch follows)
    def find_spec(self, name, path, target=None):
        if name == "numpy":
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, CtrlC())
sys.argv = ['baseline.py', '--out', sys.argv[1]]
runpy.run_path(os.path.join(os.getcwd(), 'baseline.py'), run_name='__main__')
"""


def test_invariant_ctrl_c_while_importing_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-c", INV_STARTUP_CTRL_C, str(tmp_path / "r")], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 130 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.strip() == "stopped (Ctrl-C) during start-up: no run folder was touched"
    assert not (tmp_path / "r").exists()


def test_invariant_ddp_sigterm_to_the_launcher_stops_every_process_after_one_step(inv_data, tmp_path):
    """SIGTERM to the launcher of --gpus 0,1 (as a scheduler's kill of the job's main process): passed on,
    both processes stop after the same step, the last checkpoint is kept, exit code 143."""
    import time
    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "baseline.py"),
                          *map(str, [*INV, "--gpus", "0,1", "--data-dir", inv_data, "--epochs", 1000, "--out", out])],
                         cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        stdout, err = p.communicate(timeout=240)
    finally:
        p.kill()
    assert p.returncode == 143, stdout + err
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("stopped in epoch ") and "(SIGTERM): the checkpoint of epoch" in last, stdout + err
    kept = common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"]
    assert kept >= 1 and len(read_log(out)) == kept and not (out / "final.json").exists()
    assert "Traceback" not in err


def test_invariant_a_killed_ddp_process_ends_every_process_with_one_line(inv_data, tmp_path):
    out = tmp_path / "r"
    p = subprocess.run([sys.executable, os.path.join(HERE, "baseline.py"),
                        *map(str, [*INV, "--gpus", "0,1", "--data-dir", inv_data, "--epochs", 2, "--out", out])], cwd=HERE,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OKD_FAIL_RANK": "1:kill"})
    assert p.returncode == 5, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "training process 1 of 2" in lines[0] and "was killed by SIGKILL" in lines[0]
    assert "every process was stopped" in lines[0] and "Traceback" not in p.stderr
    assert not out.exists()  # no checkpoint: the start was undone


# ---- invariants: every refusal is one line that says what to change, before anything is written

def _one_class(root):
    fake_cifar(root, n_train=64, n_test=32)
    path = os.path.join(root, "cifar-100-python", "train")
    d = pickle.load(open(path, "rb"))
    d["fine_labels"] = [3] * len(d["fine_labels"])
    pickle.dump(d, open(path, "wb"))
    return str(root)


def _empty_test_set(root):
    fake_cifar(root, n_train=64, n_test=32)
    pickle.dump({"data": np.zeros((0, 3072), np.uint8), "fine_labels": []},
                open(os.path.join(root, "cifar-100-python", "test"), "wb"))
    return str(root)


@pytest.mark.parametrize("script,argv,msg", [
    ("baseline", ["--gpus", "0,0"], "GPU 0 given twice"),
    ("baseline", ["--gpus", ""], "expected GPU indices"),
    ("baseline", ["--out", ""], "argument --out: '' is no folder"),
    ("baseline", ["--cosine", "--schedule", "1"], "--schedule 1 and --cosine contradict"),
    ("mcl", ["--recipe", "paper", "--epochs", "2", "--schedule", "1"], "--recipe paper (the recipe of mcl decays by cosine)"),
    ("baseline", ["--seed", str(2 ** 32)], "argument --seed: 4294967296 must lie in [0, 4294967295]"),
    ("baseline", ["--seed", "-1"], "argument --seed: -1 must lie in"),
    ("one", ["--batch-size", "1"], "one cannot train on a batch of 1 image(s) per process (it needs 2: its gate"),
    ("one", ["--batch-size", "21"], "the last batch of each epoch holds 1 of the 64 training images"),
    ("kdcl", ["--variant", "general", "--val-size", "63"], "a holdout of 63 images leaves 1 of the 64 training images"),
    ("baseline", ["--gpus", "0,1", "--batch-size", "31"], "--batch-size 31 is not divisible by the 2 processes"),
    ("mcl", ["--nce-k", "100000000"], "MCL's memory banks (4 x 64 x 128 floats) and a step's NCE scores"),
    ("mcl", ["--data-dir", "ONE_CLASS"], "at least two classes"),
    ("baseline", ["--data-dir", "EMPTY_TEST"], "the test split of"),
])
def test_invariant_every_refusal_is_one_line_before_anything_is_written(script, argv, msg, inv_data, tmp_path,
                                                                        capsys, monkeypatch):
    out = tmp_path / "never"
    data = {"ONE_CLASS": lambda: _one_class(tmp_path / "one"), "EMPTY_TEST": lambda: _empty_test_set(tmp_path / "e")}
    argv = [data[a]() if a in data else a for a in argv]
    if "--gpus" in argv and argv[argv.index("--gpus") + 1] == "0,1":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # two CPU processes
    base = [*INV, "--epochs", 2] if "--data-dir" in argv else [*INV, "--epochs", 2, "--data-dir", inv_data]
    code, stdout, err = _call(capsys, script, *base, "--out", out, *argv)
    err = "\n".join(ln for ln in err.splitlines() if not ln.startswith("warning: CUDA is not available"))
    assert code == 2 and msg in err, stdout + err
    _assert_one_line(err)
    assert not out.exists()


def test_invariant_os_errors_on_the_run_folder_are_one_line(inv_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--out", tmp_path / "file" / "r")
    assert code == 2 and "cannot create the run folder" in err and "Not a directory" in err
    _assert_one_line(err)

    def read_only(*a, **k):  # a read-only file system: the first write of the start fails
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "ro"
    code, _, err = _call(capsys, "baseline", *INV, "--data-dir", inv_data, "--epochs", 1, "--out", out)
    monkeypatch.undo()
    assert code == 2 and "cannot write" in err and "Read-only file system" in err and "removed" in err
    _assert_one_line(err)
    assert not out.exists()


# ---- invariants: --resume continues the same experiment

def test_invariant_resume_on_other_data_is_refused_naming_the_difference(inv_data, tmp_path, capsys):
    out = tmp_path / "r"
    run_main("baseline", *INV, "--data-dir", inv_data, "--epochs", 2, "--out", out, "--halt-after", 1)
    before = _snapshot(out)
    other = fake_cifar(tmp_path / "other", n_train=96, n_test=32)
    code, _, err = _call(capsys, "baseline", "--out", out, "--resume", "--data-dir", other)
    assert code == 2 and "was trained on other data: train_images 64 (checkpoint) vs 96 (now)" in err, err
    assert "labels_sha256" in err and "--data-dir" in err
    _assert_one_line(err)
    assert _snapshot(out) == before
    os.remove(out / "checkpoint.pt")  # stopped in its first epoch: run.json holds the identity
    code, _, err = _call(capsys, "baseline", "--out", out, "--resume", "--data-dir", other)
    assert code == 2 and "train_images 64 (run.json) vs 96 (now)" in err


def test_invariant_teacher_of_another_dataset_normalisation_or_padding_is_named(inv_data, tmp_path, capsys):
    args = argparse.Namespace(dataset="cifar100", norm="dataset", padding="zeros", image_size=None)
    t = {"arch": "resnet8", "dataset": "cifar100", "norm": "dataset", "padding": "zeros"}
    assert common.check_teacher("t.pt", t, args) == []
    with pytest.raises(ValueError, match="trained on cifar10, this run is on cifar100"):
        common.check_teacher("t.pt", {**t, "dataset": "cifar10"}, args)
    with pytest.raises(ValueError, match=r"trained with --norm cifar10 .*this run normalises with --norm dataset"):
        common.check_teacher("t.pt", {**t, "norm": "cifar10"}, args)
    assert common.check_teacher("t.pt", {**t, "norm": "cifar10"}, argparse.Namespace(**{**vars(args), "norm": "cifar10"})) == []
    [w] = common.check_teacher("t.pt", {**t, "padding": "reflect"}, args)
    assert "--padding reflect" in w and "--padding zeros" in w
    [w] = common.check_teacher("t.pt", t, args, {"train_images": 512, "labels_sha256": "a"},
                               {"train_images": 50000, "labels_sha256": "b"})
    assert "other cifar100 training data" in w and "train_images 512 vs 50000 now" in w
    for script in TEACHER_SCRIPTS:  # every script that loads a teacher: refused in one line, before
        path = tmp_path / f"{script}-t.pt"      # anything is written
        fake_teacher(path, "resnet8")
        ck = torch.load(path, weights_only=True)
        ck["args"]["norm"] = "cifar10-legacy"
        torch.save(ck, path)
        out = tmp_path / f"{script}-never"
        code, _, err = _call(capsys, script, *INV, "--data-dir", inv_data, "--teacher", path, "--out", out)
        assert code == 2 and "--norm cifar10-legacy" in err and "pass --norm cifar10-legacy" in err, script
        _assert_one_line(err)
        assert not out.exists()
        ck["args"]["norm"], ck["args"]["padding"] = "dataset", "reflect"
        torch.save(ck, path)
        code, _, err = _call(capsys, script, *INV, "--data-dir", inv_data, "--teacher", path, "--out", out,
                             "--bench", 1)
        assert code == 0 and "warning: teacher" in err and "--padding reflect" in err, script


# =================================================================================================
# 6. BENCH (common.py part 6): behaviour, not time
# =================================================================================================

def test_bench_writes_bench_json_without_touching_a_dataset(tmp_path):
    out = tmp_path / "b"
    run_main("baseline", *TINY, "--bench", 2, "--data-dir", tmp_path / "absent", "--out", out)
    b = json.load(open(out / "bench.json"))
    assert b["steps"] == 2 and b["images_per_second"] > 0 and b["seconds_per_step"] > 0
    assert b["peak_memory_bytes"] > 0 and b["params_trained"] == common.count_params(common.build_model("resnet8", 100))
    assert b["device"] == "cpu" and b["torch"] == torch.__version__ and b["threads"] >= 1
    # where and how it ran, as a run's record says it: the machine, every argument, the load around it
    cpu = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert b["machine"]["device"] in cpu or not cpu
    assert b["machine"]["commit"] is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", b["machine"]["commit"])
    assert b["args"]["arch"] == "resnet8" and b["args"]["bench"] == 2 and b["args"]["method"] == "baseline"
    # the baseline's own step timed in the same run: the yardstick of every method's cost
    assert b["cost_vs_baseline"] > 0 and b["baseline_images_per_second"] > 0
    if hasattr(os, "getloadavg"):
        assert all(len(b["load_average"][k]) == 3 for k in ("before", "after"))
    assert not (tmp_path / "absent").exists()


# =================================================================================================
# 7. TOOLS: summarize.py and slurm_grid.sh, cifar10_from_jpeg.py, gpu_check.py
# =================================================================================================

# ---- summarize.py and slurm_grid.sh

def _fabricate(root, name, method, seed, deploy_acc, ens_acc, finished=True, epochs=300, data=None, machine=None,
               **args):
    """A run folder as a run writes it: run.json (the arguments + records), final.json when finished."""
    d = root / name
    d.mkdir(parents=True)
    meta = {"method": method, "arch": "resnet32", "dataset": "cifar100", "epochs": epochs, "seed": seed,
            "lr": 0.1, "gpus": "0", "out": str(d), **args}
    records = {"data": data, "machine": machine}
    (d / "run.json").write_text(json.dumps({**meta, **records}))
    if finished:
        fin = {**{k: meta[k] for k in ("method", "arch", "dataset", "epochs", "seed")}, "deploy": "peer1",
               "last": {"peer1": deploy_acc, "peer2": 1.0, "ensemble": ens_acc}, "train_last": {"peer1": 99.0},
               "params": {"peer1": 470000}, "seconds": 100.0, "device": "cpu", **records, "args": meta}
        (d / "final.json").write_text(json.dumps(fin))


def test_summarize_means_stds_and_unfinished_runs(tmp_path, capsys):
    _fabricate(tmp_path, "dml-s0", "dml", 0, 70.0, 72.0)
    _fabricate(tmp_path, "dml-s1", "dml", 1, 72.0, 74.0, gpus="0,1")  # how it ran does not split a group
    _fabricate(tmp_path, "dml-s2", "dml", 2, 0, 0, finished=False)
    _fabricate(tmp_path, "kdcl-s0", "kdcl", 0, 0, 0, finished=False)
    rows = summarize.summarize(str(tmp_path), plot=False)
    assert len(rows) == 2
    dml = next(r for r in rows if r["method"] == "dml")
    assert (dml["deploy_mean"], dml["deploy_std"], dml["n"]) == (71.0, round(math.sqrt(2), 2), 2)
    assert (dml["ensemble_mean"], dml["ensemble_std"]) == (73.0, round(math.sqrt(2), 2))
    assert (dml["running"], dml["stopped"]) == (0, 1)  # no process holds its lock: stopped, not running
    assert dml["params"] == 470000 and dml["train_top1_mean"] == 99.0
    kdcl = next(r for r in rows if r["method"] == "kdcl")
    assert kdcl["stopped"] == 1 and kdcl["n"] == 0 and kdcl["deploy_mean"] is None
    out = capsys.readouterr().out
    assert "| dml | resnet32 | cifar100 | peer1 | 71.00 ± 1.41 (n=2) | 73.00 ± 1.41 | 99.00 |" in out


def test_summarize_tells_running_from_stopped_by_the_folder_lock(tmp_path, capsys):
    """An unfinished run is "running" while a process holds its folder's lock, "stopped" otherwise."""
    import fcntl
    _fabricate(tmp_path, "dml-s0", "dml", 0, 0, 0, finished=False)
    fd = os.open(tmp_path / "dml-s0" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what common._lock_run_dir holds for a run's whole life
    try:
        (row,) = summarize.summarize(str(tmp_path), plot=False)
        assert (row["running"], row["stopped"]) == (1, 0)
        assert capsys.readouterr().out.splitlines()[0].endswith("| running | stopped |")
    finally:
        os.close(fd)  # the process ended: the OS releases the lock
    (row,) = summarize.summarize(str(tmp_path), plot=False)
    assert (row["running"], row["stopped"]) == (0, 1)


def test_summarize_never_merges_runs_on_other_data_and_splits_machines_when_asked(tmp_path, capsys):
    """Same options, other data (number of training images, label checksum): two rows, the data a column.
    Other machines: one row unless --by-machine."""
    cpu = {"device": "Xeon", "torch": "2.14.1", "threads": 1}
    _fabricate(tmp_path, "a", "dml", 0, 50.0, 50.0, data={"train_images": 512, "labels_sha256": "aa"}, machine=cpu)
    _fabricate(tmp_path, "b", "dml", 1, 80.0, 80.0, data={"train_images": 50000, "labels_sha256": "bb"}, machine=cpu)
    _fabricate(tmp_path, "c", "dml", 2, 82.0, 82.0, data={"train_images": 50000, "labels_sha256": "bb"},
               machine={**cpu, "device": "NVIDIA H200"})
    rows = summarize.summarize(str(tmp_path), plot=False)
    assert sorted((r["n"], r["deploy_mean"]) for r in rows) == [(1, 50.0), (2, 81.0)]
    assert "| data |" in capsys.readouterr().out.splitlines()[0]
    rows = summarize.summarize(str(tmp_path), plot=False, by_machine=True)
    assert sorted((r["n"], r["deploy_mean"]) for r in rows) == [(1, 50.0), (1, 80.0), (1, 82.0)]


def test_summarize_skips_a_non_number_and_an_empty_folder_is_one_line(tmp_path, capsys):
    _fabricate(tmp_path, "good", "dml", 0, 70.0, 72.0)
    _fabricate(tmp_path, "nan", "dml", 1, float("nan"), 72.0)
    _fabricate(tmp_path, "text", "dml", 2, "70.0", 72.0)
    (row,) = summarize.summarize(str(tmp_path), plot=False)
    assert row["n"] == 1 and row["deploy_mean"] == 70.0
    assert capsys.readouterr().err.count("warning: skipped") == 2
    (tmp_path / "empty" / "nested").mkdir(parents=True)  # e.g. one level too high: no run folder directly under it
    r = run_cli("summarize", tmp_path / "empty")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "holds no run folders" in r.stderr


def test_summarize_groups_by_every_setting_but_the_seed(tmp_path, capsys):
    """A 2-epoch and a 3-epoch run are two experiments, not one mean: the differing setting is a column."""
    _fabricate(tmp_path, "a", "dml", 0, 50.0, 50.0, epochs=2)
    _fabricate(tmp_path, "b", "dml", 0, 54.0, 54.0, epochs=3)
    rows = summarize.summarize(str(tmp_path), plot=False)
    assert sorted((r["epochs"], r["deploy_mean"], r["n"]) for r in rows) == [(2, 50.0, 1), (3, 54.0, 1)]
    assert all(r["deploy_std"] is None for r in rows)  # one run measures no spread: no "± 0.00"
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| method | arch | dataset | epochs |")
    assert "| 50.00 (n=1) |" in out and "±" not in out


def test_summarize_shows_the_recipe_when_it_differs(tmp_path, capsys):
    _fabricate(tmp_path, "a", "one", 0, 70.0, 72.0, recipe="protocol")
    _fabricate(tmp_path, "b", "one", 0, 71.0, 73.0, recipe="paper")
    rows = summarize.summarize(str(tmp_path), plot=False)
    assert sorted((r["recipe"], r["deploy_mean"]) for r in rows) == [("paper", 71.0), ("protocol", 70.0)]
    assert capsys.readouterr().out.splitlines()[0].startswith("| method | arch | dataset | recipe |")
    _fabricate(tmp_path / "same", "s0", "one", 0, 70.0, 72.0, recipe="paper")
    _fabricate(tmp_path / "same", "s1", "one", 1, 71.0, 73.0, recipe="paper")
    summarize.summarize(str(tmp_path / "same"), plot=False)
    assert "recipe" not in capsys.readouterr().out  # a setting shared by every run is not a column


def test_summarize_counts_the_teachers_training_for_offline_methods(tmp_path, capsys):
    """A student distilled from a teacher costs the teacher's training too: "s/run + teacher" adds the
    seconds of the teacher's run when its folder is among the runs; online methods have no such cell."""
    _fabricate(tmp_path, "teacher-s0", "baseline", 0, 60.0, 60.0)  # 100 s, as every fabricated run
    fin = json.loads((tmp_path / "teacher-s0" / "final.json").read_text())
    (tmp_path / "teacher-s0" / "final.json").write_text(json.dumps({**fin, "seconds": 250.0}))
    _fabricate(tmp_path, "kd-s0", "kd", 0, 61.0, 61.0, teacher="runs/laptop/teacher-s0/checkpoint.pt")
    _fabricate(tmp_path, "dml-s0", "dml", 0, 59.0, 59.0)
    rows = {r["method"]: r for r in summarize.summarize(str(tmp_path), plot=False)}
    assert rows["kd"]["seconds_with_teacher"] == 350 and rows["kd"]["seconds_per_run"] == 100
    assert rows["dml"]["seconds_with_teacher"] is None and rows["baseline"]["seconds_with_teacher"] is None
    assert "| s/run (train) | s/run + teacher |" in capsys.readouterr().out


def test_summarize_skips_a_corrupt_file_and_a_missing_path_is_one_line(tmp_path, capsys):
    _fabricate(tmp_path, "good", "dml", 0, 70.0, 72.0)
    _fabricate(tmp_path, "bad", "dml", 1, 70.0, 72.0)
    (tmp_path / "bad" / "final.json").write_text("")  # e.g. a disk that filled up under an older version
    rows = summarize.summarize(str(tmp_path), plot=False)
    assert len(rows) == 1 and rows[0]["n"] == 1
    assert "warning: skipped" in capsys.readouterr().err
    r = run_cli("summarize", tmp_path / "absent")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder" in r.stderr


def test_summarize_csv_stdout_is_only_csv_with_numbers(tmp_path):
    _fabricate(tmp_path, "a", "dml", 0, 70.0, 72.0)
    _fabricate(tmp_path, "b", "dml", 1, 72.0, 74.0)
    r = run_cli("summarize", tmp_path, "--csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(r.stdout.splitlines()))  # every stdout line is CSV (curves.png's note is on stderr)
    assert len(rows) == 1 and float(rows[0]["deploy_mean"]) == 71.0 and float(rows[0]["deploy_std"]) == 1.41
    assert int(rows[0]["n"]) == 2


def test_curves_one_colour_per_experiment_every_run_drawn(tmp_path):
    """curves.png's series: every finished run, a 1-epoch run too (one point); runs of one experiment share a
    colour, experiments with other settings (here: --epochs) never do, and neighbours differ."""
    for name, method, seed, epochs in [("d0", "dml", 0, 3), ("d1", "dml", 1, 3), ("d2", "dml", 0, 1),
                                       ("k0", "kdcl", 0, 3)]:
        _fabricate(tmp_path, name, method, seed, 60.0, 61.0, epochs=epochs)
        rows = "".join(f"{e},{50 + e}\n" for e in range(1, epochs + 1))
        (tmp_path / name / "log.csv").write_text("epoch,peer1\n" + rows)
    series = summarize.curve_series(str(tmp_path), summarize.read_runs(str(tmp_path))[0])
    assert sorted(len(s["x"]) for s in series) == [1, 3, 3, 3]
    style = lambda s: (s["colour"], s["line"])
    by_len = {}
    for s in series:
        by_len.setdefault((s["x"][-1], s["group"]), set()).add(style(s))
    assert all(len(v) == 1 for v in by_len.values())  # one style per experiment
    assert len({style(s) for s in series}) == 3  # dml 3 epochs, dml 1 epoch, kdcl: three experiments
    assert sum(s["label"] is not None for s in series) == 3  # one legend entry per experiment
    assert all(summarize._style(i)[0] != summarize._style(i + 1)[0] for i in range(40))


def test_summarize_plot_written_when_matplotlib_is_installed(data, tmp_path):
    pytest.importorskip("matplotlib")  # optional: shows as skipped where it is not installed
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", tmp_path / "runs" / "b")
    runs = tmp_path / "runs"
    assert summarize.figures(str(runs)) == [str(runs / "curves.png"), str(runs / "seeds.png")]
    assert (runs / "curves.png").stat().st_size > 0 and (runs / "seeds.png").stat().st_size > 0


def test_summarize_plot_skipped_cleanly_without_matplotlib(data, tmp_path, capsys, monkeypatch):
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", tmp_path / "runs" / "b")
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed (it is optional)
    assert summarize.figures(str(tmp_path / "runs")) == []
    assert "pip install matplotlib" in capsys.readouterr().err


def _bench_record(root, name, method, ms, machine=None, cost=None, **args):
    """A bench folder as --bench writes it: bench.json only (the fields the speed table reads); cost: the
    record's own cost_vs_baseline (measured in its run), None as in a record made before it existed."""
    d = root / name
    d.mkdir(parents=True)
    m = machine or {"device": "Xeon", "torch": "2.14.1", "threads": 2, "commit": "abc"}
    (d / "bench.json").write_text(json.dumps({
        "method": method, "arch": "resnet32", "batch_size": 128, "steps": 20, "seconds_per_step": ms / 1000,
        "images_per_second": 128 / (ms / 1000), "loop_over_bare": 0.99, "peak_memory_bytes": 2**30,
        "params_trained": 470000, "device": m["device"], "threads": m["threads"], "amp": False, "compile": False,
        "machine": m, "args": {"method": method, "arch": "resnet32", "bench": 20, "out": str(d), "seed": 0, **args},
        "load_average": {"before": [0.05, 0.1, 0.2], "after": [1.0, 0.5, 0.3]},
        **({"cost_vs_baseline": cost} if cost is not None else {})}))


def test_summarize_speed_table_from_bench_records(tmp_path, capsys):
    """A folder of bench records prints the speed table: the cost is the record's own (measured in its run)
    or else, marked, the step time over the baseline's bench on the same machine (none without one); the
    options are what differs within a method; rows by machine and then in the laptop table's method order;
    a bench file that cannot be read, or without a positive rate, is skipped with a warning; a folder of
    runs that also holds bench records says it leaves them out."""
    _bench_record(tmp_path, "dml-p3", "dml", 300.0, peers=3)
    _bench_record(tmp_path, "dml", "dml", 200.0, peers=2)
    _bench_record(tmp_path, "baseline", "baseline", 100.0)
    _bench_record(tmp_path, "kd", "kd", 150.0, cost=1.8, teacher_arch="resnet110")  # its own, not 150 / 100
    _bench_record(tmp_path, "gpu-dml", "dml", 20.0, machine={"device": "H200", "torch": "2.11", "threads": 16}, peers=2)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bench.json").write_text("{")
    (tmp_path / "no-rate").mkdir()
    (tmp_path / "no-rate" / "bench.json").write_text(json.dumps({"method": "dml", "seconds_per_step": 0.1}))
    assert summarize.is_bench_folder(str(tmp_path))
    rows = summarize.summarize(str(tmp_path), plot=True)  # plot: nothing to draw for benches
    cap = capsys.readouterr()
    assert "broken" in cap.err and "no-rate" in cap.err and cap.err.count("skipped") == 2
    assert [(r["method"], r["options"], r["cost"]) for r in rows] == [  # by machine, then in the laptop order
        ("dml", "--peers 2", None), ("baseline", "", 1.0), ("dml", "--peers 2", 2.0), ("dml", "--peers 3", 3.0),
        ("kd", "", 1.8)]
    assert next(r for r in rows if r["method"] == "kd")["teacher"] == "resnet110"
    lines = cap.out.splitlines()
    assert "| dml | --peers 3 | resnet32 |  | 128 | 470000 | 300 | 427 | 3.00x (across runs) | 0.990 | 1.0 GB | Xeon | 2 | 0.05 |" \
        in lines
    assert "| kd |  | resnet32 | resnet110 | 128 | 470000 | 150 | 853 | 1.80x | 0.990 | 1.0 GB | Xeon | 2 | 0.05 |" in lines
    assert summarize.table_markdown(str(tmp_path)) + "\n" == cap.out  # what README's block would paste
    assert not list(tmp_path.glob("*.png"))
    _fabricate(tmp_path, "dml-s0", "dml", 0, 70.0, 72.0)  # a run record among them: the runs' table
    assert not summarize.is_bench_folder(str(tmp_path))
    (row,) = summarize.summarize(str(tmp_path), plot=False)
    err = capsys.readouterr().err
    assert row["method"] == "dml" and "bench record(s) under" in err and "left out" in err


def test_speed_table_option_labels():
    """A bench's label is what differs within its method, written as the flag a user types: a 0 stays
    (--wd 0), a list is spaced (--schedule 30 45), a flag that is on is bare, one that is off is absent;
    two benches still alike get their folder names."""
    b = lambda folder, **a: {"folder": folder, "method": "dml", "args": {"arch": "resnet32", **a}}
    labels = summarize._bench_options([b("a", wd=0.0, schedule=[30, 45], amp_fp32=True),
                                       b("b", wd=5e-4, schedule=[], amp_fp32=False), b("c"), b("d")])
    assert labels["a"] == "--amp-fp32 --schedule 30 45 --wd 0.0"  # keys in sorted order
    assert labels["b"] == "--schedule --wd 0.0005"
    assert (labels["c"], labels["d"]) == ("(c)", "(d)")


def test_readme_tables_are_the_output_of_summarize_over_results():
    """Every table that README marks as generated equals `python summarize.py FOLDER` over the committed
    records (results/): regenerate with `python summarize.py readme`."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = summarize.MARK.findall(f.read())
    assert blocks, "README has no generated table"
    assert all(os.path.exists(os.path.join(HERE, b[0].split()[0])) for b in blocks)
    assert summarize.readme(check=True) == []


def test_grid_commands_and_the_slurm_script_dry_mode(tmp_path):
    """The laptop grid: the teacher first, every method x seed 0-2 with --resume; the SLURM array script's
    dry mode prints task i's command (what SLURM_ARRAY_TASK_ID=i would run) and runs nothing."""
    grid = summarize.grid("laptop")
    assert grid[0][:2] == ("teachers", "teacher-resnet14-s0")
    students = [c for s, _, c in grid if s == "students"]
    assert len(students) == 3 * (len(summarize.LAPTOP_METHODS) + len(summarize.LAPTOP_VARIANTS))
    assert all("--resume" in c for c in students)
    assert sum("okddip.py" in c and c.endswith("--detach-targets --out runs/laptop/okddip-detached-s2") for c in students) == 1
    assert all(f"--out runs/laptop/{n}" in c for _, n, c in grid)
    assert all("--teacher runs/laptop/teacher-resnet14-s0/checkpoint.pt" in c for c in students if "sokd.py" in c)
    if shutil.which("bash") is None or shutil.which("awk") is None:
        pytest.skip("needs bash and awk")
    r = subprocess.run(["bash", os.path.join(HERE, "slurm_grid.sh"), "laptop", "students"], cwd=HERE,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "DRY": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"task {i}: {c}" for i, c in enumerate(students)]
    one = subprocess.run([sys.executable, os.path.join(HERE, "summarize.py"), "grid", "laptop", "--stage",
                          "students", "--index", "4"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert one.stdout.strip() == students[4]
    bad = subprocess.run([sys.executable, os.path.join(HERE, "summarize.py"), "grid", "laptop", "--index", "999"],
                         cwd=HERE, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--index 999" in bad.stderr
    assert not (tmp_path / "runs").exists()


def test_summarize_speed_writes_a_record_and_its_table_is_made_from_it(tmp_path, capsys):
    """`summarize.py speed --out F`: the pipeline and layout numbers, the machine and the load, as JSON; the
    README table is `summarize.py F` over that record, its ratios computed from the record's numbers; a file
    that is not such a record is one line, exit 2."""
    rec = tmp_path / "pipeline.json"
    summarize.speed(batch_size=8, batches=2, out=str(rec), arch="resnet8")
    r = json.load(open(rec))
    p = r["pipeline"]
    assert p["batch_size"] == 8 and p["device"] == "cpu" and r["machine"]["torch"] == torch.__version__
    assert all(p[k] > 0 for k in ("on_device_images_per_second", "dataloader_images_per_second",
                                  "contiguous_images_per_second", "channels_last_images_per_second"))
    capsys.readouterr()
    summarize.main([str(rec)])
    table = capsys.readouterr().out
    assert table == summarize.table_markdown(str(rec)) + "\n"
    ratio = p["on_device_images_per_second"] / p["dataloader_images_per_second"]
    assert f"**{ratio:.1f}x**" in table and "batch 8 |" in table and r["machine"]["device"] in table
    layout = p["channels_last_images_per_second"] / p["contiguous_images_per_second"]
    assert "| resnet8 training step on cpu" in table and f"**{layout:.2f}x**" in table
    for i, wrong in enumerate([{"method": "dml"}, {"pipeline": {"batch_size": 8}},
                               {"pipeline": {**p, "dataloader_images_per_second": 0}}]):
        bad = tmp_path / f"other{i}.json"
        bad.write_text(json.dumps(wrong))
        with pytest.raises(SystemExit) as e:
            summarize.main([str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "not a record of `summarize.py speed --out`" in err


def test_speed_grid_benches_every_method_once_on_the_cpu():
    """`summarize.py grid speed`: one --bench command per method found on disk (and DML's peer variants),
    each into its own runs/speed folder, without --resume (a bench is timed again, not continued)."""
    grid = summarize.grid("speed")
    assert {s for s, _, _ in grid} == {"benches"}
    names = [n for _, n, _ in grid]
    assert len(set(names)) == len(names) and set(METHODS) <= set(names)
    for _, n, c in grid:
        argv = shlex.split(c)
        script = n.split("-")[0]
        assert argv[:2] == ["python", f"{script}.py"] and argv[-2:] == ["--out", f"runs/speed/{n}"]
        with contextlib.redirect_stdout(io.StringIO()):
            args = parsed_args(script, *argv[2:])  # the script's own parser: every option is real
        assert (args.arch, args.bench, args.gpus, args.resume) == ("resnet32", 20, "cpu", False)
        if n in summarize.SPEED_VARIANTS:
            assert args.peers == {"dml-p3": 3, "dml-p4": 4}[n]
        elif script == "dml":
            assert args.peers == 2


# ---- cifar10_from_jpeg.py

def test_cifar10_from_jpeg_work_tree_and_git_give_the_same_files_that_load_cifar_reads(tmp_path):
    """The laptop table's data tool: the first N JPEGs of every class, classes interleaved by a fixed
    permutation, pixels in CIFAR's channel-major layout; a clone's folder and its git directory give the
    same bytes; too few images is one line naming the option."""
    import cifar10_from_jpeg as c10
    src = tmp_path / "CIFAR-10-images"
    pixels = {}
    for split, n in (("train", 3), ("test", 2)):
        for c, name in enumerate(c10.CLASSES):
            (src / split / name).mkdir(parents=True)
            for i in range(n):
                img = np.full((32, 32, 3), 20 * c + i, np.uint8)  # flat colours survive JPEG almost exactly
                Image.fromarray(img).save(src / split / name / f"{i:04d}.jpg", quality=95)
                pixels[(split, c, i)] = img
    c10.write(str(src), str(tmp_path / "tree"), per_class_train=3, per_class_test=2)
    tx, ty, vx, vy = common.load_cifar("cifar10", str(tmp_path / "tree"))
    assert tx.shape == (30, 3, 32, 32) and vx.shape == (20, 3, 32, 32)
    assert sorted(ty.tolist()) == sorted(list(range(10)) * 3) and ty[:10].tolist() != sorted(ty[:10].tolist())
    assert (np.asarray(ty) == np.asarray(c10.read_split(str(src), "train", 3)[1])).all()
    for k in range(30):  # every image is its class's colour: labels travel with their pixels
        assert abs(float(np.asarray(tx[k]).mean()) - (20 * int(ty[k]) + 1)) <= 2
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the git-directory path is not tested")
    git = lambda *a: subprocess.run(["git", "-C", str(src), *a], capture_output=True, check=True)
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "images")
    c10.write(str(src / ".git"), str(tmp_path / "git"), per_class_train=3, per_class_test=2)
    for f in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert (tmp_path / "git" / "cifar-10-batches-py" / f).read_bytes() == \
            (tmp_path / "tree" / "cifar-10-batches-py" / f).read_bytes()
    r = run_cli("cifar10_from_jpeg", src, tmp_path / "more", "--per-class-train", 4)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--per-class-train" in r.stderr


# ---- gpu_check.py: the prepared GPU check, rehearsed here in its tiny mode

def test_gpu_check_tiny_rehearses_every_part_and_a_part_out_of_time_is_marked(tmp_path):
    """gpu_check.py --tiny runs every part on the CPU (CUDA hidden: the CUDA tests skip, visibly), the test-suite
    part given 0.1 s so that it runs out of time: summary.md and summary.json are there, that part says "timeout",
    the parts after it ran, and the real-data part kept its run records."""
    import gpu_check
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--tiny", "--out", str(out),
                        "--work", str(tmp_path / "work"), "--limit", "tests=0.1", "--budget", "1200"],
                       cwd=HERE, capture_output=True, text=True, timeout=1800, env=cpu_env())
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]  # 1: not every part is ok
    assert str((out / "summary.md").resolve()) in r.stdout  # where the outputs are
    s = json.loads((out / "summary.json").read_text())
    parts = s["parts"]
    assert {p: v["status"] for p, v in parts.items()} == \
        {"env": "ok", "cuda_tests": "ok", "tests": "timeout", "bench": "ok", "real": "ok"}, r.stdout
    md = (out / "summary.md").read_text()
    assert "| tests | timeout | 0.1 |" in md and "## bench" in md and "## real" in md
    assert parts["env"]["env"]["cuda_available"] is False
    counts = parts["cuda_tests"]["counts"]
    assert set(counts) == {"skipped"} and counts["skipped"] >= 3 * len(METHODS), counts
    assert set(parts["cuda_tests"]["skipped"]) == {"needs CUDA"}
    for m in gpu_check.TINY_METHODS:
        for mode in ("eager", "compile"):
            assert parts["bench"]["bench"][m][mode]["ms_per_step"] > 0, (m, mode)
        assert parts["bench"]["bench"][m]["eager"]["cost_same_run"] > 0, m  # the in-process yardstick (eager only)
        assert parts["real"]["runs"][m]["status"] == "ok"
        assert all((out / "real" / m / f).exists() for f in ("run.json", "log.csv", "final.json"))
    assert parts["bench"]["concurrency"]["2"]["speedup"] > 0
    assert parts["real"]["epochs"] >= 1


def test_gpu_check_stopped_by_sigterm_still_leaves_its_summary(tmp_path):
    import signal
    import time
    out = tmp_path / "gc"
    skip = [x for p in ("env", "cuda_tests", "tests", "real") for x in ("--skip", p)]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "gpu_check.py"), "--tiny", "--out", str(out),
                          "--work", str(tmp_path / "work"), *skip], cwd=HERE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=cpu_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the bench part has started its processes
            if (out / "logs" / "bench-baseline-eager.log").exists():
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        said, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, said
    parts = json.loads((out / "summary.json").read_text())["parts"]
    assert parts["bench"]["status"] == "killed" and parts["env"]["status"] == "skipped", parts
    assert "| bench | killed (signal 15) |" in (out / "summary.md").read_text()


def test_gpu_check_unpacks_a_pack_and_plans_the_epochs_that_fit(tmp_path):
    """The pack's format (mosaics of 100 images a row, labels.npz, meta; a lossless split checked by sha256) read
    back exactly; the plan: the most epochs that fit, with the concurrency that allows most."""
    import hashlib
    import gpu_check
    g = np.random.RandomState(0)
    pack = tmp_path / "pack"
    pack.mkdir()
    x = {"train": g.randint(0, 256, (150, 3, 32, 32), dtype=np.uint8), "test": g.randint(0, 256, (100, 3, 32, 32),
                                                                                          dtype=np.uint8)}
    man = {}
    for split, imgs in x.items():
        rows = -(-len(imgs) // 100)
        m = np.zeros((rows * 100, 32, 32, 3), np.uint8)
        m[:len(imgs)] = imgs.transpose(0, 2, 3, 1)
        Image.fromarray(m.reshape(rows, 100, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 32, 3200, 3)) \
            .save(pack / f"{split}-0.png")
        man[split] = {"n": len(imgs), "files": [f"{split}-0.png"], "lossless": split == "test",
                      "sha256": hashlib.sha256(imgs.reshape(len(imgs), -1).tobytes()).hexdigest()}
    (pack / "MANIFEST.json").write_text(json.dumps(man))
    np.savez(pack / "labels.npz", **{f"{s}_{k}": g.randint(0, 100, len(x[s])) for s in x for k in ("fine", "coarse")})
    (pack / "meta").write_bytes(b"meta")
    gpu_check.unpack_cifar100(str(pack), str(tmp_path / "data"))
    tx, ty, vx, vy = common.load_cifar("cifar100", str(tmp_path / "data"))
    assert np.array_equal(tx, x["train"]) and np.array_equal(vx, x["test"])
    assert np.array_equal(vy, np.load(pack / "labels.npz")["test_fine"])
    man["test"]["sha256"] = "0" * 64
    (pack / "MANIFEST.json").write_text(json.dumps(man))
    with pytest.raises(SystemExit, match="do not match the manifest's sha256"):
        gpu_check.unpack_cifar100(str(pack), str(tmp_path / "data2"))
    # two methods of 100 ms/step, 10 steps an epoch (batch 10 of 100 images), no start-up: one run takes
    # 0.1 s x (10 E steps + 0.5 x (E test batches + 10 batches of training images)) = 1.05 E + 0.5 s; alone, both
    # one after the other fit 4 epochs in 10 s; two at once (speedup 1.5: each slowed 4/3) fit 6
    c = argparse.Namespace(methods=["baseline", "dml"], batch=10, startup=0.0, a=argparse.Namespace(max_epochs=300),
                           bench={m: {"eager": {"ms_per_step": 100.0}} for m in ("baseline", "dml")},
                           concurrency={1: {"speedup": 1.0}, 2: {"speedup": 1.5}})
    assert gpu_check.plan_real(c, 10.0, 100, 10, "eager")[:2] == (6, 2)
    c.concurrency[2]["speedup"] = 1.0  # no gain from running two at once: one at a time (fewer slots on a tie)
    assert gpu_check.plan_real(c, 10.0, 100, 10, "eager")[:2] == (4, 1)


# =================================================================================================
# 8. EVERY METHOD: the scripts found on disk, the kd() copies, each file alone next to common.py, this file
# =================================================================================================

def test_methods_found_on_disk_are_readmes_table():
    """METHODS, the method scripts found on disk, are the files of README's method table (the discovery
    neither misses a method nor takes another file for one), and TEACHER_SCRIPTS its rows that need a teacher."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        table = f.read().split("\n## The methods\n", 1)[1].split("\n## ", 1)[0]
    lines = table.splitlines()
    teacher = [c.strip() for c in next(l for l in lines if l.startswith("| file |")).split("|")].index("needs a teacher?")
    rows = [[c.strip() for c in l.split("|")] for l in lines if re.match(r"\| `\w+\.py` \|", l)]
    named = sorted(r[1][1:-len(".py`")] for r in rows)
    assert METHODS == named and len(METHODS) >= 14, (METHODS, named)
    assert TEACHER_SCRIPTS == tuple(sorted(r[1][1:-len(".py`")] for r in rows if r[teacher].startswith("yes")))


class _Parsed(Exception):
    pass


def script_options(script):
    """The option strings of `script`'s own parser (what its main() hands to common.parse)."""
    box, real = {}, common.parse

    def grab(p, *a, **k):
        box["p"] = p
        raise _Parsed
    common.parse = grab
    try:
        run_main(script)
    except _Parsed:
        pass
    finally:
        common.parse = real
    return {o for a in box["p"]._actions for o in a.option_strings}


def _tool_help(script, sub):
    """`python script.py [sub] -h` of a tool (summarize.py, gpu_check.py, cifar10_from_jpeg.py)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, script + ".py"), *([sub] if sub else []), "-h"],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (script, sub, r.stderr[-500:])
    return r.stdout


def test_readme_commands_use_real_options_and_backbones():
    """Every command of README's bash blocks that runs a file of this repository (`python X.py ...` or
    `torchrun [its options] X.py ...`; continuation lines joined) names a file that exists and options it
    has: a method's own parser, or a tool's -h (summarize.py per subcommand, whose grids must exist).
    `$m.py` stands for each name of its block's `for m in ...` loop (and needs one). Every backbone named
    (--arch, --teacher-arch, the words of `for arch/a/pair in ...` loops) is in common.ARCHS."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    options, helps, checked, archs = {}, {}, 0, set()
    for block in blocks:
        loop = None
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0]
            m = re.search(r"\bfor (\w+) in ([^;]*);", line)
            if m and m.group(1) == "m":
                loop = m.group(2).split()
            elif m and m.group(1) in ("arch", "a", "pair"):
                archs |= {w for p in m.group(2).split() for w in p.split(":")}
            words = line.split("|")[0].split()
            if not words or words[0] not in ("python", "torchrun"):
                continue
            i = next(k for k, w in enumerate(words) if w.endswith(".py"))  # torchrun's own options come before
            name, argv = words[i][:-3], words[i + 1:]
            archs |= {v for k, v in zip(argv, argv[1:]) if k in ("--arch", "--teacher-arch") and not v.startswith("$")}
            flags = {a.split("=")[0] for a in argv if a.startswith("--")}
            if name == "$m":
                assert loop, f"README: `$m.py` outside a `for m in ...` loop: {line.strip()}"
            for script in (loop if name == "$m" else [name]):
                assert os.path.isfile(os.path.join(HERE, script + ".py")), f"README runs {script}.py: no such file"
                if script in METHODS:
                    if script not in options:
                        with contextlib.redirect_stdout(io.StringIO()):
                            options[script] = script_options(script)
                    assert flags <= options[script], (script, sorted(flags - options[script]), line)
                else:
                    sub = argv[0] if script == "summarize" and argv and argv[0] in ("figures", "readme", "grid",
                                                                                   "speed") else None
                    if sub == "grid":
                        summarize.grid(argv[1])  # a grid that exists (an unknown one ends in one line)
                    h = helps.setdefault((script, sub), _tool_help(script, sub))
                    assert all(f in h for f in flags), (script, sub, [f for f in flags if f not in h], line)
                checked += 1
    assert checked >= 25 and archs and archs <= set(common.ARCHS), (checked, sorted(archs - set(common.ARCHS)))


def test_the_tools_method_lists_are_the_methods_on_disk():
    """The tools keep their own lists in their own order (the table's rows, the GPU check's jobs): each holds
    every method found on disk, once, and the GPU check's offline methods are the scripts with --teacher."""
    import gpu_check
    for name, listed in (("summarize.LAPTOP_METHODS", summarize.LAPTOP_METHODS), ("gpu_check.METHODS", gpu_check.METHODS)):
        assert sorted(listed) == METHODS, (name, sorted(set(METHODS) ^ set(listed)))
    assert sorted(gpu_check.OFFLINE) == sorted(TEACHER_SCRIPTS)


def test_kd_copies_in_the_method_files_are_identical():
    """README: "Reuse kd() as it is". Every method file that defines its own kd() holds the same text, so that
    a change to one copy reaches them all (12 files define it)."""
    copies = {}
    for script in METHODS:
        f = getattr(importlib.import_module(script), "kd", None)
        if inspect.isfunction(f) and f.__module__ == script:
            copies[script] = inspect.getsource(f)
    assert len(copies) >= 12, sorted(copies)
    texts = list(copies.values())
    most = max(texts, key=texts.count)
    assert len(set(texts)) == 1, f"kd() differs from the other copies in {sorted(s for s, t in copies.items() if t != most)}"


def test_each_method_file_runs_copied_next_to_common_alone(tmp_path):
    """People copy a method file into their project: it needs common.py and nothing else from here."""
    scripts = METHODS
    for name in scripts + ["common"]:
        shutil.copy(os.path.join(HERE, name + ".py"), tmp_path)
    code = "import sys; sys.argv = ['x', '-h']\n" + "".join(
        f"import {s}\ntry:\n    {s}.main()\nexcept SystemExit as e:\n    assert e.code == 0\n" for s in scripts)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--peers", "--variant", "--branches", "--fusion-wd", "--ema-decay", "--nce-k", "--teacher",
                 "--sharing", "--warmup", "--students", "--lambda", "--kd-weight"):
        assert flag in r.stdout


def test_no_top_level_name_of_this_file_is_defined_twice():
    """A second definition of a module-level name silently replaces the first (a test, a fixture or another
    section's constant): every top-level name of this file is defined once."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
    assert not sorted({n for n in names if names.count(n) > 1})


# ---- one loss convention: (total, {term: value})

def _loss_cases():
    """(name, call, term names in logged order, the trained terms' sum as the loss computes it)."""
    g = torch.Generator().manual_seed(0)
    z = [Z1, Z2, Z3]
    gate = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    alpha = torch.rand(2, 3, 3, generator=g).softmax(-1)
    memory = F.normalize(torch.randn(3, 8, 4, generator=g), dim=2)
    emb = F.normalize(torch.randn(3, 2, 4, generator=g), dim=2)
    maps = [_ffsd_maps(g), _ffsd_maps(g)]
    sd_t = [[torch.rand(2, 2, 4, 4, generator=g), torch.rand(2, 3, 2, 2, generator=g)]]
    f_f, tf, cat = torch.rand(2, 4, 1, 3, generator=g), torch.rand(2, 8, 1, 3, generator=g), torch.rand(2, 8, 1, 3)
    levels = [torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 1, 1, generator=g)]
    t_levels = [torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 1, 1, generator=g)]
    s = lambda t, *k: sum(t[n] for n in k)  # noqa: E731
    return [
        ("dml", lambda: dml.dml_loss(z, Y, 2.0), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("cl", lambda: cl.cl_loss(z, Y, 2.0, 0.5), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("kdcl", lambda: kdcl.kdcl_loss(z, Y, 3.0, 0.7, "minlogit"), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("one", lambda: one.one_loss(z, gate, Y, 3.0, 0.4), ["ce", "ce_e", "kd"],
         lambda t: s(t, "ce", "ce_e", "kd")),
        ("okddip", lambda: okddip.okddip_loss(z, Z1.flip(1), alpha, Y, 3.0, 0.4), ["ce", "ce_l", "kd", "kd_l"],
         lambda t: s(t, "ce", "ce_l", "kd", "kd_l")),
        ("ffl", lambda: ffl.ffl_loss([Z1, Z2], Z3, Y, 3.0, 0.4), ["ce", "ce_f", "kd", "fusion"],
         lambda t: s(t, "ce", "ce_f", "kd", "fusion")),
        ("pcl", lambda: pcl.pcl_loss(z, Z1.flip(1), [Z3, Z1, Z2], Y, 3.0, 0.4), ["ce", "ce_e", "kd", "ema"],
         lambda t: s(t, "ce_e", "ce", "kd", "ema")),
        ("mcl", lambda: mcl.mcl_loss(z, memory, emb, torch.tensor([0, 5]), torch.tensor([[1, 2], [3, 4]]), Y,
                                     3.0, 0.1, 1.0, 0.025), ["ce", "dot", "nce"],
         lambda t: t["ce"] + 1.0 * t["dot"] + 0.025 * t["nce"]),
        ("sokd", lambda: sokd.sokd_loss(Z1, Z2, Z3, Y, 4.0), ["ce", "kd", "ce_b", "kd_b"],
         lambda t: s(t, "ce", "kd") + s(t, "ce_b", "kd_b")),
        ("sokd-kd_t", lambda: sokd.sokd_loss(Z1, Z2, Z3, Y, 4.0, 0.5), ["ce", "kd", "ce_b", "kd_b", "kd_t"],
         lambda t: s(t, "ce", "kd", "kd_t") + s(t, "ce_b", "kd_b")),
        ("ffsd-students", lambda: ffsd.student_loss([Z1, Z2], maps, sd_t, Y, 2.0, 0.3), ["ce", "kd", "div", "sd"],
         lambda t: s(t, "ce", "kd", "div", "sd")),
        ("ffsd-fusion", lambda: ffsd.fusion_loss(Z3, [Z1, Z2], Y, 2.0), ["ce_f", "fusion"],
         lambda t: s(t, "ce_f", "fusion")),
        ("ffsd-leader", lambda: ffsd.leader_loss(Z1.flip(1), _ffsd_maps(g), tf, Z3, f_f, cat, sd_t[0], Y, 2.0, 7.0),
         ["ce_l", "kd_l", "fuse_l", "trans_l", "sd_l"], lambda t: s(t, "ce_l", "kd_l", "fuse_l", "trans_l", "sd_l")),
        ("oeckd", lambda: oeckd.oeckd_loss(z, torch.tensor(0.8), Y, 2.0, 0.7, 0.15, 0.15), ["ce", "feat", "kd", "ce_e"],
         lambda t: s(t, "ce", "feat", "kd")),  # ce_e: logged, not trained
        ("kd", lambda: kd.kd_loss(Z1, Z2, Y, 4.0), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("reviewkd", lambda: reviewkd.reviewkd_loss(Z1, levels, t_levels, Y, 0.5), ["ce", "hcl"],
         lambda t: s(t, "ce", "hcl")),
    ]


LOSS_CASES = ("dml", "cl", "kdcl", "one", "okddip", "ffl", "pcl", "mcl", "sokd", "sokd-kd_t", "ffsd-students",
              "ffsd-fusion", "ffsd-leader", "oeckd", "kd", "reviewkd")  # _loss_cases' names (its helpers come later)


@pytest.mark.parametrize("name", LOSS_CASES)
def test_every_loss_function_returns_its_total_and_named_terms(name):
    """One convention in every method file: (total, {term: value}), the terms named as log.csv's columns
    and in their order, the total their sum as the loss adds them (bit for bit)."""
    cases = {c[0]: c[1:] for c in _loss_cases()}
    assert list(cases) == list(LOSS_CASES)
    call, names, trained = cases[name]
    total, terms = call()
    assert isinstance(terms, dict) and list(terms) == names
    assert total.dim() == 0 and all(v.dim() == 0 for v in terms.values())
    assert torch.equal(total, trained(terms))


# ---- common.py reads top to bottom

def _defs(tree):
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_common_names_its_parts_in_order_and_train_step_on_its_first_screen():
    src = _source("common")
    first_screen = "\n".join(src.splitlines()[:50])
    assert "train_step" in first_screen and "evaluate" in first_screen and "final.json" in first_screen
    parts = ["BACKBONES", "DATA", "LOOP", "OPTIONS", "RUN FOLDER", "BENCH"]
    doc = ast.get_docstring(ast.parse(src))
    assert [doc.index(f"{i}. {p}") for i, p in enumerate(parts, 1)] == \
        sorted(doc.index(f"{i}. {p}") for i, p in enumerate(parts, 1))
    banners = re.findall(r"^# =+\n# (\d)\. ([A-Z ]+?)(?::|\n)", src, re.M)
    assert [(int(n), name) for n, name in banners] == list(enumerate(parts, 1))


def test_train_is_an_outline_of_phases_of_at_most_40_lines():
    defs = _defs(ast.parse(_source("common")))
    train = defs["_train"]
    called = [n.func.id for n in ast.walk(train) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    phases = ["_loaders", "_optimizers", "_step_model", "_start", "_epoch", "_save_checkpoint", "_finish"]
    assert all(p in called for p in phases)
    for name in ["_train", *phases, "_steps", "train_step", "evaluate"]:
        assert defs[name].end_lineno - defs[name].lineno + 1 <= 40, name
    # top-down: each phase comes after _train, in the order _train calls it
    assert [defs[p].lineno for p in phases] == sorted(defs[p].lineno for p in phases)
    assert train.lineno < defs["_loaders"].lineno and defs["_steps"].lineno < defs["train_step"].lineno


def test_the_sets_of_option_names_stand_together_in_options_with_a_comment_each():
    src = _source("common")
    lines = src.splitlines()
    options, run_folder = src.index("# 4. OPTIONS"), src.index("# 5. RUN FOLDER")
    at = {}
    for name in ("MARKER", "RUN_CONTROL", "INHERITED", "RUN_SETTINGS", "RECORDS", "_LEGACY_ARGS"):
        i = next(k for k, ln in enumerate(lines) if ln.startswith(name + " = "))
        assert options < src.index(lines[i]) < run_folder, name
        assert lines[i - 1].startswith("# "), name  # its one comment says how it differs
        at[name] = i
    assert max(at.values()) - min(at.values()) < 30


def test_common_imports_no_method_file_and_each_method_only_common():
    def local_imports(name):
        mods = set()
        for n in ast.walk(ast.parse(_source(name))):
            if isinstance(n, ast.Import):
                mods |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                mods.add((n.module or "").split(".")[0])
        return {m for m in mods if os.path.exists(os.path.join(HERE, m + ".py"))}
    assert local_imports("common") == set()
    for name in METHODS:
        assert local_imports(name) == {"common"}, name


def test_every_method_file_has_the_same_skeleton():
    """The order a reader of any method file can rely on (README "How to add a method"): docstring, imports,
    the losses and helpers, the method's class, PAPER, main() (parser -> common.parse -> common.run), and the
    `if __name__ == "__main__": main()` line; nothing at the top level runs anything else."""
    for name in METHODS:
        body = ast.parse(_source(name)).body
        kinds = [type(n).__name__ for n in body]
        assert kinds[0] == "Expr" and isinstance(body[0].value, ast.Constant), f"{name}: docstring first"
        last_import = max(i for i, k in enumerate(kinds) if k in ("Import", "ImportFrom"))
        assert all(k in ("Import", "ImportFrom") for k in kinds[1:last_import + 1]), f"{name}: imports together"
        assert set(kinds[last_import + 1:]) <= {"FunctionDef", "ClassDef", "Assign", "If"}, name
        defs = {n.name: i for i, n in enumerate(body) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        paper = next(i for i, n in enumerate(body) if isinstance(n, ast.Assign) and n.targets[0].id == "PAPER")
        main = body[defs["main"]]
        run = [c for c in ast.walk(main) if isinstance(c, ast.Call) and ast.unparse(c.func) == "common.run"]
        parse = [c for c in ast.walk(main) if isinstance(c, ast.Call) and ast.unparse(c.func) == "common.parse"]
        assert len(run) == 1 and len(parse) == 1, f"{name}: main() parses with common.parse, runs with common.run"
        method = ast.unparse(run[0].args[1])
        assert defs[method] < paper < defs["main"] == len(body) - 2, f"{name}: class {method}, PAPER, main(), in order"
        assert ast.unparse(body[-1]) == "if __name__ == '__main__':\n    main()", f"{name}: ends by calling main()"


# =================================================================================================
# 9. BASELINE (baseline.py): the loop's reference runs
# baseline.py is the loop with a plain CE: its end to end, resume and DDP runs test the loop itself.
# =================================================================================================

# ---- baseline: end to end

def test_baseline_end_to_end_lowers_the_loss(data, tmp_path):
    out = tmp_path / "run"
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 4, "--schedule", 3, "--out", out)
    log = read_log(out)
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4]
    assert float(log[-1]["loss"]) < float(log[0]["loss"]) - 0.05
    assert float(log[3]["lr"]) == pytest.approx(0.005)
    fin = read_final(out)
    assert fin["deploy"] == "net" and set(fin["last"]) == {"net"}
    assert fin["params"]["net"] == common.count_params(common.build_model("resnet8", 100))
    assert fin["last"]["net"] == float(log[-1]["net"])
    assert fin["best"]["net"][0] == max(float(r["net"]) for r in log)
    for key in ("method", "arch", "dataset", "epochs", "seed", "args", "versions", "seconds", "images_per_second"):
        assert key in fin


# ---- baseline: resume

def test_resume_reproduces_an_uninterrupted_run(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*TINY, "--data-dir", data, "--epochs", 3, "--schedule", 2, "--wd", "5e-4"]
    run_main("baseline", *args, "--out", a)
    run_main("baseline", *args, "--out", b, "--halt-after", 1)
    assert len(read_log(b)) == 1 and not os.path.exists(b / "final.json")
    run_main("baseline", *args, "--out", b, "--resume")
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_final(a)["last"] == read_final(b)["last"]


# ---- baseline: DDP

def test_ddp_two_gloo_processes_keep_ranks_identical(data, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli("baseline", "--arch", "resnet8", "--batch-size", 64, "--gpus", "0,1", "--data-dir", data,
                "--epochs", 2, "--schedule", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    fin = read_final(out)
    assert fin["processes"] == 2
    s = fin["rank_param_sums"]
    assert s[0] == s[1]


# =================================================================================================
# 10. DML (dml.py)
# =================================================================================================

# ---- dml: loss by hand

def test_dml_three_peers_loss_matches_hand_computation():
    z = [[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]],
         [[0.0, 1.5, 0.3], [1.0, -1.0, 2.0]],
         [[2.0, 0.2, 0.1], [-0.5, 0.0, 0.5]]]
    y, T = [0, 2], 2.0
    ce = sum(_hand_ce(zk, y) for zk in z)
    kl = sum(_hand_kd(z[k], z[l], T) for k in range(3) for l in range(3) if l != k) / 2  # 1/(K-1)
    total, terms = dml.dml_loss([torch.tensor(zk) for zk in z], torch.tensor(y), T)
    ce_t, kl_t = terms["ce"], terms["kd"]
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(ce + kl, rel=1e-5)


# ---- dml: gradient flow

def test_dml_kd_sends_no_gradient_into_the_target_peer():
    torch.manual_seed(0)
    peers = [common.build_model("resnet8", 10) for _ in range(2)]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    z1, z2 = peers[0](x), peers[1](x)
    dml.kd(z1, z2, 1.0).backward()  # peer 1 mimics peer 2
    assert all(p.grad is None for p in peers[1].parameters())
    assert peers[0].fc.weight.grad.abs().sum() > 0
    # in the whole loss, peer k's logits get gradient from its own CE and its own KD terms only
    z = [torch.randn(4, 10, requires_grad=True) for _ in range(3)]
    dml.dml_loss(z, y, 2.0)[1]["kd"].backward()
    for k in range(3):
        zk = z[k].detach().requires_grad_()
        own = sum(dml.kd(zk, z[l].detach(), 2.0) for l in range(3) if l != k) / 2
        (g,) = torch.autograd.grad(own, zk)
        assert torch.allclose(z[k].grad, g, atol=1e-6)


# ---- dml: end to end

@pytest.mark.parametrize("script", ["dml", "kdcl"])
def test_peer_methods_end_to_end_two_archs(script, data, tmp_path):
    """DML and KDCL with heterogeneous peers (one per --arch name)."""
    out = tmp_path / "r"
    run_main(script, *TINY, "--arch", "resnet8,wrn_16_1", "--data-dir", data, "--epochs", 2, "--schedule", 1,
             "--out", out)
    fin = read_final(out)
    assert set(fin["last"]) == {"peer1", "peer2", "ensemble"} and fin["deploy"] == "peer1"
    n1, n2 = (common.count_params(common.build_model(a, 100)) for a in ("resnet8", "wrn_16_1"))
    assert fin["params"] == {"peer1": n1, "peer2": n2, "ensemble": n1 + n2}
    if script == "kdcl":
        assert fin["args"]["variant"] == "minlogit" and fin["args"]["T"] == 3.0 and fin["args"]["lam"] == 1.0
    log = read_log(out)
    assert len(log) == 2 and all(math.isfinite(float(r["kd"])) and float(r["kd"]) > 0 and float(r["ce"]) > 0
                                 for r in log)


# =================================================================================================
# 11. CL (cl.py, CL-ILR)
# =================================================================================================

def _cl_batch(B=4, nc=10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, nc, (B,), generator=g)


# ---- cl: loss by hand

CL_Z = [*HAND_Z, [[-1.0, 0.5, 0.5], [0.3, 0.2, -0.4]]]  # 4 heads x 2 samples x 3 classes


@pytest.mark.parametrize("T,beta", [(2.0, 0.5), (3.0, 0.3)])
def test_cl_loss_matches_hand_computation(T, beta):
    H = len(CL_Z)
    # t_h by hand: the mean of the other three heads' logits, entry by entry
    t = [[[sum(CL_Z[j][r][c] for j in range(H) if j != h) / (H - 1) for c in range(3)] for r in range(2)]
         for h in range(H)]
    ce = beta * sum(_hand_ce(CL_Z[h], HAND_Y) for h in range(H))
    kl = (1 - beta) * sum(_hand_kd(CL_Z[h], t[h], T) for h in range(H))
    total, terms = cl.cl_loss([torch.tensor(z) for z in CL_Z], torch.tensor(HAND_Y), T, beta)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(ce + kl, rel=1e-5)
    assert kl > 0.01 * ce  # the soft term is not negligible on these tensors


# ---- cl: gradient flow (the soft loss's targets; backpropagation rescaling)

def test_cl_kd_sends_no_gradient_into_the_heads_that_make_the_target():
    T, beta = 2.0, 0.5
    # on leaf logits: d kd / d z_j is the gradient of head j's own soft loss only, with t_j a constant
    z = [torch.tensor(v, requires_grad=True) for v in CL_Z]
    _, terms = cl.cl_loss(z, torch.tensor(HAND_Y), T, beta)
    terms["kd"].backward()
    for j in range(4):
        zj = z[j].detach().requires_grad_()
        tj = sum(z[i].detach() for i in range(4) if i != j) / 3
        (want,) = torch.autograd.grad((1 - beta) * cl.kd(zj, tj, T), zj)
        assert torch.allclose(z[j].grad, want, atol=1e-6)

    # in the model: head 1's soft loss trains head 1's path only (its branch, its stage2 copy, the trunk)
    m = method_model("cl")
    x, y = _cl_batch()
    logits = m.head_logits(x)
    cl.kd(logits[0], cl.peer_targets(logits)[0], T).backward()
    no_grad = lambda mod: all(p.grad is None or not p.grad.any() for p in mod.parameters())  # noqa: E731
    assert all(no_grad(m.branches[h]) for h in (1, 2, 3)) and no_grad(m.mids[1])
    assert m.branches[0].fc.weight.grad.abs().sum() > 0 and m.mids[0][0].body[0][0].weight.grad.abs().sum() > 0
    assert m.trunk[0][0].weight.grad.abs().sum() > 0


def test_cl_each_term_trains_every_head_and_the_shared_layers():
    m = method_model("cl")
    x, y = _cl_batch()
    for term in ("ce", "kd"):
        m.zero_grad(set_to_none=True)
        _, terms = m(x, y, None, 0)
        terms[term].backward()
        mods = [*m.branches, *m.mids, m.trunk]
        assert all(any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters()) for mod in mods), term


def test_cl_scale_grad_is_identity_forward_and_one_over_k_backward():
    x = torch.randn(3, 5, requires_grad=True)
    up = torch.randn(3, 5)
    y = cl.ScaleGrad.apply(x, 4)
    assert torch.equal(y, x)
    (y * up).sum().backward()
    assert torch.allclose(x.grad, up / 4)


@pytest.mark.parametrize("sharing", ["hierarchical", "simple"])
def test_cl_rescaling_gives_each_shared_layer_1_over_k_of_the_sum_of_its_heads_gradients(sharing):
    """Same weights, same batch: per head h, g_h = gradient of head h's loss without rescaling. With
    rescaling, on the whole loss: the trunk gets (1/4) sum_h g_h; stage2 copy a (b) gets (1/2)(g_1 + g_2)
    ((1/2)(g_3 + g_4)); each head's own last stage and classifier get g_h unchanged."""
    on = method_model("cl", sharing=sharing)
    off = copy.deepcopy(on)
    off.rescale = False
    x, y = _cl_batch()
    # per-head losses on the unscaled model: each head's CE and soft loss (the target is a constant)
    z = off.head_logits(x)
    t = cl.peer_targets(z)
    shared = [*off.trunk.parameters(), *off.mids.parameters()]
    g = [torch.autograd.grad(0.5 * F.cross_entropy(z[h], y) + 0.5 * cl.kd(z[h], t[h], 2.0), shared,
                             retain_graph=True, allow_unused=True) for h in range(4)]
    g = [[torch.zeros_like(p) if gi is None else gi for gi, p in zip(gh, shared)] for gh in g]
    n_trunk = len(list(off.trunk.parameters()))
    loss, _ = on(x, y, None, 0)
    loss.backward()
    for i, p in enumerate(on.trunk.parameters()):
        want = sum(g[h][i] for h in range(4)) / 4
        assert p.grad.abs().sum() > 0 and torch.allclose(p.grad, want, rtol=1e-4, atol=1e-7), i
    if sharing == "hierarchical":
        n_mid = len(list(off.mids[0].parameters()))
        for c, pair in enumerate([(0, 1), (2, 3)]):
            for i, p in enumerate(on.mids[c].parameters()):
                j = n_trunk + c * n_mid + i
                want = (g[pair[0]][j] + g[pair[1]][j]) / 2
                assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-7), (c, i)
                other = [h for h in range(4) if h not in pair]  # the other pair never reaches this copy
                assert all(not g[h][j].any() for h in other)
    else:
        assert len(on.mids) == 0
    # heads' own branches: no rescaling; compare with the whole unscaled loss
    off.zero_grad(set_to_none=True)
    off(x, y, None, 0)[0].backward()
    for b_on, b_off in zip(on.branches, off.branches):
        for p, q in zip(b_on.parameters(), b_off.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8)
    # and the unscaled trunk really gets the plain sum (4x the rescaled one): the test can tell them apart
    for p, q in zip(on.trunk.parameters(), off.trunk.parameters()):
        assert torch.allclose(q.grad, 4 * p.grad, rtol=1e-4, atol=1e-7)


class _MCLOKDILR(torch.autograd.Function):
    """winycg/MCL-OKD models/cl_ilr_resnet.py ILR, as written there: identity forward, grad / n backward."""

    @staticmethod
    def forward(ctx, input, num_branches):
        ctx.num_branches = num_branches
        return input

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output / ctx.num_branches, None


def _cl_mcl_okd_logits(m, x, stage1_rule):
    """The heads' logits through MCL-OKD's ResNet._forward on the CL model's modules: layer_ILR(x, 2) on the
    stage1 output, then per stage2 copy i: /2 if number_net - 2i >= 2 (a pair), else none (a lone head).
    stage1_rule "copies": the stage1 output divided by the number of copies instead (cl.py before it
    followed MCL-OKD for every H), to show where the two rules part."""
    H = len(m.branches)
    x = m.trunk(x)
    x = _MCLOKDILR.apply(x, 2 if stage1_rule == "mcl-okd" else len(m.mids))
    x2 = []
    for i in range(math.ceil(H / 2)):
        out = m.mids[i](x)
        if H - i * 2 >= 2:
            out = _MCLOKDILR.apply(out, 2)
            x2 += [out, out]
        else:
            x2.append(out)
    return [m.branches[i](x2[i]) for i in range(H)]


@pytest.mark.parametrize("heads", [2, 3, 4, 5, 6])
def test_cl_rescaling_follows_mcl_okd_for_every_number_of_heads(heads):
    """Same weights, same batch, same loss: every parameter's gradient equals that of MCL-OKD's forward
    (its ILR placement rebuilt above). The rule 'stage1 / number of copies' agrees with it for 3 and 4
    heads (the default 4: the same numbers as before) and differs on the trunk for 2, 5 and 6."""
    m = method_model("cl", heads=heads)
    x, y = _cl_batch()
    names = [n for n, _ in m.named_parameters()]
    got = dict(zip(names, torch.autograd.grad(m(x, y, None, 0)[0], list(m.parameters()))))
    want = {}
    for rule in ("mcl-okd", "copies"):
        loss, _ = cl.cl_loss(_cl_mcl_okd_logits(m, x, rule), y, 2.0, 0.5)
        want[rule] = dict(zip(names, torch.autograd.grad(loss, list(m.parameters()))))
    for n in names:
        assert torch.allclose(got[n], want["mcl-okd"][n], rtol=1e-5, atol=1e-8), n
    trunk = [n for n in names if n.startswith("trunk.")]
    same = all(torch.allclose(want["copies"][n], want["mcl-okd"][n], rtol=1e-5, atol=1e-8) for n in trunk)
    assert same == (heads in (3, 4))
    if heads == 4:  # the default: bit for bit what the per-copy rule gave
        assert all(torch.equal(want["copies"][n], want["mcl-okd"][n]) for n in names)
    if heads == 2:  # one copy: the trunk gets half of what its copy passes down, 1/4 of the heads' sum
        assert all(torch.allclose(2 * want["mcl-okd"][n], want["copies"][n], rtol=1e-5, atol=1e-8) for n in trunk)


def test_cl_rescaling_changes_nothing_forward():
    on = method_model("cl")
    off = copy.deepcopy(on)
    off.rescale = False
    x, y = _cl_batch()
    for a, b in zip(on.head_logits(x), off.head_logits(x)):
        assert torch.equal(a, b)


# ---- cl: counts and structure

def test_cl_param_counts_resnet32_hierarchical_and_simple():
    net = common.build_model("resnet32", 100)
    stem_s1 = common.count_params(*net.stages[:2])
    s2 = common.count_params(net.stages[2])
    s3_fc = common.count_params(net.stages[3], net.fc)
    assert (stem_s1, s2, s3_fc) == (464 + 23360, 88768, 353664 + 6500)
    h = cl.CL(method_args("cl", arch="resnet32"), 100)
    assert common.count_params(h) == stem_s1 + 2 * s2 + 4 * s3_fc == 1642016
    assert common.count_params(h.trunk) == stem_s1 and len(h.mids) == 2
    assert h.head_params() == {"head1": 472756, "head2": 472756, "head3": 472756, "head4": 472756,
                               "ensemble": 1642016}
    s = cl.CL(method_args("cl", arch="resnet32", sharing="simple"), 100)
    assert common.count_params(s) == stem_s1 + s2 + 4 * s3_fc == 1553248
    assert s.head_params()["head1"] == common.count_params(net) == 472756
    assert s.head_params()["ensemble"] == 1553248


def test_cl_heads_route_through_their_stage2_copy_and_head1_is_the_backbone():
    """head h = trunk + stage2 copy h // 2 + its own stage3 + fc: with a whole net's weights copied
    into that path, head h computes that net; ensemble is the mean of the heads' logits."""
    m = method_model("cl").eval()
    x, _ = _cl_batch()
    for h in range(4):
        torch.manual_seed(10 + h)
        net = common.build_model("resnet8", 10).eval()
        m.trunk.load_state_dict(torch.nn.Sequential(*net.stages[:2]).state_dict())
        m.mids[h // 2].load_state_dict(net.stages[2].state_dict())
        m.branches[h].load_state_dict(common.Net([net.stages[3]], net.fc).state_dict())
        with torch.no_grad():
            heads = m.heads(x)
            assert torch.allclose(heads[f"head{h + 1}"], net(x), atol=1e-5)
    assert set(heads) == {"head1", "head2", "head3", "head4", "ensemble"} and m.deploy == "head1"
    want = torch.stack([heads[f"head{h + 1}"] for h in range(4)]).mean(0)
    assert torch.allclose(heads["ensemble"], want)


def test_cl_odd_heads_last_one_alone_on_its_stage2_copy():
    m = method_model("cl", heads=3)
    assert len(m.mids) == 2 and m.route == [0, 0, 1]
    x, y = _cl_batch()
    off = copy.deepcopy(m)
    off.rescale = False
    m(x, y, None, 0)[0].backward()
    off(x, y, None, 0)[0].backward()
    for p, q in zip(m.mids[1].parameters(), off.mids[1].parameters()):  # one consumer: x 1
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    for p, q in zip(m.mids[0].parameters(), off.mids[0].parameters()):  # two consumers: x 1/2
        assert torch.allclose(2 * p.grad, q.grad, rtol=1e-4, atol=1e-7)


# ---- cl: end to end

@pytest.mark.parametrize("sharing", ["hierarchical", "simple"])
def test_cl_end_to_end_two_epochs_writes_every_head(sharing, data, tmp_path):
    out = tmp_path / "r"
    run_main("cl", *TINY, "--batch-size", 32, "--data-dir", data, "--epochs", 2, "--schedule", 1,
             "--sharing", sharing, "--out", out)
    fin = read_final(out)
    assert set(fin["last"]) == {"head1", "head2", "head3", "head4", "ensemble"}
    assert fin["deploy"] == "head1"
    m = cl.CL(method_args("cl", sharing=sharing), 100)
    assert fin["params"] == m.head_params()
    assert fin["params"]["head1"] == common.count_params(common.build_model("resnet8", 100))
    assert fin["args"]["sharing"] == sharing and fin["args"]["T"] == 2.0 and fin["args"]["beta"] == 0.5
    log = read_log(out)
    assert len(log) == 2
    for r in log:
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["kd"]), rel=1e-4)
        assert float(r["kd"]) > 0
    sd = common.load_checkpoint(os.path.join(out, "checkpoint.pt"))["model"]
    assert any(k.startswith("mids.1.") for k in sd) == (sharing == "hierarchical")


@pytest.mark.parametrize("sharing", ["simple"])  # hierarchical: in test_training_step_has_no_host_sync
def test_cl_training_step_has_no_host_sync(sharing, monkeypatch, tmp_path):
    c = count_syncs_in_steps(monkeypatch, "cl", *TINY, "--batch-size", 8, "--bench", 2, "--out", tmp_path / "b",
                             "--sharing", sharing)
    assert c["n"] == 0, c["what"]


@pytest.mark.parametrize("bad,msg", [(["--heads", "1"], "argument --heads: 1 must be at least 2"),
                                     (["--beta", "1.5"], "argument --beta: 1.5 must lie in [0, 1]"),
                                     (["--beta", "-0.1"], "argument --beta: -0.1 must lie in [0, 1]"),
                                     (["--T", "0"], "argument --T: 0.0 must be positive"),
                                     (["--arch", "resnet8,resnet14"], "give a single --arch"),
                                     (["--sharing", "pairs"], "invalid choice: 'pairs'")])
def test_cl_bad_arguments_are_refused(bad, msg, data, tmp_path, capsys):
    assert_refused("cl", [*TINY, "--data-dir", data, *bad], msg, tmp_path / "r", capsys)


# ---- cl: resume

def test_cl_resume_reproduces_an_uninterrupted_run(data, tmp_path):
    """Three separate processes (as a user runs them): common.py locks a run folder for the life of the
    process that opened it, so the halted run and its --resume cannot share this test's process."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*TINY, "--batch-size", 32, "--data-dir", data, "--epochs", 2, "--schedule", 1]
    for extra in (["--out", a], ["--out", b, "--halt-after", 1], ["--out", b, "--resume"]):
        r = run_cli("cl", *args, *extra)
        assert r.returncode == 0, r.stderr
        if "--halt-after" in extra:
            assert len(read_log(b)) == 1 and not os.path.exists(b / "final.json")
        if "--resume" in extra:
            assert_continued_after_epoch_1(r.stdout, b)
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_final(a)["last"] == read_final(b)["last"]


# =================================================================================================
# 12. KDCL (kdcl.py)
# =================================================================================================

def _kdcl_logits(m=3, B=16, C=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    hit = lambda: 3 * F.one_hot(y, C) * (torch.rand(B, 1, generator=g) < 0.5)  # sure and right on about half
    Z = torch.stack([torch.randn(B, C, generator=g) * (1 + i) + hit() for i in range(m)])
    return Z, y


def _kdcl_model(variant="minlogit", arch="resnet8", nc=10, bench=0):
    return method_model("kdcl", nc, None, arch=arch, variant=variant, val_size=20, bench=bench)


# ---- kdcl: loss by hand; the soft targets of the four variants

def test_kdcl_loss_matches_hand_computation():
    z = [[[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]],
         [[3.0, 0.0, 1.0], [2.0, 0.5, 0.0]]]
    y, T, lam = [0, 2], 2.0, 0.5
    # minlogit by hand: sample 0 (y=0): z1 - 1 = [0, 1, -1], z2 - 3 = [0, -3, -2] -> [0, -3, -2]
    #                   sample 1 (y=2): z1 - 3 = [-3, -2, 0], z2 - 0 = [2, 0.5, 0] -> [-3, -2, 0]
    t = [[0.0, -3.0, -2.0], [-3.0, -2.0, 0.0]]
    ce = _hand_ce(z[0], y) + _hand_ce(z[1], y)
    kl = lam * (_hand_kd(z[0], t, T) + _hand_kd(z[1], t, T))
    logits = [torch.tensor(zi) for zi in z]
    assert torch.equal(kdcl.soft_target(torch.stack(logits), torch.tensor(y), "minlogit"), torch.tensor(t))
    total, terms = kdcl.kdcl_loss(logits, torch.tensor(y), T, lam, "minlogit")
    ce_t, kl_t = terms["ce"], terms["kd"]
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(ce + kl, rel=1e-5)
    # general with weights (0.25, 0.75): the weighted sum of logits
    w = torch.tensor([0.25, 0.75])
    tg = [[0.25 * a + 0.75 * b for a, b in zip(r1, r2)] for r1, r2 in zip(*z)]
    kl_g = kdcl.kdcl_loss(logits, torch.tensor(y), T, lam, "general", w)[1]["kd"]
    assert kl_g.item() == pytest.approx(lam * (_hand_kd(z[0], tg, T) + _hand_kd(z[1], tg, T)), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kdcl_minlogit_true_class_probability_is_at_least_every_students(T):
    Z, y = _kdcl_logits()
    zt = kdcl.minlogit_target(Z, y)
    assert torch.all(zt.gather(1, y[:, None]) == 0)
    pt = (zt / T).softmax(1).gather(1, y[:, None])
    for z in Z:
        assert torch.all(pt >= (z / T).softmax(1).gather(1, y[:, None]) - 1e-7)


def test_kdcl_naive_picks_the_lowest_ce_student_per_sample():
    y = torch.tensor([0, 1])
    Z = torch.tensor([[[5.0, 0.0], [0.0, 1.0]],     # student 1: sure and right on sample 0, weak on 1
                      [[1.0, 0.0], [0.0, 6.0]]])    # student 2: weak on sample 0, sure and right on 1
    assert torch.equal(kdcl.naive_target(Z, y), torch.tensor([[5.0, 0.0], [0.0, 6.0]]))
    Z, y = _kdcl_logits()
    zt = kdcl.naive_target(Z, y)
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in Z])
    assert torch.allclose(F.cross_entropy(zt, y, reduction="none"), ce.min(0).values)
    assert all(any(torch.equal(zt[k], z[k]) for z in Z) for k in range(len(y)))  # a row of one student


def test_kdcl_linear_weights_on_the_simplex_and_at_the_optimum():
    for seed in range(3):
        Z, y = _kdcl_logits(m=3, B=64, C=20, seed=seed)
        a = kdcl.linear_weights(Z, y)
        assert torch.all(a >= 0) and a.sum().item() == pytest.approx(1, abs=1e-5)
        ce = F.cross_entropy(kdcl.soft_target(Z, y, "linear"), y).item()
        assert ce <= min(F.cross_entropy(z, y).item() for z in Z) + 1e-6
    # two students right on different halves of the batch: the optimum is inside; a grid finds it
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (64,), generator=g)
    hit = 4 * F.one_hot(y, 10)
    Z = torch.stack([torch.randn(64, 10, generator=g) + hit * (torch.arange(64) < 32)[:, None],
                     2 * torch.randn(64, 10, generator=g) + 2 * hit * (torch.arange(64) >= 32)[:, None]])
    grid = torch.linspace(0, 1, 401)
    ces = torch.stack([F.cross_entropy(c * Z[0] + (1 - c) * Z[1], y) for c in grid])
    assert 0.05 < grid[ces.argmin()] < 0.95
    ce = F.cross_entropy(kdcl.soft_target(Z, y, "linear"), y)
    assert ce.item() <= ces.min().item() + 1e-4
    assert ce.item() < min(ces[0].item(), ces[-1].item()) - 0.05  # better than either student


def test_kdcl_general_weights_sum_to_one_and_match_a_hand_solve():
    a, b, c = 0.5, 0.1, 0.3  # C = [[a, b], [b, c]]: C^-1 1 is proportional to (c - b, a - b)
    w = kdcl.general_weights(torch.tensor([[a, b], [b, c]]))
    assert w.tolist() == pytest.approx([(c - b) / (a + c - 2 * b), (a - b) / (a + c - 2 * b)], rel=1e-5)
    A = torch.randn(3, 5, dtype=torch.float64)
    C = A @ A.T / 5
    w = kdcl.general_weights(C)
    u = torch.linalg.inv(C).sum(1)
    assert w.sum().item() == pytest.approx(1, abs=1e-6)
    assert torch.allclose(w.double(), u / u.sum(), atol=1e-5)
    w = kdcl.general_weights(torch.ones(2, 2))  # two identical students: singular C, the ridge splits evenly
    assert w.tolist() == pytest.approx([0.5, 0.5])


# ---- kdcl: gradient flow

@pytest.mark.parametrize("variant", ["naive", "linear", "minlogit", "general"])
def test_kdcl_kd_sends_no_gradient_into_the_target(variant):
    """Each student's logits get gradient from its own CE and KD terms only, never through z_t."""
    Z, y = _kdcl_logits(m=3)
    w = torch.tensor([0.5, 0.3, 0.2])
    z = [zi.clone().requires_grad_() for zi in Z]
    kdcl.kdcl_loss(z, y, 3.0, 0.7, variant, w)[1]["kd"].backward()
    zt = kdcl.soft_target(Z, y, variant, w)
    for zi in z:
        leaf = zi.detach().requires_grad_()
        (g,) = torch.autograd.grad(0.7 * kdcl.kd(leaf, zt, 3.0), leaf)
        assert torch.allclose(zi.grad, g, atol=1e-6)
    # the real module: the gradient the kd term sends into student 2 equals that of student 2's own KD
    # against a constant target (a target that is not detached would add the path through student 1's term)
    torch.manual_seed(0)
    model = _kdcl_model(variant)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    yb = torch.tensor([0, 1, 2, 3])
    loss, terms = model((x1, x2), yb, None, 0)  # the step as the loop runs it: one view per student
    assert set(terms) == {"ce", "kd"}
    assert loss.item() == pytest.approx((terms["ce"] + terms["kd"]).item(), rel=1e-6)
    terms["kd"].backward()
    got = [p.grad.clone() for p in model.peers[1].parameters()]
    model.zero_grad()
    with torch.no_grad():
        zt = kdcl.soft_target(torch.stack([model.peers[0](x1), model.peers[1](x2)]), yb, variant, model.w)
    kdcl.kd(model.peers[1](x2), zt, 3.0).backward()  # lam = 1
    want = [p.grad for p in model.peers[1].parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want))


def test_kdcl_each_student_trains_on_its_own_view():
    model = _kdcl_model("minlogit")
    seen = {}
    for i, peer in enumerate(model.peers):
        peer.register_forward_pre_hook(lambda mod, inp, i=i: seen.__setitem__(i, inp[0]))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model((x1, x2), torch.tensor([0, 1, 2, 3]), torch.arange(4), 0)
    assert seen[0] is x1 and seen[1] is x2


# ---- kdcl: counts and structure (general's weights from the holdout)

def test_kdcl_general_on_epoch_computes_c_from_the_holdout_in_eval_mode(capsys):
    torch.manual_seed(0)
    model = _kdcl_model("general")
    with torch.no_grad():
        model.peers[1].fc.weight.mul_(20)  # untrained students predict alike and C is near singular
    assert model.holdout == 20 and model.views == 2
    assert _kdcl_model("minlogit").holdout == 0
    g = torch.Generator().manual_seed(0)
    hx = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    hy = torch.randint(0, 10, (20,), generator=g)
    hold = common.Loader(hx, hy, (0.5,) * 3, (0.25,) * 3, "cpu", 8, train=False)
    model.train()
    model.on_epoch(3, hold)
    assert model.training and all(m.training for m in model.modules())  # train mode restored
    assert "weights recomputed on 20 held-out images before epoch 4" in capsys.readouterr().out
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in hold.epoch()])
        E = [peer(x).softmax(1) - F.one_hot(hy, 10) for peer in model.peers]
    (a, b), (_, c) = [[(E[i] * E[j]).sum(1).mean().item() for j in range(2)] for i in range(2)]
    r = 1e-6 * (a + c) / 2  # the ridge
    w = [(c + r - b) / (a + c + 2 * r - 2 * b), (a + r - b) / (a + c + 2 * r - 2 * b)]
    assert model.w.tolist() == pytest.approx(w, rel=1e-4)
    model.on_epoch(0, None)  # --bench passes no holdout: the weights stay
    assert model.w.tolist() == pytest.approx(w, rel=1e-4)


# ---- kdcl: end to end

def test_kdcl_general_end_to_end_recomputes_the_weights(data, tmp_path, capsys):
    out = tmp_path / "g"
    run_main("kdcl", *TINY, "--variant", "general", "--val-size", 64, "--data-dir", data, "--epochs", 2,
             "--schedule", 1, "--out", out)
    text = capsys.readouterr().out
    assert "192 training images" in text  # 256 - 64 held out
    lines = [l for l in text.splitlines() if "weights recomputed on 64 held-out images" in l]
    assert len(lines) == 2 and "before epoch 1" in lines[0] and "before epoch 2" in lines[1]
    w = [float(v) for v in lines[1].split(":")[-1].split()[1::2]]
    assert sum(w) == pytest.approx(1, abs=1e-3)
    fin = read_final(out)
    assert set(fin["last"]) == {"peer1", "peer2", "ensemble"} and fin["deploy"] == "peer1"
    n = common.count_params(common.build_model("resnet8", 100))
    assert fin["params"] == {"peer1": n, "peer2": n, "ensemble": 2 * n}


@pytest.mark.parametrize("variant", ["naive", "linear", "minlogit", "general"])
def test_kdcl_loss_has_no_host_sync(monkeypatch, variant):
    calls = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **k:
                            calls.append(_name) or _real(self, *a, **k))
    Z, y = _kdcl_logits(m=3)
    kdcl.kdcl_loss(list(Z.requires_grad_()), y, 3.0, 1.0, variant, torch.tensor([0.5, 0.3, 0.2]))
    assert calls == []


# =================================================================================================
# 13. ONE (one.py)
# =================================================================================================

# ---- one: loss by hand

def test_one_teacher_is_the_gate_weighted_sum_on_fixed_tensors():
    g = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.5, 0.5]])
    z_e = one.teacher_logits([Z1, Z2, Z3], g)
    # sample 1: 0.25*[1,2,0.5] + 0.75*[2,-1,0] = [1.75, -0.25, 0.125]; sample 2: 0.5*[1.5,0.5,-0.5] + 0.5*[-2,1,1]
    assert torch.allclose(z_e, torch.tensor([[1.75, -0.25, 0.125], [-0.25, 0.75, 0.25]]))


def test_one_loss_matches_hand_computation():
    g = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    logits, T, w = [Z1, Z2, Z3], 3.0, 0.4
    total, terms = one.one_loss(logits, g, Y, T, w)
    ce, ce_e, kl = terms["ce"], terms["ce_e"], terms["kd"]
    z_e = torch.stack([0.2 * Z1[0] + 0.3 * Z2[0] + 0.5 * Z3[0], 0.6 * Z1[1] + 0.1 * Z2[1] + 0.3 * Z3[1]])
    assert ce.item() == pytest.approx(sum(_oneffl_ce(z, Y) for z in logits), rel=1e-5)
    assert ce_e.item() == pytest.approx(_oneffl_ce(z_e, Y), rel=1e-5)
    assert kl.item() == pytest.approx(w * sum(_oneffl_kd(z, z_e, T) for z in logits), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + ce_e.item() + kl.item(), rel=1e-6)


# ---- one: gradient flow

def test_one_kd_sends_no_gradient_into_teacher_or_gate_but_teacher_ce_does():
    # on leaf tensors: the KD gradient on z_i is T (p_i^T - p_e^T) / B, the gradient with z_e a constant
    logits = [z.clone().requires_grad_() for z in (Z1, Z2, Z3)]
    g = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], requires_grad=True)
    T = 3.0
    kl = one.one_loss(logits, g, Y, T, 1.0)[1]["kd"]
    kl.backward()
    assert g.grad is None or not g.grad.any()  # no path through the teacher into the gate
    z_e = one.teacher_logits([z.detach() for z in logits], g.detach())
    for z in logits:
        want = T * ((z.detach() / T).softmax(1) - (z_e / T).softmax(1)) / len(z)
        assert torch.allclose(z.grad, want, atol=1e-6)
    ce_e = one.one_loss(logits, g, Y, T, 1.0)[1]["ce_e"]
    ce_e.backward()
    assert g.grad.abs().sum() > 0

    # in the model: the gate's parameters get gradient from the teacher's CE only
    torch.manual_seed(0)
    m = one.ONE(method_args("one"), 10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, terms = m(x, y, None, 80)
    terms["kd"].backward()
    assert all(p.grad is None or not p.grad.any() for p in m.gate.parameters())
    assert m.branches[0].fc.weight.grad.abs().sum() > 0  # the students do learn from it
    m.zero_grad(set_to_none=True)
    _, terms = m(x, y, None, 80)
    terms["ce_e"].backward()
    assert m.gate[0].weight.grad.abs().sum() > 0 and m.gate[1].weight.grad.abs().sum() > 0


def test_one_rampup_scales_kd_through_the_loss():
    torch.manual_seed(0)
    m = one.ONE(method_args("one"), 10)
    with torch.no_grad():  # sharpen the branches so that KD is not lost in the fp32 rounding of the loss
        for b in m.branches:
            b.fc.weight.mul_(30)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    l0, t0 = m(x, y, None, 0)  # train-mode BN: the same batch gives the same logits at every epoch
    l80, t80 = m(x, y, None, 80)
    kd0, kd80 = (l0 - t0["ce"] - t0["ce_e"]).item(), (l80 - t80["ce"] - t80["ce_e"]).item()
    assert kd80 > 1 and kd0 / kd80 == pytest.approx(math.exp(-5), rel=1e-3)
    assert (t0["kd"] / t80["kd"]).item() == pytest.approx(math.exp(-5), rel=1e-5)
    assert m(x, y, None, 200)[0].item() == pytest.approx(l80.item(), rel=1e-6)  # flat after the ramp
    m.rampup = 0  # --rampup 0: full weight from the first epoch
    assert m(x, y, None, 0)[0].item() == pytest.approx(l80.item(), rel=1e-6)


# ---- one: counts and structure

def test_one_gate_weights_sum_to_one_and_follow_the_spec():
    torch.manual_seed(0)
    m = one.ONE(method_args("one"), 10).eval()  # eval: the fresh BN1d has running mean 0, var 1
    x = torch.randn(5, 3, 32, 32)
    h = m.trunk(x)
    g = m.gate_weights(h)
    assert g.shape == (5, 3) and (g >= 0).all()
    assert torch.allclose(g.sum(1), torch.ones(5))
    lin, bn = m.gate[0], m.gate[1]
    assert lin.in_features == h.shape[1] == 32 and lin.out_features == 3  # resnet8 stage-2 width
    hand = torch.relu((h.mean((2, 3)) @ lin.weight.t() + lin.bias) / math.sqrt(1 + bn.eps)).softmax(1)
    assert torch.allclose(g, hand, atol=1e-6)
    # the "ensemble" head is exactly that weighted sum of the branch heads
    heads = m.heads(x)
    assert set(heads) == {"branch1", "branch2", "branch3", "ensemble"}
    want = sum(g[:, i, None] * heads[f"branch{i + 1}"] for i in range(3))
    assert torch.allclose(heads["ensemble"], want, atol=1e-6)


def test_one_param_count_resnet32_is_trunk_plus_3_branches_plus_gate():
    m = one.ONE(method_args("one", arch="resnet32"), 100)
    net = common.build_model("resnet32", 100)
    trunk = common.count_params(*net.stages[:-1])
    branch = common.count_params(net.stages[-1], net.fc)
    # trunk: stem 3*16*9 + 2*16 = 464; stage1 5 x 2 x (16*16*9 + 32) = 23360;
    # stage2 (16*32*9 + 64) + (32*32*9 + 64) + (16*32 + 64) + 4 x 2 x (32*32*9 + 64) = 88768
    assert trunk == 464 + 23360 + 88768 == 112592
    # branch: stage3 (32*64*9 + 128) + (64*64*9 + 128) + (32*64 + 128) + 4 x 2 x (64*64*9 + 128) = 353664;
    # fc 64*100 + 100 = 6500
    assert branch == 353664 + 6500 == 360164
    gate = 32 * 3 + 3 + 2 * 3  # Linear(32, 3) + BatchNorm1d(3) weight and bias
    assert common.count_params(m) == trunk + 3 * branch + gate == 1193189
    assert common.count_params(m.trunk) == trunk and common.count_params(m.gate) == gate
    assert m.head_params() == {"branch1": 472756, "branch2": 472756, "branch3": 472756, "ensemble": 1193189}
    assert trunk + branch == common.count_params(net) == 472756  # a branch head costs the plain resnet32


# ---- one: end to end

def test_one_end_to_end(data, tmp_path):
    out = tmp_path / "r"
    run_main("one", *TINY, "--data-dir", data, "--epochs", 2, "--schedule", 1, "--out", out)
    fin = read_final(out)
    assert set(fin["last"]) == {"branch1", "branch2", "branch3", "ensemble"}
    assert fin["deploy"] == "branch1"
    m = one.ONE(method_args("one"), 100)
    assert fin["params"]["branch1"] == common.count_params(common.build_model("resnet8", 100))
    assert fin["params"]["ensemble"] == common.count_params(m)
    log = read_log(out)
    assert len(log) == 2
    for r in log:  # the logged terms add up to the loss (kd is logged ramped)
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["ce_e"]) + float(r["kd"]), rel=1e-4)
    assert float(log[0]["kd"]) < 0.05 * float(log[0]["ce_e"])  # exp(-5) ramp at epoch 0


# =================================================================================================
# 14. OKDDIP (okddip.py)
# =================================================================================================

def _okddip_model(arch="resnet8", nc=10, peers=3, seed=0, detach_targets=False):
    return method_model("okddip", nc, seed, arch=arch, peers=peers, detach_targets=detach_targets)


# ---- okddip: loss by hand (attention, targets, the loss on fixed tensors)

def test_okddip_attention_rows_sum_to_one_and_match_a_hand_computation():
    m = _okddip_model().eval()
    x, _ = small_batch(5)
    h = m.trunk(x)
    feats = [p(h, features=True)[1] for p in m.peers]
    alpha = m.attention_weights(feats)
    assert alpha.shape == (5, 3, 3) and (alpha > 0).all()
    assert torch.allclose(alpha.sum(-1), torch.ones(5, 3), atol=1e-6)  # every peer's weights sum to 1
    assert not torch.allclose(alpha[:, 0], alpha[:, 1])  # each peer its own weights
    # shared projections, no bias, C -> C // 8 (resnet8: 64 -> 8)
    assert m.query.weight.shape == m.key.weight.shape == (8, 64) and m.query.bias is None and m.key.bias is None
    # by hand in numpy: alpha_ab = exp(q_a . k_b) / sum_f exp(q_a . k_f), self included, no 1/sqrt(d)
    F_, Wq, Wk = (t.detach().numpy().astype(np.float64) for t in (torch.stack(feats, 1), m.query.weight, m.key.weight))
    for i in range(5):
        q, k = F_[i] @ Wq.T, F_[i] @ Wk.T
        for a in range(3):
            e = np.exp([q[a] @ k[b] for b in range(3)])
            assert np.allclose(alpha[i, a].detach().numpy(), e / e.sum(), atol=1e-5)


def test_okddip_peer_targets_are_the_attention_weighted_peer_logits():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(2, 4, generator=g) for _ in range(3)]
    alpha = torch.softmax(torch.randn(2, 3, 3, generator=g), -1)
    t = okddip.peer_targets(z, alpha)
    for i in range(2):
        for a in range(3):
            for c in range(4):
                want = sum(alpha[i, a, b].item() * z[b][i, c].item() for b in range(3))
                assert t[i, a, c].item() == pytest.approx(want, abs=1e-6)


# with HAND_Z (3 peers x 2 samples x 3 classes) and HAND_Y: the leader's logits, the attention weights
OKDDIP_LEADER = [[0.5, 0.5, -1.0], [1.0, 2.0, 0.0]]
OKDDIP_ALPHA = [[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.0, 0.25, 0.75]],
                [[1.0, 0.0, 0.0], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2]]]  # per sample, row a = peer a's weights


def _okddip_hand_kl(student, teacher, T, eps):
    """The official utils.KL_Loss by hand: T^2 sum_c (p_c + eps) log((p_c + eps) / q_c), row mean."""
    total = 0.0
    for s, t in zip(student, teacher):
        ps, pt = _hand_softmax(s, T), _hand_softmax(t, T)
        total += sum((a + eps) * math.log((a + eps) / b) for a, b in zip(pt, ps))
    return T * T * total / len(student)


@pytest.mark.parametrize("detach", [False, True])
def test_okddip_loss_matches_hand_computation(detach):
    """Official (default): 1e-7 added to every target's probabilities; --detach-targets: none."""
    T, w, eps = 3.0, 0.4, 0.0 if detach else 1e-7
    total, terms = okddip.okddip_loss([torch.tensor(z) for z in HAND_Z], torch.tensor(OKDDIP_LEADER), torch.tensor(OKDDIP_ALPHA),
                                      torch.tensor(HAND_Y), T, w, detach_targets=detach)
    # targets by hand: t_a[i][c] = sum_b alpha[i][a][b] * z_b[i][c]
    t = [[[sum(OKDDIP_ALPHA[i][a][b] * HAND_Z[b][i][c] for b in range(3)) for c in range(3)] for i in range(2)] for a in range(3)]
    mean = [[sum(HAND_Z[b][i][c] for b in range(3)) / 3 for c in range(3)] for i in range(2)]
    want = {"ce": sum(_hand_ce(z, HAND_Y) for z in HAND_Z), "ce_l": _hand_ce(OKDDIP_LEADER, HAND_Y),
            "kd": w * sum(_okddip_hand_kl(HAND_Z[a], t[a], T, eps) for a in range(3)),
            "kd_l": w * _okddip_hand_kl(OKDDIP_LEADER, mean, T, eps)}
    if detach:  # no epsilon: the plain KL of every other kd() in the project
        assert want["kd_l"] == pytest.approx(w * _hand_kd(OKDDIP_LEADER, mean, T), rel=1e-12)
    assert set(terms) == set(want)
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-5), k
    assert want["kd"] > 0.01 and want["kd_l"] > 0.01
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-5)  # loss = sum of the logged terms


# ---- okddip: gradient flow (on fixed tensors; which term trains which module; the official step rebuilt)

def test_okddip_peer_kd_gradient_treats_targets_as_constants_but_reaches_alpha():
    """--detach-targets, on leaf tensors: d kd / d z_a is w T (p_a^T - p^T(t_a)) / B, the gradient with
    t_a a constant (no gradient into the other peers through the targets); alpha gets gradient; kd_l
    reaches only the leader."""
    T, w = 3.0, 0.5
    z = [torch.tensor(v, requires_grad=True) for v in HAND_Z]
    lead = torch.tensor(OKDDIP_LEADER, requires_grad=True)
    alpha = torch.tensor(OKDDIP_ALPHA, requires_grad=True)
    _, terms = okddip.okddip_loss(z, lead, alpha, torch.tensor(HAND_Y), T, w, detach_targets=True)
    gz = torch.autograd.grad(terms["kd"], [*z, alpha, lead], allow_unused=True)
    t = torch.tensor(OKDDIP_ALPHA) @ torch.tensor(HAND_Z).transpose(0, 1)  # (B, m, C)
    for a in range(3):
        want = w * T * ((torch.tensor(HAND_Z[a]) / T).softmax(1) - (t[:, a] / T).softmax(1)) / 2
        assert torch.allclose(gz[a], want, atol=1e-6)
    assert gz[3].abs().sum() > 1e-4  # the attention learns through the targets
    assert gz[4] is None  # the leader is not in the peers' KD
    gl = torch.autograd.grad(terms["kd_l"], [*z, alpha, lead], allow_unused=True)
    assert all(g is None for g in gl[:4]) and gl[4].abs().sum() > 0  # the mean of the peers is a target only


def test_okddip_official_kd_gradient_flows_through_the_targets():
    """Default (official), on leaf tensors: the peers' KD and the leader's KD give every peer logit the
    gradient of the official KL_Loss with its target live, checked against a separate autograd of the
    formula written out (sum_c (p_c + 1e-7) (log(p_c + 1e-7) - log q_c)); the other peers and alpha get
    gradient through t_a, the peers through the leader's mean."""
    T, w = 3.0, 0.5
    z = [torch.tensor(v, requires_grad=True) for v in HAND_Z]
    lead = torch.tensor(OKDDIP_LEADER, requires_grad=True)
    alpha = torch.tensor(OKDDIP_ALPHA, requires_grad=True)
    _, terms = okddip.okddip_loss(z, lead, alpha, torch.tensor(HAND_Y), T, w)
    zs = torch.stack(z, 1)  # (B, m, C)

    def hand(student, target):
        p = torch.exp(target / T) / torch.exp(target / T).sum(1, keepdim=True) + 1e-7
        q = torch.exp(student / T) / torch.exp(student / T).sum(1, keepdim=True)
        return T * T * (p * (p.log() - q.log())).sum() / student.shape[0]

    t = torch.einsum("iab,ibc->iac", alpha, zs)
    want_kd = w * sum(hand(z[a], t[:, a]) for a in range(3))
    want_l = w * hand(lead, zs.mean(1))
    assert terms["kd"].item() == pytest.approx(want_kd.item(), rel=1e-5)
    assert terms["kd_l"].item() == pytest.approx(want_l.item(), rel=1e-5)
    for got, want in [(terms["kd"], want_kd), (terms["kd_l"], want_l)]:
        g1 = torch.autograd.grad(got, [*z, alpha, lead], allow_unused=True, retain_graph=True)
        g2 = torch.autograd.grad(want, [*z, alpha, lead], allow_unused=True, retain_graph=True)
        for a, b in zip(g1, g2):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    gz = torch.autograd.grad(terms["kd"], z)
    for a in range(3):  # not the constant-target gradient: t_a's own graph adds to it
        const = w * T * ((torch.tensor(HAND_Z[a]) / T).softmax(1) - (t[:, a].detach() / T).softmax(1)) / 2
        assert (gz[a] - const).abs().max() > 1e-3
    gl = torch.autograd.grad(terms["kd_l"], z)
    assert all(g.abs().sum() > 1e-4 for g in gl)  # the leader's KD moves every peer


def _okddip_grads(loss, modules):
    """{name: total |grad|} of each module's parameters for this loss alone (0 where none reaches)."""
    names = list(modules)
    params = [list(modules[n].parameters()) for n in names]
    flat = [p for ps in params for p in ps]
    gs = iter(torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True))
    out = {}
    for n, ps in zip(names, params):
        out[n] = sum(float(g.abs().sum()) if g is not None else 0.0 for g in (next(gs) for _ in ps))
    return out


@pytest.mark.parametrize("detach", [False, True])
def test_okddip_each_term_trains_its_modules_only(detach):
    """Official (default): the leader's KD also trains the peers (through the mean). --detach-targets:
    it trains the leader and the trunk only. The peers' KD trains every peer under both: the other peers
    through t_a (official) or, detached, each peer as its own student."""
    m = _okddip_model(detach_targets=detach)
    x, y = small_batch()
    _, terms = m(x, y, None, 80)
    mods = {"trunk": m.trunk, "peer1": m.peers[0], "peer2": m.peers[1], "peer3": m.peers[2],
            "leader": m.leader, "query": m.query, "key": m.key}
    peers = {"peer1", "peer2", "peer3"}
    expect = {"ce": {"trunk", *peers}, "ce_l": {"trunk", "leader"},
              "kd": {"trunk", *peers, "query", "key"}, "kd_l": {"trunk", "leader"} | (set() if detach else peers)}
    for term, trained in expect.items():
        g = _okddip_grads(terms[term], mods)
        assert {n for n, v in g.items() if v > 0} == trained, (term, g)


@pytest.mark.parametrize("detach", [False, True])
def test_okddip_one_peers_kd_trains_that_peer_and_the_projections_and_officially_the_other_peers(detach):
    """KL(t_1 || z_1) alone: peer 1 (student), the trunk, W_q and W_k; peers 2 and 3 (whose logits and
    features build t_1) get gradient in the official flow and nothing under --detach-targets; the
    leader never."""
    m = _okddip_model(detach_targets=detach)
    x, _ = small_batch()
    h = m.trunk(x)
    outs = [p(h, features=True) for p in m.peers]
    logits = [z for z, _, _ in outs]
    made_of = [z.detach() for z in logits] if detach else logits  # as okddip_loss builds them
    t = okddip.peer_targets(made_of, m.attention_weights([f for _, f, _ in outs]))
    kl1 = okddip.kl(logits[0], t[:, 0], 3.0)
    g = _okddip_grads(kl1, {"trunk": m.trunk, "peer1": m.peers[0], "peer2": m.peers[1], "peer3": m.peers[2],
                     "leader": m.leader, "query": m.query, "key": m.key})
    assert g["peer1"] > 0 and g["trunk"] > 0 and g["query"] > 0 and g["key"] > 0 and g["leader"] == 0.0
    if detach:
        assert g["peer2"] == g["peer3"] == 0.0
    else:
        assert g["peer2"] > 0 and g["peer3"] > 0


@pytest.mark.parametrize("detach", [False, True])
def test_okddip_attention_gradient_reaches_the_features_officially_and_only_the_projections_detached(detach):
    """--detach-targets: the peers' kd with alpha detached gives the peers and the trunk the very same
    gradient: the attention path ends at W_q, W_k (the features they read are detached). Official: the
    attention path also reaches the peers' last stages and the trunk through the live features."""
    m = _okddip_model(detach_targets=detach)
    with torch.no_grad():  # sharpen the classifiers: the attention path's share well above rounding
        for b in [*m.peers, m.leader]:
            b.fc.weight.mul_(10)
    x, y = small_batch()
    live = [*m.trunk.parameters(), *m.peers.parameters()]
    g1 = torch.autograd.grad(m(x, y, None, 80)[1]["kd"], live)
    real = m.attention_weights
    m.attention_weights = lambda feats: real(feats).detach()
    g2 = torch.autograd.grad(m(x, y, None, 80)[1]["kd"], live)
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g1, g2))
    assert same == detach
    assert any(a.abs().sum() > 0 for a in g1)


def _okddip_official_loss(m, x, y, detach, T=3.0, w=1.0):
    """DefangChen/OKDDip's step on the same modules, with plain torch ops: resnet_GL.py forward (lines
    195-240: q, k per peer from its pooled feature, cat, energy = bmm(q, k^T), softmax, x_m = bmm(logits,
    attention^T), logits stacked B x C x m) and train_GL.py lines 96-104 with utils.KL_Loss (softmax + 1e-7,
    nn.KLDivLoss batchmean, x T^2), --alpha 1. detach=True adds the three detaches of --detach-targets
    (peer logits in x_m, the features the projections read, the leader's mean) and drops the 1e-7."""
    h = m.trunk(x)
    pro, qs, ks = [], [], []
    for p in m.peers:
        z, f, _ = p(h, features=True)
        f = f.detach() if detach else f
        qs.append(m.query(f)[:, None, :])
        ks.append(m.key(f)[:, None, :])
        pro.append(z.unsqueeze(-1))
    pro, proj_q, proj_k = torch.cat(pro, -1), torch.cat(qs, 1), torch.cat(ks, 1)
    attention = F.softmax(torch.bmm(proj_q, proj_k.permute(0, 2, 1)), dim=-1)
    x_m = torch.bmm(pro.detach() if detach else pro, attention.permute(0, 2, 1))
    x_stu = m.leader(h)
    eps = 0.0 if detach else 10 ** (-7)

    def kl_loss(out, teacher):
        return T * T * torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(out / T, dim=1),
                                                                  F.softmax(teacher / T, dim=1) + eps)
    m_ = pro.shape[2]
    loss_true = sum(F.cross_entropy(pro[:, :, i], y) for i in range(m_))
    loss_group = sum(kl_loss(pro[:, :, i], x_m[:, :, i]) for i in range(m_))
    mean = torch.mean(pro, dim=2)
    return loss_true + F.cross_entropy(x_stu, y) + w * (loss_group + kl_loss(x_stu, mean.detach() if detach else mean))


def _okddip_param_grads(m, loss):
    names = [n for n, _ in m.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(m.parameters()))))


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("sharpen", [1.0, 10.0])
def test_okddip_every_gradient_equals_the_reconstructed_official_step(detach, sharpen):
    """Same weights, same batch: every parameter's gradient of the model's loss equals that of the
    official step rebuilt above (default) or of that step with the three detaches (--detach-targets),
    to 1e-5 of the parameter's largest gradient. sharpen: the classifiers' weights x10, confident
    logits where the KD terms weigh."""
    m = _okddip_model(detach_targets=detach)
    with torch.no_grad():
        for b in [*m.peers, m.leader]:
            b.fc.weight.mul_(sharpen)
    x, y = small_batch(8)
    got = _okddip_param_grads(m, m(x, y, None, 80)[0])  # epoch 80: w = 1
    want = _okddip_param_grads(m, _okddip_official_loss(m, x, y, detach))
    assert set(got) == set(want) and len(got) > 20
    for n in got:
        scale = want[n].abs().max()
        assert scale > 0, n
        assert (got[n] - want[n]).abs().max() <= 1e-5 * scale, (n, (got[n] - want[n]).abs().max() / scale)
    # at another ramp weight too
    got = _okddip_param_grads(m, m(x, y, None, 40)[0])
    want = _okddip_param_grads(m, _okddip_official_loss(m, x, y, detach, w=common.ramp_up(40, 80)))
    assert all((got[n] - want[n]).abs().max() <= 1e-5 * want[n].abs().max() for n in got)


def test_okddip_official_flow_differs_from_the_detached_one():
    """The two settings on the same weights and batch (relative L2 difference of each module's
    gradient): the trunk and every peer differ, the leader and W_q, W_k do not (their gradients do not
    pass through a detach; only the 1e-7 separates them). Numbers quoted in okddip.py's docstring."""
    def module_diffs(sharpen):
        gs = []
        for detach in (False, True):
            m = _okddip_model(detach_targets=detach)
            with torch.no_grad():
                for b in [*m.peers, m.leader]:
                    b.fc.weight.mul_(sharpen)
            x, y = small_batch(8)
            gs.append(_okddip_param_grads(m, m(x, y, None, 80)[0]))
        out = {}
        for mod in ["trunk", "peers.0", "peers.1", "peers.2", "leader", "query", "key"]:
            a, b = (torch.cat([v.flatten() for k, v in g.items() if k.startswith(mod + ".")]) for g in gs)
            out[mod] = ((a - b).norm() / b.norm()).item()
        return out
    d = module_diffs(1.0)  # as initialised: trunk ~2%, peers ~9-12%
    assert d["trunk"] > 0.01 and all(d[f"peers.{a}"] > 0.05 for a in range(3))
    assert d["leader"] < 1e-4 and d["query"] < 1e-4 and d["key"] < 1e-4
    d = module_diffs(10.0)  # confident logits: trunk ~17%, peers ~19-26%
    assert d["trunk"] > 0.1 and all(d[f"peers.{a}"] > 0.1 for a in range(3))
    assert d["leader"] < 1e-4 and d["query"] < 1e-4 and d["key"] < 1e-4


def test_okddip_official_flow_stays_finite_where_a_target_probability_underflows():
    """A target logit gap of 400 at T = 3: softmax gives an exact 0 in fp32. Through a live target,
    KL's gradient would be 0/0 there without the official 1e-7; with it every gradient is finite."""
    z = [torch.tensor([[0.0, 400.0, 0.0]], requires_grad=True) for _ in range(3)]
    lead = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    alpha = torch.full((1, 3, 3), 1 / 3, requires_grad=True)
    assert F.softmax(z[0] / 3, 1)[0, 0].item() == 0.0
    total, _ = okddip.okddip_loss(z, lead, alpha, torch.tensor([1]), 3.0, 1.0)
    total.backward()
    assert all(torch.isfinite(t.grad).all() for t in [*z, lead, alpha])
    no_eps = okddip.kl(lead, z[0], 3.0, eps=0.0)
    assert not torch.isfinite(torch.autograd.grad(no_eps, z[0])[0]).all()  # why the 1e-7 stays


def test_okddip_projections_change_under_sgd_without_weight_decay():
    m = _okddip_model()
    x, y = small_batch(8)
    q0, k0 = m.query.weight.clone(), m.key.weight.clone()
    opt = torch.optim.SGD(m.parameters(), lr=0.5, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        m(x, y, None, 80)[0].backward()
        opt.step()
    assert (m.query.weight - q0).abs().max() > 1e-6 and (m.key.weight - k0).abs().max() > 1e-6


def test_okddip_rampup_scales_both_kd_terms():
    m = _okddip_model()
    with torch.no_grad():  # sharpen the classifiers so that the KD terms are well above rounding
        for b in [*m.peers, m.leader]:
            b.fc.weight.mul_(30)
    x, y = small_batch()
    with torch.no_grad():  # train-mode BN, same batch: the same logits at every call
        full = m(x, y, None, 80)[1]
        for e in (0, 40, 200):
            terms = m(x, y, None, e)[1]
            for k in ("kd", "kd_l"):
                assert terms[k].item() == pytest.approx(common.ramp_up(e, 80) * full[k].item(), rel=1e-5)
            assert terms["ce"].item() == pytest.approx(full["ce"].item(), rel=1e-6)
    assert full["kd"] > 0.1 and full["kd_l"] > 0.1


# ---- okddip: counts and structure

def test_okddip_heads_ensemble_is_the_mean_of_the_peers():
    m = _okddip_model().eval()
    x, _ = small_batch()
    heads = m.heads(x)
    assert list(heads) == ["peer1", "peer2", "peer3", "leader", "ensemble"] and m.deploy == "leader"
    assert torch.allclose(heads["ensemble"], (heads["peer1"] + heads["peer2"] + heads["peer3"]) / 3, atol=1e-6)
    assert torch.allclose(heads["leader"], m.leader(m.trunk(x)), atol=1e-6)
    assert not torch.allclose(heads["leader"], heads["peer1"])  # independent branches


def test_okddip_param_counts_resnet32():
    m = _okddip_model("resnet32", 100)
    trunk, branch, proj = 112592, 360164, 2 * 64 * 8  # stem..stage2; stage3 + fc(64 -> 100); W_q, W_k
    assert common.count_params(m.trunk) == trunk and common.count_params(m.leader) == branch
    assert common.count_params(m.query, m.key) == proj == 1024
    assert common.count_params(m) == trunk + 4 * branch + proj == 1554272
    n = m.head_params()
    assert n["leader"] == n["peer1"] == n["peer3"] == common.count_params(common.build_model("resnet32", 100)) == 472756
    assert n["ensemble"] == trunk + 3 * branch


def test_okddip_param_counts_resnet110b():
    m = _okddip_model("resnet110b", 100)
    assert m.query.weight.shape == (32, 256)  # C // 8 for the Bottleneck's 256-wide feature
    assert m.head_params()["leader"] == common.count_params(common.build_model("resnet110b", 100)) == 1170868
    assert common.count_params(m) == 3874016


# ---- okddip: end to end

def test_okddip_detach_targets_option_reaches_the_model_default_off(monkeypatch, tmp_path):
    a = parsed_args("okddip", "--out", tmp_path / "r")
    assert a.detach_targets is False and okddip.OKDDip(a, 10).detach_targets is False
    a = parsed_args("okddip", "--detach-targets", "--out", tmp_path / "r")
    assert a.detach_targets is True and okddip.OKDDip(a, 10).detach_targets is True


def test_okddip_end_to_end_writes_every_head(okddip_run):
    fin = read_final(okddip_run)
    heads = {"peer1", "peer2", "peer3", "leader", "ensemble"}
    assert fin["deploy"] == "leader" and set(fin["last"]) == heads and set(fin["params"]) == heads
    assert fin["params"] == _okddip_model("resnet8", 100).head_params()
    assert fin["params"]["leader"] == common.count_params(common.build_model("resnet8", 100))
    log = read_log(okddip_run)
    assert len(log) == 2
    for r in log:  # the logged terms add up to the loss; KD terms are on
        parts = [float(r[k]) for k in ("ce", "ce_l", "kd", "kd_l")]
        assert float(r["loss"]) == pytest.approx(sum(parts), rel=1e-4) and min(parts) > 0
    assert fin["args"]["rampup"] == 1  # 80 x 2/300, at least 1: scaled with --epochs
    ck = common.load_checkpoint(os.path.join(okddip_run, "checkpoint.pt"))["model"]
    assert ck["query.weight"].shape == (8, 64) and "leader.fc.weight" in ck


@pytest.mark.parametrize("bad,msg", [(["--peers", 1], "argument --peers: 1 must be at least 2"),
                                     (["--arch", "resnet8,resnet14"], "give a single --arch"),
                                     (["--T", 0], "argument --T: 0.0 must be positive"),
                                     (["--rampup", -1], "argument --rampup: -1 must be non-negative")])
def test_okddip_bad_options_are_refused(bad, msg, small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main("okddip", *TINY, *bad, "--data-dir", small_data, "--out", tmp_path / "x")
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


# ---- okddip: resume

@pytest.mark.parametrize("stored, want", [(None, True), (False, False), (True, True)])
def test_okddip_resume_keeps_the_flow_the_run_started_with(monkeypatch, tmp_path, stored, want):
    """A run whose stored settings lack detach_targets trained with detached targets: --resume keeps
    them; a stored value stands."""
    out = tmp_path / "r"
    a = vars(parsed_args("okddip", "--out", out))
    a.pop("detach_targets")
    if stored is not None:
        a["detach_targets"] = stored
    out.mkdir()
    (out / "run.json").write_text(json.dumps({k: v for k, v in a.items() if k != "devices"}))
    assert parsed_args("okddip", "--out", out, "--resume").detach_targets is want


def test_okddip_resume_reproduces_an_uninterrupted_run(small_data, tmp_path, okddip_run):
    b = tmp_path / "b"
    args = [*SMALL_RUN, "--data-dir", small_data, "--out", b]
    r = run_cli("okddip", *args, "--halt-after", 1)
    assert r.returncode == 0 and "halted after epoch 1" in r.stdout, r.stderr[-2000:]
    assert len(read_log(b)) == 1 and not os.path.exists(b / "final.json")
    r = run_cli("okddip", *args, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_continued_after_epoch_1(r.stdout, b)
    wa = common.load_checkpoint(os.path.join(okddip_run, "checkpoint.pt"))["model"]
    wb = common.load_checkpoint(os.path.join(b, "checkpoint.pt"))["model"]
    assert set(wa) == set(wb) and "query.weight" in wa and "key.weight" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_final(okddip_run)["last"] == read_final(b)["last"]


# =================================================================================================
# 15. FFL (ffl.py)
# =================================================================================================

# ---- ffl: loss by hand

def test_ffl_loss_matches_hand_computation():
    logits, fused, T, w = [Z1, Z2], Z3, 3.0, 0.25
    total, terms = ffl.ffl_loss(logits, fused, Y, T, w)
    ce, ce_f, kl, fusion = terms["ce"], terms["ce_f"], terms["kd"], terms["fusion"]
    ens = (Z1 + Z2) / 2
    assert ce.item() == pytest.approx(_oneffl_ce(Z1, Y) + _oneffl_ce(Z2, Y), rel=1e-5)
    assert ce_f.item() == pytest.approx(_oneffl_ce(Z3, Y), rel=1e-5)
    assert kl.item() == pytest.approx(w * (_oneffl_kd(Z1, Z3, T) + _oneffl_kd(Z2, Z3, T)), rel=1e-5)
    assert fusion.item() == pytest.approx(w * _oneffl_kd(Z3, ens, T), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + ce_f.item() + kl.item() + fusion.item(), rel=1e-6)


# ---- ffl: gradient flow

def test_ffl_detach_semantics():
    torch.manual_seed(0)
    m = ffl.FFL(method_args("ffl", branches=2), 10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    no_grad = lambda mod: all(p.grad is None or not p.grad.any() for p in mod.parameters())
    # KD(branch <- fused): the fused classifier is a target, the fusion module gets nothing
    _, terms = m(x, y, None, 80)
    terms["kd"].backward()
    assert no_grad(m.fusion)
    assert all(b.fc.weight.grad.abs().sum() > 0 for b in m.branches)
    # KD(fused <- ensemble): the ensemble is a target, the branch classifiers get nothing; the
    # fusion module learns, and its input feature maps carry gradient into the branches (official)
    m.zero_grad(set_to_none=True)
    _, terms = m(x, y, None, 80)
    terms["fusion"].backward()
    assert all(no_grad(b.fc) for b in m.branches)
    assert m.fusion.fc.weight.grad.abs().sum() > 0
    assert all(b.stages[0][0].body[0][0].weight.grad.abs().sum() > 0 for b in m.branches)
    # the fused CE trains the fusion module, not the branch classifiers
    m.zero_grad(set_to_none=True)
    _, terms = m(x, y, None, 80)
    terms["ce_f"].backward()
    assert m.fusion.fc.weight.grad.abs().sum() > 0 and all(no_grad(b.fc) for b in m.branches)


def test_ffl_rampup_scales_both_kd_terms_through_the_loss():
    torch.manual_seed(0)
    m = ffl.FFL(method_args("ffl", branches=2), 10)
    with torch.no_grad():  # sharpen the classifiers so that KD is not lost in the fp32 rounding of the loss
        for fc in (m.branches[0].fc, m.branches[1].fc, m.fusion.fc):
            fc.weight.mul_(30)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    l0, t0 = m(x, y, None, 0)
    l80, t80 = m(x, y, None, 80)
    kd0, kd80 = (l0 - t0["ce"] - t0["ce_f"]).item(), (l80 - t80["ce"] - t80["ce_f"]).item()
    assert kd80 > 1 and kd0 / kd80 == pytest.approx(math.exp(-5), rel=1e-3)
    for k in ("kd", "fusion"):
        assert (t0[k] / t80[k]).item() == pytest.approx(math.exp(-5), rel=1e-5)


# ---- ffl: counts and structure

def test_ffl_fusion_param_count_resnet32_two_branches():
    m = ffl.FFL(method_args("ffl", arch="resnet32", branches=2), 100)
    N, C = 2, 64  # two branches, resnet32's last-stage width
    dw = N * C * 3 * 3            # depthwise 3x3, groups = N*C, no bias: 1152
    bn1 = 2 * N * C               # BatchNorm2d(128): 256
    pw = N * C * C                # 1x1 conv 128 -> 64, no bias: 8192
    bn2 = 2 * C                   # BatchNorm2d(64): 128
    fc = C * 100 + 100            # Linear(64, 100): 6500
    assert dw + bn1 + pw + bn2 + fc == 16228
    assert common.count_params(m.fusion) == 16228
    convs = [mod for mod in m.fusion.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.groups, c.bias) for c in convs] == [((3, 3), 128, None), ((1, 1), 1, None)]
    net = common.build_model("resnet32", 100)
    hp = m.head_params()
    assert hp["branch1"] == hp["branch2"] == common.count_params(net) == 472756
    assert hp["ensemble"] == 112592 + 2 * 360164
    assert hp["fused"] == 112592 + 2 * 353664 + 16228  # trunk + both last stages + fusion, no branch FC


def test_ffl_param_groups_carry_two_weight_decays():
    m = ffl.FFL(method_args("ffl", branches=3, fusion_wd=2e-5), 10)
    groups = m.param_groups(3e-4)
    assert [g["weight_decay"] for g in groups] == [3e-4, 2e-5]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[1] == {id(p) for p in m.fusion.parameters()}
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in m.parameters()}
    assert sum(len(i) for i in ids) == len(list(m.parameters()))


# ---- ffl: end to end (ONE's host syncs and refusals too)

def test_ffl_end_to_end(data, tmp_path):
    out = tmp_path / "r"
    run_main("ffl", *TINY, "--data-dir", data, "--epochs", 2, "--schedule", 1, "--out", out,
             "--wd", "3e-4", "--fusion-wd", "2e-5")
    fin = read_final(out)
    assert set(fin["last"]) == {"branch1", "branch2", "fused", "ensemble"}
    assert fin["deploy"] == "branch1"
    m = ffl.FFL(method_args("ffl", branches=2), 100)
    assert fin["params"] == m.head_params()
    assert fin["params"]["branch1"] == common.count_params(common.build_model("resnet8", 100))
    log = read_log(out)
    for r in log:
        parts = sum(float(r[k]) for k in ("ce", "ce_f", "kd", "fusion"))
        assert float(r["loss"]) == pytest.approx(parts, rel=1e-4)
    opt = common.load_checkpoint(os.path.join(out, "checkpoint.pt"))["opt"]
    assert [g["weight_decay"] for g in opt["param_groups"]] == [3e-4, 2e-5]
    assert len(opt["param_groups"][1]["params"]) == len(list(m.fusion.parameters()))


@pytest.mark.parametrize("script", ["one", "ffl"])
def test_oneffl_training_step_has_no_host_sync(script, monkeypatch, tmp_path):
    c = count_syncs_in_steps(monkeypatch, script, *TINY, "--batch-size", 8, "--bench", 2, "--out", tmp_path / "b")
    assert c["n"] == 0, c["what"]


@pytest.mark.parametrize("script,bad,msg", [("one", ["--branches", "1"], "argument --branches: 1 must be at least 2"),
                                            ("ffl", ["--branches", "1"], "argument --branches: 1 must be at least 2"),
                                            ("one", ["--arch", "resnet8,resnet14"], "give a single --arch"),
                                            ("ffl", ["--fusion-wd", "-1"], "argument --fusion-wd: -1.0 must be non-negative")])
def test_oneffl_bad_arguments_are_refused(script, bad, msg, data, tmp_path, capsys):
    assert_refused(script, [*TINY, "--data-dir", data, *bad], msg, tmp_path / "r", capsys)


# =================================================================================================
# 16. PCL (pcl.py)
# =================================================================================================

def _pcl_model(arch="resnet8", nc=10, peers=3):
    return method_model("pcl", nc, arch=arch, peers=peers, ema_decay=0.999)


def _pcl_views(m=3, B=4, nc=10):
    """m distinct views of a small batch; 16x16 images (the nets pool globally) keep the test fast."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(B, 3, 16, 16, generator=g) for _ in range(m)), torch.arange(B) % nc


def _pcl_split(model):
    live = [*model.trunk.parameters(), *model.peers.parameters()]
    mean = [*model.mean_trunk.parameters(), *model.mean_peers.parameters()]
    return live, mean


# ---- pcl: loss by hand

def _pcl_hand_kd(s, t, T):
    pt = torch.softmax(t / T, 1)
    return T * T * (pt * (torch.log(pt) - torch.log_softmax(s / T, 1))).sum(1).mean()


def test_pcl_loss_matches_hand_computation_and_peer_j_skips_its_own_mean_teacher():
    g = torch.Generator().manual_seed(0)
    m, B, C, T, w = 3, 4, 5, 3.0, 0.5
    logits = [torch.randn(B, C, generator=g, requires_grad=True) for _ in range(m)]
    z_e = torch.randn(B, C, generator=g, requires_grad=True)
    z_mean = [torch.randn(B, C, generator=g) * 2 for _ in range(m)]
    y = torch.tensor([0, 1, 2, 4])
    total, terms = pcl.pcl_loss(logits, z_e, z_mean, y, T, w)
    ce = sum(-torch.log_softmax(z, 1)[torch.arange(B), y].mean() for z in logits)
    ce_e = -torch.log_softmax(z_e, 1)[torch.arange(B), y].mean()
    kd_e = w * sum(_pcl_hand_kd(z, z_e, T) for z in logits)
    ema = w / 2 * sum(_pcl_hand_kd(logits[j], z_mean[l], T) for j in range(m) for l in range(m) if l != j)
    for name, want in [("ce", ce), ("ce_e", ce_e), ("kd", kd_e), ("ema", ema)]:
        assert terms[name].item() == pytest.approx(want.item(), rel=1e-5), name
    assert total.item() == pytest.approx((ce + ce_e + kd_e + ema).item(), rel=1e-5)
    # peer 1's loss holds KD from mean teachers 2 and 3 only: moving mean teacher 1 leaves its gradient alone
    g1 = torch.autograd.grad(total, logits)
    z_mean[0] = z_mean[0] + 3 * torch.randn(B, C, generator=g)
    total2, terms2 = pcl.pcl_loss(logits, z_e, z_mean, y, T, w)
    g2 = torch.autograd.grad(total2, logits)
    assert terms2["ema"].item() != pytest.approx(terms["ema"].item())
    assert torch.allclose(g1[0], g2[0], rtol=0, atol=1e-7)
    assert not torch.allclose(g1[1], g2[1]) and not torch.allclose(g1[2], g2[2])


# ---- pcl: gradient flow

def test_pcl_mean_teachers_get_no_gradient_and_no_optimizer_step():
    model = _pcl_model()
    live, mean = _pcl_split(model)
    assert all(not p.requires_grad for p in mean) and all(p.requires_grad for p in live)
    views, y = _pcl_views()
    loss, _ = model(views, y, None, 80)
    loss.backward()
    assert all(p.grad is None for p in mean)
    assert all(p.grad is not None for p in [*live, *model.ensemble.parameters()])
    before = [p.clone() for p in mean]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=5e-4)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, mean))  # only after_step moves them


def test_pcl_ensemble_ce_trains_peers_and_trunk_but_kd_does_not_reach_the_ensemble_linear():
    model = _pcl_model()
    views, y = _pcl_views()
    _, terms = model(views, y, None, 80)
    terms["kd"].backward(retain_graph=True)
    assert model.ensemble.weight.grad is None and model.ensemble.bias.grad is None  # z_e detached in KD
    assert all(p.fc.weight.grad.abs().sum() > 0 for p in model.peers)
    model.zero_grad(set_to_none=True)
    terms["ce_e"].backward()
    assert model.ensemble.weight.grad.abs().sum() > 0
    for peer in model.peers:  # the ensemble's CE reaches every peer's last stage (not its classifier)
        assert peer.fc.weight.grad is None
        assert sum(p.grad.abs().sum() for p in peer.stages.parameters()) > 0
    assert sum(p.grad.abs().sum() for p in model.trunk.parameters()) > 0


def test_pcl_peer_j_and_mean_teacher_j_see_view_j():
    model = _pcl_model()
    views, y = _pcl_views()
    seen = {}
    hooks = [mod.register_forward_pre_hook(lambda m, inp, key=(name, j): seen.__setitem__(key, inp[0].detach()))
             for name, mods in (("peer", model.peers), ("mean", model.mean_peers)) for j, mod in enumerate(mods)]
    model(views, y, None, 0)
    for h in hooks:
        h.remove()
    with torch.no_grad():  # train mode: batch statistics, so re-running the trunk gives the same features
        trunk = [model.trunk(v) for v in views]
        mean_trunk = [model.mean_trunk(v) for v in views]
    for j in range(3):
        for k in range(3):
            assert torch.allclose(seen["peer", j], trunk[k]) == (j == k)
            assert torch.allclose(seen["mean", j], mean_trunk[k]) == (j == k)


def test_pcl_rampup_is_the_80_epoch_sigmoid():
    """Both KD terms scale with common.ramp_up(e, 80); the re-implementation's bug gives ~0 at e = 2."""
    model = _pcl_model()
    views, y = _pcl_views()
    with torch.no_grad():  # train mode, same batch: the same logits at every call
        full = model(views, y, None, 80)[1]
        for e in (0, 2, 200):
            terms = model(views, y, None, e)[1]
            for name in ("kd", "ema"):
                assert terms[name].item() == pytest.approx(common.ramp_up(e, 80) * full[name].item(), rel=1e-5)
            assert terms["ce"].item() == pytest.approx(full["ce"].item(), rel=1e-6)


# ---- pcl: counts and structure (the mean teachers' EMA)

def test_pcl_ema_update_follows_the_formula():
    """a_t = min(1 - 1/(t+1), 0.999): t=0 copies, t=1 halves, t=2 weighs 2/3, late: 0.999. Hand-set weights."""
    model = _pcl_model()
    live, mean = _pcl_split(model)
    bn_before = {k: v.clone() for k, v in model.named_buffers() if k.startswith("mean_")}

    def set_all(params, value):
        with torch.no_grad():
            for p in params:
                p.fill_(value)

    with torch.no_grad():  # distinct weights everywhere: t = 0 copies each tensor to its own counterpart
        for i, p in enumerate(live):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    model.after_step()
    named = dict(model.named_parameters())  # mean_trunk.X <- trunk.X, mean_peers.X <- peers.X
    assert all(torch.equal(named["mean_" + k], p) for k, p in named.items() if k.startswith(("trunk.", "peers.")))
    set_all(mean, 7.0)
    for t, new, expect in [(0, 3.0, 3.0),                       # a_0 = 0: copy
                           (1, 1.0, 0.5 * 3 + 0.5 * 1),          # a_1 = 1/2 -> 2
                           (2, 5.0, 2 / 3 * 2 + 1 / 3 * 5),      # a_2 = 2/3 -> 3
                           (10_000, 4.0, 0.999 * 3 + 0.001 * 4)]:  # capped at 0.999 -> 3.001
        model.step.fill_(t)
        set_all(live, new)
        model.after_step()
        assert int(model.step) == t + 1
        assert all(torch.allclose(q, torch.full_like(q, expect), rtol=0, atol=1e-6) for q in mean), t
        assert all(torch.equal(p, torch.full_like(p, new)) for p in live)  # the live net is untouched
    # the mean teachers' BN buffers are theirs: the EMA update leaves them alone
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in bn_before.items())


def test_pcl_ema_horizon_keeps_its_fraction_of_training(monkeypatch):
    def decay(*argv, n):
        args = parsed_args("pcl", "--arch", "resnet8", *argv)
        model = pcl.PCL(args, 10)
        model.on_data(torch.zeros(n, dtype=torch.long))
        return model.decay, getattr(model, "resolved", {})
    d, resolved = decay(n=50_000)  # the protocol's run: the paper's 0.999
    assert d == pytest.approx(0.999) and resolved == {"ema_decay": 0.999}
    d, _ = decay("--epochs", 10, n=20_000)  # 10 x 157 steps = 1.34% of 117,300: a 13.4-step horizon
    assert d == pytest.approx(1 - 1 / (1000 * 10 * 157 / 117_300))
    d, resolved = decay("--epochs", 10, "--ema-decay", 0.99, n=20_000)  # given: it wins
    assert d == 0.99 and resolved == {}


@pytest.mark.parametrize("arch", ["resnet8", "resnet32"])
def test_pcl_head_params_mean1_is_the_backbone(arch):
    model = _pcl_model(arch, 100)
    n = model.head_params()
    backbone = common.count_params(common.build_model(arch, 100))
    assert n["mean1"] == n["mean2"] == n["peer1"] == backbone
    c = model.peers[0].fc.in_features
    trunk = common.count_params(model.trunk)
    fc = c * 100 + 100  # one peer classifier; the ensemble head uses the peers' features, not their classifiers
    assert n["ensemble"] == trunk + 3 * (backbone - trunk - fc) + 3 * c * 100 + 100
    assert not torch.equal(model.peers[0].fc.weight, model.peers[1].fc.weight)  # independent peers


# ---- pcl: end to end

def test_pcl_end_to_end_writes_every_head(pcl_run):
    fin = read_final(pcl_run)
    heads = {"peer1", "peer2", "peer3", "mean1", "mean2", "mean3", "ensemble"}
    assert fin["deploy"] == "mean1" and set(fin["last"]) == heads and set(fin["params"]) == heads
    assert fin["params"]["mean1"] == common.count_params(common.build_model("resnet8", 100))
    log = read_log(pcl_run)
    for r in log:  # the logged terms add up to the loss; KD terms are on
        parts = [float(r[k]) for k in ("ce", "ce_e", "kd", "ema")]
        assert float(r["loss"]) == pytest.approx(sum(parts), rel=1e-4) and min(parts) > 0
    ck = common.load_checkpoint(os.path.join(pcl_run, "checkpoint.pt"))["model"]
    assert int(ck["step"]) == 2 * 2  # 2 epochs x 32/16 steps
    assert not torch.equal(ck["mean_trunk.0.0.weight"], ck["trunk.0.0.weight"])  # an average, not a copy


def test_pcl_rejects_bad_options(small_data, tmp_path, capsys):
    for bad, msg in ((["--peers", 1], "argument --peers: 1 must be at least 2"),
                     (["--arch", "resnet8,resnet14"], "single --arch"),
                     (["--ema-decay", 1.0], "argument --ema-decay: 1.0 must lie in [0, 1)")):
        with pytest.raises(SystemExit) as e:
            run_main("pcl", *TINY, *bad, "--epochs", 1, "--schedule", "--data-dir", small_data, "--out", tmp_path / "x")
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


# ---- pcl: resume

def test_pcl_resume_restores_the_mean_teachers_exactly(small_data, tmp_path, pcl_run):
    b = tmp_path / "b"
    args = [*PCL_RUN, "--data-dir", small_data, "--out", b]
    run_main("pcl", *args, "--halt-after", 1)
    assert int(common.load_checkpoint(os.path.join(b, "checkpoint.pt"))["model"]["step"]) == 2
    run_main("pcl", *args, "--resume")
    wa = common.load_checkpoint(os.path.join(pcl_run, "checkpoint.pt"))["model"]
    wb = common.load_checkpoint(os.path.join(b, "checkpoint.pt"))["model"]
    keys = [k for k in wa if k.startswith("mean_") or k == "step"]
    assert len(keys) > 10 and any("running_mean" in k for k in keys)
    assert all(torch.equal(wa[k], wb[k]) for k in keys)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_final(pcl_run)["last"] == read_final(b)["last"]


# =================================================================================================
# 17. MCL (mcl.py)
# =================================================================================================

def _mcl_model(n_train=24, num_classes=10, branches=4, nce_k=8):
    model = method_model("mcl", num_classes, branches=branches, feat_dim=16, nce_k=nce_k, batch_size=8)
    labels = torch.arange(n_train) % num_classes
    model.on_data(labels)
    return model, labels


# ---- mcl: loss by hand

def test_mcl_nce_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(1)
    nb, N, D, B, K, T, eps = 3, 7, 5, 2, 3, 0.1, 1e-7
    memory = F.normalize(torch.randn(nb, N, D, generator=g), dim=2)
    emb = F.normalize(torch.randn(nb, B, D, generator=g), dim=2)
    idx = torch.tensor([4, 1])
    neg = torch.tensor([[0, 2, 2], [6, 3, 5]])
    got = mcl.nce_loss(memory, emb, idx, neg, T)
    total = 0.0
    for a in range(nb):
        for b in range(nb):
            if a == b:
                continue
            rows = [[int(idx[n])] + [int(j) for j in neg[n]] for n in range(B)]
            s = [[math.exp(float(memory[a, j] @ emb[b, n]) / T) for j in rows[n]] for n in range(B)]
            Z = sum(map(sum, s)) / (B * (K + 1)) * N
            pair = 0.0
            for n in range(B):
                P = [v / Z for v in s[n]]
                pair += math.log(P[0] / (P[0] + K / N + eps)) + sum(math.log((K / N) / (p + K / N + eps)) for p in P[1:])
            total += -pair / B
    assert got.item() == pytest.approx(total, rel=1e-5)
    # the bank receives no gradient, the embeddings do
    e = emb.clone().requires_grad_()
    mcl.nce_loss(memory, e, idx, neg, T).backward()
    assert e.grad.abs().sum() > 0


# ---- mcl: gradient flow

def test_mcl_dot_trains_only_the_last_branch():
    model, labels = _mcl_model()
    idx = torch.arange(8)
    model(torch.randn(8, 3, 32, 32), labels[idx], idx, 0)
    h = model.trunk(torch.randn(8, 3, 32, 32))
    logits = [b(h).float() for b in model.branches]
    model.zero_grad(set_to_none=True)
    mcl.dot_loss(logits, 3.0).backward()
    for b in model.branches[:-1]:
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in b.parameters())
    assert all(p.grad is not None for p in model.branches[-1].parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.trunk.parameters())
    # the hand formula: T^2 KL(softmax(mean/T) || softmax(last/T)), batch mean
    t = F.softmax(torch.stack(logits).mean(0) / 3, 1)
    ref = 9 * (t * (t.log() - F.log_softmax(logits[-1] / 3, 1))).sum(1).mean()
    assert mcl.dot_loss(logits, 3.0).item() == pytest.approx(ref.item(), rel=1e-5)


# ---- mcl: counts and structure (negatives, memory banks, heads)

def test_mcl_negatives_never_share_the_anchor_class():
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 2, 0, 1, 2, 0])  # uneven classes, unsorted
    order, start, count = mcl.class_table(labels, 4)                # class 3 is empty
    y = labels[torch.randint(0, len(labels), (400,))]
    neg = mcl.sample_negatives(y, 64, order, start, count)
    assert neg.shape == (400, 64)
    assert (labels[neg] != y[:, None]).all()
    # every image of another class is drawn, roughly uniformly: for class 0 anchors, 8 candidates
    drawn = neg[y == 0].flatten()
    assert set(drawn.tolist()) == set(torch.nonzero(labels != 0).flatten().tolist())
    freq = torch.bincount(drawn, minlength=len(labels))[labels != 0].float() / len(drawn)
    assert (freq - 1 / 8).abs().max() < 0.03


def test_mcl_bank_one_row_per_sample_and_update_touches_only_the_batch():
    model, labels = _mcl_model(n_train=24)
    assert model.memory.shape == (4, 24, 16)
    s = 1 / math.sqrt(16 / 3)
    assert model.memory.abs().max() <= s and model.memory.abs().max() > 0.8 * s
    assert "memory" in model.state_dict() and "order" not in model.state_dict()
    before = model.memory.clone()
    idx = torch.tensor([3, 17, 0, 9, 22, 5, 11, 14])
    x = torch.randn(8, 3, 32, 32)
    loss, terms = model(x, labels[idx], idx, 0)
    assert set(terms) == {"ce", "dot", "nce"}
    emb = model._stash[0].clone()
    model.after_step()
    after = model.memory
    assert torch.allclose(after[:, idx].norm(dim=2), torch.ones(4, 8), atol=1e-6)
    expect = F.normalize(0.5 * before[:, idx] + 0.5 * emb, dim=2)
    assert torch.allclose(after[:, idx], expect, atol=1e-6)
    rest = torch.ones(24, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(after[:, rest], before[:, rest])


def test_mcl_heads_and_params():
    model, _ = _mcl_model()
    model.eval()
    heads = model.heads(torch.randn(2, 3, 32, 32))
    assert list(heads) == ["branch1", "branch2", "branch3", "branch4", "ensemble"]
    assert torch.allclose(heads["ensemble"], torch.stack([heads[f"branch{k}"] for k in range(1, 5)]).mean(0))
    n = model.head_params()
    # a branch + the trunk is exactly one whole resnet8
    assert n["branch4"] == common.count_params(common.build_model("resnet8", 10))
    assert model.deploy == "branch4"


# ---- mcl: end to end and resume

def test_mcl_end_to_end_and_resume_restores_the_banks(tmp_path):
    small = fake_cifar(tmp_path / "data", n_train=128, n_test=64)  # 2 steps per epoch: 4 branches x 3 runs
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*TINY, "--data-dir", small, "--epochs", 2, "--schedule", 1]
    run_main("mcl", *args, "--out", a)
    fin = read_final(a)
    assert fin["deploy"] == "branch4"
    assert set(fin["last"]) == {"branch1", "branch2", "branch3", "branch4", "ensemble"}
    assert fin["params"]["branch4"] == common.count_params(common.build_model("resnet8", 100))
    log = read_log(a)
    assert all(float(r["nce"]) > 0 and float(r["dot"]) >= 0 for r in log)
    run_main("mcl", *args, "--out", b, "--halt-after", 1)
    assert not os.path.exists(b / "final.json")
    mem1 = common.load_checkpoint(os.path.join(b, "checkpoint.pt"))["model"]["memory"]
    run_main("mcl", *args, "--out", b, "--resume")
    wa, wb = (common.load_checkpoint(os.path.join(o, "checkpoint.pt"))["model"] for o in (a, b))
    assert wa["memory"].shape == (4, 128, 128)
    assert not torch.equal(wb["memory"], mem1)          # epoch 2 did update the restored banks
    assert torch.equal(wa["memory"], wb["memory"])       # bit-identical to the uninterrupted run
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# =================================================================================================
# 18. SOKD (sokd.py)
# =================================================================================================

def _sokd_model(path, arch="resnet8", teacher_arch=None, kd_teacher=0.0):
    return method_model("sokd", 100, None, teacher=path, arch=arch, teacher_arch=teacher_arch, kd_teacher=kd_teacher)


# ---- sokd: loss by hand

def _sokd_kd_by_hand(s, t, T):
    ps, pt = (s / T).softmax(1), (t / T).softmax(1)
    return T * T * (pt * (pt.log() - ps.log())).sum(1).mean()


def test_sokd_losses_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    z_a, z_t, z_s = (torch.randn(4, 5, generator=g) * 3 for _ in range(3))
    y = torch.tensor([0, 3, 1, 4])
    ce = lambda z: -z.log_softmax(1)[torch.arange(4), y].mean()
    total, terms = sokd.bridge_loss(z_a, z_t, z_s, y, 4.0)
    ce_b, kd_b = terms["ce_b"], terms["kd_b"]
    assert ce_b.item() == pytest.approx(ce(z_a).item(), rel=1e-5)
    by_hand = _sokd_kd_by_hand(z_a, z_t, 4) + _sokd_kd_by_hand(z_a, z_s, 4)
    assert kd_b.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert total.item() == pytest.approx(ce_b.item() + kd_b.item(), rel=1e-6)
    total, terms = sokd.student_loss(z_s, z_a, z_t, y, 4.0, 0.5)
    ce_s, kl, kl_t = terms["ce"], terms["kd"], terms["kd_t"]
    assert ce_s.item() == pytest.approx(ce(z_s).item(), rel=1e-5)
    assert kl.item() == pytest.approx(_sokd_kd_by_hand(z_s, z_a, 4).item(), rel=1e-5)
    assert kl_t.item() == pytest.approx(0.5 * _sokd_kd_by_hand(z_s, z_t, 4).item(), rel=1e-5)
    assert total.item() == pytest.approx(ce_s.item() + kl.item() + kl_t.item(), rel=1e-6)
    assert "kd_t" not in sokd.student_loss(z_s, z_a, z_t, y, 4.0, 0.0)[1]  # logged only when its weight is > 0


# ---- sokd: gradient flow

def test_sokd_frozen_teacher_is_bit_identical_after_training_steps(tmp_path):
    model = _sokd_model(fake_teacher(tmp_path / "t.pt"), kd_teacher=1.0)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    student0 = model.student.fc.weight.clone()
    model.train()
    assert model.training and model.student.training and model.bridge.training and not model.teacher.training
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 100, (4,), generator=g)
        loss, terms = model(x, y, None, 0)
        assert set(terms) == {"ce", "kd", "ce_b", "kd_b", "kd_t"}
        assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers (counts included)
    assert not torch.equal(student0, model.student.fc.weight)    # while the student did train


def test_sokd_each_module_gets_gradient_from_its_own_loss_only(tmp_path):
    model = _sokd_model(fake_teacher(tmp_path / "t.pt"), kd_teacher=1.0).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4,))

    def grads(term_names):
        model.zero_grad(set_to_none=True)
        _, terms = model(x, y, None, 0)
        sum(terms[n] for n in term_names).backward()
        has = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        return has(model.student), has(model.bridge), any(p.grad is not None for p in model.teacher.parameters())

    assert grads(["ce_b", "kd_b"]) == (False, True, False)      # z_S detached in the bridge's KD
    assert grads(["kd_b"]) == (False, True, False)
    assert grads(["ce", "kd", "kd_t"]) == (True, False, False)  # z_A detached in the student's KD
    assert grads(["kd"]) == (True, False, False)


# ---- sokd: counts and structure

@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8"])
def test_sokd_bridge_is_the_teachers_last_stage_and_classifier(tmp_path, arch):
    model = _sokd_model(fake_teacher(tmp_path / "t.pt", arch), arch="resnet8")
    t = model.teacher
    assert common.count_params(model.bridge) == common.count_params(t.stages[-1], t.fc)
    hp = model.head_params()
    assert hp == {"student": common.count_params(common.build_model("resnet8", 100)),
                  "teacher": common.count_params(t), "bridge": common.count_params(t)}
    # fresh init, not the teacher's weights
    assert not torch.equal(model.bridge.fc.weight, t.fc.weight)


# ---- sokd: end to end

def test_sokd_missing_teacher_is_a_clear_error_and_creates_no_run_folder(data, tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        run_main("sokd", *TINY, "--data-dir", data, "--teacher", tmp_path / "nope.pt", "--out", out)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "nope.pt" in err and "python baseline.py --arch wrn_40_2 --dataset cifar100" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_sokd_wrong_teacher_arch_or_dataset_is_a_clear_error(data, tmp_path, capsys):
    out = tmp_path / "r"
    path = fake_teacher(tmp_path / "t.pt", "resnet8")
    with pytest.raises(SystemExit) as e:
        run_main("sokd", *TINY, "--data-dir", data, "--teacher", path, "--teacher-arch", "wrn_16_1", "--out", out)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "resnet8" in err and "python baseline.py --arch wrn_16_1 --dataset cifar100" in err
    assert not out.exists()
    c10 = fake_teacher(tmp_path / "c10.pt", "resnet8", dataset="cifar10")
    with pytest.raises(SystemExit):
        run_main("sokd", *TINY, "--data-dir", data, "--teacher", c10, "--out", out)
    assert "python baseline.py --arch resnet8 --dataset cifar100" in capsys.readouterr().err
    assert not out.exists()


def test_sokd_end_to_end_with_a_baseline_teacher_and_export(tmp_path):
    data = fake_cifar(tmp_path / "cifar", n_train=128, n_test=64)  # half the shared fixture: three nets train here
    t_out, s_out = tmp_path / "teacher", tmp_path / "sokd"
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", t_out)
    run_main("sokd", *TINY, "--data-dir", data, "--teacher", t_out / "checkpoint.pt",
             "--epochs", 2, "--schedule", 1, "--out", s_out)
    fin, log = read_final(s_out), read_log(s_out)
    assert fin["deploy"] == "student" and set(fin["last"]) == {"student", "teacher", "bridge"}
    n = common.count_params(common.build_model("resnet8", 100))
    assert fin["params"] == {"student": n, "teacher": n, "bridge": n}
    assert fin["args"]["teacher_arch"] == "resnet8"
    assert {"ce", "kd", "ce_b", "kd_b"} <= set(log[0]) and "kd_t" not in log[0]
    # the teacher head is the frozen eval-mode baseline net: its accuracy never moves
    t_acc = read_final(t_out)["last"]["net"]
    assert [float(r["teacher"]) for r in log] == [t_acc, t_acc]
    ck = common.load_checkpoint(str(s_out / "checkpoint.pt"))["model"]
    base = common.load_checkpoint(str(t_out / "checkpoint.pt"))["model"]
    assert all(torch.equal(ck["teacher." + k[4:]], v) for k, v in base.items())
    # the exported improved teacher computes the bridge head and loads as a teacher
    exp = tmp_path / "improved.pt"
    net = sokd.export_improved_teacher(str(s_out), str(exp)).eval()
    model = _sokd_model(str(t_out / "checkpoint.pt"))
    model.load_state_dict(ck)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), model.heads(x)["bridge"], atol=1e-5)
        arch, loaded, _ = common.load_teacher(str(exp), "resnet8", "cifar100", 100)
        assert arch == "resnet8" and torch.allclose(loaded.eval()(x), model.heads(x)["bridge"], atol=1e-5)
        assert not torch.allclose(net(x), model.heads(x)["teacher"], atol=1e-3)


# ---- sokd_loss's terms

def test_sokd_student_loss_logs_kd_t_only_with_a_weight():
    total, terms = sokd.student_loss(Z1, Z2, Z3, Y, 4.0, 0.0)
    assert list(terms) == ["ce", "kd"] and torch.equal(total, terms["ce"] + terms["kd"])


# =================================================================================================
# 19. FFSD (ffsd.py)
# =================================================================================================

FFSD_TERMS = ["ce", "kd", "div", "sd", "ce_f", "fusion", "ce_l", "kd_l", "fuse_l", "trans_l", "sd_l", "dec"]
FFSD_WARMED = {"div", "sd", "fuse_l", "trans_l", "sd_l", "dec"}  # the terms carrying a lambda


def _ffsd_unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _ffsd_hand_at(xs, ys):
    """mean over samples and elements of (x/|x| - y/|y|)^2; xs, ys: lists of flat rows."""
    tot, cnt = 0.0, 0
    for x, y in zip(xs, ys):
        for a, b in zip(_ffsd_unit(x), _ffsd_unit(y)):
            tot += (a - b) ** 2
            cnt += 1
    return tot / cnt


def _ffsd_hand_attention(f):
    """f: (B, C, H, W) tensor -> list of rows: per position, the mean over channels of the squares."""
    rows = []
    for sample in f.tolist():
        flat = [sum(row, []) for row in sample]  # C lists of H*W
        rows.append([sum(c[p] ** 2 for c in flat) / len(flat) for p in range(len(flat[0]))])
    return rows


def _ffsd_hand_shift(a):
    """The official shift of one flat attention row: u = a/|a|, t = k-th smallest u, k = len/3."""
    n = math.sqrt(sum(v * v for v in a))
    u = [v / n for v in a]
    t = sorted(u)[max(1, len(u) // 3) - 1]
    return [uu if uu < t else n / 2 if uu == t else n - uu for uu in u], u, n


# ---- ffsd: loss by hand (the diversity target and the attention shift; the losses on fixed tensors)

def test_ffsd_shifted_attention_matches_a_hand_computation():
    a = torch.tensor([[1.0, 4.0, 2.0, 0.5, 3.0, 2.5], [3.0, 1.0, 2.0, 6.0, 5.0, 4.0]]).view(2, 1, 2, 3)
    target, u, n = ffsd.shifted_attention(a)
    n1, n2 = math.sqrt(36.5), math.sqrt(91.0)
    # HW = 6: the threshold is the 2nd smallest; below it u stays, at it n/2, above it n - u
    want = [[n1 / 2, n1 - 4 / n1, n1 - 2 / n1, 0.5 / n1, n1 - 3 / n1, n1 - 2.5 / n1],
            [n2 - 3 / n2, 1 / n2, n2 / 2, n2 - 6 / n2, n2 - 5 / n2, n2 - 4 / n2]]
    assert torch.allclose(target, torch.tensor(want), atol=1e-6)
    assert torch.allclose(n.view(-1), torch.tensor([n1, n2]))
    assert torch.allclose(u, a.view(2, 6) / torch.tensor([[n1], [n2]]))
    assert target.flatten().tolist() == pytest.approx(sum((_ffsd_hand_shift(r)[0] for r in a.view(2, 6).tolist()), []),
                                                  rel=1e-5, abs=1e-6)


def test_ffsd_shifted_attention_uses_at_least_one_position_on_tiny_maps():
    a = torch.tensor([[2.0, 1.0]]).view(1, 1, 1, 2)  # HW // 3 = 0: the official topk(0) would fail
    target, _, _ = ffsd.shifted_attention(a)
    n = math.sqrt(5.0)
    assert torch.allclose(target, torch.tensor([[n - 2 / n, n / 2]]))


def test_ffsd_shift_features_matches_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    f = torch.rand(2, 3, 2, 3, generator=g) * 2
    out = ffsd.shift_features(f)
    assert out.shape == f.shape
    for b, a in enumerate(_ffsd_hand_attention(f)):
        target, u, n = _ffsd_hand_shift(a)
        for c in range(3):
            flat = sum(f[b, c].tolist(), [])
            want = [v + (t - uu) * n / 3 for v, t, uu in zip(flat, target, u)]  # one shift per position, every channel
            assert sum(out[b, c].tolist(), []) == pytest.approx(want, rel=1e-5, abs=1e-6)
    f.requires_grad_()
    assert not ffsd.shift_features(f).requires_grad  # a target: detached


def test_ffsd_diversity_loss_matches_a_hand_computation_and_trains_only_the_current_student():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(2, 1, 3, 3, generator=g).requires_grad_()
    a_prev = torch.rand(2, 1, 3, 3, generator=g).requires_grad_()
    loss = ffsd.diversity_loss(a, a_prev)
    tot = 0.0
    for x, y in zip(a.view(2, 9).tolist(), a_prev.view(2, 9).tolist()):
        tot += sum((p - q) ** 2 for p, q in zip(_ffsd_unit(x), _ffsd_hand_shift(y)[0]))
    assert loss.item() == pytest.approx(tot / 18, rel=1e-5)
    loss.backward()
    assert a.grad.abs().sum() > 0 and a_prev.grad is None  # the previous student's attention is a target


def test_ffsd_at_sd_and_decoder_losses_match_hand_computations():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    rows = lambda t: t.flatten(1).tolist()
    assert ffsd.at_loss(x, y).item() == pytest.approx(_ffsd_hand_at(rows(x), rows(y)), rel=1e-5)
    a = ffsd.attention(x)
    assert a.shape == (2, 1, 2, 2) and a.flatten().tolist() == pytest.approx(sum(_ffsd_hand_attention(x), []), rel=1e-6)
    maps = [torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 4, 1, 1)]
    targets = [torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    sd = sum(_ffsd_hand_at(_ffsd_hand_attention(m), _ffsd_hand_attention(t)) for m, t in zip(maps, targets))
    assert ffsd.sd_loss(maps, targets).item() == pytest.approx(sd, rel=1e-5)
    rec = sum(_ffsd_hand_at(rows(d), rows(m)) + _ffsd_hand_at(_ffsd_hand_attention(d), _ffsd_hand_attention(m))
              for d, m in zip(targets, maps))
    assert ffsd.decoder_loss(targets, maps).item() == pytest.approx(rec, rel=1e-5)


def _ffsd_maps(g, B=2):
    return [torch.rand(B, 2, 4, 4, generator=g), torch.rand(B, 3, 2, 2, generator=g), torch.rand(B, 4, 1, 3)]


def test_ffsd_student_fusion_and_leader_losses_match_hand_computations():
    g = torch.Generator().manual_seed(6)
    T, l_div, l_fus = 2.0, 0.3, 7.0
    maps = [_ffsd_maps(g), _ffsd_maps(g)]
    sd_targets = [[torch.rand(2, 2, 4, 4, generator=g), torch.rand(2, 3, 2, 2, generator=g)]]
    t = ffsd.student_loss([Z1, Z2], maps, sd_targets, Y, T, l_div)[1]
    z1, z2, y = Z1.tolist(), Z2.tolist(), Y.tolist()
    assert t["ce"].item() == pytest.approx(_hand_ce(z1, y) + _hand_ce(z2, y), rel=1e-5)
    assert t["kd"].item() == pytest.approx(_hand_kd(z1, z2, T) + _hand_kd(z2, z1, T), rel=1e-5)  # / (M-1) = 1
    div = 0.0
    for x, p in zip(_ffsd_hand_attention(maps[1][-1]), _ffsd_hand_attention(maps[0][-1])):
        div += sum((a - b) ** 2 for a, b in zip(_ffsd_unit(x), _ffsd_hand_shift(p)[0])) / (len(x) * 2)
    assert t["div"].item() == pytest.approx(l_div * div, rel=1e-5)  # student 2 against student 1 only
    sd = sum(_ffsd_hand_at(_ffsd_hand_attention(m), _ffsd_hand_attention(s)) for m, s in zip(maps[1], sd_targets[0]))
    assert t["sd"].item() == pytest.approx(l_div * sd, rel=1e-5)  # weighted by l_div (official)

    f = ffsd.fusion_loss(Z3, [Z1, Z2], Y, T)[1]
    ens = ((Z1 + Z2) / 2).tolist()
    assert f["ce_f"].item() == pytest.approx(_hand_ce(Z3.tolist(), y), rel=1e-5)
    assert f["fusion"].item() == pytest.approx(_hand_kd(Z3.tolist(), ens, T), rel=1e-5)

    maps_l = _ffsd_maps(g)
    tf, f_f, cat = torch.rand(2, 8, 1, 3, generator=g), torch.rand(2, 4, 1, 3, generator=g), torch.rand(2, 8, 1, 3)
    sd_l = [torch.rand(2, 2, 4, 4, generator=g), torch.rand(2, 3, 2, 2, generator=g)]
    zl = Z1.flip(1)
    t = ffsd.leader_loss(zl, maps_l, tf, Z3, f_f, cat, sd_l, Y, T, l_fus)[1]
    assert t["ce_l"].item() == pytest.approx(_hand_ce(zl.tolist(), y), rel=1e-5)
    assert t["kd_l"].item() == pytest.approx(_hand_kd(zl.tolist(), Z3.tolist(), T), rel=1e-5)
    assert t["fuse_l"].item() == pytest.approx(
        l_fus * _ffsd_hand_at(_ffsd_hand_attention(maps_l[-1]), _ffsd_hand_attention(f_f)), rel=1e-5)
    assert t["trans_l"].item() == pytest.approx(l_fus * _ffsd_hand_at(_ffsd_hand_attention(tf), _ffsd_hand_attention(cat)), rel=1e-5)
    sd = sum(_ffsd_hand_at(_ffsd_hand_attention(m), _ffsd_hand_attention(s)) for m, s in zip(maps_l, sd_l))
    assert t["sd_l"].item() == pytest.approx(l_fus * sd, rel=1e-5)


# ---- ffsd: gradient flow (which modules each term trains, the joint step against the official separate steps)

def test_ffsd_mutual_kd_sends_no_gradient_into_the_target_student():
    # on leaf logits: KD(z_1 <- z_2) + KD(z_2 <- z_1) gives z_i exactly T (p_i^T - p_j^T) / B, the gradient
    # with the other student a constant (no extra gradient from being the other's target)
    g = torch.Generator().manual_seed(7)
    logits = [Z1.clone().requires_grad_(), Z2.clone().requires_grad_()]
    T = 2.0
    ffsd.student_loss(logits, [_ffsd_maps(g), _ffsd_maps(g)], [[m for m in _ffsd_maps(g)[:2]]], Y, T, 0.0)[1]["kd"].backward()
    for z, other in ((logits[0], Z2), (logits[1], Z1)):
        want = T * ((z.detach() / T).softmax(1) - (other / T).softmax(1)) / 2
        assert torch.allclose(z.grad, want, atol=1e-6)


def _ffsd_parts(m):
    return {"student1": m.students[0], "student2": m.students[1], "leader": m.leader, "fusion": m.fusion,
            "trans_fusion": m.trans_fusion, "decoder2": m.decoders[0], "decoder_l": m.decoders[1]}


def _ffsd_trained(m):
    return {k for k, mod in _ffsd_parts(m).items() if any(p.grad is not None and p.grad.abs().sum() > 0
                                                     for p in mod.parameters())}


FFSD_TRAINS = {"ce": {"student1", "student2"}, "kd": {"student1", "student2"}, "div": {"student2"},
               "sd": {"student2"}, "ce_f": {"fusion"}, "fusion": {"fusion"}, "ce_l": {"leader"}, "kd_l": {"leader"},
               "fuse_l": {"leader"}, "trans_l": {"leader", "trans_fusion"}, "sd_l": {"leader"},
               "dec": {"decoder2", "decoder_l"}}


@pytest.mark.parametrize("term", FFSD_TERMS)
def test_ffsd_each_term_trains_exactly_its_modules(term):
    m = method_model("ffsd")
    x, y = small_batch()
    loss, terms = m(x, y, None, 10)
    assert list(terms) == FFSD_TERMS
    assert torch.allclose(loss, sum(terms.values()))
    terms[term].backward()
    assert _ffsd_trained(m) == FFSD_TRAINS[term]
    if term in ("div", "sd"):  # student 2's own maps: its classifier gets nothing
        assert m.students[1].fc.weight.grad is None or not m.students[1].fc.weight.grad.any()
    if term == "sd":  # the decoder's targets reach stage 1 and 2 (the shallow maps), not the last stage
        assert m.students[1].stages[1][0].body[0][0].weight.grad.abs().sum() > 0
        last = m.students[1].stages[-1][0].body[0][0].weight.grad
        assert last is None or not last.any()


def test_ffsd_joint_backward_equals_the_official_separate_backward_passes():
    """Official: one backward per group (students, fusion, leader, decoders), each into its own optimizer.
    Each group's loss reaches only its own parameters, so the joint backward gives every parameter the
    gradient of its own group. (Within the students, each student's loss reaches only that student: the
    per-term test above and the mutual-KD test on leaf logits.)"""
    m = method_model("ffsd")
    x, y = small_batch()
    state = copy.deepcopy(m.state_dict())  # every forward starts from the same BN statistics
    groups = {"students": (["ce", "kd", "div", "sd"], [m.students]), "fusion": (["ce_f", "fusion"], [m.fusion]),
              "leader": (["ce_l", "kd_l", "fuse_l", "trans_l", "sd_l"], [m.leader, m.trans_fusion]),
              "decoders": (["dec"], [m.decoders])}
    assert sorted(k for ks, _ in groups.values() for k in ks) == sorted(FFSD_TERMS)

    def grads():
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}

    loss, _ = m(x, y, None, 10)
    loss.backward()
    joint = grads()
    for name, (keys, owners) in groups.items():
        m.zero_grad(set_to_none=True)
        m.load_state_dict(state)
        _, t = m(x, y, None, 10)
        sum(t[k] for k in keys).backward()
        mine = {id(p) for mod in owners for p in mod.parameters()}
        for n, p in m.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if id(p) in mine:
                assert torch.allclose(g, joint[n], rtol=1e-4, atol=1e-9), n
            else:
                assert not g.any(), f"{name}'s loss reaches {n}"
    assert all(g.any() for g in joint.values())  # every parameter is trained by something (DDP needs it)


def test_ffsd_warmup_scales_the_three_lambdas_from_epoch_one():
    m = method_model("ffsd")
    x, y = small_batch()
    state = copy.deepcopy(m.state_dict())

    def terms(epoch, warmup=5):
        m.load_state_dict(state)
        m.warmup = warmup
        return m(x, y, None, epoch)[1]

    t0, t4, t9, off = terms(0), terms(4), terms(9), terms(0, warmup=0)
    for k in FFSD_TERMS:
        if k in FFSD_WARMED:  # official e = 1 for the loop's epoch index 0: exp(-5 (1 - 1/5)^2) = exp(-3.2)
            assert (t0[k] / t4[k]).item() == pytest.approx(math.exp(-3.2), rel=1e-4), k
            assert (terms(2)[k] / t4[k]).item() == pytest.approx(math.exp(-5 * 0.4 ** 2), rel=1e-4), k
        else:
            assert t0[k].item() == pytest.approx(t4[k].item(), rel=1e-6), k
        assert t9[k].item() == pytest.approx(t4[k].item(), rel=1e-6) == pytest.approx(off[k].item(), rel=1e-6)


def test_ffsd_decoder_targets_come_from_eval_mode_before_the_training_pass():
    m = method_model("ffsd")
    x, y = small_batch()
    with torch.no_grad():
        m.decoders[0][0][1].running_mean.fill_(0.5)  # a BN state that eval mode would use
        m.decoders[1][0][1].running_mean.fill_(0.5)
    calls = []
    hook = lambda mod, inp, out: calls.append(mod.training)
    h = m.decoders[0][0][1].register_forward_hook(hook)
    m(x, y, None, 10)
    h.remove()
    assert calls == [False, True]  # the target pass first, in eval mode; then the training pass
    assert m.decoders.training  # left in training mode
    assert not torch.allclose(m.decoders[0][0][1].running_mean, torch.full_like(m.decoders[0][0][1].running_mean, 0.5))


# ---- ffsd: counts and structure (sizes, backbones, optimizers)

def test_ffsd_param_counts_resnet32_cifar100():
    m = method_model("ffsd", nc=100, arch="resnet32")
    # fusion: depthwise 3x3 on 128 (1152) + BN (256) + 1x1 128->64 (8192) + BN (128) + FC 64*100+100 (6500)
    assert common.count_params(m.fusion) == 1152 + 256 + 8192 + 128 + 6500 == 16228
    # trans-fusion: depthwise 3x3 on 64 (576) + BN (128) + 1x1 64->128 (8192) + BN (256)
    assert common.count_params(m.trans_fusion) == 576 + 128 + 8192 + 256 == 9152
    # decoder: ConvT 64->32 3x3 (18432) + BN (64) + ConvT 32->16 (4608) + BN (32)
    assert [common.count_params(d) for d in m.decoders] == [18432 + 64 + 4608 + 32] * 2 == [23136, 23136]
    assert common.count_params(m.leader) == 472756
    hp = m.head_params()
    assert hp == {"student1": 472756, "student2": 472756, "fused": 2 * (472756 - 6500) + 16228, "leader": 472756,
                  "ensemble": 2 * 472756}
    convs = [c for c in m.decoders[0].modules() if isinstance(c, torch.nn.ConvTranspose2d)]
    assert [(c.stride, c.output_padding) for c in convs] == [((2, 2), (1, 1))] * 2


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8", "densenet40_12", "mobilenetv2", "resnet8x4"])
def test_ffsd_decoders_rebuild_every_shallow_map_of_other_backbones(arch):
    m = method_model("ffsd", arch=arch, students=3)
    assert len(m.decoders) == 3 and m.fusion.fc.in_features == m.leader.fc.in_features
    with torch.no_grad():
        _, maps = ffsd.stage_maps(m.leader.eval(), torch.randn(2, 3, 32, 32))
        outs = ffsd.decode(m.decoders[0].eval(), maps[-1])
        assert [o.shape for o in outs] == [f.shape for f in maps[:-1]]
        assert m.trans_fusion(maps[-1]).shape[1] == 3 * maps[-1].shape[1]


def test_ffsd_a_stage_that_shrinks_more_than_twice_is_refused_in_one_line():
    with pytest.raises(ValueError, match="keep or halve the resolution"):
        ffsd.make_decoder([(16, 32), (32, 8)])


def test_ffsd_param_groups_leave_the_decoders_to_adam():
    m = method_model("ffsd", fusion_wd=2e-5)
    groups = m.param_groups(3e-4)
    assert [g["weight_decay"] for g in groups] == [3e-4, 2e-5]
    sgd = {id(p) for g in groups for p in g["params"]}
    dec = {id(p) for p in m.decoders.parameters()}
    assert not sgd & dec and sgd | dec == {id(p) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in m.fusion.parameters()}
    adam = m.extra_optimizer()
    assert isinstance(adam, torch.optim.Adam)
    assert {id(p) for g in adam.param_groups for p in g["params"]} == dec
    assert adam.param_groups[0]["lr"] == 1e-3 and adam.param_groups[0]["weight_decay"] == 1e-4


def test_ffsd_one_step_moves_the_decoders_by_adam_not_sgd():
    m = method_model("ffsd", decoder_wd=0.0, fusion_wd=0.0)  # no decay: a step is the gradient's alone
    x, y = small_batch()
    sgd = torch.optim.SGD(m.param_groups(0.0), lr=0.1, momentum=0.9)
    adam = m.extra_optimizer()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    common.train_step(m, m, [sgd, adam], x, y, None, 10, False)
    for n, p in m.named_parameters():
        d = (p.detach() - before[n]).abs()
        g = p.grad.abs()
        if n.startswith("decoders."):  # Adam's first step: lr * g / (|g| + eps), |step| = lr wherever g >> eps
            big = g > 1e-6
            assert big.any() and torch.allclose(d[big], torch.full_like(d[big], 1e-3), rtol=1e-2)
        else:  # SGD: lr * g
            assert torch.allclose(d, 0.1 * g, rtol=1e-3, atol=1e-6), n
    assert len(adam.state) == len(list(m.decoders.parameters()))
    assert all(p not in sgd.state or not sgd.state[p] for p in m.decoders.parameters())


def test_ffsd_decoder_lr_follows_the_sgd_schedule():
    m = method_model("ffsd", schedule=[2, 4], epochs=6)
    adam = m.extra_optimizer()
    got = []
    for e in range(6):
        m.on_epoch(e, None)
        got.append(adam.param_groups[0]["lr"])
    assert got == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    m = method_model("ffsd", epochs=4, cosine=True)
    adam = m.extra_optimizer()
    m.on_epoch(2, None)
    assert adam.param_groups[0]["lr"] == pytest.approx(0.5e-3)


# ---- ffsd: end to end

def test_ffsd_end_to_end(data, tmp_path):
    out = tmp_path / "r"
    run_main("ffsd", *TINY, "--batch-size", 32, "--data-dir", data, "--epochs", 2, "--schedule", 1, "--out", out,
             "--wd", "3e-4", "--fusion-wd", "2e-5")
    fin = read_final(out)
    assert set(fin["last"]) == {"student1", "student2", "fused", "leader", "ensemble"}
    assert fin["deploy"] == "leader"
    m = method_model("ffsd", nc=100)
    assert fin["params"] == m.head_params()
    assert fin["params"]["leader"] == common.count_params(common.build_model("resnet8", 100))
    assert fin["args"]["warmup"] == 1  # 5 of 300 epochs, scaled to 2 epochs: at least 1
    log = read_log(out)
    assert len(log) == 2
    for r in log:  # the logged terms add up to the loss
        assert float(r["loss"]) == pytest.approx(sum(float(r[k]) for k in FFSD_TERMS), rel=1e-4)
    ck = common.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert [g["weight_decay"] for g in ck["opt"]["param_groups"]] == [3e-4, 2e-5]
    n_sgd = sum(len(g["params"]) for g in ck["opt"]["param_groups"])
    n_dec = len(list(m.decoders.parameters()))
    assert n_sgd == len(list(m.parameters())) - n_dec
    adam = ck["opt_extra"]
    assert len(adam["state"]) == n_dec and all("exp_avg_sq" in s for s in adam["state"].values())
    assert adam["param_groups"][0]["lr"] == pytest.approx(1e-4)  # x0.1 at the milestone, like SGD
    assert adam["param_groups"][0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("bad,msg", [(["--students", "1"], "argument --students: 1 must be at least 2"),
                                     (["--arch", "resnet8,resnet14"], "give a single --arch"),
                                     (["--lambda-div", "-1"], "argument --lambda-div: -1.0 must be non-negative"),
                                     (["--decoder-lr", "0"], "argument --decoder-lr: 0.0 must be positive"),
                                     (["--fusion-wd", "-0.5"], "argument --fusion-wd: -0.5 must be non-negative")])
def test_ffsd_bad_arguments_are_refused(bad, msg, data, tmp_path, capsys):
    assert_refused("ffsd", [*TINY, "--data-dir", data, *bad], msg, tmp_path / "r", capsys)


# ---- ffsd: resume

def test_ffsd_resume_reproduces_an_uninterrupted_run(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*TINY, "--batch-size", 32, "--data-dir", data, "--epochs", 2, "--schedule", 1]
    run_main("ffsd", *args, "--out", a)
    # the interrupted run in its own processes: common.py locks a run folder for a process's whole life
    r = run_cli("ffsd", *args, "--out", b, "--halt-after", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_log(b)) == 1 and not os.path.exists(b / "final.json")
    r = run_cli("ffsd", *args, "--out", b, "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr[-2000:]
    ca, cb = (common.load_checkpoint(os.path.join(o, "checkpoint.pt")) for o in (a, b))
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    sa, sb = ca["opt_extra"]["state"], cb["opt_extra"]["state"]  # the decoders' Adam moments too
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
    assert read_final(a)["last"] == read_final(b)["last"]


# =================================================================================================
# 20. OECKD (oeckd.py, OEC-KD)
# =================================================================================================

OECKD_PARAMS = {  # METHODS.md section 12: CIFAR-100 students, the shared stem included in each
    "resnet32": [472756, 298240, 168952, 73895, 18915],
    "resnet110": [1736564, 1091396, 613708, 264501, 64233]}
OECKD_WIDTHS = [[16, 32, 64], [12, 25, 51], [9, 19, 38], [6, 12, 25], [3, 6, 12]]


# ---- oeckd: loss by hand

@pytest.mark.parametrize("T,w", [(2.0, (0.7, 0.15, 0.15)), (3.0, (1.0, 0.5, 2.0))])
def test_oeckd_loss_matches_hand_computation(T, w):
    feat = 0.8
    z_e = [[sum(z[i][c] for z in HAND_Z) / 3 for c in range(3)] for i in range(2)]  # mean logits
    ce = w[0] * sum(_hand_ce(z, HAND_Y) for z in HAND_Z)
    kl = w[2] * sum(_hand_kd(z, z_e, T) for z in HAND_Z)  # every student, the full-size one included
    total, terms = oeckd.oeckd_loss([torch.tensor(z) for z in HAND_Z], torch.tensor(feat), torch.tensor(HAND_Y), T, *w)
    ce_t, feat_t, kl_t, ce_e = terms["ce"], terms["feat"], terms["kd"], terms["ce_e"]
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert feat_t.item() == pytest.approx(w[1] * feat, rel=1e-6)
    assert total.item() == pytest.approx(ce + w[1] * feat + kl, rel=1e-5)
    assert ce_e.item() == pytest.approx(_hand_ce(z_e, HAND_Y), rel=1e-5)  # logged only


def test_oeckd_feature_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    widths = [[2, 3], [1, 2], [1, 1]]  # 3 students, 2 stages; student 1 first
    maps = [[torch.randn(1, c, 2, 1, generator=g) for c in w] for w in widths]
    torch.manual_seed(0)
    adapters = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Conv2d(c, c1, 1) for c, c1 in zip(w, widths[0]))
                                   for w in widths[1:])
    hand = 0.0
    for k in (1, 2):
        for b in (0, 1):
            conv = adapters[k - 1][b]
            W, bias = conv.weight[:, :, 0, 0].tolist(), conv.bias.tolist()
            f, t = maps[k][b][0, :, :, 0].tolist(), maps[0][b][0, :, :, 0].tolist()  # [channel][row]
            sq = [(sum(W[o][i] * f[i][r] for i in range(len(f))) + bias[o] - t[o][r]) ** 2
                  for o in range(len(t)) for r in range(2)]
            hand += sum(sq) / len(sq)  # MSE: the mean over every element
    assert oeckd.feature_loss(maps, adapters).item() == pytest.approx(hand, rel=1e-5)


# ---- oeckd: gradient flow

def _oeckd_parts(m):
    return {"stem": m.stem, **{f"student{k + 1}": s for k, s in enumerate(m.students)},
            **{f"adapters{k + 2}": a for k, a in enumerate(m.adapters)}}


@pytest.mark.parametrize("term,trains", [
    ("ce", {"stem", "student1", "student2", "student3", "student4", "student5"}),
    ("kd", {"stem", "student1", "student2", "student3", "student4", "student5"}),
    ("feat", {"stem", "student2", "student3", "student4", "student5",
              "adapters2", "adapters3", "adapters4", "adapters5"})])
def test_oeckd_each_term_trains_exactly_its_modules(term, trains):
    """CE and KD reach every student (student 1 too) and the stem; the feature MSE trains the adapters and
    students 2..5 (and through them the stem), never student 1, whose maps are its detached target."""
    m = method_model("oeckd")
    x, y = small_batch()
    loss, terms = m(x, y, None, 0)
    terms[term].backward()
    got = {n for n, mod in _oeckd_parts(m).items()
           if any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())}
    assert got == trains
    assert not terms["ce_e"].requires_grad  # the ensemble's CE is logged, not trained
    assert loss.item() == pytest.approx(sum(terms[k].item() for k in ("ce", "feat", "kd")), rel=1e-6)


def test_oeckd_kd_reaches_each_student_from_its_own_term_only():
    """Student k's logits get the gradient of KD(z_k <- z_e) with z_e a constant: nothing through the ensemble."""
    m = method_model("oeckd")
    x, y = small_batch()
    h = m.stem(x)
    logits = [oeckd.stage_maps(s, h)[0] for s in m.students]
    kl = oeckd.oeckd_loss(logits, torch.zeros(()), y, 2.0, 0.0, 0.0, 1.0)[1]["kd"]
    grads = torch.autograd.grad(kl, logits)
    z_e = torch.stack(logits).mean(0).detach()
    for k, z in enumerate(logits):
        zk = z.detach().requires_grad_()
        (g,) = torch.autograd.grad(oeckd.kd(zk, z_e, 2.0), zk)
        assert g.abs().sum() > 0 and torch.allclose(grads[k], g, atol=1e-7), k


def test_oeckd_feature_loss_sends_nothing_into_student1s_maps():
    m = method_model("oeckd")
    x, _ = small_batch()
    h = m.stem(x)
    maps = [oeckd.stage_maps(s, h)[1] for s in m.students]
    g = torch.autograd.grad(oeckd.feature_loss(maps, m.adapters), maps[0] + maps[1], allow_unused=True)
    assert all(t is None for t in g[:3]) and all(t is not None and t.abs().sum() > 0 for t in g[3:])


# ---- oeckd: counts and structure (widths, heads, initialisation, optimizers)

@pytest.mark.parametrize("arch", ["resnet32", "resnet110"])
def test_oeckd_widths_and_param_counts_match_section_12(arch):
    m = method_model("oeckd", nc=100, arch=arch)
    assert [[st[0].body[0][0].out_channels for st in s.stages] for s in m.students] == OECKD_WIDTHS
    hp = m.head_params()
    assert [hp[f"student{k}"] for k in range(1, 6)] == OECKD_PARAMS[arch]
    assert hp["student1"] == common.count_params(common.build_model(arch, 100))  # student 1 is the backbone
    stem = common.count_params(m.stem)
    assert stem == 16 * 27 + 2 * 16  # conv3x3 3->16 + BN
    assert hp["ensemble"] == sum(OECKD_PARAMS[arch]) - 4 * stem  # one stem for all
    # adapters: (12+9+6+3)*16 + (25+19+12+6)*32 + (51+38+25+12)*64 weights + 4*(16+32+64) biases
    assert common.count_params(m.adapters) == 30 * 16 + 62 * 32 + 126 * 64 + 4 * 112 == 10976
    assert [[(a.in_channels, a.out_channels) for a in row] for row in m.adapters] == \
        [[(c, c1) for c, c1 in zip(w, OECKD_WIDTHS[0])] for w in OECKD_WIDTHS[1:]]
    if arch == "resnet32":
        assert common.count_params(m) == 1041878  # all trained: stem + 5 students + adapters
    # a 1x1 conv + BN shortcut wherever stride or width changes: students 2..5 in their first block too
    first = [s.stages[0][0].short for s in m.students]
    assert isinstance(first[0], torch.nn.Identity)
    assert all(isinstance(f, torch.nn.Sequential) and f[0].kernel_size == (1, 1) for f in first[1:])
    assert all(not isinstance(s.stages[b][0].short, torch.nn.Identity) for s in m.students for b in (1, 2))
    assert all(isinstance(s.stages[0][1].short, torch.nn.Identity) for s in m.students)


def test_oeckd_integer_widths_equal_the_official_float_truncation():
    for depths, widths, stem in oeckd.RESNETS.values():
        for N in range(2, 17):
            for k in range(N):  # official: int(w * (float(N - j) / N)), j = 0..N-1
                assert oeckd.student_widths(widths, k, N) == [int(w * (float(N - k) / N)) for w in widths]


def test_oeckd_heads_are_every_student_and_the_mean_of_their_logits():
    m = method_model("oeckd").eval()
    x, _ = small_batch()
    with torch.no_grad():
        heads = m.heads(x)
        z = [s(m.stem(x)) for s in m.students]
    assert list(heads) == ["student1", "student2", "student3", "student4", "student5", "ensemble"]
    assert all(torch.equal(heads[f"student{k + 1}"], z[k]) for k in range(5))
    assert torch.allclose(heads["ensemble"], torch.stack(z).mean(0))
    assert m.deploy == "student1" and set(m.head_params()) == set(heads)


def test_oeckd_init_he_by_default_xavier_for_the_official_recipe():
    conv = lambda m: m.students[0].stages[2][1].body[0][0]  # a 3x3 conv 64 -> 64 of student 1
    m = method_model("oeckd", nc=100, arch="resnet32")
    assert conv(m).weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)  # He, fan_out
    assert all(a.bias.abs().sum() == 0 for row in m.adapters for a in row)
    m = method_model("oeckd", nc=100, arch="resnet32", init="xavier")
    assert conv(m).weight.std().item() == pytest.approx(math.sqrt(2 / (2 * 64 * 9)), rel=0.03)
    fc = m.students[0].fc.weight
    assert fc.std().item() == pytest.approx(math.sqrt(2 / (64 + 100)), rel=0.05)
    a = m.adapters[0][2]  # 51 -> 64, PyTorch's default (the official code creates it outside the init)
    assert a.bias.abs().sum() > 0 and a.weight.abs().max().item() <= 1 / math.sqrt(51) + 1e-6


def test_oeckd_adapters_at_half_the_lr_and_adam_moves_each_weight_by_its_lr():
    m = method_model("oeckd", optimizer="adam", lr=1e-3)
    opt = m.make_optimizer(m.param_groups(0.0))
    assert isinstance(opt, torch.optim.Adam) and method_model("oeckd").make_optimizer([]) is None  # sgd: the loop's
    common._set_lr(opt, argparse.Namespace(cosine=False, lr=1e-3, schedule=[2]), 0)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in m.adapters.parameters()}
    x, y = small_batch()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    common.train_step(m, m, [opt], x, y, None, 0, False)
    for n, p in m.named_parameters():  # Adam's first step: lr * g / (|g| + eps), |step| = lr wherever g >> eps
        big = p.grad.abs() > 1e-5
        if big.any():
            want = 5e-4 if n.startswith("adapters.") else 1e-3
            d = (p.detach() - before[n]).abs()[big]
            assert torch.allclose(d, torch.full_like(d, want), rtol=2e-3), n
    common._set_lr(opt, argparse.Namespace(cosine=False, lr=1e-3, schedule=[2]), 2)  # the schedule keeps the ratio
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 5e-5])


# ---- oeckd: end to end

def test_oeckd_end_to_end_writes_every_head_and_each_students_params(oeckd_run):
    fin = read_final(oeckd_run)
    heads = {"student1", "student2", "student3", "student4", "student5", "ensemble"}
    assert fin["deploy"] == "student1" and set(fin["last"]) == heads and set(fin["params"]) == heads
    assert fin["params"] == method_model("oeckd", nc=100).head_params()
    assert fin["params"]["student1"] == common.count_params(common.build_model("resnet8", 100))
    assert fin["params"]["student1"] > fin["params"]["student2"] > fin["params"]["student5"]
    log = read_log(oeckd_run)
    assert len(log) == 2
    for r in log:  # the logged terms add up to the loss (ce_e is logged only)
        parts = [float(r[k]) for k in ("ce", "feat", "kd")]
        assert float(r["loss"]) == pytest.approx(sum(parts), rel=1e-4) and min(parts) > 0 and float(r["ce_e"]) > 0
    ck = common.load_checkpoint(os.path.join(oeckd_run, "checkpoint.pt"))
    assert "adapters.3.2.weight" in ck["model"] and "stem.0.weight" in ck["model"]
    groups = ck["opt"]["param_groups"]  # SGD (the protocol); adapters at half the lr after the x0.1 drop
    assert [g.get("lr_scale", 1.0) for g in groups] == [1.0, 0.5]
    assert [g["lr"] for g in groups] == pytest.approx([0.005, 0.0025])
    assert all("momentum_buffer" in s for s in ck["opt"]["state"].values())


@pytest.mark.parametrize("extra", [[], ["--recipe", "paper"]])
def test_oeckd_training_step_has_no_host_sync(extra, monkeypatch, tmp_path):
    """SGD and the paper recipe's Adam (fused: its step counts stay on the device)."""
    c = count_syncs_in_steps(monkeypatch, "oeckd", *TINY, "--batch-size", 16, "--bench", 2, "--out", tmp_path / "b",
                             *extra)
    assert c["n"] == 0, c["what"]


def test_oeckd_runs_copied_next_to_common_alone(tmp_path):
    for name in ("oeckd", "common"):
        shutil.copy(os.path.join(HERE, name + ".py"), tmp_path)
    code = "import sys; sys.argv = ['x', '-h']\nimport oeckd\ntry:\n    oeckd.main()\nexcept SystemExit as e:\n" \
           "    assert e.code == 0\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--students", "--T", "--ce-w", "--feat-w", "--kd-w", "--adapter-lr-scale", "--optimizer", "--init"):
        assert flag in r.stdout


def test_oeckd_recipe_paper_sets_the_official_values_and_given_options_win(monkeypatch):
    a = parsed_args("oeckd", "--recipe", "paper")
    assert (a.optimizer, a.lr, a.wd, a.batch_size, a.epochs, a.schedule, a.padding, a.norm, a.init) == \
        ("adam", 1e-3, 1e-5, 128, 350, [200, 300], "zeros", "none", "xavier")
    a = parsed_args("oeckd")  # the default stays the protocol
    assert (a.optimizer, a.lr, a.wd, a.epochs, a.schedule, a.norm, a.init, a.no_nesterov) == \
        ("sgd", 0.1, 5e-4, 300, [150, 225], "dataset", "he", False)
    assert (a.students, a.T, a.ce_w, a.feat_w, a.kd_w, a.adapter_lr_scale) == (5, 2.0, 0.7, 0.15, 0.15, 0.5)
    a = parsed_args("oeckd", "--recipe", "paper", "--epochs", 200, "--lr", 2e-3)
    assert a.schedule == [114, 171] and a.lr == 2e-3 and a.optimizer == "adam"  # 200 and 300 of 350, scaled


def test_oeckd_recipe_paper_reaches_the_run(small_data, tmp_path, capsys, monkeypatch):
    seen = []
    real = common.Loader.__init__

    def spy(self, x, y, mean, std, *a, **k):
        seen.append((tuple(mean), tuple(std)))
        return real(self, x, y, mean, std, *a, **k)
    monkeypatch.setattr(common.Loader, "__init__", spy)
    out = tmp_path / "p"
    run_main("oeckd", "--arch", "resnet8", "--batch-size", 16, "--gpus", "cpu", "--data-dir", small_data,
             "--epochs", 1, "--recipe", "paper", "--out", out)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("recipe paper: 1 epochs, batch 16, lr 0.001 constant, wd 1e-05, optimizer adam, "
                            "zeros padding, none statistics") and "--init xavier" in first
    assert seen and set(seen) == {((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}  # no normalisation: pixels / 255
    ck = common.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    groups = ck["opt"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 5e-4]) and [g["weight_decay"] for g in groups] == [1e-5] * 2
    assert all("exp_avg_sq" in s for s in ck["opt"]["state"].values())  # Adam's moments, checkpointed
    fin = read_final(out)
    assert fin["args"]["recipe"] == "paper" and fin["args"]["optimizer"] == "adam" and set(fin["last"]) == set(fin["params"])


@pytest.mark.parametrize("bad,msg", [(["--students", "1"], "argument --students: 1 must be at least 2"),
                                     (["--students", "17"], "would have a stage of 0 channels"),
                                     (["--arch", "wrn_16_1"], "narrows a BasicBlock CIFAR ResNet"),
                                     (["--arch", "resnet8,resnet14"], "narrows a BasicBlock CIFAR ResNet"),
                                     (["--adapter-lr-scale", "0"], "argument --adapter-lr-scale: 0.0 must be positive"),
                                     (["--kd-w", "-1"], "argument --kd-w: -1.0 must be non-negative"),
                                     (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'")])
def test_oeckd_bad_arguments_are_refused(bad, msg, small_data, tmp_path, capsys):
    assert_refused("oeckd", [*TINY, "--data-dir", small_data, *bad], msg, tmp_path / "r", capsys)


# ---- oeckd: resume

def test_oeckd_resume_reproduces_an_uninterrupted_run(small_data, tmp_path, oeckd_run):
    b = tmp_path / "b"
    args = [*SMALL_RUN, "--data-dir", small_data, "--out", b]
    r = run_cli("oeckd", *args, "--halt-after", 1)
    assert r.returncode == 0 and "halted after epoch 1" in r.stdout, r.stderr[-2000:]
    assert len(read_log(b)) == 1 and not os.path.exists(b / "final.json")
    r = run_cli("oeckd", *args, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_continued_after_epoch_1(r.stdout, b)
    ca, cb = (common.load_checkpoint(os.path.join(o, "checkpoint.pt")) for o in (oeckd_run, b))
    assert set(ca["model"]) == set(cb["model"]) and "adapters.0.0.weight" in ca["model"]
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    sa, sb = ca["opt"]["state"], cb["opt"]["state"]  # momentum of students and adapters too
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])
    assert read_final(oeckd_run)["last"] == read_final(b)["last"]


# ---- oeckd: DDP

def test_oeckd_ddp_two_gloo_processes_keep_ranks_identical(small_data, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli("oeckd", "--arch", "resnet8", "--batch-size", 16, "--gpus", "0,1", "--data-dir", small_data,
                "--epochs", 1, "--schedule", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    fin = read_final(out)
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert set(fin["last"]) == set(fin["params"])


# =================================================================================================
# 21. KD (kd.py): Hinton et al., as RepDistiller runs it: a frozen baseline.py teacher, 0.1 CE + 0.9 KD, T = 4
# =================================================================================================

def _kd_model(path, arch="resnet8", teacher_arch=None, **kw):
    return method_model("kd", 100, None, teacher=str(path), arch=arch, teacher_arch=teacher_arch, **kw)


# ---- kd: loss by hand

def test_kd_loss_matches_hand_computation():
    z_s = [[1.0, 0.0, -1.0, 2.0], [0.5, 2.0, 0.0, -0.3]]
    z_t = [[3.0, -1.0, 0.2, 0.0], [-0.5, 1.0, 2.5, 0.1]]
    y = [3, 2]
    total, terms = kd.kd_loss(torch.tensor(z_s), torch.tensor(z_t), torch.tensor(y), 4.0)
    ce, kl = terms["ce"], terms["kd"]
    assert ce.item() == pytest.approx(0.1 * _hand_ce(z_s, y), rel=1e-5)
    assert kl.item() == pytest.approx(0.9 * _hand_kd(z_s, z_t, 4.0), rel=1e-5)  # T^2 KL, batch mean
    assert total.item() == pytest.approx(ce.item() + kl.item(), rel=1e-6)
    total, terms = kd.kd_loss(torch.tensor(z_s), torch.tensor(z_t), torch.tensor(y), 2.0, 1.0, 0.5)
    ce, kl = terms["ce"], terms["kd"]
    assert (ce.item(), kl.item()) == (pytest.approx(_hand_ce(z_s, y), rel=1e-5),
                                      pytest.approx(0.5 * _hand_kd(z_s, z_t, 2.0), rel=1e-5))


# ---- kd: gradient flow

def test_kd_terms_train_the_student_only_and_the_teacher_stays_bit_identical(tmp_path):
    model = _kd_model(fake_teacher(tmp_path / "t.pt"))
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert model.training and model.student.training and not model.teacher.training
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 100, (4,), generator=g)
    for term in ("ce", "kd"):  # each term on its own: gradient into the student, never into the teacher
        model.zero_grad(set_to_none=True)
        loss, terms = model(x, y, None, 0)
        assert set(terms) == {"ce", "kd"} and loss.item() == pytest.approx(sum(v.item() for v in terms.values()))
        terms[term].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.fc.parameters()), term
        assert all(p.grad is None for p in model.teacher.parameters()), term
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert len(opt.param_groups[0]["params"]) == len(list(model.student.parameters()))
    student0 = model.student.fc.weight.clone()
    for _ in range(2):
        loss, _ = model(x, y, None, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert not torch.equal(student0, model.student.fc.weight)


# ---- kd: counts and structure

def test_kd_heads_and_param_counts(tmp_path):
    model = _kd_model(fake_teacher(tmp_path / "t.pt", "resnet14"), arch="resnet8")
    n8, n14 = (common.count_params(common.build_model(a, 100)) for a in ("resnet8", "resnet14"))
    assert model.head_params() == {"student": n8, "teacher": n14} and model.deploy == "student"
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = model.heads(x)
        assert set(h) == {"student", "teacher"} and torch.equal(h["teacher"], model.teacher(x))


# ---- kd: end to end

def test_kd_end_to_end_writes_every_head(kd_run, offline_teacher):
    fin, log = read_final(kd_run), read_log(kd_run)
    n = common.count_params(common.build_model("resnet8", 100))
    assert fin["deploy"] == "student" and set(fin["last"]) == {"student", "teacher"}
    assert fin["params"] == {"student": n, "teacher": n} and fin["args"]["teacher_arch"] == "resnet8"
    assert len(log) == 2
    for r in log:  # the weighted terms add up to the loss
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["kd"]), rel=1e-4)
    # the teacher head is the frozen eval-mode baseline net: its accuracy never moves
    t_acc = offline_teacher[2]
    assert [float(r["teacher"]) for r in log] == [t_acc, t_acc]


def test_kd_training_step_has_no_host_sync(monkeypatch, tmp_path):
    c = count_syncs_in_steps(monkeypatch, "kd", *TINY, "--batch-size", 16, "--bench", 2, "--out", tmp_path / "b",
                             "--teacher-arch", "resnet8", "--teacher", "absent.pt")
    assert c["n"] == 0, c["what"]


def test_kd_runs_copied_next_to_common_alone(tmp_path):
    for name in ("kd", "common"):
        shutil.copy(os.path.join(HERE, name + ".py"), tmp_path)
    r = subprocess.run([sys.executable, "kd.py", "-h"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--teacher", "--teacher-arch", "--T", "--ce-weight", "--kd-weight", "--recipe"):
        assert flag in r.stdout


def test_kd_missing_or_wrong_teacher_is_one_clear_line_and_no_run_folder(data, tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        run_main("kd", *TINY, "--data-dir", data, "--teacher", tmp_path / "nope.pt", "--out", out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nope.pt" in err and len(err.strip().splitlines()) == 1
    assert "python baseline.py --arch resnet110 --dataset cifar100" in err  # resnet8 has no table teacher
    with pytest.raises(SystemExit):  # the table's teacher of the student is the one named
        run_main("kd", *TINY, "--arch", "resnet20", "--data-dir", data, "--out", out)
    err = capsys.readouterr().err
    assert "runs/baseline-resnet56-cifar100-s0/checkpoint.pt" in err and "--arch resnet56" in err
    path = fake_teacher(tmp_path / "t.pt", "resnet8")
    with pytest.raises(SystemExit):
        run_main("kd", *TINY, "--data-dir", data, "--teacher", path, "--teacher-arch", "wrn_16_1", "--out", out)
    err = capsys.readouterr().err
    assert "holds a resnet8" in err and "python baseline.py --arch wrn_16_1 --dataset cifar100" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        run_main("kd", *TINY, "--data-dir", data, "--teacher", fake_teacher(tmp_path / "c10.pt", dataset="cifar10"),
                 "--out", out)
    assert "trained on cifar10" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main("kd", *TINY, "--data-dir", data, "--teacher-arch", "resnet33", "--out", out)
    assert "invalid choice: 'resnet33'" in capsys.readouterr().err
    assert not out.exists()


def test_kd_recipe_paper_is_repdistillers(monkeypatch):
    extra = ["--teacher-arch", "resnet8", "--teacher", "absent.pt", "--bench", 1]
    a = parsed_args("kd", "--recipe", "paper", *extra)
    assert (a.batch_size, a.epochs, a.lr, a.schedule, a.no_nesterov, a.wd, a.momentum) == \
        (64, 240, 0.05, [150, 180, 210], True, 5e-4, 0.9)
    assert (a.T, a.ce_weight, a.kd_weight, a.padding, a.norm) == (4.0, 0.1, 0.9, "zeros", "dataset")
    assert parsed_args("kd", "--recipe", "paper", "--arch", "mobilenetv2", *extra).lr == 0.01
    a = parsed_args("kd", "--recipe", "paper", "--lr", 0.03, "--epochs", 120, *extra)
    assert a.lr == 0.03 and a.schedule == [75, 90, 105]  # given options win; milestones keep their fractions
    a = parsed_args("kd", *extra)  # the default stays the protocol
    assert (a.recipe, a.epochs, a.lr, a.batch_size, a.schedule, a.no_nesterov) == \
        ("protocol", 300, 0.1, 128, [150, 225], False)


# ---- kd: resume

def test_kd_resume_reproduces_an_uninterrupted_run(kd_run, offline_teacher, tmp_path):
    data, teacher, _ = offline_teacher
    b = tmp_path / "b"
    args = [*TINY, "--data-dir", data, "--teacher", teacher, "--epochs", 2, "--schedule", 1, "--out", b]
    run_main("kd", *args, "--halt-after", 1)
    assert len(read_log(b)) == 1 and not os.path.exists(b / "final.json")
    run_main("kd", *args, "--resume")
    wa, wb = _weights(kd_run), _weights(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_final(kd_run)["last"] == read_final(b)["last"]


# ---- kd: DDP

def test_kd_ddp_two_gloo_processes_keep_ranks_identical(data, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli("kd", "--arch", "resnet8", "--batch-size", 64, "--gpus", "0,1", "--data-dir", data, "--epochs", 1,
                "--schedule", "--out", out, "--teacher", fake_teacher(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    fin = read_final(out)
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert set(fin["last"]) == set(fin["params"]) == {"student", "teacher"}


# =================================================================================================
# 22. REVIEWKD (reviewkd.py): a frozen baseline.py teacher's pre-ReLU levels, ABF fusion deepest first, HCL
# =================================================================================================

def _rkd_model(path="", arch="resnet8", teacher_arch=None, lam=1.0, warmup=25):
    return method_model("reviewkd", 100, None, teacher=str(path), arch=arch, teacher_arch=teacher_arch, warmup=warmup,
                        **{"lambda": lam})


# ---- reviewkd: loss by hand (the levels, ABF, review, HCL)

@pytest.mark.parametrize("arch", ["resnet8", "resnet110b", "resnet8x4", "wrn_16_1", "wrn_20_8"])
def test_reviewkd_levels_are_the_nets_own_forward(arch):
    """Reading the levels computes the net's own logits exactly; the student's levels are the stage
    outputs, the teacher's their pre-activations (ResNet: relu(pre) = post; WRN: the next BN's input)."""
    torch.manual_seed(0)
    net = common.build_model(arch, 10)
    for m in net.modules():  # non-trivial running statistics: the BN applied for the WRN pre-activation shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        post, z = reviewkd.features(net, x)
        pre, z_pre = reviewkd.features(net, x, pre_relu=True)
        assert torch.equal(z, net(x)) and torch.equal(z_pre, net(x))
        h = net.stages[0](x)
        stages = list(net.stages[1:])
        for i, stage in enumerate(stages):
            h = stage(h) if i < len(stages) - 1 or reviewkd.family(net) == "resnet" else stage[:-1](h)
            assert torch.equal(post[i], h)
        assert post[-1].shape == (2, net.fc.in_features, 1, 1) and torch.equal(pre[-1], post[-1])
        if reviewkd.family(net) == "resnet":
            assert all(torch.equal(F.relu(p), q) for p, q in zip(pre[:-1], post[:-1]))
            assert all((p < 0).any() for p in pre[:-1])  # really before the ReLU
        else:
            bns = [stages[1][0].bn1, stages[2][0].bn1, stages[2][-1][0]]
            assert all(torch.allclose(p, bn(q)) for p, q, bn in zip(pre[:-1], post[:-1], bns))
        assert torch.allclose(post[-1].flatten(1), net(x, features=True)[1])


def test_reviewkd_abf_fusion_matches_hand_computation():
    torch.manual_seed(0)
    abf = reviewkd.ABF(3, 4, 5, fuse=True).eval()
    for bn in (abf.conv1[1], abf.conv2[1]):  # eval-mode BN with made-up statistics and affine weights
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    f, r = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)

    def bn(v, m):
        s = (m.running_var + m.eps).rsqrt() * m.weight
        return (v - m.running_mean[:, None, None]) * s[:, None, None] + m.bias[:, None, None]
    with torch.no_grad():
        out, x = abf(f, r)
        x1 = torch.stack([bn(torch.einsum("oc,chw->ohw", abf.conv1[0].weight[:, :, 0, 0], fi), abf.conv1[1]) for fi in f])
        up = r.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest 2x2 -> 4x4
        wa, ba = abf.att.weight[:, :, 0, 0], abf.att.bias
        z = torch.sigmoid(torch.einsum("oc,nchw->nohw", wa, torch.cat([x1, up], 1)) + ba[None, :, None, None])
        fused = x1 * z[:, 0:1] + up * z[:, 1:2]
        assert torch.allclose(x, fused, atol=1e-5)
        assert torch.allclose(out, bn(F.conv2d(fused, abf.conv2[0].weight, padding=1), abf.conv2[1]), atol=1e-5)
    deepest = reviewkd.ABF(3, 4, 5, fuse=False)
    assert deepest.att is None and common.count_params(abf) - common.count_params(deepest) == 2 * 4 * 2 + 2


def test_reviewkd_review_runs_deepest_first_and_passes_residuals():
    """review(): the deepest ABF sees no residual, each shallower one the fused map of the level below."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, f, residual=None):
            seen.append((self.i, None if residual is None else residual.item()))
            return f * 10, f + 100
    levels = [torch.tensor(float(i)) for i in range(4)]
    outs = reviewkd.review([Spy(i) for i in range(4)], levels)
    assert seen == [(3, None), (2, 103.0), (1, 102.0), (0, 101.0)]
    assert [o.item() for o in outs] == [0.0, 10.0, 20.0, 30.0]  # in level order, shallowest first


def _rkd_hand_mse(a, b):
    return ((a - b) ** 2).mean()


def _rkd_hand_pool(f, k):
    n, c, h, w = f.shape
    return f.reshape(n, c, k, h // k, k, w // k).mean((3, 5))


def test_reviewkd_hcl_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(2, 3, s, s, generator=g), torch.randn(2, 3, s, s, generator=g)) for s in (8, 2, 1)]
    (s8, t8), (s2, t2), (s1, t1) = pairs
    level8 = (_rkd_hand_mse(s8, t8) + _rkd_hand_mse(_rkd_hand_pool(s8, 4), _rkd_hand_pool(t8, 4)) / 2
              + _rkd_hand_mse(_rkd_hand_pool(s8, 2), _rkd_hand_pool(t8, 2)) / 4
              + _rkd_hand_mse(_rkd_hand_pool(s8, 1), _rkd_hand_pool(t8, 1)) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    level2 = (_rkd_hand_mse(s2, t2) + _rkd_hand_mse(s2.mean((2, 3)), t2.mean((2, 3))) / 2) / 1.5  # official halving
    level1 = _rkd_hand_mse(s1, t1)
    for i, want in enumerate((level8, level2, level1)):
        assert reviewkd.hcl([pairs[i][0]], [pairs[i][1]]).item() == pytest.approx(want.item(), rel=1e-5)
    got = reviewkd.hcl([p[0] for p in pairs], [p[1] for p in pairs])
    assert got.item() == pytest.approx((level8 + level2 + level1).item(), rel=1e-5)


def test_reviewkd_warm_up_is_linear_from_zero_in_epoch_zero():
    assert [reviewkd.warm_up(e, 20) for e in (0, 1, 10, 20, 200)] == [0.0, 0.05, 0.5, 1.0, 1.0]
    assert reviewkd.warm_up(0, 0) == 1.0


# ---- reviewkd: gradient flow

def test_reviewkd_each_term_trains_its_modules_and_never_the_teacher(tmp_path):
    model = _rkd_model(fake_teacher(tmp_path / "t.pt", "resnet14"), arch="resnet8", lam=2.0, warmup=4).train()
    assert model.student.training and model.abfs.training and not model.teacher.training
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 100, (4,), generator=g)

    def grads(term, epoch=2):
        model.zero_grad(set_to_none=True)
        loss, terms = model(x, y, None, epoch)
        assert set(terms) == {"ce", "hcl"} and loss.item() == pytest.approx(terms["ce"].item() + terms["hcl"].item())
        terms[term].backward()
        got = lambda m: [p.grad is not None and p.grad.abs().sum().item() > 0 for p in m.parameters()]
        return got(model.student), got(model.abfs), [p.grad is not None for p in model.teacher.parameters()]

    s, a, t = grads("ce")
    assert all(s) and not any(a) and not any(t)  # CE: the student, not the ABFs
    s, a, t = grads("hcl")
    assert not any(t) and all(a)                 # HCL: every ABF parameter (attention convs included)
    assert all(s[:-2]) and not any(s[-2:])       # and the student up to its pooled feature, not its classifier
    assert before.keys() == model.teacher.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())  # BN buffers too
    # the weight: lambda min(1, e/W)
    hcl = [model(x, y, None, e)[1]["hcl"].item() for e in (0, 1, 4)]
    raw = hcl[2] / 2.0
    assert hcl[0] == 0.0 and hcl[1] == pytest.approx(2.0 * raw / 4, rel=1e-4) and raw > 0


# ---- reviewkd: counts and structure

@pytest.mark.parametrize("teacher,student,n", [("resnet56", "resnet20", 114_278), ("resnet110", "resnet32", 114_278),
                                               ("resnet32x4", "resnet8x4", 1_808_774),
                                               ("wrn_40_2", "wrn_16_2", 453_830), ("wrn_40_2", "wrn_40_1", 216_006)])
def test_reviewkd_abf_param_counts(teacher, student, n):
    """The ABFs of the official CIFAR pairs (counted by hand: e.g. resnet20 <- resnet56, M = 64:
    pooled 4,224 + 36,992; stage 3 4,224 + 258 + 36,992; stage 2 2,176 + 258 + 18,496; stage 1
    1,152 + 258 + 9,248 = 114,278)."""
    model = _rkd_model(arch=student, teacher_arch=teacher)
    assert common.count_params(model.abfs) == n
    assert model.head_params() == {"student": common.count_params(common.build_model(student, 100)),
                                   "teacher": common.count_params(common.build_model(teacher, 100))}


# ---- reviewkd: end to end

def test_reviewkd_end_to_end_writes_every_head_and_trains_the_abfs(reviewkd_run, offline_teacher):
    fin, log = read_final(reviewkd_run), read_log(reviewkd_run)
    n = common.count_params(common.build_model("resnet8", 100))
    assert fin["deploy"] == "student" and set(fin["last"]) == {"student", "teacher"}
    assert fin["params"] == {"student": n, "teacher": n}  # the ABFs are dropped at test time
    assert fin["args"]["teacher_arch"] == "resnet8" and fin["args"]["lambda"] == 1.0 and fin["args"]["warmup"] == 1
    assert len(log) == 2 and float(log[0]["hcl"]) == 0.0 and float(log[1]["hcl"]) > 0  # warm-up: 0 in epoch 1
    for r in log:
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["hcl"]), rel=1e-4)
    assert [float(r["teacher"]) for r in log] == [offline_teacher[2]] * 2
    ck = common.load_checkpoint(os.path.join(reviewkd_run, "checkpoint.pt"))
    model = _rkd_model(str(offline_teacher[1]))
    n_trained = len(list(model.student.parameters())) + len(list(model.abfs.parameters()))
    assert [len(g["params"]) for g in ck["opt"]["param_groups"]] == [n_trained]  # the ABFs in the student's SGD
    assert ck["opt"]["param_groups"][0]["weight_decay"] == 5e-4
    abf0 = model.abfs[0].conv2[0].weight
    assert not torch.equal(ck["model"]["abfs.0.conv2.0.weight"], abf0)  # moved by training


def test_reviewkd_training_step_has_no_host_sync(monkeypatch, tmp_path):
    c = count_syncs_in_steps(monkeypatch, "reviewkd", *TINY, "--batch-size", 16, "--bench", 2, "--out",
                             tmp_path / "b", "--teacher-arch", "resnet8", "--teacher", "absent.pt")
    assert c["n"] == 0, c["what"]


def test_reviewkd_runs_copied_next_to_common_alone(tmp_path):
    for name in ("reviewkd", "common"):
        shutil.copy(os.path.join(HERE, name + ".py"), tmp_path)
    r = subprocess.run([sys.executable, "reviewkd.py", "-h"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("--teacher", "--teacher-arch", "--lambda", "--warmup", "--recipe"):
        assert flag in r.stdout


def test_reviewkd_refuses_backbones_whose_levels_it_cannot_read(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    resnet = fake_teacher(tmp_path / "t.pt", "resnet8")
    with pytest.raises(SystemExit) as e:
        run_main("reviewkd", *TINY, "--arch", "vgg8", "--data-dir", data, "--teacher", resnet, "--out", out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "the student vgg8 is not one of them" in err
    dense = fake_teacher(tmp_path / "d.pt", "densenet40_12")
    with pytest.raises(SystemExit):
        run_main("reviewkd", *TINY, "--data-dir", data, "--teacher", dense, "--out", out)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "the teacher densenet40_12 is not one of them" in err
    assert not out.exists()
    # levels of other sizes (here a two-stage ResNet) cannot be paired
    monkeypatch.setitem(common.ARCHS, "resnet2stages",
                        lambda nc: common._resnet(common.BasicBlock, [1, 1], [16, 32], nc))
    with pytest.raises(ValueError, match=r"levels of sizes \[32, 16, 8, 1\] and \[32, 16, 1\]"):
        _rkd_model(arch="resnet8", teacher_arch="resnet2stages")


def test_reviewkd_missing_or_wrong_teacher_is_one_clear_line_and_no_run_folder(data, tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        run_main("reviewkd", *TINY, "--data-dir", data, "--teacher", tmp_path / "nope.pt", "--out", out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nope.pt" in err and len(err.strip().splitlines()) == 1
    assert "python baseline.py --arch resnet110 --dataset cifar100" in err
    with pytest.raises(SystemExit):
        run_main("reviewkd", *TINY, "--arch", "wrn_40_1", "--data-dir", data, "--out", out)
    assert "runs/baseline-wrn_40_2-cifar100-s0/checkpoint.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_main("reviewkd", *TINY, "--data-dir", data, "--teacher", fake_teacher(tmp_path / "t.pt", "resnet8"),
                 "--teacher-arch", "resnet14", "--out", out)
    err = capsys.readouterr().err
    assert "holds a resnet8" in err and "python baseline.py --arch resnet14 --dataset cifar100" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_reviewkd_lambda_per_pair_warmup_scaled_and_recipe_paper(monkeypatch):
    def parsed(*argv):
        return parsed_args("reviewkd", "--teacher", "absent.pt", "--bench", 1, *argv)
    for (t, s), lam in [(("resnet56", "resnet20"), 0.6), (("resnet110", "resnet32"), 1.0),
                        (("resnet32x4", "resnet8x4"), 5.0), (("wrn_40_2", "wrn_16_2"), 5.0),
                        (("wrn_40_2", "wrn_40_1"), 5.0), (("resnet14", "resnet8"), 1.0)]:
        assert getattr(parsed("--teacher-arch", t, "--arch", s), "lambda") == lam
    assert getattr(parsed("--teacher-arch", "resnet56", "--arch", "resnet20", "--lambda", 2), "lambda") == 2.0
    a = parsed("--teacher-arch", "resnet8", "--arch", "resnet8")
    assert (a.epochs, a.warmup, a.schedule, a.recipe) == (300, 25, [150, 225], "protocol")
    assert parsed("--teacher-arch", "resnet8", "--arch", "resnet8", "--epochs", 60).warmup == 5  # 1/12 of the run
    assert parsed("--teacher-arch", "resnet8", "--arch", "resnet8", "--epochs", 60, "--warmup", 0).warmup == 0
    a = parsed("--teacher-arch", "resnet8", "--arch", "resnet8", "--recipe", "paper")
    assert (a.epochs, a.warmup, a.batch_size, a.lr, a.schedule, a.wd, a.no_nesterov, a.norm, a.padding) == \
        (240, 20, 128, 0.1, [151, 181, 211], 5e-4, False, "cifar10", "zeros")
    # train.py:168-169: lr 0.02 for ShuffleNet / MobileNet students (by name; their levels are not read here yet)
    assert [reviewkd.paper_recipe(a)["lr"] for a in ("ShuffleV2", "mobile_half", "wrn_16_2")] == [0.02, 0.02, 0.1]
    with pytest.raises(SystemExit):
        parsed("--teacher-arch", "resnet8", "--arch", "resnet8", "--lambda", -1)


# ---- reviewkd: resume

def test_reviewkd_resume_reproduces_an_uninterrupted_run(reviewkd_run, offline_teacher, tmp_path):
    data, teacher, _ = offline_teacher
    b = tmp_path / "b"
    args = [*TINY, "--data-dir", data, "--teacher", teacher, "--epochs", 2, "--schedule", 1, "--out", b]
    run_main("reviewkd", *args, "--halt-after", 1)
    assert len(read_log(b)) == 1 and not os.path.exists(b / "final.json")
    run_main("reviewkd", *args, "--resume")
    wa, wb = _weights(reviewkd_run), _weights(b)
    assert set(wa) == set(wb) and "abfs.3.conv1.0.weight" in wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_final(reviewkd_run)["last"] == read_final(b)["last"]


# ---- reviewkd: DDP

def test_reviewkd_ddp_two_gloo_processes_keep_ranks_identical(data, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli("reviewkd", "--arch", "resnet8", "--batch-size", 64, "--gpus", "0,1", "--data-dir", data,
                "--epochs", 1, "--schedule", "--warmup", 0, "--out", out, "--teacher", fake_teacher(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    fin = read_final(out)
    # weights, the ABFs' included, identical on both ranks
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert set(fin["last"]) == set(fin["params"]) == {"student", "teacher"}
