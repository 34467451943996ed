"""SOKD: Semi-Online Knowledge Distillation (Liu, Liu, Huang; BMVC 2021). https://arxiv.org/abs/2111.11747

Idea: offline KD (a fixed, pre-trained teacher) gives a strong but unresponsive target; online KD
(DML) gives a responsive but weak one. SOKD keeps the teacher frozen and trains a "knowledge
bridge module" (KBM): a fresh copy of the teacher's last stage + final norm + classifier, fed with
the teacher's (detached) penultimate-stage features. The teacher's trunk + the KBM form an improved
teacher that learns from the labels, from the frozen teacher and from the student, while the
student learns from the labels and from the KBM (mutual learning between student and KBM).

Losses (z_T teacher, z_A teacher trunk + KBM, z_S student):
  KBM:      CE(z_A, y) + KD(z_A <- z_T) + KD(z_A <- z_S),   z_T, z_S detached
  student:  CE(z_S, y) + KD(z_S <- z_A) [+ w KD(z_S <- z_T), --kd-teacher w, default 0],  z_A detached

Logged terms: "ce" student CE, "kd" student <- KBM, "ce_b" KBM (bridge) CE, "kd_b" KBM <- teacher
plus KBM <- student, and "kd_t" (only when --kd-teacher > 0) the weighted teacher -> student term.
The loss is the sum of all of them; each module's parameters get gradient from its own terms only.

The teacher is a checkpoint written by baseline.py (the "net.*" weights of "model"; its "args"
give the architecture and dataset); train it first, with the normalisation (--norm) of the SOKD run
that reads it, e.g.
    python baseline.py --arch wrn_40_2 --dataset cifar100                  # for sokd.py under the protocol

Deviations from the paper / official code (swlzq/Semi-Online-KD, trainer/sokd.py, models/wrn.py,
configs/sokd.yaml), and choices where the spec was open:
  1. The frozen teacher runs in eval mode, always (train() is overridden): its BN layers use the
     running statistics it was trained with and never change. The official code runs the frozen
     teacher in train mode, so its BN statistics drift with the student's training batches and the
     KBM's input is normalised with batch statistics.
  2. The KBM is built with common.split_model(teacher_arch, classes, -1, 1), so it is the last
     stage (+ final norm where the backbone has one) + classifier of ANY backbone; the official
     code has it for WRN only. Untrained, random init as in the official code (its KBM is a copy of
     block3, bn1 and fc made when the net is built: convs re-drawn by the WRN init loop, fc equal to
     the teacher's fc at initialisation), initialised like the backbone (common.init_weights).
  3. Its input is the output of the teacher's penultimate stage, computed under no_grad (the
     official code reads the same tensor, feature_T[-3] = block2's output, and detaches it).
  4. --kd-teacher: an optional direct teacher -> student KD term, default 0 as in the official
     code (which has none); the paper frames SOKD as offline KD + mutual learning.
  5. One SGD step on the summed losses with the same lr for student and KBM. The detaches make the
     gradients disjoint, so this is two independent updates, as in the official loss_total.
     Official configs/sokd.yaml sets lr_auxiliary 0.1 = lr (the trainer's fallback 0.05 is unused).
  6. Recipe: the shared protocol (300 epochs, x0.1 at 150/225, Nesterov, zero padding, CIFAR-100
     mean/std) instead of the official 200 epochs, lr 0.1 x0.1 at 100/150, wd 5e-4, no Nesterov,
     reflect padding, and CIFAR-10 mean/std on CIFAR-100 (a quirk of their dataset code). `--recipe paper`
     sets all of these (--epochs 200 --schedule 100 150 --no-nesterov --padding reflect --norm cifar10). T = 4 and all loss weights 1 as in the official code.
  7. The reported number is the last epoch's student; the official code logs the best epoch on the
     test set and saves the KBM of its best test epoch.
  8. --bench with no teacher checkpoint times SOKD with a randomly initialised teacher (the step
     time does not depend on its weights); a training run always needs the checkpoint.

Heads: "student" (deployable), "teacher" (frozen, constant over training), "bridge" = teacher trunk
+ KBM, the improved teacher. `python sokd.py --export-teacher RUN_DIR` (or export_improved_teacher)
writes the improved teacher as one plain network in baseline.py's checkpoint format, usable as
--teacher of another run.

    python sokd.py --dataset cifar100 --gpus 0   # runs/baseline-wrn_40_2-cifar100-s0/checkpoint.pt -> wrn_40_1
    python sokd.py --arch resnet20 --teacher runs/baseline-resnet56-cifar100-s0/checkpoint.pt
    python sokd.py --export-teacher runs/sokd-wrn_40_1-cifar100-s0   # -> .../improved_teacher.pt
    python baseline.py --arch wrn_40_2 --dataset cifar100 --recipe paper --out runs/sokd-teacher-paper
    python sokd.py --dataset cifar100 --recipe paper --teacher runs/sokd-teacher-paper/checkpoint.pt
"""
import os

