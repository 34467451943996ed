"""MCL-OKD: Multi-view Contrastive Learning for Online KD (Yang, An, Xu; ICASSP 2021). https://arxiv.org/abs/2006.04093

Idea: K branches share the stem and first stage and each owns the rest of the net (stage2, stage3,
FC); every branch sees the same augmented batch, so a "view" is a peer network, not an augmentation.
Each branch embeds its pooled feature (Linear -> 128, L2 norm) and keeps a memory bank of one
embedding per training image. Contrast: the embedding of image n in branch b must match row n of
branch a's bank better than K rows of images of other classes (CRD-style binary NCE, every ordered
pair a != b). On top, the last branch distils the detached mean of all branches' logits (DOT).

Loss:  sum_i CE(z_i, y) + 1.0 KD(z_last <- mean_i z_i) + 0.025 sum_{a != b} NCE(M_a, e_b),
       NCE = -mean_n [log P_0/(P_0 + K/N) + sum_k log (K/N)/(P_k + K/N)],  P_j = exp(<M_a[j], e_b(x_n)>/0.1) / Z

Deviations from the paper / official code (winycg/MCL-OKD), and choices where the spec was open:
  - Recipe: the protocol (batch 128, lr 0.1 x0.1 at 150/225, 300 epochs, Nesterov, wd 5e-4) instead of
    the official batch 64, lr 0.05 cosine over 300 epochs, which `--recipe paper` sets (the official
    SGDR with T_0 = 300 epochs is a plain cosine).
  - Negatives: K indices per image drawn uniformly WITH replacement from the images of the other
    classes, on the device at every step (a class-sorted index table; exact). The official data loader
    draws them without replacement (np.random.choice) when K is below the pool size.
  - The banks are updated in after_step from the embeddings computed in forward (detached): the same
    values as the official code, which updates inside its forward after scoring. Under DDP the
    embeddings and indices of all ranks are gathered first, so every rank applies the same update.
  - Banks and embedding heads are module state, so checkpoints hold them and --resume restores them;
    the official checkpoint saves the backbone only (a resumed run restarts with random banks).
  - Checked against the official code (followed, not deviations): pair (a, b) scores branch a's BANK
    against branch b's EMBEDDING, both orders, the 12 pair losses SUMMED; Z = N * mean of the pair's
    scores over the batch, re-estimated every batch and detached (`.item()` there); eps = 1e-7;
    bank init uniform in [-s, s], s = 1/sqrt(128/3); momentum 0.5; embeddings from the pooled feature;
    the DOT target includes the last branch itself; the ensemble head is the mean of LOGITS; the
    embedding heads are trained with weight decay like the rest.
  - --nce-k defaults to 256 as the official README commands for ResNet-32/110 and DenseNet (the
    script's own default 16384 is used there for VGG-16 and HCGNet: pass --nce-k 16384).
  - NCE scores are computed in fp32 with autocast off and without a matmul (which may run in TF32 on
    CUDA): bf16 or TF32 dot products would blur exp(<.,.>/0.1).
  - Logged terms "ce", "dot", "nce" are unweighted (mcl_loss applies --dot-w and --nce-w).
  - The official script reports the best epoch of the best head; here the last epoch, per head.

Heads: every branch ("branch1" ... "branchK") and "ensemble" = mean of the branches' logits.
Deployable: the last branch ("branchK", branch4 by default), the only one that DOT distils from the
ensemble: the paper's gain from DOT (ResNet-32 error 27.29 -> 24.52) is that branch's.

    python mcl.py --arch resnet32 --dataset cifar100 --gpus 0
    python mcl.py --arch resnet32 --dataset cifar100 --recipe paper   # batch 64, lr 0.05, cosine (official)
"""
import common  # before torch: a Ctrl-C while the imports run then ends in one line
import torch
import torch.nn as nn
import torch.nn.functional as F


def kd(student, teacher, T):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, batch mean.
    The teacher is detached here: a KD term never trains its target."""
    return F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher.detach() / T, 1),
                    reduction="batchmean") * T * T


def dot_loss(logits, T):
    """DOT: KD(z_last <- mean_i z_i). kd() detaches the mean, so only the last branch (and, through
    it, the shared trunk) is trained toward the ensemble."""
    return kd(logits[-1], torch.stack(logits).mean(0), T)


def class_table(labels, num_classes):
    """Training indices sorted by class, and each class's first position and size in that order."""
    order = torch.argsort(labels, stable=True)
    count = torch.bincount(labels, minlength=num_classes)
    return order, torch.cumsum(count, 0) - count, count


