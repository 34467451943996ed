"""ReviewKD: Distilling Knowledge via Knowledge Review (Chen, Liu, Zhao, Jia; CVPR 2021). https://arxiv.org/abs/2104.09044

Idea: offline feature distillation across levels ("knowledge review"): each level of a frozen teacher
supervises a fusion of the student's same and deeper levels, so a deep student stage also learns from
the teacher's shallower levels. The student's features, deepest first, pass through attention-based
fusion modules (ABF): each level's feature is projected and fused with the residual from the deeper
level, then mapped to the teacher's channels and compared with the teacher's feature of that level by
a hierarchical context loss (HCL). The ABFs exist only for training.

  student levels f_1..f_L = stage outputs (post-ReLU; WRN: below) + the pooled feature as an (N, C, 1, 1) map
  teacher levels t_1..t_L = PRE-ReLU outputs of each stage's last block + the pooled feature
  ABF_L: x = BN(Conv1x1(f_L)); out_L = BN(Conv3x3(x)); residual r = x
  ABF_i (i < L): x = BN(Conv1x1(f_i)); u = nearest-upsample(r); (a, b) = sigmoid(Conv1x1([x, u]))
                 x = a x + b u; out_i = BN(Conv3x3(x)); r = x
  HCL(out, t) = [MSE(out, t) + sum_k w_k MSE(AAP_k(out), AAP_k(t))] / (1 + sum_k w_k), pools k = 4, 2, 1
                below the map's size, weights 1/2, 1/4, 1/8 in that order

Loss:  CE(z_S, y) + lambda min(1, e / W) sum_i HCL(out_i, t_i),  e the 0-based epoch, W = --warmup,
teacher features without a graph. Logged terms: "ce" and "hcl" (the weighted HCL; they add up to the loss).

lambda per (teacher, student) as the official script/reviewKD.sh: resnet56->resnet20 0.6,
resnet110->resnet32 1.0, resnet32x4->resnet8x4 5.0, wrn_40_2->wrn_16_2 and wrn_40_2->wrn_40_1 5.0; any
other pair 1.0 (train.py's --kd-loss-weight default); `--lambda` sets it.

Backbones: the CIFAR ResNets (resnet8..110, resnet110b, resnet8x4, resnet32x4, wrn_20_8: common.py's
BasicBlock/Bottleneck stages) and the WRNs (wrn_*); other students or teachers are refused in one line.
For a WRN (pre-activation blocks) the levels are the stage outputs, the last one before the final
BN-ReLU, as in the official wide_resnet_cifar.py; the teacher's pre-activation of a level is the BN
that opens the next stage (the final BN for the last), without its ReLU. The teacher's pre-ReLU
features are read by running its stages here (the last block's body + shortcut, then the ReLU), which
computes exactly the network's own forward (tested), so common.py's networks need no hook for it.

The teacher is a checkpoint written by baseline.py, loaded and checked exactly as sokd.py loads its
teacher; train it first, e.g.
    python baseline.py --arch resnet110 --dataset cifar100

Deviations from the official code (dvlab-research/ReviewKD, CIFAR-100/: train.py, model/reviewkd.py,
model/resnet_cifar.py, model/wide_resnet_cifar.py, util/misc.py), and choices where the spec was open:
  1. The frozen teacher runs in eval mode, always (train() is overridden). The official train.py never
     calls teacher.eval(): its teacher runs in train mode, so its features are normalised with batch
     statistics and its BN running statistics drift with the student's training batches.
  2. Recipe: the shared protocol (300 epochs, x0.1 at 150/225, CIFAR-100 statistics) instead of the
     official 240 epochs, x0.1 after the 0-based epochs 150, 180, 210 (lr_schedule runs after each
     epoch, so the first epoch at the lower rate is index 151: --schedule 151 181 211) and CIFAR-10
     mean/std on CIFAR-100 (train.py:96-97, (125.3, 123.0, 113.9)/255 and (63.0, 62.1, 66.7)/255; here
     `--norm cifar10`, equal to the fourth decimal); lr 0.1, batch 128, SGD 0.9 Nesterov and wd 5e-4 are the
     same (the official lr is 0.02 for ShuffleNet/MobileNet students). `--recipe paper` sets all of these.
     The official teachers come from the same train.py and its best test epoch; here a baseline.py
     run's last epoch (`python baseline.py --recipe paper` is SOKD's teacher recipe, not this one); the
     teacher `--recipe paper` expects is train.py's own baseline (script/baseline.sh): e.g.
     `python baseline.py --arch resnet56 --epochs 240 --schedule 151 181 211 --norm cifar10`.
  3. The warm-up W: the official 20 epochs of its 240, the same fraction (1/12) of every run here:
     declared as 25 of the protocol's 300 epochs and scaled with --epochs like every ramp-up
     (20 under --recipe paper, 5 in a 60-epoch run); `--warmup N` sets it, 0 turns it off.
  4. HCL's pooled levels: the official hcl() halves the weight for each pool size it uses (the first
     used gets 1/2); with CIFAR maps of 32, 16 and 8 that is 1/2, 1/4, 1/8 for pools 4, 2, 1 as the
     paper writes, and the same code is used here (a 4x4 map would weigh pools 2, 1 by 1/2, 1/4).
  5. Student and teacher must give maps of the same size at every level (so the official ABF's extra
     resize to the teacher's size, used for its ShuffleNet/MobileNet/VGG students, is not needed here).
  6. The ABFs' convolutions are initialised as the official ABF (kaiming_uniform_, a=1; the attention
     conv and BN with PyTorch's defaults), trained by the student's SGD with its weight decay, and
     dropped at test time (not part of the student's parameter count).
  7. The reported number is the last epoch's student; the official code reports its best test epoch.
  8. --bench with no teacher checkpoint times ReviewKD with a randomly initialised teacher.

Heads: "student" (deployable) and "teacher" (the frozen teacher, constant over training, as in
sokd.py). An offline method's cost is the teacher's training plus the student's.

    python reviewkd.py --arch resnet32 --dataset cifar100 --gpus 0   # reads runs/baseline-resnet110-cifar100-s0
    python reviewkd.py --arch wrn_40_1 --teacher runs/baseline-wrn_40_2-cifar100-s0/checkpoint.pt
    python baseline.py --arch resnet56 --epochs 240 --schedule 151 181 211 --norm cifar10 --out runs/t56-paper
    python reviewkd.py --arch resnet20 --recipe paper --teacher runs/t56-paper/checkpoint.pt   # item 2
"""
import os

