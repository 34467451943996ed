"""OEC-KD: Online Ensemble Model Compression using Knowledge Distillation (Devesh Walawalkar, Zhiqiang
Shen, Marios Savvides; ECCV 2020). https://arxiv.org/abs/2011.07449

Idea: one shared stem feeds N students of the backbone's depth, each narrower than the last: student
k (k = 1..N) has every stage's width scaled by (N-k+1)/N, so student 1 is the full network (the
paper's "pseudo teacher") and the others are compressed copies of it. The mean of the students'
logits teaches every student; student 1 also teaches the others stage by stage through 1x1
adapters. One run trains N deployable models of N sizes (resnet32, N = 5: 0.47M down to 0.02M).

Loss:  0.7 sum_k CE(z_k, y) + 0.15 sum_{b, k>=2} MSE(A_bk(F_bk), F_b1) + 0.15 sum_k KD(z_k <- z_e),
       z_e = mean_k z_k, T = 2, no ramp-up; F_bk = student k's post-ReLU output of stage b, A_bk a 1x1
       conv with bias to student 1's width; z_e and F_b1 detached.

Deviations from the paper and the official code (Devwalkar/BOC-KD), and choices:
  - Recipe: the CIFAR protocol (SGD, Nesterov, lr 0.1, wd 5e-4, 300 epochs, normalised input, He init).
    Official (configs/Cifar100_exp/Resnet32.py): torch.optim.Adam, lr 1e-3, L2 weight decay 1e-5, batch
    128, 350 epochs, x0.1 at 200/300, zero-padded crop + flip, NO normalisation (pixels in [0, 1]),
    xavier_normal_ on every conv and linear weight of stem and students: `--recipe paper` sets all of
    these (--optimizer adam --norm none --init xavier); the adapters keep PyTorch's default init there,
    as in the official code, which creates them inside the loss. That is the CIFAR-100 config of resnet32,
    44, 56 and 110 (weights 0.7/0.15/0.15, T = 2: the defaults here); its resnet20 config differs (400
    epochs, x0.1 at 100/180/240/350, T = 3, weights 0.4/0.3/0.3) and the CIFAR-10 configs differ again
    (e.g. resnet32: SGD lr 0.1, wd 1e-4, T = 3, weights 0.4/0.3/0.3): give those options by hand.
  - Adapters are modules of the model, trained from the first step and saved in checkpoints. Official:
    created on the loss's first call, so absent from the optimizer for all of epoch 0 (untrained), not in
    its checkpoints (a resumed run gets fresh random adapters), and optimizer (Adam moments included) and
    scheduler re-created after epoch 0 to add them. Their lr is half the students' as in the official
    code (`lr*0.5`): --adapter-lr-scale 0.5, under both recipes. Their weight decay is --wd, as there.
  - The stem: every student's losses train it. The official flag Collective_Base_gradient=True does the
    inverse of its name, feeding students 2..N a detached copy of the stem's output (the CIFAR-100 configs
    set it False, which is what is done here). Not copied.
  - Ensemble: the plain mean of the logits. The official "learnable" weights (a tensor of 1/N with
    requires_grad) are in no optimizer, so they stay 1/N: the same thing.
  - Reported: the last epoch of student 1 (and every head). Official: each student's best of the test
    evaluations at the 0-based epochs 0, 10, ..., 340 (never the last); the paper states gains relative
    to the baseline ((new - base) / base).
  - Evaluation in eval mode (BN running statistics). Official: the students sit in a plain Python list
    (models/ResNet_cifar.py:185), so model.eval() (tools/train.py:633) never reaches them: every test
    batch of 64 is normalised with its own statistics. Not copied (a deployed net has no batch to lean on).
  - The ensemble's CE ("ce_e") is logged and not trained, as in the official code: loss = ce + feat + kd.
    The logged ce, feat and kd carry their weights (0.7, 0.15, 0.15).
  - Widths: w * (N-k+1) // N in integers, the official int(w * (N-k+1)/N) (equal here: tested, N <= 16);
    every BasicBlock whose input and output widths differ has a 1x1 conv + BN shortcut, so students 2..N
    have one in their first stage too. --arch: the BasicBlock CIFAR ResNets (resnet8..110, resnet8x4,
    resnet32x4); the official CIFAR configs use resnet20..110. Left out: a Dropout the official student
    defines and never applies, and the pseudo-teacher pre-training (off in every CIFAR-100 config).

Heads: every student ("student1" ... "studentN"; deployable: student1, the backbone's size) and
"ensemble" = mean of the students' logits. final.json's params: each student's own count (stem
included); the ensemble's is the stem plus all students (the adapters serve training only).

    python oeckd.py --arch resnet32 --dataset cifar100 --gpus 0
    python oeckd.py --arch resnet32 --dataset cifar100 --recipe paper   # Adam, 350 epochs, no normalisation
"""
import common  # before torch: a Ctrl-C while the imports run then ends in one line
import torch
import torch.nn as nn
import torch.nn.functional as F

