"""CL-ILR: Collaborative Learning for Deep Neural Networks, with intermediate-level representation
sharing (Guocong Song, Wei Chai; NeurIPS 2018). https://arxiv.org/abs/1805.11761

Idea: H classifier heads of one network learn together on the same batch. Each head learns from the
labels and from the consensus of the others: the mean of the OTHER heads' logits, softened by T, is
its soft target. The low layers are shared (ILR sharing), and "backpropagation rescaling" divides
the gradient entering a shared output (here as in MCL-OKD: by 2 at every split of the tree below),
so that with the default 4 heads a shared layer gets the mean, not the sum, of the gradients of the
heads above it. One head alone is deployed, at the backbone's cost.

    stem..stage1 --/2--+-- stage2 (a) --/2--+-- stage3 + fc --> z_1     hierarchical sharing with 4
                       |                    +-- stage3 + fc --> z_2     heads (the default); /k:
                       +-- stage2 (b) --/2--+-- stage3 + fc --> z_3     identity forward, gradient
                                            +-- stage3 + fc --> z_4     x 1/k backward
    so stem..stage1 gets 1/4 of the sum of the four heads' gradients, each stage2 copy 1/2 of its pair's.

Loss:  sum_h [ beta CE(z_h, y) + (1 - beta) KD(z_h <- t_h) ],  t_h = 1/(H-1) sum_{j != h} z_j,
       t_h detached; beta = 0.5, T = 2; no ramp-up.

Deviations from the paper, and choices (no official code; the public re-implementations disagree):
  1. What the paper's abstract and introduction (arXiv 1805.11761) confirm: heads of one network
     trained on the same data, the consensus of the other heads' views as supplementary supervision,
     and ILR sharing with backpropagation rescaling that aggregates the heads' gradient flows into
     the shared layers. Taken from the re-implementations, not from those sections of the paper:
     T = 2, beta = 0.5 (hard and soft weights summing to 1), the T^2 factor, the split points, and
     4 heads with hierarchical sharing as the setting (MCL-OKD's choice). T = 2 and beta = 0.5 are
     where two re-implementations agree, both written after the paper: winycg/MCL-OKD
     main_cifar_cl_ilr.py (--kd_T 2; 0.5 CE + 0.5 T^2 KL per head) and qq456cvb/Collaborative-Learning
     main.py (T = 2, beta = 0.5).
  2. The soft target t_h is detached, as in MCL-OKD and in qq456cvb (main.py line 106:
     q = tf.stop_gradient(q); its current README says so too; an older README said the gradient
     passed through q, which the code has not done since commit c1c4a73). DefangChen/OKDDip
     train_one.py (--avg --bpscale) does not detach it (utils.KL_Loss): that bug is not copied.
  3. The soft loss is kd() = T^2 KL, as MCL-OKD; qq456cvb uses the cross-entropy -sum q log p^T
     without T^2 (same gradient direction, T^2 = 4 times smaller).
  4. Hierarchical sharing, the default (--sharing hierarchical), splits as MCL-OKD
     models/cl_ilr_resnet.py: stem..stage1 shared by all heads, stage2 shared by heads 1-2 and by
     heads 3-4, each head its own stage3 + classifier; /2 at the stage1 output and at each stage2
     output. For every --arch the cut is the same in common.Net's stages: all but the last two
     shared, the second-to-last shared by pairs, the last per head. An odd --heads leaves the last
     head alone on its own stage2 copy (gradient x 1, as MCL-OKD).
     The rescaling is MCL-OKD's for every --heads: the stage1 output's gradient is divided by 2
     whatever the number of stage2 copies (cl_ilr_resnet.py: layer_ILR(x, 2)), each stage2 copy's by
     the number of its heads (2, or 1 for a lone last head). So stem..stage1 gets half the sum of what
     its copies pass down, g_h being head h's gradient: H = 4: (1/4) sum_h g_h, the heads' mean;
     H = 3: (g_1 + g_2)/4 + g_3/2; H = 2 (one copy): (g_1 + g_2)/4, half the mean; H = 5:
     (g_1 + .. + g_4)/4 + g_5/2; H = 6 (three copies): (1/4) sum_h g_h, 1.5x the mean. The rule
     "divide by the number of copies" would give the mean for H = 2 and 6; it is not used: MCL-OKD's
     rule is followed for every H (its runs use 4 heads, where the two rules agree).
  5. --sharing simple is OKDDip's variant (resnet_one.py --bpscale): stem..stage2 shared by every
     head, gradient / H at its output. OKDDip also uses T = 3, weights 1 and 1 and an 80-epoch
     ramp-up; only T is offered here (--T 3). No ramp-up: neither MCL-OKD nor qq456cvb has one.
  6. Recipe: the CIFAR protocol. MCL-OKD's defaults are the same except its learning rate, one
     cosine cycle over the 300 epochs (pass --cosine). beta = 0.5 halves the per-head loss against
     methods weighting CE and KD by 1 (ONE, OKDDip), so weight decay weighs twice as much relatively.
     Under SGD, twice the loss is exactly twice --lr with half --wd: `--lr 0.2 --wd 2.5e-4` trains CL
     with CE and KD weighted 1 and 1. With no official code, `--recipe paper` changes nothing.
  7. The backpropagation rescaling is an autograd.Function (ScaleGrad); --no-rescale sums the
     heads' gradients unscaled at every split (an ablation).
  8. "ensemble" is the mean of all H heads' logits; MCL-OKD's test-time "ensemble" is the mean of
     heads 1..H-1 (a leftover loop variable).
  9. Logged terms: "ce" = beta sum_h CE(z_h, y), "kd" = (1 - beta) sum_h KD(z_h <- t_h); loss = ce + kd.

Heads: every head ("head1" ... deployable: head1 = stem..stage1 + its stage2 + its stage3 + fc, the
backbone's size) and "ensemble" = mean of the heads' logits.

    python cl.py --arch resnet32 --dataset cifar100 --gpus 0
    python cl.py --arch resnet32 --sharing simple --T 3            # OKDDip's variant, without its ramp
    python cl.py --arch resnet32 --dataset cifar100 --recipe paper   # = the protocol
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


def peer_targets(logits):
    """t_h = 1/(H-1) sum_{j != h} z_j for every head h: the mean of the OTHER heads' logits."""
    total = torch.stack(logits).sum(0)
    return [(total - z) / (len(logits) - 1) for z in logits]