import common  # before torch: a Ctrl-C while the imports run then ends in one line
import torch
import torch.nn as nn
import torch.nn.functional as F


def hcl(student, teacher):
    """Hierarchical context loss, summed over levels: per level
    [MSE(fs, ft) + sum_k w_k MSE(AAP_k fs, AAP_k ft)] / (1 + sum_k w_k) over the pool sizes k in (4, 2, 1)
    smaller than the map, w = 1/2, 1/4, 1/8 in that order (MSE: mean over every element)."""
    total = 0.0
    for fs, ft in zip(student, teacher):
        ft = ft.detach()  # the teacher's features are targets (no graph anyway: the teacher is frozen)
        loss, w, norm = F.mse_loss(fs, ft), 1.0, 1.0
        for k in (4, 2, 1):
            if k >= fs.shape[2]:
                continue
            w /= 2
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, k), F.adaptive_avg_pool2d(ft, k))
            norm += w
        total = total + loss / norm
    return total


def reviewkd_loss(z_s, outs, t_levels, y, w):
    """CE(z_S, y) + w sum_i HCL(out_i, t_i), w = lambda min(1, e/W). Returns (total, {term: value}), "hcl"
    already multiplied by w."""
    ce = F.cross_entropy(z_s, y)
    loss_hcl = w * hcl(outs, t_levels)
    return ce + loss_hcl, {"ce": ce, "hcl": loss_hcl}