def sample_negatives(y, K, order, start, count):
    """K indices per anchor, uniform with replacement over the images whose class is not y.
    r ~ U{0 .. N - n_y - 1} counts positions of the class-sorted order outside y's block
    [start_y, start_y + n_y): position r if r < start_y, else r + n_y. Exact, one vectorised draw."""
    n_y, s_y = count[y, None], start[y, None]
    r = torch.randint(0, 2 ** 62, (len(y), K), device=y.device) % (len(order) - n_y)  # modulo bias < 1e-13
    return order[r + n_y * (r >= s_y)]


def nce_loss(memory, emb, idx, neg, T, eps=1e-7):
    """sum over ordered pairs a != b of the binary NCE of branch b's embeddings against branch a's bank:
    s_j = exp(<M_a[j], e_b(x_n)> / T) for j = idx_n (positive) and the K rows neg_n (negatives);
    Z = N * mean_{n,j} s_j (detached); P = s / Z;
    NCE = -mean_n [log(P_0 / (P_0 + K/N + eps)) + sum_k log((K/N) / (P_k + K/N + eps))].
    memory (branches, N, D) unit rows; emb (branches, B, D) unit rows; idx (B,); neg (B, K)."""
    nb, N = memory.shape[:2]
    K = neg.shape[1]
    with torch.autocast(emb.device.type, enabled=False):  # fp32 scores (see the docstring of the file)
        emb = emb.float()
        rows = torch.cat([idx[:, None], neg], 1)                # (B, 1 + K)
        total = 0.0
        for a in range(nb):
            bank = memory[a][rows]                              # (B, 1 + K, D); a buffer: never trained
            # every other branch, by slices: indexing with a list would copy it to the device, a host sync
            e = torch.cat([emb[:a], emb[a + 1:]]).permute(1, 0, 2)  # (B, nb - 1, D)
            # elementwise product + sum, not bmm: on CUDA a matmul may run in TF32, which blurs exp(<.,.>/0.1)
            s = torch.exp((bank[:, :, None] * e[:, None]).sum(-1) / T)  # (B, 1 + K, nb - 1): a column per pair (a, b)
            Z = s.mean((0, 1)).detach() * N                      # detached: a constant estimate of the partition
            P = s / Z
            pn = K / N
            pos = torch.log(P[:, 0] / (P[:, 0] + pn + eps))      # (B, nb - 1)
            negs = torch.log(pn / (P[:, 1:] + pn + eps)).sum(1)
            total = total - (pos + negs).mean(0).sum()
    return total


def mcl_loss(logits, memory, emb, idx, neg, y, T, nce_t, dot_w, nce_w):
    """sum_i CE(z_i, y) + dot_w DOT + nce_w sum_{a != b} NCE(M_a, e_b). Returns (total, {term: value}),
    the terms unweighted."""
    ce = sum(F.cross_entropy(z, y) for z in logits)
    dot = dot_loss(logits, T)
    nce = nce_loss(memory, emb, idx, neg, nce_t)
    return ce + dot_w * dot + nce_w * nce, {"ce": ce, "dot": dot, "nce": nce}


