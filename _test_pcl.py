from test_methods import *
import argparse

import pcl


# ------------------------------------------------------------------------------------------------
# PCL
# ------------------------------------------------------------------------------------------------

def _pcl_model(arch="resnet8", nc=10, peers=3):
    torch.manual_seed(0)
    return pcl.PCL(argparse.Namespace(arch=arch, peers=peers, T=3.0, rampup=80, ema_decay=0.999), nc)


def _pcl_views(m=3, B=4, nc=10):
    """m distinct views of a small batch; 16x16 images (the nets pool globally) keep the test fast."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(B, 3, 16, 16, generator=g) for _ in range(m)), torch.arange(B) % nc


def _pcl_split(model):
    live = [*model.trunk.parameters(), *model.peers.parameters()]
    mean = [*model.mean_trunk.parameters(), *model.mean_peers.parameters()]
    return live, mean


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


@pytest.mark.parametrize("arch", ["resnet8", "resnet32"])
def test_pcl_head_params_mean1_is_the_backbone(arch):
    model = _pcl_model(arch, 100)
    n = model.head_params()
    backbone = common.count_params(common.build_model(arch, 100))
    assert n["mean1"] == n["mean2"] == n["peer1"] == backbone
    c = model.peers[0].fc.in_features
    trunk = common.count_params(model.trunk)
    assert n["ensemble"] == trunk + 3 * (backbone - trunk) + 3 * c * 100 + 100
    assert not torch.equal(model.peers[0].fc.weight, model.peers[1].fc.weight)  # independent peers


PCL_TINY = [*TINY, "--batch-size", 16, "--epochs", 2, "--schedule", 1]  # with pcl_data: 2 steps per epoch


@pytest.fixture(scope="module")
def pcl_data(tmp_path_factory):
    """32 training images: PCL's step costs ~3 baseline steps (3 views, a mean teacher), so fewer of them."""
    return fake_cifar(tmp_path_factory.mktemp("pcl_cifar"), n_train=32, n_test=32)


@pytest.fixture(scope="module")
def pcl_run(pcl_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pcl") / "r"
    run_main("pcl", *PCL_TINY, "--data-dir", pcl_data, "--out", out)
    return out


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


def test_pcl_resume_restores_the_mean_teachers_exactly(pcl_data, tmp_path, pcl_run):
    b = tmp_path / "b"
    args = [*PCL_TINY, "--data-dir", pcl_data, "--out", b]
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


def test_pcl_rejects_bad_options(pcl_data, tmp_path):
    for bad in (["--peers", 1], ["--arch", "resnet8,resnet14"], ["--ema-decay", 1.0]):
        with pytest.raises(SystemExit):
            run_main("pcl", *TINY, *bad, "--data-dir", pcl_data, "--out", tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")
