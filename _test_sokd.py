from test_methods import *

import argparse

import sokd


# ------------------------------------------------------------------------------------------------
# sokd
# ------------------------------------------------------------------------------------------------

def _sokd_teacher(path, arch="resnet8", dataset="cifar100", seed=0):
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


def _sokd_model(path, arch="resnet8", teacher_arch=None, kd_teacher=0.0):
    args = argparse.Namespace(arch=arch, teacher=path, teacher_arch=teacher_arch, dataset="cifar100",
                              T=4.0, kd_teacher=kd_teacher)
    return sokd.SOKD(args, 100)


def _sokd_kd_by_hand(s, t, T):
    ps, pt = (s / T).softmax(1), (t / T).softmax(1)
    return T * T * (pt * (pt.log() - ps.log())).sum(1).mean()


def test_sokd_losses_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    z_a, z_t, z_s = (torch.randn(4, 5, generator=g) * 3 for _ in range(3))
    y = torch.tensor([0, 3, 1, 4])
    ce = lambda z: -z.log_softmax(1)[torch.arange(4), y].mean()
    total, ce_b, kd_b = sokd.bridge_loss(z_a, z_t, z_s, y, 4.0)
    assert ce_b.item() == pytest.approx(ce(z_a).item(), rel=1e-5)
    by_hand = _sokd_kd_by_hand(z_a, z_t, 4) + _sokd_kd_by_hand(z_a, z_s, 4)
    assert kd_b.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert total.item() == pytest.approx(ce_b.item() + kd_b.item(), rel=1e-6)
    total, ce_s, kl, kl_t = sokd.student_loss(z_s, z_a, z_t, y, 4.0, 0.5)
    assert ce_s.item() == pytest.approx(ce(z_s).item(), rel=1e-5)
    assert kl.item() == pytest.approx(_sokd_kd_by_hand(z_s, z_a, 4).item(), rel=1e-5)
    assert kl_t.item() == pytest.approx(0.5 * _sokd_kd_by_hand(z_s, z_t, 4).item(), rel=1e-5)
    assert total.item() == pytest.approx(ce_s.item() + kl.item() + kl_t.item(), rel=1e-6)
    assert sokd.student_loss(z_s, z_a, z_t, y, 4.0, 0.0)[3].item() == 0.0


def test_sokd_frozen_teacher_is_bit_identical_after_training_steps(tmp_path):
    model = _sokd_model(_sokd_teacher(tmp_path / "t.pt"), kd_teacher=1.0)
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
    model = _sokd_model(_sokd_teacher(tmp_path / "t.pt"), kd_teacher=1.0).train()
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


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "vgg8"])
def test_sokd_bridge_is_the_teachers_last_stage_and_classifier(tmp_path, arch):
    model = _sokd_model(_sokd_teacher(tmp_path / "t.pt", arch), arch="resnet8")
    t = model.teacher
    assert common.count_params(model.bridge) == common.count_params(t.stages[-1], t.fc)
    hp = model.head_params()
    assert hp == {"student": common.count_params(common.build_model("resnet8", 100)),
                  "teacher": common.count_params(t), "bridge": common.count_params(t)}
    # fresh init, not the teacher's weights
    assert not torch.equal(model.bridge.fc.weight, t.fc.weight)


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
    path = _sokd_teacher(tmp_path / "t.pt", "resnet8")
    with pytest.raises(SystemExit) as e:
        run_main("sokd", *TINY, "--data-dir", data, "--teacher", path, "--teacher-arch", "wrn_16_1", "--out", out)
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "resnet8" in err and "python baseline.py --arch wrn_16_1 --dataset cifar100" in err
    assert not out.exists()
    c10 = _sokd_teacher(tmp_path / "c10.pt", "resnet8", dataset="cifar10")
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
        arch, loaded, _ = sokd.load_teacher(str(exp), "resnet8", "cifar100", 100)
        assert arch == "resnet8" and torch.allclose(loaded.eval()(x), model.heads(x)["bridge"], atol=1e-5)
        assert not torch.allclose(net(x), model.heads(x)["teacher"], atol=1e-3)
