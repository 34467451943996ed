"""OKDDip: Online Knowledge Distillation with Diverse Peers (Defang Chen, Jian-Ping Mei, Can Wang, Yan Feng,
Chun Chen; AAAI 2020). https://arxiv.org/abs/1912.00350

Idea: one network whose low stages are shared and whose last stage is copied into m auxiliary peers
and one group leader. Two levels of distillation: (1) each peer learns from its own target, a
weighted sum of the peers' logits whose weights come from an attention over the peers' pooled
features, so every peer is taught by a different mix of the group and the peers stay diverse;
(2) the leader learns from the plain mean of the peers. At test time the leader alone is deployed
and costs what the plain backbone costs.

Loss:  sum_a CE(z_a, y) + CE(z_l, y) + w(e) [sum_a T^2 KL(p^T(t_a) + eps || p^T_a) + T^2 KL(p^T(mean_a z_a) + eps || p^T_l)],
       t_a = sum_b alpha_ab z_b,  alpha_ab = softmax_b(W_q h_a . W_k h_b),  h = pooled peer feature,
       eps = 1e-7 added to every target's probabilities (official utils.KL_Loss); l = the leader.

Gradient flow. Default: the official code's (DefangChen/OKDDip), which detaches nothing: no detach(),
no no_grad() in the training step (train_GL.py lines 96-104), the model (resnet_GL.py lines 195-240:
q, k from the live pooled features, x_m = bmm(logits, alpha^T) from the live logits) or the loss
(utils.py KL_Loss, line 175). So every term trains everything it is built from:
  - CE(z_a, y): peer a and the trunk. CE(z_l, y): the leader and the trunk.
  - KL(t_a || z_a): peer a (the student), and, through the target t_a, every peer's logits (pulled
    towards z_a) and, through alpha, W_q, W_k, the pooled features they read, so every peer's last
    stage, and the trunk. The KL is zero when alpha_aa = 1 (t_a = z_a), so the attention's gradient
    pulls each peer's attention towards itself.
  - KL(mean_b z_b || z_l): the leader and the trunk, and through the mean every peer (pulled towards
    the leader).
  The 1e-7 is kept in this flow: the gradient reaches the target through F.kl_div's target * log(target),
  which is 0/0 = NaN where a softmax probability underflows to exactly 0 in fp32 (a logit gap over about
  300 at T = 3); with the 1e-7 it is finite. Each target probability moves by 1e-7, the loss negligibly.

--detach-targets: the targets treated as constants, as by every kd() in this project (a target never
trains what it is built from). Each peer's KD then trains that peer, the trunk and W_q, W_k only, and
the leader's KD the leader and the trunk. Three detaches, none of them in the official code:
  1. the peer logits inside t_a (peer_targets gets detached logits): the official code passes the live
     x_m to KL_Loss, so there KL(t_a || z_a) also moves the other peers;
  2. the pooled features read by W_q, W_k (attention_weights): the official projections read the live
     x_3 / temp, so there the attention's gradient also reaches every peer's last stage and the trunk;
  3. the peers' mean in the leader's target: the official code passes the live torch.mean(output_batch)
     (train_GL.py line 104), so there the leader's KD also moves the peers.
  alpha keeps its graph under both settings (the attention learns through W_q, W_k). No 1e-7 under
  --detach-targets: no gradient enters a target there, so it has nothing to guard.
  The two settings' gradients, same weights and resnet8 batch (relative L2 difference; the test
  test_okddip_official_flow_differs_from_the_detached_one): trunk 2%, peers 9-12% as initialised;
  trunk 17%, peers 19-26% with the classifiers' weights x10 (confident logits); the leader and
  W_q, W_k the same under both (< 1e-4: no detach lies on their path, only the 1e-7 differs).

Deviations from the paper and the official code (DefangChen/OKDDip), and choices:
  - Targets aggregate logits, as the official code (resnet_GL.py line 240: x_m = bmm(logits, alpha^T));
    the paper writes the aggregation over softened predictions (Chen et al., AAAI 2020, arXiv 1912.00350).
  - Projections: query and key Linear(C, C // 8, bias=False) shared by the peers (official factor 8,
    resnet_GL.py lines 144-145: Linear(64, 8) for resnet32, Linear(256, 32) for resnet110b), on the
    pooled features; no 1/sqrt(d) scaling (resnet_GL.py lines 238-239). PyTorch's default Linear
    initialisation, as the official code: its init loop touches Conv2d and BatchNorm2d only
    (resnet_GL.py lines 147-152). The leader has no projections. Attention in fp32 under autocast.
  - w(e) = exp(-5 (1 - min(e, 80)/80)^2) per epoch index e (--rampup 80, 0 turns it off), the
    official ramp (train_GL.py lines 308-312 and 372-379, --start_consistency 0); it weights both KD
    levels (official --alpha 1.0). T = 3 (official --temperature 3.0).
  - The official KL adds 1e-7 to the target probabilities (utils.py line 175): kept in the default
    (official) flow, not under --detach-targets (above).
  - Recipe: the CIFAR protocol, which is the official one, except that the official scheduler is
    stepped at the start of each epoch (train_GL.py line 302), so its drops land at 149/224.
    The official code keeps the best leader epoch on the test set; the last epoch is reported here.
  - The branch point is the last stage for every --arch (common.split_model at=-1); the official
    "resnet110" is resnet110b here (Bottleneck [12,12,12]).
  - The logged "kd" (sum_a KL(t_a || z_a)) and "kd_l" (the leader's KD) are the ramped terms, so that
    loss = ce + ce_l + kd + kd_l ("kd_l", not "leader": a term must not share a head's name in log.csv).

Heads: every peer ("peer1" ... "peerm": trunk + peer), "leader" (trunk + the leader branch;
deployable, the backbone's size) and "ensemble" = mean of the peers' logits, the leader's target
(the official "test_accTop1"; trunk + every peer).

    python okddip.py --arch resnet32 --dataset cifar100 --gpus 0
    python okddip.py --arch resnet110b --dataset cifar100 --gpus 0      # OKDDip's "ResNet-110"
    python okddip.py --arch resnet32 --detach-targets                  # targets never train their makers
    python okddip.py --arch resnet32 --dataset cifar100 --recipe paper  # drops at 149/224 (official)
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


def attention(q, k):
    """alpha_ab = softmax over b of q_a . k_b: how much peer a listens to peer b, itself included; no
    1/sqrt(d) scaling (official). q, k: (B, m, d) -> (B, m, m), every row sums to 1. In fp32 under autocast."""
    with torch.autocast(q.device.type, enabled=False):  # a matmul under autocast would run in bf16
        return (q.float() @ k.float().transpose(1, 2)).softmax(-1)


def peer_targets(logits, alpha):
    """t_a = sum_b alpha_ab z_b, peer a's target. logits: m x (B, C); alpha: (B, m, m) -> (B, m, C).
    Keeps the graph of both (official); okddip_loss passes detached logits under --detach-targets.
    In fp32 under autocast."""
    with torch.autocast(alpha.device.type, enabled=False):  # a matmul under autocast would run in bf16
        return alpha.float() @ torch.stack(logits, 1).float()


EPS = 1e-7  # official utils.KL_Loss: added to the target's probabilities


def kl(student, target, T, eps=EPS):
    """T^2 * KL(softmax(target/T) + eps || softmax(student/T)), summed over classes, batch mean: the
    official KL_Loss. The target keeps its graph (unlike kd())."""
    return F.kl_div(F.log_softmax(student / T, 1), F.softmax(target / T, 1) + eps, reduction="batchmean") * T * T


def okddip_loss(logits, leader, alpha, y, T, w, detach_targets=False):
    """sum_a CE(z_a, y) + CE(z_l, y) + w * [sum_a T^2 KL(t_a || z_a) + T^2 KL(mean_b z_b || z_l)].
    Default (official): nothing detached, 1e-7 in both KLs. detach_targets: the peer logits inside t_a
    and the mean are detached (alpha keeps its graph), no 1e-7. Returns (total, {term: value}) with kd
    and kd_l already multiplied by w."""
    ce = sum(F.cross_entropy(z, y) for z in logits)
    ce_l = F.cross_entropy(leader, y)
    if detach_targets:
        t = peer_targets([z.detach() for z in logits], alpha)  # detach 1: the peers inside the targets
        kl_a = sum(kl(z, t[:, a], T, eps=0.0) for a, z in enumerate(logits))  # not kd(): alpha keeps its graph
        kl_l = kd(leader, torch.stack(logits).mean(0), T)  # detach 3: kd() detaches the peers' mean
    else:
        t = peer_targets(logits, alpha)
        kl_a = sum(kl(z, t[:, a], T) for a, z in enumerate(logits))
        kl_l = kl(leader, torch.stack(logits).mean(0), T)
    kl_a, kl_l = w * kl_a, w * kl_l
    return ce + ce_l + kl_a + kl_l, {"ce": ce, "ce_l": ce_l, "kd": kl_a, "kd_l": kl_l}


class OKDDip(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        m = args.peers
        self.trunk, branches = common.split_model(args.arch, num_classes, -1, m + 1)  # m peers + the leader
        self.peers, self.leader = branches[:m], branches[m]
        c = self.leader.fc.in_features  # C: width of a branch's pooled feature
        self.query = nn.Linear(c, c // 8, bias=False)  # shared by the peers; PyTorch's init (official)
        self.key = nn.Linear(c, c // 8, bias=False)
        self.T, self.rampup, self.detach_targets = args.T, args.rampup, args.detach_targets
        self.deploy = "leader"

    def attention_weights(self, feats):
        """alpha from the peers' pooled features: live (official), or detached under --detach-targets
        (detach 2: the attention then trains W_q, W_k only)."""
        f = torch.stack(feats, 1)  # (B, m, C)
        f = f.detach() if self.detach_targets else f
        with torch.autocast(f.device.type, enabled=False):  # the projections in fp32 too, as the attention
            return attention(self.query(f.float()), self.key(f.float()))

    def forward(self, x, y, idx, epoch):
        h = self.trunk(x)
        outs = [p(h, features=True) for p in self.peers]  # (logits, pooled feature, feature map) each
        logits = [z.float() for z, _, _ in outs]  # losses in fp32 under autocast
        alpha = self.attention_weights([f for _, f, _ in outs])
        return okddip_loss(logits, self.leader(h).float(), alpha, y, self.T, common.ramp_up(epoch, self.rampup),
                           self.detach_targets)

    def heads(self, x):
        h = self.trunk(x)
        logits = [p(h).float() for p in self.peers]
        heads = {f"peer{a + 1}": z for a, z in enumerate(logits)}
        heads["leader"] = self.leader(h).float()
        heads["ensemble"] = torch.stack(logits).mean(0)
        return heads

    def head_params(self):
        t = common.count_params(self.trunk)
        n = {f"peer{a + 1}": t + common.count_params(p) for a, p in enumerate(self.peers)}
        # the projections only build training targets: no head needs them
        return {**n, "leader": t + common.count_params(self.leader), "ensemble": t + common.count_params(self.peers)}


# --recipe paper: the official train_GL.py is the protocol, but steps its scheduler at the start of each epoch,
# so its drops land at 149/224
PAPER = dict(schedule=[149, 224])


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--peers", type=int, default=3, check="two+", help="auxiliary peers m (the leader is one more)")
    common.add_arg(p, "--T", type=float, default=3.0, check="positive", help="distillation temperature")
    common.add_epochs_arg(p, "--rampup", 80, "epochs of the sigmoid ramp-up of both KD weights; 0: none")
    common.add_arg(p, "--detach-targets", action="store_true", help="targets never train the peers they are made "
                   "of (peer logits, attention features, the leader's mean detached; no 1e-7); default: the "
                   "official code's gradient flow, nothing detached")
    args = common.parse(p, "okddip", paper=PAPER)
    if args.resume and not args.bench:  # a run stored without the option trained with detached targets:
        stored, _ = common.stored_settings(common.run_dir(args))  # it continues with them
        if stored is not None and "detach_targets" not in stored:
            args.detach_targets = True
    if "," in args.arch:
        p.error("okddip.py builds one multi-branch network: give a single --arch")
    common.run(args, OKDDip)


if __name__ == "__main__":
    main()