import common  # before torch: a Ctrl-C while the imports run then ends in one line
import torch
import torch.nn as nn
import torch.nn.functional as F

TEACHER_ARCH = "wrn_40_2"  # the paper's teacher (WRN-40-2 -> WRN-40-1): where --teacher-arch is left out


def kd(student, teacher, T):
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, batch mean.
    The teacher is detached here: a KD term never trains its target."""
    return F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher.detach() / T, 1),
                    reduction="batchmean") * T * T


def bridge_loss(z_a, z_t, z_s, y, T):
    """KBM: CE(z_A, y) + KD(z_A <- z_T) + KD(z_A <- z_S). Returns (total, {"ce_b": CE, "kd_b": both KDs})."""
    ce = F.cross_entropy(z_a, y)
    # z_S detached: the KBM's loss must not train the student (z_T has no graph: the teacher is frozen)
    kl = kd(z_a, z_t, T) + kd(z_a, z_s.detach(), T)
    return ce + kl, {"ce_b": ce, "kd_b": kl}


def student_loss(z_s, z_a, z_t, y, T, w_t=0.0):
    """Student: CE(z_S, y) + KD(z_S <- z_A) + w_t KD(z_S <- z_T). Returns (total, {"ce", "kd"} and, only
    when w_t > 0, "kd_t" = w_t KD(z_S <- z_T))."""
    ce = F.cross_entropy(z_s, y)
    kl = kd(z_s, z_a.detach(), T)  # z_A detached: the student's loss must not train the KBM
    kl_t = w_t * kd(z_s, z_t, T) if w_t else z_s.new_zeros(())  # z_T: frozen teacher, no graph
    return ce + kl + kl_t, {"ce": ce, "kd": kl, **({"kd_t": kl_t} if w_t else {})}


def sokd_loss(z_s, z_a, z_t, y, T, w_t=0.0):
    """The student's loss plus the KBM's: each module's parameters get gradient from its own terms only.
    Returns (total, {term: value}), the terms in the order "ce", "kd" (student), "ce_b", "kd_b" (KBM),
    then "kd_t" when w_t > 0."""
    loss_b, bridge = bridge_loss(z_a, z_t, z_s, y, T)
    loss_s, student = student_loss(z_s, z_a, z_t, y, T, w_t)
    terms = {"ce": student["ce"], "kd": student["kd"], **bridge}
    if "kd_t" in student:
        terms["kd_t"] = student["kd_t"]
    return loss_s + loss_b, terms


class SOKD(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        if args.teacher:
            t_arch, self.teacher, _ = common.load_teacher(args.teacher, args.teacher_arch, args.dataset, num_classes,
                                                           default_arch=TEACHER_ARCH)
        else:  # --bench with no checkpoint only (main() checks): the step time does not depend on the weights
            t_arch = args.teacher_arch or TEACHER_ARCH
            self.teacher = common.build_model(t_arch, num_classes)
        self.teacher.requires_grad_(False)  # frozen: not in the optimizer, no weight decay either
        # KBM: the teacher's last stage (+ final norm) + classifier, freshly initialised as in the official code
        _, (self.bridge,) = common.split_model(t_arch, num_classes, -1, 1)
        self.student = common.build_model(args.arch, num_classes)
        self.T, self.kd_teacher = args.T, args.kd_teacher
        self.deploy = "student"
        self.train()

    def train(self, mode=True):
        """The teacher stays in eval mode whatever the loop asks: its BN layers keep the running
        statistics it was trained with (the official code runs it in train mode; they drift)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_forward(self, x):
        """(output of the teacher's penultimate stage h, teacher logits z_T), computed without a graph."""
        with torch.no_grad():
            *trunk, last = self.teacher.stages
            for stage in trunk:
                x = stage(x)
            z_t = self.teacher.fc(last(x).mean((2, 3)))
        return x, z_t

    def forward(self, x, y, idx, epoch):
        h, z_t = self.teacher_forward(x)
        z_a = self.bridge(h.detach()).float()  # h detached (no graph anyway): nothing reaches the teacher
        z_s = self.student(x).float()          # losses in fp32 under autocast
        return sokd_loss(z_s, z_a, z_t.float(), y, self.T, self.kd_teacher)

    def heads(self, x):
        h, z_t = self.teacher_forward(x)
        return {"student": self.student(x), "teacher": z_t, "bridge": self.bridge(h)}

    def head_params(self):
        trunk = common.count_params(self.teacher) - common.count_params(self.teacher.stages[-1], self.teacher.fc)
        return {"student": common.count_params(self.student), "teacher": common.count_params(self.teacher),
                "bridge": trunk + common.count_params(self.bridge)}


