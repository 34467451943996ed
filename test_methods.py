"""Tests: CPU, tiny fake CIFAR folders, tiny architectures. Run: python -m pytest -q test_methods.py"""
import csv
import importlib
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

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


def run_cli(script, *argv, timeout=300):
    """Run `python script.py argv...` in a subprocess; returns CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(HERE, script + ".py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE)


def read_final(out):
    with open(os.path.join(out, "final.json")) as f:
        return json.load(f)


def read_log(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


TINY = ["--arch", "resnet8", "--batch-size", "64", "--gpus", "cpu", "--lr", "0.05"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_cifar(tmp_path_factory.mktemp("cifar"))


# ------------------------------------------------------------------------------------------------
# backbones
# ------------------------------------------------------------------------------------------------

# parameter counts with a CIFAR-100 head: the literature's numbers (METHODS.md), within 1%
LITERATURE = {"resnet32": 0.47e6, "resnet56": 0.86e6, "resnet110": 1.73e6, "resnet110b": 1.17e6,
              "wrn_16_2": 0.70e6, "wrn_40_2": 2.26e6, "wrn_28_10": 36.5e6, "wrn_20_8": 6.87e6}


@pytest.mark.parametrize("arch", sorted(LITERATURE))
def test_param_counts_match_literature(arch):
    n = common.count_params(common.build_model(arch, 100))
    assert abs(n - LITERATURE[arch]) / LITERATURE[arch] < 0.01, n


@pytest.mark.parametrize("arch", [a for a in common.ARCHS if a not in ("wrn_28_10", "vgg16", "resnet32x4")])
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


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

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


def test_cifar10_layout_reads(tmp_path):
    fake_cifar(tmp_path, "cifar10", n_train=100, n_test=20)
    tx, ty, vx, vy = common.load_cifar("cifar10", str(tmp_path))
    assert tx.shape == (100, 3, 32, 32) and vx.shape == (20, 3, 32, 32) and ty.max() < 10


def test_ramp_up_values():
    assert common.ramp_up(0) == pytest.approx(math.exp(-5))
    assert common.ramp_up(40) == pytest.approx(math.exp(-5 * 0.25))
    assert common.ramp_up(80) == 1.0 and common.ramp_up(200) == 1.0
    assert common.ramp_up(3, 0) == 1.0


# ------------------------------------------------------------------------------------------------
# the loop: baseline end to end, resume, DDP
# ------------------------------------------------------------------------------------------------

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


def _weights(out):
    return common.load_checkpoint(os.path.join(out, "checkpoint.pt"))["model"]


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


def test_ddp_two_gloo_processes_keep_ranks_identical(data, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli("baseline", "--arch", "resnet8", "--batch-size", 64, "--gpus", "0,1", "--data-dir", data,
                "--epochs", 2, "--schedule", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    fin = read_final(out)
    assert fin["processes"] == 2
    s = fin["rank_param_sums"]
    assert s[0] == s[1]


# ------------------------------------------------------------------------------------------------
# robustness: bad input, interruptions and faults (README "When things go wrong")
# ------------------------------------------------------------------------------------------------

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


def test_existing_run_folder_is_refused_then_force_restarts(data, tmp_path, capsys):
    out = tmp_path / "r"
    args = [*TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", out]
    run_main("baseline", *args)
    stamp = os.path.getmtime(out / "final.json")
    with pytest.raises(SystemExit):
        run_main("baseline", *args)
    assert "exists; pass --resume" in capsys.readouterr().err
    assert os.path.getmtime(out / "final.json") == stamp  # untouched
    run_main("baseline", *args, "--force")
    assert len(read_log(out)) == 1


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


def test_resume_without_checkpoint_or_with_garbage_is_a_clear_error(data, tmp_path, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--data-dir", data, "--out", out, "--resume")
    assert "no checkpoint at" in capsys.readouterr().err
    os.makedirs(out)
    (out / "checkpoint.pt").write_bytes(b"\x80\x04garbage" * 10)
    with pytest.raises(SystemExit):
        run_main("baseline", *TINY, "--data-dir", data, "--out", out, "--resume")
    assert "cannot load checkpoint" in capsys.readouterr().err


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


def test_sigint_stops_at_a_safe_point_and_resume_matches_uninterrupted(data, tmp_path):
    import signal
    import time
    args = [*TINY, "--data-dir", data, "--epochs", 4, "--schedule", 3]
    a, b = tmp_path / "a", tmp_path / "b"
    run_main("baseline", *args, "--out", a)
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "baseline.py"), *map(str, args), "--out", str(b)],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def test_nan_loss_stops_naming_epoch_step_and_term(data, tmp_path, monkeypatch, capsys):
    import baseline
    calls = {"n": 0}
    real = baseline.Baseline.forward

    def poisoned(self, x, y, idx, epoch):
        loss, terms = real(self, x, y, idx, epoch)
        calls["n"] += 1
        if epoch == 1 and calls["n"] >= 6:  # 4 steps per epoch: epoch 1, step 1 goes bad
            loss = loss * float("nan")
            terms = {"ce": terms["ce"] * float("nan")}
        return loss, terms
    monkeypatch.setattr(baseline.Baseline, "forward", poisoned)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        run_main("baseline", *TINY, "--data-dir", data, "--epochs", 3, "--schedule", 2, "--out", out)
    assert e.value.code == 3
    assert "non-finite loss at epoch 1 step 1 in term(s) loss, ce" in capsys.readouterr().err
    assert common.load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1  # the last good epoch


def test_ddp_rank_failure_ends_every_rank(data, tmp_path):
    import time
    t0 = time.time()
    env = dict(os.environ, OKD_FAIL_RANK="1")
    p = subprocess.run([sys.executable, os.path.join(HERE, "baseline.py"), "--arch", "resnet8", "--gpus", "0,1",
                        "--data-dir", data, "--epochs", "2", "--schedule", "1", "--out", str(tmp_path / "r")],
                       cwd=HERE, capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode != 0
    assert "failure injected" in p.stderr
    assert time.time() - t0 < 120


# ------------------------------------------------------------------------------------------------
# speed: behaviour, not time
# ------------------------------------------------------------------------------------------------

def test_bench_writes_bench_json_without_touching_a_dataset(tmp_path):
    out = tmp_path / "b"
    run_main("baseline", *TINY, "--bench", 2, "--data-dir", tmp_path / "absent", "--out", out)
    b = json.load(open(out / "bench.json"))
    assert b["steps"] == 2 and b["images_per_second"] > 0 and b["seconds_per_step"] > 0
    assert b["peak_memory_bytes"] > 0 and b["params_trained"] == common.count_params(common.build_model("resnet8", 100))
    assert b["device"] == "cpu" and b["torch"] == torch.__version__ and b["threads"] >= 1
    assert not (tmp_path / "absent").exists()


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


def test_training_step_has_no_host_sync(monkeypatch, tmp_path):
    c = count_syncs_in_steps(monkeypatch, "dml", *TINY, "--bench", 2, "--out", tmp_path / "b")
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


# ------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------

def _fabricate(root, name, method, seed, deploy_acc, ens_acc, finished=True):
    d = root / name
    d.mkdir(parents=True)
    meta = {"method": method, "arch": "resnet32", "dataset": "cifar100", "epochs": 300, "seed": seed}
    (d / "run.json").write_text(json.dumps(meta))
    if finished:
        fin = {**meta, "deploy": "peer1", "last": {"peer1": deploy_acc, "peer2": 1.0, "ensemble": ens_acc},
               "params": {"peer1": 470000}, "images_per_second": 1000.0}
        (d / "final.json").write_text(json.dumps(fin))


def test_summarize_means_stds_and_unfinished_runs(tmp_path, capsys):
    _fabricate(tmp_path, "dml-s0", "dml", 0, 70.0, 72.0)
    _fabricate(tmp_path, "dml-s1", "dml", 1, 72.0, 74.0)
    _fabricate(tmp_path, "dml-s2", "dml", 2, 0, 0, finished=False)
    _fabricate(tmp_path, "kdcl-s0", "kdcl", 0, 0, 0, finished=False)
    rows = common.summarize(str(tmp_path), plot=False)
    dml = next(r for r in rows if r["method"] == "dml")
    assert dml["deploy_top1"] == f"71.00 +- {math.sqrt(2):.2f} (n=2)"
    assert dml["ensemble_top1"] == f"73.00 +- {math.sqrt(2):.2f} (n=2)"
    assert dml["status"] == "2 done, 1 running" and dml["params"] == 470000
    kdcl = next(r for r in rows if r["method"] == "kdcl")
    assert kdcl["status"] == "1 running" and kdcl["deploy_top1"] == ""
    out = capsys.readouterr().out
    assert "| dml | resnet32 | cifar100 | peer1 | 71.00 +- 1.41 (n=2)" in out


def test_summarize_csv(tmp_path, capsys):
    _fabricate(tmp_path, "a", "dml", 0, 70.0, 72.0)
    common.summarize(str(tmp_path), as_csv=True, plot=False)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("method,arch,dataset,deploy,deploy_top1") and lines[1].startswith("dml,resnet32")


def test_summarize_plot_written_or_skipped_cleanly(data, tmp_path, capsys, monkeypatch):
    run_main("baseline", *TINY, "--data-dir", data, "--epochs", 1, "--schedule", "--out", tmp_path / "runs" / "b")
    capsys.readouterr()
    try:
        import matplotlib  # noqa: F401
        assert common._plot(str(tmp_path / "runs")) == str(tmp_path / "runs" / "curves.png")
        assert (tmp_path / "runs" / "curves.png").stat().st_size > 0
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert common._plot(str(tmp_path / "runs")) is None
    assert "pip install matplotlib" in capsys.readouterr().out