def warm_up(epoch, length):
    """min(1, e / W) for the 0-based epoch e (0 in the first epoch); 1 when W = 0."""
    return 1.0 if length == 0 else min(1.0, epoch / length)


# ---- features: common.py's ResNet and WRN stages, read level by level

def family(net):
    """"resnet" (stages of common.BasicBlock / Bottleneck), "wrn" (stages of common.PreActBlock, the last
    ending with the final BN-ReLU) or None: the backbones whose levels ReviewKD can take."""
    stages = list(net.stages[1:]) if isinstance(net, common.Net) else []
    if not stages or not all(isinstance(s, nn.Sequential) and len(s) for s in stages):
        return None
    if all(isinstance(b, (common.BasicBlock, common.Bottleneck)) for s in stages for b in s):
        return "resnet"
    norm = stages[-1][-1]
    if (all(isinstance(b, common.PreActBlock) for s in stages[:-1] for b in s)
            and all(isinstance(b, common.PreActBlock) for b in stages[-1][:-1])
            and isinstance(norm, nn.Sequential) and len(norm) == 2 and isinstance(norm[0], nn.BatchNorm2d)):
        return "wrn"
    return None


def features(net, x, pre_relu=False):
    """(levels, logits) of a resnet- or wrn-family common.Net: one level per stage after the stem, then
    the pooled feature as an (N, C, 1, 1) map. pre_relu: each stage's last block's output before its
    ReLU (resnet), or the next BN's output before its ReLU (wrn) - the teacher's levels; the BN is
    applied a second time, so call it on a net in eval mode. The logits are the net's forward's."""
    h, levels = net.stages[0](x), []
    if family(net) == "resnet":
        for stage in net.stages[1:]:
            if pre_relu:
                h, last = stage[:-1](h), stage[-1]
                pre = last.body(h) + last.short(h)  # BasicBlock / Bottleneck forward, without its final ReLU
                h = F.relu(pre)
                levels.append(pre)
            else:
                h = stage(h)
                levels.append(h)
        pooled = h.mean((2, 3), keepdim=True)
    else:  # wrn: a block's output is the raw residual sum; the BN-ReLU that follows belongs to the next block
        stages = net.stages[1:]
        for i, stage in enumerate(stages[:-1]):
            h = stage(h)
            levels.append(stages[i + 1][0].bn1(h) if pre_relu else h)
        h = stages[-1][:-1](h)
        pre = stages[-1][-1][0](h)  # the final BN
        levels.append(pre if pre_relu else h)
        pooled = F.relu(pre).mean((2, 3), keepdim=True)
    return levels + [pooled], net.fc(pooled.flatten(1))


class ABF(nn.Module):
    """Attention-based fusion of one level: 1x1 conv + BN to M channels, fused (except at the deepest
    level) with the nearest-upsampled residual r of the deeper level by two sigmoid attention maps from
    a 1x1 conv (2M -> 2, bias) on [x, r]; then 3x3 conv + BN to the teacher's channels.
    forward(f, r) -> (output compared with the teacher, the fused x: the residual for the next level)."""

    def __init__(self, c_in, mid, c_out, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.att = nn.Conv2d(2 * mid, 2, 1) if fuse else None
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # the official ABF's initialisation
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, f, residual=None):
        x = self.conv1(f)
        if self.att is not None:
            r = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = torch.sigmoid(self.att(torch.cat([x, r], 1)))
            x = x * z[:, :1] + r * z[:, 1:]
        return self.conv2(x), x


def review(abfs, levels):
    """The ABFs applied deepest level first, each fed the residual of the level below it in depth.
    Returns their outputs in level order (shallowest first), as the teacher's levels."""
    outs, residual = [None] * len(levels), None
    for i in reversed(range(len(levels))):
        outs[i], residual = abfs[i](levels[i], residual)
    return outs


