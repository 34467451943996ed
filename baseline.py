"""Baseline: one backbone trained with cross-entropy alone, under the shared protocol.

The reference every online-distillation method is compared with, and the producer of the teacher
checkpoint that sokd.py loads (runs/baseline-<arch>-<dataset>-s<seed>/checkpoint.pt).

    loss = CE(z, y)

    python baseline.py --arch resnet32 --dataset cifar100 --gpus 0
    python baseline.py --arch wrn_40_2 --dataset cifar100 --recipe paper   # SOKD's teacher recipe (PAPER)
"""
import common  # before torch: a Ctrl-C while the imports run then ends in one line
import torch.nn as nn
import torch.nn.functional as F


class Baseline(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        self.net = common.build_model(args.arch, num_classes)
        self.deploy = "net"

    def forward(self, x, y, idx, epoch):
        ce = F.cross_entropy(self.net(x).float(), y)
        return ce, {"ce": ce}

    def heads(self, x):
        return {"net": self.net(x)}

    def head_params(self):
        return {"net": common.count_params(self.net)}


# --recipe paper: SOKD's vanilla teacher script (swlzq/Semi-Online-KD: 200 epochs, x0.1 at 100/150, no
# Nesterov, reflect padding, CIFAR-10 statistics on every dataset), so that sokd.py's teacher matches it
PAPER = dict(epochs=200, schedule=[100, 150], no_nesterov=True, padding="reflect", norm="cifar10")


def main():
    p = common.parser(__doc__)
    args = common.parse(p, "baseline", paper=PAPER)
    if "," in args.arch:
        p.error("baseline.py trains one network: give a single --arch")
    common.run(args, Baseline)


if __name__ == "__main__":
    main()
