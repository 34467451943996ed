"""PCL: Peer Collaborative Learning for Online Knowledge Distillation (Guile Wu, Shaogang Gong; AAAI 2021). https://arxiv.org/abs/2006.04147

Idea: one network with a shared trunk (stem, stage 1, stage 2) and m peers, each its own copy of the
last stage + pool + classifier. Peer j sees its own random augmentation (view j) of the batch. Two
kinds of teacher are built from the peers themselves, for free:
  - the peer ensemble teacher: one Linear on the concatenated pooled features of all peers, z_e;
    it learns from the labels (that CE also trains the peers and the trunk, through the features)
    and every peer mimics it;
  - the peer mean teachers: a temporal mean (EMA of the weights) of trunk + peer l, z'_l; every
    peer mimics the OTHER peers' mean teachers.
After training, mean teacher 1 alone is the deployed model (the size of the backbone).

    view j --> trunk --> peer j --> z_j, feat_j            (j = 1..m; one trunk, run once per view)
    [feat_1 .. feat_m] --> Linear --> z_e                   ensemble teacher:  z_e  --KD--> every z_j
    view l --> EMA trunk --> EMA peer l --> z'_l            mean teacher l:    z'_l --KD--> z_j, j != l

Loss:  CE(z_e, y) + sum_j [ CE(z_j, y) + w(e) KD(z_j <- z_e) + w(e)/(m-1) sum_{l != j} KD(z_j <- z'_l) ],
       z_e detached in KD only; z'_l = mean teacher l on view l, no gradient; after every step
       theta'_l <- a_t theta'_l + (1 - a_t) theta_l,  a_t = min(1 - 1/(t+1), 0.999).

Deviations from the paper, and choices (the recipe is the shared protocol, which is PCL's own):
  - No official code. The public re-implementation (shaoeric/Peer-Collaborative-Learning-for-Online-
    Knowledge-Distillation) was read for facts; two of its bugs are not copied: its peers are deep
    copies of one branch (identical initial weights, classifiers included), here every peer and its
    classifier start from independent weights; its ramp-up divides by the weight instead of the
    length (KD is off for epochs 2-80), here w(e) = exp(-5 (1 - min(e, 80)/80)^2) per epoch index e
    from 0 (--rampup 80; 0 turns it off), for both KD terms; left out, --rampup is 80/300 of --epochs.
  - The decay 0.999 is a 1,000-step horizon: 0.85% of the protocol's 117,300 steps. With --ema-decay
    left out, a shorter run keeps that fraction (horizon = 1000 x this run's steps / 117,300, at
    least 1; e.g. 10 epochs of 20,000 images: 13 steps, a = 0.925): a fixed 1,000 steps would average
    over most of a short run and its random start (measured: -5 points for mean1 in a 10-epoch run).
    The decay in force is printed first and stored as "resolved" in run.json and final.json.
  - Mean teachers, weights: the EMA above, t = number of updates before this one, so the first
    update copies (a_0 = 0). t is a buffer ("step") and the mean teachers are submodules whose
    parameters have requires_grad=False: the optimizer and DDP skip them, checkpoints hold them,
    --resume continues the decay schedule exactly. The trunk is shared, so one EMA trunk serves all
    m mean teachers. They start as copies of trunk + peers (the re-implementation starts them from
    another random net; a_0 = 0 makes that matter for the first step's targets only).
  - Mean teachers, BatchNorm: during training they predict in train mode (batch statistics), as in
    the re-implementation and in Mean Teacher (Tarvainen & Valpola 2017): batch statistics are the
    ones that fit the averaged weights, and the peers they are compared with use batch statistics
    too. Their running statistics (used at test time) are neither averaged nor copied from the live
    net: those same forward passes update them (momentum 0.1), so they are the statistics of the
    averaged network itself on training views, an online torch.optim.swa_utils.update_bn. Averaged
    or copied live statistics would describe the live weights, not the averaged ones.
  - One joint SGD step for trunk, peers and ensemble teacher. Logged terms: "ce" = sum_j CE(z_j, y),
    "ce_e" = CE(z_e, y), "kd" = w(e) sum_j KD(z_j <- z_e) (from the ensemble teacher), "ema" =
    w(e)/(m-1) sum_j sum_{l != j} KD(z_j <- z'_l) (from the mean teachers); loss = their sum.

Heads: every peer ("peer1" ...: trunk + peer j), every mean teacher ("mean1" ...: EMA trunk + EMA
peer j; deployable: mean1) and "ensemble" = the peer ensemble teacher z_e ("PCL-E": trunk + every
peer's last stage + the Linear; the peers' classifiers are not part of it).

    python pcl.py --arch resnet32 --dataset cifar100 --gpus 0
    python pcl.py --arch resnet110b --dataset cifar100 --gpus 0,1     # PCL's "ResNet-110"
    python pcl.py --arch resnet32 --dataset cifar100 --recipe paper   # = the protocol (PCL's own)
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


def pcl_loss(logits, z_e, z_mean, y, T, w):
    """CE(z_e, y) + sum_j [CE(z_j, y) + w KD(z_j <- z_e) + w/(m-1) sum_{l != j} KD(z_j <- z'_l)].
    logits: the peers' z_j; z_e: the ensemble teacher, trained by its CE only (kd() detaches it);
    z_mean: the mean teachers' z'_l, targets only. Returns (total, {term: value}), kd and ema ramped."""
    m = len(logits)
    ce_e = F.cross_entropy(z_e, y)
    ce = sum(F.cross_entropy(z, y) for z in logits)
    kd_e = w * sum(kd(z, z_e, T) for z in logits)
    kd_mean = w / (m - 1) * sum(kd(logits[j], z_mean[l], T) for j in range(m) for l in range(m) if l != j)
    return ce_e + ce + kd_e + kd_mean, {"ce": ce, "ce_e": ce_e, "kd": kd_e, "ema": kd_mean}


class PCL(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        m = args.peers
        self.trunk, self.peers = common.split_model(args.arch, num_classes, -1, m)  # independent peers
        self.ensemble = nn.Linear(sum(p.fc.in_features for p in self.peers), num_classes)  # on [feat_1 .. feat_m]
        # the peer mean teachers: same shapes, start as copies, then only follow the EMA in after_step
        self.mean_trunk, self.mean_peers = common.split_model(args.arch, num_classes, -1, m)
        self.mean_trunk.load_state_dict(self.trunk.state_dict())
        self.mean_peers.load_state_dict(self.peers.state_dict())
        self.mean_trunk.requires_grad_(False)
        self.mean_peers.requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # t, saved in checkpoints
        self.views = m  # peer j trains on view j
        self.T, self.rampup, self.args = args.T, args.rampup, args
        self.decay = args.ema_decay  # None: set by on_data, scaled to the length of the run
        self.deploy = "mean1"

    def on_data(self, train_labels):
        """--ema-decay left out: the horizon 1/(1 - a) is 1,000 steps of the 300-epoch protocol run
        (0.85% of its 117,300 steps), kept at that fraction of this run's steps (at least 1 step)."""
        if self.args.ema_decay is None:
            horizon = max(1.0, 1000 * common.run_fraction(self.args, len(train_labels)))
            self.decay = 1.0 - 1.0 / horizon
            self.resolved = {"ema_decay": round(self.decay, 6)}

    def forward(self, x, y, idx, epoch):
        outs = [peer(self.trunk(v), features=True) for peer, v in zip(self.peers, x)]  # the trunk runs once per view
        logits = [z.float() for z, _, _ in outs]  # losses in fp32 under autocast
        z_e = self.ensemble(torch.cat([f for _, f, _ in outs], 1)).float()
        with torch.no_grad():  # mean teachers give targets only; train-mode BN (see the docstring)
            z_mean = [mp(self.mean_trunk(v)).float() for mp, v in zip(self.mean_peers, x)]
        return pcl_loss(logits, z_e, z_mean, y, self.T, common.ramp_up(epoch, self.rampup))

    @torch.no_grad()
    def after_step(self):
        """theta' <- a_t theta' + (1 - a_t) theta, a_t = min(1 - 1/(t+1), decay), for every parameter of
        the mean teachers; their BN buffers are left to their own forward passes (see the docstring)."""
        w = (1.0 / (self.step + 1)).clamp(min=1.0 - self.decay)  # 1 - a_t, a tensor: no host sync
        live = [*self.trunk.parameters(), *self.peers.parameters()]
        mean = [*self.mean_trunk.parameters(), *self.mean_peers.parameters()]
        for p_mean, p in zip(mean, live):
            p_mean.lerp_(p, w)  # p_mean + w (p - p_mean) = a_t p_mean + (1 - a_t) p
        self.step.add_(1)

    def heads(self, x):
        h, h_mean = self.trunk(x), self.mean_trunk(x)
        outs = [peer(h, features=True) for peer in self.peers]
        heads = {f"peer{j + 1}": z for j, (z, _, _) in enumerate(outs)}
        heads.update({f"mean{j + 1}": mp(h_mean) for j, mp in enumerate(self.mean_peers)})
        heads["ensemble"] = self.ensemble(torch.cat([f for _, f, _ in outs], 1))
        return heads

    def head_params(self):
        n = {f"peer{j + 1}": common.count_params(self.trunk, p) for j, p in enumerate(self.peers)}
        n.update({f"mean{j + 1}": common.count_params(self.mean_trunk, p) for j, p in enumerate(self.mean_peers)})
        # z_e reads the peers' pooled features: their classifiers are not part of it
        stages = sum(common.count_params(p.stages) for p in self.peers)
        return {**n, "ensemble": common.count_params(self.trunk, self.ensemble) + stages}


# --recipe paper: the protocol is PCL's own recipe (300 epochs, x0.1 at 150/225, wd 5e-4, Nesterov)
PAPER = dict()


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--peers", type=int, default=3, check="two+", help="number of peers m")
    common.add_arg(p, "--T", type=float, default=3.0, check="positive", help="distillation temperature")
    common.add_epochs_arg(p, "--rampup", 80, "epochs of the sigmoid ramp-up of both KD weights; 0: none")
    common.add_arg(p, "--ema-decay", type=float, default=None, check="unit", help="largest decay a_t of the peer mean teachers; "
                   "when not given: 0.999 (a 1,000-step horizon) under the protocol, the horizon scaled to the "
                   "same fraction of a shorter or longer run")
    args = common.parse(p, "pcl", paper=PAPER)
    if "," in args.arch:
        p.error("pcl.py builds one multi-branch network: give a single --arch")
    common.run(args, PCL)


if __name__ == "__main__":
    main()
