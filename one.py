"""ONE: Knowledge Distillation by On-the-fly Native Ensemble (Xu Lan, Xiatian Zhu, Shaogang Gong;
NeurIPS 2018). https://arxiv.org/abs/1806.04606

Idea: one network whose low stages are shared and whose last stage is copied into m branches. A
gate looks at the shared features and weights the branches' logits per sample; that gated ensemble
is the teacher, trained on the labels with the branches, and each branch mimics it. At test time
one branch alone ("ONE") costs what the plain backbone costs; the gated ensemble is "ONE-E".

Loss:  sum_i CE(z_i, y) + CE(z_e, y) + w(e) * sum_i KD(z_i <- z_e),  z_e = sum_i g_i z_i,
       g = softmax(ReLU(BN(W GAP(h)))) over branches, h = shared trunk output; z_e detached in KD only.

Deviations from the paper and the official code (Lan1991Xu/ONE_NeurIPS2018), and choices:
  - w(e) = exp(-5 (1 - min(e, 80)/80)^2) per epoch (--rampup 80, 0 turns it off) is the official
    code's; the paper does not mention a ramp-up. Left out, --rampup is 80/300 of --epochs (README
    "Shorter runs"), so a 10-epoch run still ramps up instead of staying near w = 0.007.
  - Recipe: the CIFAR protocol (wd 5e-4, Nesterov, x0.1 at 150/225, per-dataset normalisation). The
    official scripts use wd 1e-4, no Nesterov, drops at 151/225 and, on every dataset, the CIFAR-10 mean
    with the std (0.2023, 0.1994, 0.2010): `--recipe paper` sets all of these (--norm cifar10-legacy).
  - Pitfall: the official "ResNet-110" is a 164-layer net (Bottleneck blocks, n = 18 per stage,
    1.73M parameters), not He et al.'s BasicBlock resnet110 here (also 1.73M) nor resnet110b
    (the PCL/OKDDip Bottleneck [12,12,12]). Compare ResNet-110 numbers with that in mind.
  - The branch point is the last stage for every --arch (common.split_model at=-1); the gate's
    input width is whatever the trunk outputs. The official KL adds 1e-7 to the target
    probabilities; kd() here does not.
  - The logged "kd" is the ramped term, w(e) * sum_i KD, so that loss = ce + ce_e + kd.

Heads: every branch ("branch1" ... deployable: branch1 = "ONE") and "ensemble" = the gated teacher
logits z_e ("ONE-E").

    python one.py --arch resnet32 --dataset cifar100 --gpus 0
    python one.py --arch resnet32 --dataset cifar100 --recipe paper   # the official scripts' recipe (above)
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


def teacher_logits(logits, g):
    """z_e = sum_i g_i * z_i: the gate-weighted sum of the branch logits. logits: m x (B, C); g: (B, m)."""
    return sum(g[:, i, None] * z for i, z in enumerate(logits))


def one_loss(logits, g, y, T, w):
    """sum_i CE(z_i, y) + CE(z_e, y) + w * sum_i KD(z_i <- z_e). z_e is trained (gate included) by its
    CE only: kd() detaches it. Returns (total, {term: value}) with "kd" already multiplied by w."""
    z_e = teacher_logits(logits, g)
    ce = sum(F.cross_entropy(z, y) for z in logits)
    ce_e = F.cross_entropy(z_e, y)
    kl = w * sum(kd(z, z_e, T) for z in logits)
    return ce + ce_e + kl, {"ce": ce, "ce_e": ce_e, "kd": kl}


class ONE(nn.Module):
    min_batch = 2  # common.run refuses a batch (or an epoch's short last batch) of 1 image per process
    min_batch_why = "its gate normalises over the batch (BatchNorm1d)"

    def __init__(self, args, num_classes):
        super().__init__()
        self.trunk, self.branches = common.split_model(args.arch, num_classes, -1, args.branches)
        with torch.no_grad():  # trunk output width from a dry run in eval mode (BN statistics untouched)
            c = self.trunk.eval()(torch.zeros(2, 3, 32, 32)).shape[1]
        self.trunk.train()
        m = args.branches
        self.gate = nn.Sequential(nn.Linear(c, m), nn.BatchNorm1d(m), nn.ReLU(inplace=True))
        self.T, self.rampup = args.T, args.rampup
        self.deploy = "branch1"

    def gate_weights(self, h):
        """g = softmax over branches of ReLU(BN(W * GAP(h) + b)), h = shared trunk output; (B, m)."""
        return self.gate(h.mean((2, 3))).float().softmax(1)

    def forward(self, x, y, idx, epoch):
        h = self.trunk(x)
        logits = [b(h).float() for b in self.branches]  # losses in fp32 under autocast
        return one_loss(logits, self.gate_weights(h), y, self.T, common.ramp_up(epoch, self.rampup))

    def heads(self, x):
        h = self.trunk(x)
        logits = [b(h).float() for b in self.branches]
        heads = {f"branch{k + 1}": z for k, z in enumerate(logits)}
        heads["ensemble"] = teacher_logits(logits, self.gate_weights(h))
        return heads

    def head_params(self):
        t = common.count_params(self.trunk)
        n = {f"branch{k + 1}": t + common.count_params(b) for k, b in enumerate(self.branches)}
        return {**n, "ensemble": common.count_params(self)}


# --recipe paper: the official scripts (Lan1991Xu/ONE_NeurIPS2018): wd 1e-4, no Nesterov, x0.1 at 151/225,
# its CIFAR-10 statistics (std 0.2023, 0.1994, 0.2010) on every dataset
PAPER = dict(wd=1e-4, no_nesterov=True, schedule=[151, 225], norm="cifar10-legacy")


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--branches", type=int, default=3, check="two+", help="number of branches m")
    common.add_arg(p, "--T", type=float, default=3.0, check="positive", help="distillation temperature")
    common.add_epochs_arg(p, "--rampup", 80, "epochs of the sigmoid ramp-up of the KD weight; 0: none")
    args = common.parse(p, "one", paper=PAPER)
    if "," in args.arch:
        p.error("one.py builds one multi-branch network: give a single --arch")
    common.run(args, ONE)


if __name__ == "__main__":
    main()