class MCL(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        self.trunk, self.branches = common.split_model(args.arch, num_classes, -2, args.branches)
        d = self.branches[0].fc.in_features
        self.embed = nn.ModuleList(nn.Linear(d, args.feat_dim) for _ in range(args.branches))
        self.num_classes, self.feat_dim = num_classes, args.feat_dim
        self.T, self.nce_k, self.nce_t, self.nce_m = args.T, args.nce_k, args.nce_t, args.nce_m
        self.dot_w, self.nce_w = args.dot_w, args.nce_w
        self.batch_size = args.batch_size
        self.deploy = f"branch{args.branches}"
        self._stash = None

    def check_data(self, train_labels):
        """Before the run starts (common.run): negatives need a second class."""
        if len(torch.unique(train_labels)) < 2:
            raise ValueError("MCL needs training images of at least two classes to draw negatives")

    def memory_needed(self, n_train, batch):
        """(bytes, what, fix) for common's memory check: the banks (branches x n_train x feat_dim floats,
        for the run's life) and a step's NCE tensors per process (nce_loss keeps each pair's gathered bank
        rows (batch x (1 + K) x D) for the backward pass, and builds a (batch x (1 + K) x (branches - 1) x D)
        product and its gradient one pair at a time)."""
        nb, D, K = len(self.branches), self.feat_dim, self.nce_k
        banks = 4 * nb * n_train * D
        step = 4 * batch * (1 + K) * D * (nb + 2 * (nb - 1))
        return (banks + step, f"MCL's memory banks ({nb} x {n_train} x {D} floats) and a step's NCE scores "
                              f"(batch {batch} x {1 + K} rows, --nce-k {K})",
                "lower --nce-k, --feat-dim or --batch-size")

    def on_data(self, train_labels):
        """One bank row per training image, uniform in [-s, s], s = 1/sqrt(D/3) (official init);
        and the class table that negatives are drawn from (rebuilt on every start, not saved)."""
        n = len(train_labels)
        order, start, count = class_table(train_labels, self.num_classes)
        if bool((count == n).any()):
            raise ValueError("MCL needs training images of at least two classes to draw negatives")
        s = 1.0 / (self.feat_dim / 3) ** 0.5
        bank = torch.rand(len(self.branches), n, self.feat_dim, device=train_labels.device) * 2 * s - s
        self.register_buffer("memory", bank)
        for name, t in (("order", order), ("start", start), ("count", count)):
            self.register_buffer(name, t, persistent=False)

    def forward(self, x, y, idx, epoch):
        h = self.trunk(x)
        outs = [branch(h, features=True) for branch in self.branches]
        logits = [z.float() for z, _, _ in outs]  # losses in fp32 under autocast
        with torch.autocast(h.device.type, enabled=False):  # the embedding in fp32, like the NCE scores it feeds
            emb = torch.stack([F.normalize(head(f.float()), dim=1) for head, (_, f, _) in zip(self.embed, outs)])
        neg = sample_negatives(y, self.nce_k, self.order, self.start, self.count)
        self._stash = (emb.detach(), idx)  # detached: the bank update in after_step is not part of the graph
        return mcl_loss(logits, self.memory, emb, idx, neg, y, self.T, self.nce_t, self.dot_w, self.nce_w)

    @torch.no_grad()
    def after_step(self):
        """M_i[idx] <- normalise(m M_i[idx] + (1 - m) e_i(x)) with m = 0.5, for every branch i."""
        emb, idx = self._stash
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            # every rank updates with the whole global batch; pad to the fixed per-rank size with
            # copies of the first sample (duplicate rows then receive identical values)
            world = dist.get_world_size()
            pad = self.batch_size // world - len(idx)
            idx = torch.cat([idx, idx[:1].expand(pad)])
            emb = torch.cat([emb, emb[:, :1].expand(-1, pad, -1)], 1).contiguous()
            idxs, embs = [torch.empty_like(idx) for _ in range(world)], [torch.empty_like(emb) for _ in range(world)]
            dist.all_gather(idxs, idx)
            dist.all_gather(embs, emb)
            idx, emb = torch.cat(idxs), torch.cat(embs, 1)
        m = self.nce_m
        self.memory[:, idx] = F.normalize(m * self.memory[:, idx] + (1 - m) * emb, dim=2)
        self._stash = None

    def heads(self, x):
        h = self.trunk(x)
        logits = [branch(h) for branch in self.branches]
        heads = {f"branch{k + 1}": z for k, z in enumerate(logits)}
        heads["ensemble"] = torch.stack([z.float() for z in logits]).mean(0)  # mean of logits, as the official test
        return heads

    def head_params(self):
        n = {f"branch{k + 1}": common.count_params(self.trunk, b) for k, b in enumerate(self.branches)}
        return {**n, "ensemble": common.count_params(self.trunk, self.branches)}


# --recipe paper: the official code (winycg/MCL-OKD): batch 64, lr 0.05, cosine over 300 epochs (SGDR, T0 = 300)
PAPER = dict(batch_size=64, lr=0.05, cosine=True, epochs=300)


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--branches", type=int, default=4, check="two+", help="number of branches (views)")
    common.add_arg(p, "--T", type=float, default=3.0, check="positive", help="DOT temperature")
    common.add_arg(p, "--dot-w", type=float, default=1.0, check="nonneg", help="weight of DOT (last branch <- mean logits)")
    common.add_arg(p, "--nce-w", type=float, default=0.025, check="nonneg", help="weight of the summed pairwise NCE")
    common.add_arg(p, "--feat-dim", type=int, default=128, check="positive", help="embedding (and bank row) dimension")
    common.add_arg(p, "--nce-k", type=int, default=256, check="positive", help="negatives per image (official: 16384 for VGG-16)")
    common.add_arg(p, "--nce-t", type=float, default=0.1, check="positive", help="NCE temperature")
    common.add_arg(p, "--nce-m", type=float, default=0.5, check="unit", help="bank momentum: weight of the old row")
    args = common.parse(p, "mcl", paper=PAPER)
    if "," in args.arch:
        p.error("mcl.py splits one architecture into branches: give a single --arch")
    common.run(args, MCL)


if __name__ == "__main__":
    main()