# ---- the model

# the tables' teacher of each student, and the official lambda of each pair (script/reviewKD.sh)
TEACHERS = {"resnet20": "resnet56", "resnet32": "resnet110", "resnet8x4": "resnet32x4", "wrn_16_2": "wrn_40_2",
            "wrn_40_1": "wrn_40_2"}
LAMBDAS = {("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1.0, ("resnet32x4", "resnet8x4"): 5.0,
           ("wrn_40_2", "wrn_16_2"): 5.0, ("wrn_40_2", "wrn_40_1"): 5.0}
LAMBDA_DEFAULT = 1.0  # train.py's --kd-loss-weight default, for any other pair


def level_shapes(net, pre_relu):
    """[(channels, height)] of each level of `net` for a 32x32 input (no state changes: eval, no grad)."""
    mode = net.training
    with torch.no_grad():
        levels, _ = features(net.eval(), torch.zeros(1, 3, 32, 32), pre_relu)
    net.train(mode)
    return [(f.shape[1], f.shape[2]) for f in levels]


def check_pair(student, s_arch, teacher, t_arch):
    """The levels [(channels, size)] of student and teacher; ValueError (one line) when either backbone
    is not of a family whose levels can be read, or their levels differ in number or size."""
    for name, role, net in ((s_arch, "student", student), (t_arch, "teacher", teacher)):
        if family(net) is None:
            raise ValueError(f"reviewkd.py reads the levels of the CIFAR ResNet and WRN backbones only (resnet8..110, "
                             f"resnet110b, resnet8x4, resnet32x4, wrn_*); the {role} {name} is not one of them")
    s, t = level_shapes(student, False), level_shapes(teacher, True)
    if [h for _, h in s] != [h for _, h in t]:
        raise ValueError(f"the student {s_arch} and the teacher {t_arch} give levels of sizes "
                         f"{[h for _, h in s]} and {[h for _, h in t]}: ReviewKD pairs them level by level")
    return s, t


class ReviewKD(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        if args.teacher:
            t_arch, self.teacher, _ = common.load_teacher(args.teacher, args.teacher_arch, args.dataset, num_classes)
        else:  # --bench with no checkpoint only (main() checks): the step time does not depend on the weights
            t_arch, self.teacher = args.teacher_arch, common.build_model(args.teacher_arch, num_classes)
        self.teacher.requires_grad_(False)  # frozen: not in the optimizer, no weight decay either
        self.student = common.build_model(args.arch, num_classes)
        s, t = check_pair(self.student, args.arch, self.teacher, t_arch)
        mid = min(512, s[-1][0])  # M: the pooled level's student channels, at most 512
        self.abfs = nn.ModuleList(ABF(cs, mid, ct, fuse=i < len(s) - 1)
                                  for i, ((cs, _), (ct, _)) in enumerate(zip(s, t)))
        self.lam, self.warmup = getattr(args, "lambda"), args.warmup
        self.deploy = "student"
        self.train()

    def train(self, mode=True):
        """The teacher stays in eval mode whatever the loop asks: its BN layers keep the running
        statistics it was trained with (the official CIFAR code never calls teacher.eval())."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x, y, idx, epoch):
        with torch.no_grad():  # the frozen teacher: no graph, nothing reaches it
            t_levels, _ = features(self.teacher, x, pre_relu=True)
        s_levels, z_s = features(self.student, x)
        outs = review(self.abfs, s_levels)
        w = self.lam * warm_up(epoch, self.warmup)  # a Python float: no host sync
        floats = lambda fs: [f.float() for f in fs]  # losses in fp32 under autocast
        return reviewkd_loss(z_s.float(), floats(outs), floats(t_levels), y, w)

    def heads(self, x):
        return {"student": self.student(x), "teacher": self.teacher(x)}

    def head_params(self):
        return {"student": common.count_params(self.student), "teacher": common.count_params(self.teacher)}


# --recipe paper: the official train.py: 240 epochs, batch 128, lr 0.1, Nesterov, wd 5e-4, the lr x0.1 after
# the 0-based epochs 150/180/210 (first lower epoch 151), CIFAR-10 statistics on CIFAR-100, zero padding
PAPER = dict(epochs=240, batch_size=128, lr=0.1, schedule=[151, 181, 211], wd=5e-4, norm="cifar10")


def paper_recipe(arch):
    """PAPER for this student: lr 0.02 for ShuffleNet / MobileNet students (train.py:168-169)."""
    small = any(n in arch.lower() for n in ("mobile", "shuffle"))
    return dict(PAPER, lr=0.02) if small else PAPER


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--teacher", default=None,
                   help="baseline.py checkpoint of the frozen teacher; None: runs/baseline-<--teacher-arch, or the "
                        "tables' teacher of --arch>-<dataset>-s0/checkpoint.pt")
    common.add_arg(p, "--teacher-arch", default=None, help="teacher backbone; None: the checkpoint's "
                                                           "(if given, it must match the checkpoint)")
    common.add_arg(p, "--lambda", type=float, default=None, check="nonneg",
                   help="weight of HCL; None: the official value of the (teacher, student) pair, "
                        f"{LAMBDA_DEFAULT} for pairs the official script does not list")
    common.add_epochs_arg(p, "--warmup", 25, "epochs of the linear warm-up min(1, e/W) of lambda (official: 20 of "
                                             "240 epochs); 0: none")
    arch = p.parse_known_args()[0].arch  # the student decides the paper's lr
    args = common.parse(p, "reviewkd", paper=paper_recipe(arch))
    if "," in args.arch:
        p.error("reviewkd.py trains one student: give a single --arch")
    if args.teacher_arch is not None and args.teacher_arch not in common.ARCHS:
        p.error(f"argument --teacher-arch: invalid choice: {args.teacher_arch!r} "
                f"(choose from {', '.join(common.ARCHS)})")
    default = args.teacher_arch or TEACHERS.get(args.arch)
    if args.teacher is None:
        if default is None:
            p.error(f"no default teacher for --arch {args.arch} (the tables' pairs: "
                    f"{', '.join(f'{t}->{s}' for s, t in TEACHERS.items())}): give --teacher PATH or --teacher-arch")
        args.teacher = os.path.join("runs", f"baseline-{default}-{args.dataset}-s0", "checkpoint.pt")
    nc = common.dataset_info(args)[0]
    if args.bench and not os.path.isfile(args.teacher):
        print(f"note: no teacher at {args.teacher}; --bench times a randomly initialised teacher")
        args.teacher, args.teacher_arch = "", default or "resnet110"
    else:  # checked here, before common.run creates the run folder
        try:
            args.teacher_arch, _, desc = common.load_teacher(args.teacher, args.teacher_arch, args.dataset, nc,
                                                             args, default or "resnet110")
        except (ValueError, common.DataError) as e:
            common.fail(e)
        print(f"teacher {args.teacher}: {desc}")
    try:  # before the data are read and the run folder is made
        check_pair(common.build_model(args.arch, nc), args.arch, common.build_model(args.teacher_arch, nc),
                   args.teacher_arch)
    except ValueError as e:
        common.fail(e)
    if getattr(args, "lambda") is None:  # stored with the run, so --resume keeps it
        pair = (args.teacher_arch, args.arch)
        setattr(args, "lambda", LAMBDAS.get(pair, LAMBDA_DEFAULT))
        source = "the official value" if pair in LAMBDAS else "train.py's default: no official value"
        print(f"lambda {getattr(args, 'lambda')} ({source} for {pair[0]} -> {pair[1]})")
    common.run(args, ReviewKD)


if __name__ == "__main__":
    main()