def export_improved_teacher(ckpt_path, out_path):
    """Write the improved teacher of a sokd.py checkpoint (a file or its run folder) to out_path as one
    plain Net = the teacher's stages[:-1] + the KBM's last stage + the KBM's fc, in baseline.py's
    checkpoint format ({"model": {"net.*": ...}, "args": {"arch", "dataset", ...}, "history"}), so that
    `--teacher out_path` loads it here and in any script that reads baseline checkpoints.
    Its logits are the "bridge" head's. Returns the Net."""
    if os.path.isdir(ckpt_path):
        ckpt_path = os.path.join(ckpt_path, "checkpoint.pt")
    ck = common.load_checkpoint(ckpt_path, "sokd checkpoint")
    args = ck.get("args", {}) if isinstance(ck, dict) else {}
    if args.get("method") != "sokd":
        raise ValueError(f"{ckpt_path} is not a sokd.py checkpoint")
    num_classes = ck["model"]["teacher.fc.weight"].shape[0]
    net = common.build_model(args["teacher_arch"], num_classes)
    k = len(net.stages) - 1  # index of the last stage, the one the KBM replaces
    state = {}
    for name, v in ck["model"].items():
        if name.startswith("teacher.stages.") and int(name.split(".")[2]) < k:
            state[name[len("teacher."):]] = v
        elif name.startswith("bridge.stages.0."):
            state[f"stages.{k}." + name[len("bridge.stages.0."):]] = v
        elif name.startswith("bridge.fc."):
            state[name[len("bridge."):]] = v
    net.load_state_dict(state)  # strict: every weight found exactly once
    meta = {**args, "method": "sokd-improved-teacher", "arch": args["teacher_arch"], "source": ckpt_path}
    history = [{"epoch": r["epoch"], "net": r["bridge"]} for r in ck.get("history", [])]
    common.atomic_save({"model": {"net." + n: v for n, v in net.state_dict().items()}, "epoch": ck.get("epoch"),
                        "history": history, "args": meta}, out_path)
    return net


# --recipe paper: the official configs (swlzq/Semi-Online-KD): 200 epochs, x0.1 at 100/150, no Nesterov, reflect
# padding, CIFAR-10 statistics on CIFAR-100 (the teacher: baseline.py --recipe paper)
PAPER = dict(epochs=200, schedule=[100, 150], no_nesterov=True, padding="reflect", norm="cifar10")


def main():
    p = common.parser(__doc__)
    p.set_defaults(arch="wrn_40_1")  # the paper's student (teacher WRN-40-2)
    common.add_arg(p, "--teacher", default=None,
                   help="baseline.py checkpoint of the frozen teacher; None: "
                        "runs/baseline-<--teacher-arch or wrn_40_2>-<dataset>-s0/checkpoint.pt")
    common.add_arg(p, "--teacher-arch", default=None, help="teacher backbone; None: the checkpoint's "
                                                           "(if given, it must match the checkpoint)")
    common.add_arg(p, "--T", type=float, default=4.0, check="positive", help="temperature of every KD term (official: 4)")
    common.add_arg(p, "--kd-teacher", type=float, default=0.0, check="nonneg",
                   help="weight of a direct teacher -> student KD term (official code: none)")
    common.add_arg(p, "--export-teacher", default=None, metavar="RUN_DIR",
                   help="write RUN_DIR/improved_teacher.pt (teacher trunk + KBM, baseline.py format, "
                        "usable as --teacher) from a sokd run and exit")
    args = common.parse(p, "sokd", paper=PAPER)
    if args.export_teacher:
        out = os.path.join(args.export_teacher, "improved_teacher.pt")
        try:
            export_improved_teacher(args.export_teacher, out)
        except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
            common.fail(e)
        print(f"wrote {out}; use it with --teacher {out}")
        return
    if "," in args.arch:
        p.error("sokd.py trains one student: give a single --arch")
    if args.teacher_arch is not None and args.teacher_arch not in common.ARCHS:
        p.error(f"argument --teacher-arch: invalid choice: {args.teacher_arch!r} "
                f"(choose from {', '.join(common.ARCHS)})")
    if args.teacher is None:
        args.teacher = os.path.join("runs", f"baseline-{args.teacher_arch or TEACHER_ARCH}-{args.dataset}-s0",
                                    "checkpoint.pt")
    if args.bench and not os.path.isfile(args.teacher):
        print(f"note: no teacher at {args.teacher}; --bench times a randomly initialised teacher")
        args.teacher, args.teacher_arch = "", args.teacher_arch or TEACHER_ARCH
    else:  # checked here, before common.run creates the run folder
        try:
            args.teacher_arch, _, desc = common.load_teacher(args.teacher, args.teacher_arch, args.dataset,
                                                             common.dataset_info(args)[0], args, TEACHER_ARCH)
        except (ValueError, common.DataError) as e:
            common.fail(e)
        print(f"teacher {args.teacher}: {desc}")
    common.run(args, SOKD)


if __name__ == "__main__":
    main()
