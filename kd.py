"""KD: Distilling the Knowledge in a Neural Network (Hinton, Vinyals, Dean; 2015), as RepDistiller runs it
on CIFAR-100 (Tian, Krishnan, Isola; ICLR 2020). https://arxiv.org/abs/1503.02531

Idea: the offline reference of every distillation table. A teacher is trained first and frozen; the
student learns from the labels and from the teacher's softened class distribution (temperature T).

Loss (z_T teacher, z_S student):
  0.1 CE(z_S, y) + 0.9 KD(z_S <- z_T),   T = 4,   z_T from the frozen teacher (no graph)

Logged terms are the weighted ones, so that they add up to the loss: "ce" = 0.1 CE, "kd" = 0.9 KD.

The teacher is a checkpoint written by baseline.py (the "net.*" weights of "model"; its "args" give the
architecture and dataset), loaded and checked exactly as sokd.py loads its teacher; train it first, e.g.
    python baseline.py --arch resnet110 --dataset cifar100

Deviations from RepDistiller (HobbitLong/RepDistiller: train_student.py, helper/loops.py,
distiller_zoo/KD.py), and choices where the spec was open:
  1. Recipe: the shared protocol (batch 128, 300 epochs, lr 0.1 x0.1 at 150/225, Nesterov) instead of
     RepDistiller's batch 64, 240 epochs, lr 0.05 (0.01 for MobileNetV2/ShuffleNet students), momentum
     0.9 without Nesterov, wd 5e-4, x0.1 after epochs 150/180/210. `--recipe paper` sets all of these
     (the lr by the student's name: "mobile" or "shuffle" in --arch gives 0.01, as train_student.py:93-94).
     The weights 0.1 / 0.9 and T = 4 are RepDistiller's KD command (-r 0.1 -a 0.9 -b 0, --kd_T 4)
     under both recipes. RepDistiller normalises CIFAR-100 with (0.5071, 0.4867, 0.4408) /
     (0.2675, 0.2565, 0.2761); the dataset statistics here differ in the fourth decimal.
  2. The teacher runs in eval mode and without a graph, as in RepDistiller (loops.py:74 and :115);
     train() is overridden so that the loop's model.train() never changes that.
  3. The reported number is the last epoch's student; RepDistiller's table reports the best test epoch.
  4. The teacher is a baseline.py run's last epoch (RepDistiller: ckpt_epoch_240 of train_teacher.py, the
     same recipe as its students). baseline.py's `--recipe paper` is SOKD's teacher recipe; RepDistiller's
     is `python baseline.py --epochs 240 --batch-size 64 --lr 0.05 --schedule 150 180 210 --no-nesterov`.
  5. --bench with no teacher checkpoint times KD with a randomly initialised teacher (the step time does
     not depend on its weights); a training run always needs the checkpoint.

Heads: "student" (deployable) and "teacher" (the frozen teacher, constant over training: the reference
the student is read against, as in sokd.py). The teacher is not trained here but costs its own run:
an offline method's cost is the teacher's training plus the student's.

    python kd.py --arch resnet32 --dataset cifar100 --gpus 0   # reads runs/baseline-resnet110-cifar100-s0
    python kd.py --arch resnet8x4 --teacher runs/baseline-resnet32x4-cifar100-s0/checkpoint.pt
    python kd.py --arch resnet32 --dataset cifar100 --recipe paper   # RepDistiller's batch 64, 240 epochs
"""
import os

import common  # before torch: a Ctrl-C while the imports run then ends in one line
import torch
import torch.nn as nn
import torch.nn.functional as F


