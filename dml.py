"""DML: Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu; CVPR 2018). https://arxiv.org/abs/1706.00384

Idea: K independent networks learn together; each is trained on the labels and on mimicking the
other peers' predicted class distributions. No teacher, no shared layers.

Loss of peer k:  CE(z_k, y) + 1/(K-1) * sum_{l != k} KD(z_k <- z_l),
  KD(s <- t) = T^2 KL(p_t^T || p_s^T), p^T = softmax(z/T), summed over classes, averaged over the
  batch, the target t detached: the distillation term of every method file here (their kd()).

Deviations from the paper (all defaults follow the shared protocol in README.md):
  - One joint SGD step for all peers with the others' predictions detached, as every
    re-implementation does; the paper's Algorithm 1 updates the peers one after another,
    recomputing predictions between updates.
  - Recipe: the protocol (batch 128, 300 epochs, lr 0.1 x0.1 at 150/225, wd 5e-4, Nesterov, zero
    padding) instead of the paper's batch 64, 200 epochs, x0.1 every 60 epochs, reflect padding
    (`--recipe paper` sets these).
  - --T defaults to 1 as in the paper (no temperature); with T != 1 the KL is scaled by T^2.

Heads: every peer ("peer1" ... deployable: peer1) and "ensemble" = mean of the peers' probabilities.

    python dml.py --arch resnet32 --dataset cifar100 --gpus 0
    python dml.py --arch resnet32,mobilenetv2 --peers 2       # one architecture per peer
    python dml.py --arch resnet32 --dataset cifar100 --recipe paper   # the paper's batch 64, 200 epochs
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


def dml_loss(logits, y, T):
    """Per peer k: CE(z_k, y) + 1/(K-1) sum_{l != k} KD(z_k <- z_l), summed over peers.
    Returns (total, {term: value})."""
    K = len(logits)
    ce = sum(F.cross_entropy(z, y) for z in logits)
    kl = sum(kd(logits[k], logits[l], T) for k in range(K) for l in range(K) if l != k) / (K - 1)
    return ce + kl, {"ce": ce, "kd": kl}


class DML(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        archs = args.arch.split(",")
        archs = archs * args.peers if len(archs) == 1 else archs
        self.peers = nn.ModuleList(common.build_model(a, num_classes) for a in archs)
        self.T = args.T
        self.deploy = "peer1"

    def forward(self, x, y, idx, epoch):
        logits = [peer(x).float() for peer in self.peers]  # losses in fp32 under autocast
        return dml_loss(logits, y, self.T)

    def heads(self, x):
        logits = [peer(x) for peer in self.peers]
        heads = {f"peer{k + 1}": z for k, z in enumerate(logits)}
        heads["ensemble"] = torch.stack([z.float().softmax(1) for z in logits]).mean(0)
        return heads

    def head_params(self):
        n = {f"peer{k + 1}": common.count_params(p) for k, p in enumerate(self.peers)}
        return {**n, "ensemble": sum(n.values())}


# --recipe paper: the paper's (no official PyTorch code): batch 64, 200 epochs, x0.1 every 60, reflect padding
PAPER = dict(batch_size=64, epochs=200, schedule=[60, 120, 180], padding="reflect")


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--peers", type=int, default=2, check="two+", help="number of peers K (ignored when --arch lists several)")
    common.add_arg(p, "--T", type=float, default=1.0, check="positive", help="temperature; the paper uses none (1)")
    args = common.parse(p, "dml", paper=PAPER)
    n = len(args.arch.split(","))
    if n > 1:
        args.peers = n
    common.run(args, DML)


if __name__ == "__main__":
    main()
