from test_methods import *

import argparse

import dml
import kdcl


# ------------------------------------------------------------------------------------------------
# DML and KDCL: hand computations in plain Python, independent of torch's losses
# ------------------------------------------------------------------------------------------------

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


def test_dml_three_peers_loss_matches_hand_computation():
    z = [[[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]],
         [[0.0, 1.5, 0.3], [1.0, -1.0, 2.0]],
         [[2.0, 0.2, 0.1], [-0.5, 0.0, 0.5]]]
    y, T = [0, 2], 2.0
    ce = sum(_hand_ce(zk, y) for zk in z)
    kl = sum(_hand_kd(z[k], z[l], T) for k in range(3) for l in range(3) if l != k) / 2  # 1/(K-1)
    total, ce_t, kl_t = dml.dml_loss([torch.tensor(zk) for zk in z], torch.tensor(y), T)
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(ce + kl, rel=1e-5)


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
    dml.dml_loss(z, y, 2.0)[2].backward()
    for k in range(3):
        zk = z[k].detach().requires_grad_()
        own = sum(dml.kd(zk, z[l].detach(), 2.0) for l in range(3) if l != k) / 2
        (g,) = torch.autograd.grad(own, zk)
        assert torch.allclose(z[k].grad, g, atol=1e-6)


def test_dml_end_to_end_two_archs(data, tmp_path):
    out = tmp_path / "r"
    run_main("dml", *TINY, "--arch", "resnet8,wrn_16_1", "--data-dir", data, "--epochs", 2, "--schedule", 1,
             "--out", out)
    fin = read_final(out)
    assert set(fin["last"]) == {"peer1", "peer2", "ensemble"} and fin["deploy"] == "peer1"
    n1, n2 = (common.count_params(common.build_model(a, 100)) for a in ("resnet8", "wrn_16_1"))
    assert fin["params"] == {"peer1": n1, "peer2": n2, "ensemble": n1 + n2}
    log = read_log(out)
    assert len(log) == 2 and all(math.isfinite(float(r["kd"])) and float(r["kd"]) > 0 for r in log)


# ------------------------------------------------------------------------------------------------
# KDCL
# ------------------------------------------------------------------------------------------------

def _kdcl_logits(m=3, B=16, C=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    hit = lambda: 3 * F.one_hot(y, C) * (torch.rand(B, 1, generator=g) < 0.5)  # sure and right on about half
    Z = torch.stack([torch.randn(B, C, generator=g) * (1 + i) + hit() for i in range(m)])
    return Z, y


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
    total, ce_t, kl_t = kdcl.kdcl_loss(logits, torch.tensor(y), T, lam, "minlogit")
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(ce + kl, rel=1e-5)
    # general with weights (0.25, 0.75): the weighted sum of logits
    w = torch.tensor([0.25, 0.75])
    tg = [[0.25 * a + 0.75 * b for a, b in zip(r1, r2)] for r1, r2 in zip(*z)]
    _, _, kl_g = kdcl.kdcl_loss(logits, torch.tensor(y), T, lam, "general", w)
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


def _kdcl_model(variant="minlogit", arch="resnet8", nc=10, bench=0):
    args = argparse.Namespace(arch=arch, peers=2, T=3.0, lam=1.0, variant=variant, val_size=20, bench=bench)
    return kdcl.KDCL(args, nc)


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


@pytest.mark.parametrize("variant", ["naive", "linear", "minlogit", "general"])
def test_kdcl_kd_sends_no_gradient_into_the_target(variant):
    """Each student's logits get gradient from its own CE and KD terms only, never through z_t."""
    Z, y = _kdcl_logits(m=3)
    w = torch.tensor([0.5, 0.3, 0.2])
    z = [zi.clone().requires_grad_() for zi in Z]
    kdcl.kdcl_loss(z, y, 3.0, 0.7, variant, w)[2].backward()
    zt = kdcl.soft_target(Z, y, variant, w)
    for zi in z:
        leaf = zi.detach().requires_grad_()
        (g,) = torch.autograd.grad(0.7 * kdcl.kd(leaf, zt, 3.0), leaf)
        assert torch.allclose(zi.grad, g, atol=1e-6)
    # with real students on their own views: student 1's KD term leaves student 2 untouched
    torch.manual_seed(0)
    model = _kdcl_model(variant)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    z1, z2 = model.peers[0](x1), model.peers[1](x2)
    yb = torch.tensor([0, 1, 2, 3])
    zt = kdcl.soft_target(torch.stack([z1, z2]).detach(), yb, variant, model.w)
    kdcl.kd(z1, zt, 3.0).backward()
    assert all(p.grad is None for p in model.peers[1].parameters())
    assert model.peers[0].fc.weight.grad.abs().sum() > 0
    loss, terms = model((x1, x2), yb, None, 0)  # the step as the loop runs it: one view per student
    assert set(terms) == {"ce", "kd"} and torch.isfinite(loss)
    assert loss.item() == pytest.approx((terms["ce"] + terms["kd"]).item(), rel=1e-6)


def test_kdcl_end_to_end_two_archs(data, tmp_path):
    out = tmp_path / "r"
    run_main("kdcl", *TINY, "--arch", "resnet8,wrn_16_1", "--data-dir", data, "--epochs", 2, "--schedule", 1,
             "--out", out)
    fin = read_final(out)
    assert set(fin["last"]) == {"peer1", "peer2", "ensemble"} and fin["deploy"] == "peer1"
    n1, n2 = (common.count_params(common.build_model(a, 100)) for a in ("resnet8", "wrn_16_1"))
    assert fin["params"] == {"peer1": n1, "peer2": n2, "ensemble": n1 + n2}
    assert fin["args"]["variant"] == "minlogit" and fin["args"]["T"] == 3.0 and fin["args"]["lam"] == 1.0
    log = read_log(out)
    assert len(log) == 2 and all(float(r["kd"]) > 0 and float(r["ce"]) > 0 for r in log)


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