# the backbones this method compresses: (blocks per stage, stage widths, stem width) of common's BasicBlock ResNets
RESNETS = {**{f"resnet{d}": ([(d - 2) // 6] * 3, [16, 32, 64], 16) for d in (8, 14, 20, 32, 44, 56, 110)},
           "resnet8x4": ([1, 1, 1], [64, 128, 256], 32), "resnet32x4": ([5, 5, 5], [64, 128, 256], 32)}


def student_widths(widths, k, N):
    """Stage widths of student k (k = 0..N-1 here, "student{k+1}" in the heads): w * (N-k)/N, truncated."""
    return [w * (N - k) // N for w in widths]


def kd(student, teacher, T):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, batch mean.
    The teacher is detached here: a KD term never trains its target."""
    return F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher.detach() / T, 1),
                    reduction="batchmean") * T * T


def feature_loss(maps, adapters):
    """L_feat = sum over stages b and students k >= 2 of MSE(A_bk(F_bk), F_b1), the mean over all elements.
    maps[k][b]: the post-ReLU output of stage b of student k+1; adapters[k-1][b]: A_b(k+1), 1x1 conv with
    bias to student 1's width. F_b1 is detached: student 1 is the target here, never pulled toward the
    small students (the official code detaches it too)."""
    return sum(F.mse_loss(adapters[k - 1][b](f).float(), maps[0][b].detach().float())
               for k in range(1, len(maps)) for b, f in enumerate(maps[k]))


def oeckd_loss(logits, feat, y, T, w_ce, w_feat, w_kd):
    """w_ce sum_k CE(z_k, y) + w_feat L_feat + w_kd sum_k KD(z_k <- z_e), z_e = mean_k z_k. kd() detaches z_e:
    the ensemble target trains no student through itself, while every student, student 1 included, is
    pulled toward it. Returns (total, {term: value}), weights applied; "ce_e" = CE(z_e, y) is logged only."""
    z_e = torch.stack(logits).mean(0)
    ce = w_ce * sum(F.cross_entropy(z, y) for z in logits)
    kl = w_kd * sum(kd(z, z_e, T) for z in logits)
    feat = w_feat * feat
    ce_e = F.cross_entropy(z_e.detach(), y)  # no gradient, not in the loss
    return ce + feat + kl, {"ce": ce, "feat": feat, "kd": kl, "ce_e": ce_e}


def stage_maps(student, h):
    """(logits, [output of each stage]) of a student (a common.Net without the stem) on the stem's output h."""
    maps = []
    for stage in student.stages:
        h = stage(h)
        maps.append(h)
    return student.fc(h.mean((2, 3))), maps


@torch.no_grad()
def xavier_init(module):
    """The official code's init: xavier_normal_ on every conv and linear weight; biases and BN as PyTorch's."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
    return module


class OECKD(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        depths, widths, stem = RESNETS[args.arch]
        N = args.students
        ws = [student_widths(widths, k, N) for k in range(N)]
        nets = [common._resnet(common.BasicBlock, depths, w, num_classes, stem) for w in ws]  # each: stem + stages + fc
        for net in nets:
            if args.init == "xavier":
                xavier_init(net)
            else:
                common.init_weights(net)
        self.stem = nets[0].stages[0]  # conv3x3 + BN + ReLU, shared by every student (the other nets' stems unused)
        self.students = nn.ModuleList(common.Net(list(n.stages[1:]), n.fc) for n in nets)
        # adapters[k - 1][b]: student k+1's stage-b map -> student 1's width (1x1 conv with bias), k = 1..N-1
        self.adapters = nn.ModuleList(nn.ModuleList(nn.Conv2d(c, c1, 1) for c, c1 in zip(ws[k], ws[0]))
                                      for k in range(1, N))
        if args.init == "he":
            common.init_weights(self.adapters)
        self.T, self.weights, self.args = args.T, (args.ce_w, args.feat_w, args.kd_w), args
        self.deploy = "student1"

    def forward(self, x, y, idx, epoch):
        h = self.stem(x)  # not detached for any student: all of them train the stem (the official flag bug is not copied)
        outs = [stage_maps(s, h) for s in self.students]
        logits = [z.float() for z, _ in outs]  # losses in fp32 under autocast
        feat = feature_loss([m for _, m in outs], self.adapters)
        return oeckd_loss(logits, feat, y, self.T, *self.weights)

    def heads(self, x):
        h = self.stem(x)
        logits = [s(h).float() for s in self.students]
        heads = {f"student{k + 1}": z for k, z in enumerate(logits)}
        heads["ensemble"] = torch.stack(logits).mean(0)
        return heads

    def head_params(self):
        t = common.count_params(self.stem)
        n = {f"student{k + 1}": t + common.count_params(s) for k, s in enumerate(self.students)}
        return {**n, "ensemble": t + common.count_params(self.students)}

    def param_groups(self, wd):
        """Stem and students at the scheduled lr, the adapters at --adapter-lr-scale times it; all decay wd."""
        nets = [*self.stem.parameters(), *self.students.parameters()]
        return [{"params": nets, "weight_decay": wd},
                {"params": list(self.adapters.parameters()), "weight_decay": wd, "lr_scale": self.args.adapter_lr_scale}]

    def make_optimizer(self, groups):
        """--optimizer adam: the official torch.optim.Adam (betas 0.9/0.999, L2 weight decay per group), fused so
        that its step counts stay on the device (the default implementation reads them every step).
        --optimizer sgd: None, the loop's SGD."""
        if self.args.optimizer == "sgd":
            return None
        return torch.optim.Adam(groups, lr=self.args.lr, fused=True)


# --recipe paper: the official config (Devwalkar/BOC-KD configs/Cifar100_exp/Resnet32.py; models/ResNet_cifar.py's
# xavier_normal_ init; utils/data_builder.py: Pad(4) + flip + crop, ToTensor, no Normalize)
PAPER = dict(optimizer="adam", lr=1e-3, wd=1e-5, batch_size=128, epochs=350, schedule=[200, 300], norm="none",
             init="xavier")


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--students", type=int, default=5, check="two+", help="number of students N; student k has "
                   "(N-k+1)/N of the backbone's widths")
    common.add_arg(p, "--T", type=float, default=2.0, check="positive", help="distillation temperature")
    common.add_arg(p, "--ce-w", type=float, default=0.7, check="nonneg", help="weight of the students' summed CE")
    common.add_arg(p, "--feat-w", type=float, default=0.15, check="nonneg", help="weight of the stage-wise feature MSE")
    common.add_arg(p, "--kd-w", type=float, default=0.15, check="nonneg", help="weight of the summed KD from the ensemble")
    common.add_arg(p, "--adapter-lr-scale", type=float, default=0.5, check="positive",
                   help="the adapters' lr as a multiple of the scheduled lr (official: 0.5)")
    common.add_arg(p, "--optimizer", default="sgd", choices=["sgd", "adam"],
                   help="sgd: the loop's (--momentum, Nesterov); adam: the official code's (betas 0.9/0.999, L2 --wd; "
                        "give --lr: the protocol's 0.1 is SGD's)")
    common.add_arg(p, "--init", default="he", choices=["he", "xavier"],
                   help="he: the references' (common.init_weights); xavier: the official code's xavier_normal_")
    args = common.parse(p, "oeckd", paper=PAPER)
    if args.arch not in RESNETS:
        p.error(f"oeckd.py narrows a BasicBlock CIFAR ResNet: --arch one of {', '.join(RESNETS)}")
    if min(student_widths(RESNETS[args.arch][1], args.students - 1, args.students)) < 1:
        p.error(f"--students {args.students}: the smallest student of {args.arch} would have a stage of 0 channels")
    common.run(args, OECKD)


if __name__ == "__main__":
    main()
