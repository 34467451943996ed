"""FFL: Feature Fusion for Online Mutual Knowledge Distillation (Jangho Kim, Minsung Hyun, Inseop Chung,
Nojun Kwak; ICPR 2020). https://arxiv.org/abs/1904.09058

Idea: N sub-networks share the low stages and each has its own last stage and classifier (FFL-S).
A fusion module concatenates their last feature maps and learns a fused classifier from them. The
fused classifier teaches every sub-network, and the sub-networks' ensemble (mean of logits) teaches
the fused classifier back: knowledge goes round in both directions.

Loss:  sum_i CE(z_i, y) + CE(z_f, y) + w(e) [sum_i KD(z_i <- z_f) + KD(z_f <- z_ens)],
       z_f = Fusion(concat_i F_i), z_ens = mean_i z_i; every KD target (z_f, z_ens) detached.

Fusion module (official our_network.py Fusion_module, generalised from 2 to N maps of C channels):
concat (N*C) -> depthwise 3x3 conv (no bias) + BN + ReLU -> 1x1 conv N*C -> C (no bias) + BN + ReLU
-> global average pool -> FC (with bias).

Deviations from the paper and the official code (Jangho-Kim/FFL-pytorch), and choices:
  - Recipe: the CIFAR protocol (wd 5e-4 for the sub-networks, zero padding). The official code uses
    wd 1e-4, reflect padding, and runs 301 epochs (0..300 inclusive): `--recipe paper` sets these;
    Nesterov and lr 0.1 x0.1 at 150/225 agree. The fusion module has its own weight decay,
    --fusion-wd, official value 1e-5.
  - Only the official code's shared-trunk setting (FFL-S), with N = --branches sub-networks
    (official: 2); the paper's separate or heterogeneous sub-networks are not offered. The branch
    point is the last stage for every --arch (common.split_model at=-1); C is that stage's width.
  - The fused classifier's losses (its CE and KD(fused <- ensemble)) reach the sub-networks and the
    trunk through the concatenated feature maps, which are not detached, as in the official code.
  - w(e) = exp(-5 (1 - min(e, 80)/80)^2) per epoch (--rampup 80; 0 turns it off), the official
    ramp-up; left out, --rampup is 80/300 of --epochs (README "Shorter runs"). The official KL adds
    1e-7 to the target probabilities; kd() here does not.
  - The fusion module is initialised as the official code does (He normal, fan-out; BN 1/0), like
    every backbone here (common.init_weights).
  - The logged "kd" (sum_i KD(z_i <- z_f)) and "fusion" (KD(z_f <- z_ens)) are the ramped terms, so
    that loss = ce + ce_f + kd + fusion.

Heads: every sub-network ("branch1" ... deployable: branch1), "fused" (the fusion module's
classifier) and "ensemble" = mean of the sub-networks' logits (the official code tests
sub-networks and fused only).

    python ffl.py --arch resnet32 --dataset cifar100 --gpus 0
    python ffl.py --arch resnet32 --dataset cifar100 --recipe paper   # wd 1e-4, 301 epochs, reflect padding
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


def ffl_loss(logits, fused, y, T, w):
    """sum_i CE(z_i, y) + CE(z_f, y) + w * [sum_i KD(z_i <- z_f) + KD(z_f <- mean_i z_i)]. Both targets
    are detached by kd(): z_f is not trained by the branches' KD, the ensemble not by the fused KD.
    Returns (total, {term: value}) with "kd" and "fusion" already multiplied by w."""
    ensemble = torch.stack(logits).mean(0)
    ce = sum(F.cross_entropy(z, y) for z in logits)
    ce_f = F.cross_entropy(fused, y)
    kl = w * sum(kd(z, fused, T) for z in logits)
    fusion = w * kd(fused, ensemble, T)
    return ce + ce_f + kl + fusion, {"ce": ce, "ce_f": ce_f, "kd": kl, "fusion": fusion}


class FFL(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        self.trunk, self.branches = common.split_model(args.arch, num_classes, -1, args.branches)
        c = self.branches[0].fc.in_features  # C: channels of a branch's last feature map
        cat = args.branches * c
        # the fusion module is itself stages + global pool + FC, so common.Net builds it
        self.fusion = common.Net([common.conv_bn(cat, cat, 3, groups=cat),  # depthwise 3x3 + BN + ReLU
                                  common.conv_bn(cat, c, 1)],                # pointwise N*C -> C + BN + ReLU
                                 nn.Linear(c, num_classes))
        common.init_weights(self.fusion)  # He-normal convs, BN 1/0, as the official code's model init
        self.T, self.rampup, self.fusion_wd = args.T, args.rampup, args.fusion_wd
        self.deploy = "branch1"

    def forward(self, x, y, idx, epoch):
        h = self.trunk(x)
        outs = [b(h, features=True) for b in self.branches]  # (logits, pooled feature, feature map) each
        logits = [z.float() for z, _, _ in outs]  # losses in fp32 under autocast
        fused = self.fusion(torch.cat([f for _, _, f in outs], 1)).float()  # maps not detached (official)
        return ffl_loss(logits, fused, y, self.T, common.ramp_up(epoch, self.rampup))

    def heads(self, x):
        h = self.trunk(x)
        outs = [b(h, features=True) for b in self.branches]
        logits = [z.float() for z, _, _ in outs]
        heads = {f"branch{k + 1}": z for k, z in enumerate(logits)}
        heads["fused"] = self.fusion(torch.cat([f for _, _, f in outs], 1)).float()
        heads["ensemble"] = torch.stack(logits).mean(0)
        return heads

    def head_params(self):
        t = common.count_params(self.trunk)
        n = {f"branch{k + 1}": t + common.count_params(b) for k, b in enumerate(self.branches)}
        stages = sum(common.count_params(b.stages) for b in self.branches)  # the fused head needs no branch FC
        return {**n, "fused": t + stages + common.count_params(self.fusion),
                "ensemble": t + common.count_params(self.branches)}

    def param_groups(self, wd):
        """Sub-networks (trunk and branches) decay with --wd, the fusion module with --fusion-wd."""
        return [{"params": [p for n, p in self.named_parameters() if not n.startswith("fusion.")], "weight_decay": wd},
                {"params": list(self.fusion.parameters()), "weight_decay": self.fusion_wd}]


# --recipe paper: the official code (Jangho-Kim/FFL-pytorch): sub-network wd 1e-4, fusion module 1e-5,
# 301 epochs (0..300), x0.1 at 150/225, reflect padding
PAPER = dict(wd=1e-4, fusion_wd=1e-5, epochs=301, schedule=[150, 225], padding="reflect")


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--branches", type=int, default=2, check="two+", help="number of sub-networks N")
    common.add_arg(p, "--T", type=float, default=3.0, check="positive", help="distillation temperature")
    common.add_epochs_arg(p, "--rampup", 80, "epochs of the sigmoid ramp-up of the KD weights; 0: none")
    common.add_arg(p, "--fusion-wd", type=float, default=1e-5, check="nonneg", help="weight decay of the fusion module")
    args = common.parse(p, "ffl", paper=PAPER)
    if "," in args.arch:
        p.error("ffl.py builds one multi-branch network (FFL-S): give a single --arch")
    common.run(args, FFL)


if __name__ == "__main__":
    main()
