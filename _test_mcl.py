from test_methods import *

import argparse

import mcl


def _mcl_model(n_train=24, num_classes=10, branches=4, nce_k=8):
    args = argparse.Namespace(arch="resnet8", branches=branches, T=3.0, dot_w=1.0, nce_w=0.025, feat_dim=16,
                              nce_k=nce_k, nce_t=0.1, nce_m=0.5, batch_size=8)
    torch.manual_seed(0)
    model = mcl.MCL(args, num_classes)
    labels = torch.arange(n_train) % num_classes
    model.on_data(labels)
    return model, labels


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


def test_mcl_end_to_end_and_resume_restores_the_banks(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = [*TINY, "--data-dir", data, "--epochs", 2, "--schedule", 1]
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
    wa, wb = _weights(a), _weights(b)
    assert wa["memory"].shape == (4, 256, 128)
    assert not torch.equal(wb["memory"], mem1)          # epoch 2 did update the restored banks
    assert torch.equal(wa["memory"], wb["memory"])       # bit-identical to the uninterrupted run
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