def kd(student, teacher, T):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, batch mean.
    The teacher is detached here: a KD term never trains its target."""
    return F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher.detach() / T, 1),
                    reduction="batchmean") * T * T


def kd_loss(z_s, z_t, y, T, ce_weight=0.1, kd_weight=0.9):
    """ce_weight CE(z_S, y) + kd_weight KD(z_S <- z_T). Returns (total, {term: value}), both terms weighted."""
    ce = ce_weight * F.cross_entropy(z_s, y)
    kl = kd_weight * kd(z_s, z_t, T)  # z_T: frozen teacher, no graph (kd() detaches it anyway)
    return ce + kl, {"ce": ce, "kd": kl}


# the tables' teacher of each student (RepDistiller README): where --teacher and --teacher-arch are left out
TEACHERS = {"resnet20": "resnet56", "resnet32": "resnet110", "resnet8x4": "resnet32x4", "wrn_16_2": "wrn_40_2",
            "wrn_40_1": "wrn_40_2", "vgg8": "vgg13"}


class KD(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        if args.teacher:
            _, self.teacher, _ = common.load_teacher(args.teacher, args.teacher_arch, args.dataset, num_classes)
        else:  # --bench with no checkpoint only (main() checks): the step time does not depend on the weights
            self.teacher = common.build_model(args.teacher_arch, num_classes)
        self.teacher.requires_grad_(False)  # frozen: not in the optimizer, no weight decay either
        self.student = common.build_model(args.arch, num_classes)
        self.T, self.ce_weight, self.kd_weight = args.T, args.ce_weight, args.kd_weight
        self.deploy = "student"
        self.train()

    def train(self, mode=True):
        """The teacher stays in eval mode whatever the loop asks: its BN layers keep the running
        statistics it was trained with (as RepDistiller's loops.py)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, x, y, idx, epoch):
        with torch.no_grad():  # the frozen teacher: no graph, nothing reaches it
            z_t = self.teacher(x)
        z_s = self.student(x).float()  # losses in fp32 under autocast
        return kd_loss(z_s, z_t.float(), y, self.T, self.ce_weight, self.kd_weight)

    def heads(self, x):
        return {"student": self.student(x), "teacher": self.teacher(x)}

    def head_params(self):
        return {"student": common.count_params(self.student), "teacher": common.count_params(self.teacher)}


# --recipe paper: RepDistiller's train_student.py: batch 64, 240 epochs, lr 0.05, x0.1 after 150/180/210
# (adjust_learning_rate decays when the 1-based epoch > 150: from 0-based index 150 on), no Nesterov
PAPER = dict(batch_size=64, epochs=240, lr=0.05, schedule=[150, 180, 210], no_nesterov=True)


def paper_recipe(arch):
    """PAPER for this student: lr 0.01 for MobileNetV2 / ShuffleNet students (train_student.py:93-94)."""
    small = any(n in arch.lower() for n in ("mobile", "shuffle"))
    return dict(PAPER, lr=0.01) if small else PAPER


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--teacher", default=None,
                   help="baseline.py checkpoint of the frozen teacher; None: runs/baseline-<--teacher-arch, or the "
                        "tables' teacher of --arch>-<dataset>-s0/checkpoint.pt")
    common.add_arg(p, "--teacher-arch", default=None, help="teacher backbone; None: the checkpoint's "
                                                           "(if given, it must match the checkpoint)")
    common.add_arg(p, "--T", type=float, default=4.0, check="positive", help="temperature (RepDistiller: 4)")
    common.add_arg(p, "--ce-weight", type=float, default=0.1, check="nonneg", help="weight of CE (RepDistiller -r 0.1)")
    common.add_arg(p, "--kd-weight", type=float, default=0.9, check="nonneg", help="weight of KD (RepDistiller -a 0.9)")
    arch = p.parse_known_args()[0].arch  # the student decides the paper's lr
    args = common.parse(p, "kd", paper=paper_recipe(arch))
    if "," in args.arch:
        p.error("kd.py trains one student: give a single --arch")
    if args.teacher_arch is not None and args.teacher_arch not in common.ARCHS:
        p.error(f"argument --teacher-arch: invalid choice: {args.teacher_arch!r} "
                f"(choose from {', '.join(common.ARCHS)})")
    default = args.teacher_arch or TEACHERS.get(args.arch)
    if args.teacher is None:
        if default is None:
            p.error(f"no default teacher for --arch {args.arch} (the tables' pairs: "
                    f"{', '.join(f'{t}->{s}' for s, t in TEACHERS.items())}): give --teacher PATH or --teacher-arch")
        args.teacher = os.path.join("runs", f"baseline-{default}-{args.dataset}-s0", "checkpoint.pt")
    if args.bench and not os.path.isfile(args.teacher):
        print(f"note: no teacher at {args.teacher}; --bench times a randomly initialised teacher")
        args.teacher, args.teacher_arch = "", default or "resnet110"
    else:  # checked here, before common.run creates the run folder
        try:
            args.teacher_arch, _, desc = common.load_teacher(args.teacher, args.teacher_arch, args.dataset,
                                                             common.dataset_info(args)[0], args, default or "resnet110")
        except (ValueError, common.DataError) as e:
            common.fail(e)
        print(f"teacher {args.teacher}: {desc}")
    common.run(args, KD)


if __name__ == "__main__":
    main()
