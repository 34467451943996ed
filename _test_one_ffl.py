from test_methods import *

import argparse

import one
import ffl


# ------------------------------------------------------------------------------------------------
# ONE and FFL
# ------------------------------------------------------------------------------------------------

def _oneffl_args(**kw):
    a = dict(arch="resnet8", branches=3, T=3.0, rampup=80, fusion_wd=1e-5)
    a.update(kw)
    return argparse.Namespace(**a)


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


# fixed small logits (2 samples, 3 classes) shared by the hand-computed loss tests
_Z1 = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
_Z2 = torch.tensor([[2.0, -1.0, 0.0], [1.5, 0.5, -0.5]])
_Z3 = torch.tensor([[0.0, 0.0, 4.0], [-2.0, 1.0, 1.0]])
_Y = torch.tensor([1, 2])


def test_one_teacher_is_the_gate_weighted_sum_on_fixed_tensors():
    g = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.5, 0.5]])
    z_e = one.teacher_logits([_Z1, _Z2, _Z3], g)
    # sample 1: 0.25*[1,2,0.5] + 0.75*[2,-1,0] = [1.75, -0.25, 0.125]; sample 2: 0.5*[1.5,0.5,-0.5] + 0.5*[-2,1,1]
    assert torch.allclose(z_e, torch.tensor([[1.75, -0.25, 0.125], [-0.25, 0.75, 0.25]]))


def test_one_gate_weights_sum_to_one_and_follow_the_spec():
    torch.manual_seed(0)
    m = one.ONE(_oneffl_args(), 10).eval()  # eval: the fresh BN1d has running mean 0, var 1
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


def test_one_loss_matches_hand_computation():
    g = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    logits, T, w = [_Z1, _Z2, _Z3], 3.0, 0.4
    total, ce, ce_e, kl = one.one_loss(logits, g, _Y, T, w)
    z_e = torch.stack([0.2 * _Z1[0] + 0.3 * _Z2[0] + 0.5 * _Z3[0], 0.6 * _Z1[1] + 0.1 * _Z2[1] + 0.3 * _Z3[1]])
    assert ce.item() == pytest.approx(sum(_oneffl_ce(z, _Y) for z in logits), rel=1e-5)
    assert ce_e.item() == pytest.approx(_oneffl_ce(z_e, _Y), rel=1e-5)
    assert kl.item() == pytest.approx(w * sum(_oneffl_kd(z, z_e, T) for z in logits), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + ce_e.item() + kl.item(), rel=1e-6)


def test_one_kd_sends_no_gradient_into_teacher_or_gate_but_teacher_ce_does():
    # on leaf tensors: the KD gradient on z_i is T (p_i^T - p_e^T) / B, the gradient with z_e a constant
    logits = [z.clone().requires_grad_() for z in (_Z1, _Z2, _Z3)]
    g = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]], requires_grad=True)
    T = 3.0
    _, _, _, kl = one.one_loss(logits, g, _Y, T, 1.0)
    kl.backward()
    assert g.grad is None or not g.grad.any()  # no path through the teacher into the gate
    z_e = one.teacher_logits([z.detach() for z in logits], g.detach())
    for z in logits:
        want = T * ((z.detach() / T).softmax(1) - (z_e / T).softmax(1)) / len(z)
        assert torch.allclose(z.grad, want, atol=1e-6)
    _, _, ce_e, _ = one.one_loss(logits, g, _Y, T, 1.0)
    ce_e.backward()
    assert g.grad.abs().sum() > 0

    # in the model: the gate's parameters get gradient from the teacher's CE only
    torch.manual_seed(0)
    m = one.ONE(_oneffl_args(), 10)
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
    m = one.ONE(_oneffl_args(), 10)
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


def test_one_param_count_resnet32_is_trunk_plus_3_branches_plus_gate():
    m = one.ONE(_oneffl_args(arch="resnet32"), 100)
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


def test_one_end_to_end(data, tmp_path):
    out = tmp_path / "r"
    run_main("one", *TINY, "--data-dir", data, "--epochs", 2, "--schedule", 1, "--out", out)
    fin = read_final(out)
    assert set(fin["last"]) == {"branch1", "branch2", "branch3", "ensemble"}
    assert fin["deploy"] == "branch1"
    m = one.ONE(_oneffl_args(), 100)
    assert fin["params"]["branch1"] == common.count_params(common.build_model("resnet8", 100))
    assert fin["params"]["ensemble"] == common.count_params(m)
    log = read_log(out)
    assert len(log) == 2
    for r in log:  # the logged terms add up to the loss (kd is logged ramped)
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + float(r["ce_e"]) + float(r["kd"]), rel=1e-4)
    assert float(log[0]["kd"]) < 0.05 * float(log[0]["ce_e"])  # exp(-5) ramp at epoch 0


def test_ffl_fusion_param_count_resnet32_two_branches():
    m = ffl.FFL(_oneffl_args(arch="resnet32", branches=2), 100)
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


def test_ffl_loss_matches_hand_computation():
    logits, fused, T, w = [_Z1, _Z2], _Z3, 3.0, 0.25
    total, ce, ce_f, kl, fusion = ffl.ffl_loss(logits, fused, _Y, T, w)
    ens = (_Z1 + _Z2) / 2
    assert ce.item() == pytest.approx(_oneffl_ce(_Z1, _Y) + _oneffl_ce(_Z2, _Y), rel=1e-5)
    assert ce_f.item() == pytest.approx(_oneffl_ce(_Z3, _Y), rel=1e-5)
    assert kl.item() == pytest.approx(w * (_oneffl_kd(_Z1, _Z3, T) + _oneffl_kd(_Z2, _Z3, T)), rel=1e-5)
    assert fusion.item() == pytest.approx(w * _oneffl_kd(_Z3, ens, T), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + ce_f.item() + kl.item() + fusion.item(), rel=1e-6)


def test_ffl_detach_semantics():
    torch.manual_seed(0)
    m = ffl.FFL(_oneffl_args(branches=2), 10)
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
    m = ffl.FFL(_oneffl_args(branches=2), 10)
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


def test_ffl_param_groups_carry_two_weight_decays():
    m = ffl.FFL(_oneffl_args(branches=3, fusion_wd=2e-5), 10)
    groups = m.param_groups(3e-4)
    assert [g["weight_decay"] for g in groups] == [3e-4, 2e-5]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[1] == {id(p) for p in m.fusion.parameters()}
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in m.parameters()}
    assert sum(len(i) for i in ids) == len(list(m.parameters()))


def test_ffl_end_to_end(data, tmp_path):
    out = tmp_path / "r"
    run_main("ffl", *TINY, "--data-dir", data, "--epochs", 2, "--schedule", 1, "--out", out,
             "--wd", "3e-4", "--fusion-wd", "2e-5")
    fin = read_final(out)
    assert set(fin["last"]) == {"branch1", "branch2", "fused", "ensemble"}
    assert fin["deploy"] == "branch1"
    m = ffl.FFL(_oneffl_args(branches=2), 100)
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


@pytest.mark.parametrize("script,bad,msg", [("one", ["--branches", "1"], "--branches must be at least 2"),
                                            ("ffl", ["--branches", "1"], "--branches must be at least 2"),
                                            ("one", ["--arch", "resnet8,resnet14"], "give a single --arch"),
                                            ("ffl", ["--fusion-wd", "-1"], "--fusion-wd non-negative")])
def test_oneffl_bad_arguments_are_refused(script, bad, msg, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(script, *TINY, "--data-dir", data, "--out", tmp_path / "r", *bad)
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