def cl_loss(logits, y, T, beta):
    """sum_h [beta CE(z_h, y) + (1 - beta) KD(z_h <- t_h)]. t_h is detached by kd(): head h's soft loss
    trains head h only, never the heads that make its target. Returns (total, {term: value})."""
    ce = beta * sum(F.cross_entropy(z, y) for z in logits)
    kl = (1 - beta) * sum(kd(z, t, T) for z, t in zip(logits, peer_targets(logits)))
    return ce + kl, {"ce": ce, "kd": kl}


class ScaleGrad(torch.autograd.Function):
    """Backpropagation rescaling: y = x forward; dL/dx = (1/k) dL/dy backward. Put on a shared output
    read by k consumers, it turns the sum of their gradients into their mean."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.k, None


class CL(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        H = args.heads
        _, self.branches = common.split_model(args.arch, num_classes, -1, H)  # each head: last stage + fc
        if args.sharing == "hierarchical":  # trunk = all but the last two stages; stage2 copies by pairs
            self.trunk, pairs = common.split_model(args.arch, num_classes, -2, (H + 1) // 2)
            self.mids = nn.ModuleList(p.stages[0] for p in pairs)  # only their second-to-last stage is used
            self.route = [h // 2 for h in range(H)]  # head h reads stage2 copy h // 2
        else:  # simple: one trunk, all but the last stage
            self.trunk, _ = common.split_model(args.arch, num_classes, -1, 1)
            self.mids, self.route = nn.ModuleList(), []
        self.T, self.beta, self.rescale = args.T, args.beta, not args.no_rescale
        self.deploy = "head1"

    def scale(self, x, k):
        """The shared output x, read by k consumers: its gradient is divided by k (unless --no-rescale)."""
        return ScaleGrad.apply(x, k) if self.rescale and k > 1 else x

    def head_logits(self, x):
        h = self.trunk(x)
        if len(self.mids):
            h = self.scale(h, 2)  # MCL-OKD: / 2 whatever the number of stage2 copies
            mids = [self.scale(m(h), self.route.count(g)) for g, m in enumerate(self.mids)]
            inputs = [mids[g] for g in self.route]
        else:
            inputs = [self.scale(h, len(self.branches))] * len(self.branches)
        return [b(v).float() for b, v in zip(self.branches, inputs)]  # losses in fp32 under autocast

    def forward(self, x, y, idx, epoch):
        return cl_loss(self.head_logits(x), y, self.T, self.beta)

    def heads(self, x):
        logits = self.head_logits(x)
        heads = {f"head{k + 1}": z for k, z in enumerate(logits)}
        heads["ensemble"] = torch.stack(logits).mean(0)
        return heads

    def head_params(self):
        t = common.count_params(self.trunk)
        mid = [common.count_params(self.mids[g]) for g in self.route] or [0] * len(self.branches)
        n = {f"head{k + 1}": t + m + common.count_params(b) for k, (m, b) in enumerate(zip(mid, self.branches))}
        return {**n, "ensemble": common.count_params(self)}


# --recipe paper: no official code and no recipe recovered from the paper: the protocol (README)
PAPER = dict()


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--heads", type=int, default=4, check="two+", help="number of classifier heads H")
    common.add_arg(p, "--sharing", default="hierarchical", choices=["hierarchical", "simple"],
                   help="hierarchical: stem..stage1 shared by all, stage2 by pairs; simple: stem..stage2 by all")
    common.add_arg(p, "--T", type=float, default=2.0, check="positive", help="distillation temperature")
    common.add_arg(p, "--beta", type=float, default=0.5, help="weight of the hard loss; the soft loss has 1 - beta")
    common.add_arg(p, "--no-rescale", action="store_true", help="no backpropagation rescaling (ablation)")
    args = common.parse(p, "cl", paper=PAPER)
    if "," in args.arch:
        p.error("cl.py builds one multi-head network: give a single --arch")
    if not 0 <= args.beta <= 1:  # 1 (labels only) is allowed: common.CHECKS has no closed [0, 1]
        p.error(f"argument --beta: {args.beta} must lie in [0, 1]")
    common.run(args, CL)


if __name__ == "__main__":
    main()
