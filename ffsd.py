"""FFSD: Feature Fusion and Self-Distillation (Shaojie Li, Mingbao Lin, Yan Wang, Yongjian Wu, Yonghong Tian,
Ling Shao, Rongrong Ji; "Distilling a Powerful Student Model via Online Knowledge Distillation", IEEE TNNLS
2022). https://arxiv.org/abs/2103.14473

Idea: M students (M = 2) learn from the labels and from each other (DML). A fusion module turns the
concatenation of their last feature maps into a fused classifier, which the students' mean teaches. A
third, separate net, the student leader, learns from the fused classifier and copies the fused
feature map's attention: after training it alone is deployed. Two regularisers: the diversity term
pushes student i's attention map away from student i-1's ("shifted" attention: its strongest 2/3 of
positions flipped), and the self-distillation decoders (transposed convs, trained to rebuild a net's
shallow maps from its last map) rebuild shallow-map targets from student i-1's shifted map (for student i)
and from the fused map (for the leader). A(F) = mean_c F_c^2, the attention map of a feature map F.

Loss:  sum_i [CE(z_i, y) + 1/(M-1) sum_{j!=i} KD(z_i <- z_j)] + l_div sum_{i>=1} [Div(A(F_i), A(F_{i-1}))
       + SD(F_i, D_i(shift(F_{i-1})))] + CE(z_f, y) + KD(z_f <- z_ens) + CE(z_l, y) + KD(z_l <- z_f)
       + l_fus [AT(A(F_l), A(F_f)) + AT(A(TF(F_l)), A([F_1..F_M])) + SD(F_l, D_l(F_f))]
       + l_sd sum_{D in decoders} Rec(D),  every target detached, every l warmed up; z_ens = mean_i z_i.
  F = a net's last feature map; z_f, F_f = fusion([F_1..F_M] detached); TF = the leader's trans-fusion head;
  AT(a, b) = mean (a/|a| - b/|b|)^2 per sample; Div and shift: see diversity_loss and shift_features;
  SD(F, targets) = sum_k AT(A(F^k), A(target^k)) over the shallow stages k; Rec: see decoder_loss.

Modules (official models/fusion_module.py, models/self_distillation.py, models/resnet_cifar.py), with C the
width of the last stage and "maps" the outputs of every stage but the stem (ResNet: layer1..layer3):
  - fusion: concat (M*C) -> depthwise 3x3 + BN + ReLU -> 1x1 to C + BN + ReLU (= F_f) -> pool -> FC (FFL's);
  - trans-fusion (in the leader, for the loss only): depthwise 3x3 on C + BN + ReLU -> 1x1 C -> M*C + BN + ReLU;
  - decoders, one per student i >= 2 and one for the leader: per stage back from the last map, ConvTranspose
    3x3 (stride 2, or 1 where the stage keeps the resolution) to the earlier stage's width + BN + ReLU.

Deviations from the official code (SJLeo/FFSD: CIFARTrainer.py, options.py, models/), and choices:
  - One joint backward and step instead of one optimizer and backward pass per student, for the fusion
    module, the leader and each decoder. There too every forward happens before any update and every
    input from another group is detached, so each parameter gets the same gradient (tested).
  - Weights as in the official code: the students' self-distillation term is weighted by l_div (1e-5),
    not l_sd; the leader's by l_fus (10); l_sd (1000) weights only the decoders' own loss. T = 2.
  - Warm-up: official w(e) = exp(-5 (1 - e/5)^2) for e <= 5, e counted from 1; here w =
    common.ramp_up(epoch + 1, --warmup) on the loop's 0-based epoch index: exp(-3.2) in the first epoch,
    1 from index 4 on. --warmup 5 is scaled with --epochs (a shorter run warms up faster); 0: none.
  - Decoders: Adam (fused: same update, no host sync), lr 1e-3, wd 1e-4 (--decoder-lr, --decoder-wd;
    official: Adam's default lr, wd = the nets' 1e-4), through extra_optimizer(); their lr follows the
    SGD schedule (on_epoch: --decoder-lr x common.lr_factor), as the official code steps a MultiStepLR on
    them too. Their targets come from an eval-mode pass (running BN statistics) before their training
    pass, as in the official order.
  - Recipe: the protocol. Official: wd 1e-4, reflect padding, 299 epochs (1..299, lr drops after 150
    and 225 of them; `--recipe paper` sets these), the best leader epoch reported; the fusion module
    decays with --fusion-wd 1e-5 as there. The official fusion classifier has 100 outputs whatever the
    dataset; here the dataset's.
  - Other backbones: the decoders take each stage's width and resolution (ResNet, WRN: the official
    halving of widths); a stage that keeps the resolution gets a stride-1 ConvTranspose. DenseNet's
    maps are its stage outputs (after the transitions), not the official dense-block outputs. The
    diversity threshold takes max(1, HW // 3) positions (official HW // 3 is 0 under 3 positions).
  - Initialisation: fusion and trans-fusion He-normal (fan-out) as in the official code; the decoders
    PyTorch's default (the official SelfDistillationModel sets none).
  - Logged terms: "ce", "kd" (students), "div", "sd" (students, weighted), "ce_f", "fusion" (fusion
    module), "ce_l", "kd_l", "fuse_l", "trans_l", "sd_l" (leader, weighted), "dec" (decoders, weighted);
    loss = their sum.

Heads: "student1" ... "studentM", "fused" (fusion module's classifier), "leader" (deployable: the
backbone's size; the trans-fusion head is not part of it) and "ensemble" = mean of the students'
logits, the fused classifier's KD target (the official "Ensemble Acc" adds up the students' hits: an
oracle, not reproduced).

    python ffsd.py --arch resnet32 --dataset cifar100 --gpus 0
    python ffsd.py --arch resnet32 --recipe paper     # the official recipe (wd 1e-4, 299 epochs, reflect)
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


def attention(f):
    """A(F) = mean_c F_c^2: (B, C, H, W) -> (B, 1, H, W), in fp32."""
    return f.float().pow(2).mean(1, keepdim=True)


def at_loss(x, y):
    """AT(x, y) = mean over batch and positions of (x/|x| - y/|y|)^2, |.| the L2 norm of each flattened
    sample. y is detached: it is always a target."""
    return (F.normalize(x.float().flatten(1)) - F.normalize(y.detach().float().flatten(1))).pow(2).mean()


def shifted_attention(a):
    """The shift of an attention map a (B, 1, H, W): with n = |a| and u = a/n per sample, t = the k-th smallest
    u, k = max(1, HW // 3): shift(a) = (n/2 - u) sign(u - t) + n/2, i.e. u where u < t, n - u where u > t,
    n/2 at t. Returns (shift(a), u, n) flattened to (B, HW)."""
    n = a.flatten(1).norm(dim=1, keepdim=True)
    u = F.normalize(a.flatten(1))
    t = u.kthvalue(max(1, u.shape[1] // 3), 1, keepdim=True).values
    return (n / 2 - u) * torch.sign(u - t) + n / 2, u, n


def diversity_loss(a, a_prev):
    """Div(a, a') = mean over batch and positions of (a/|a| - shift(a'))^2, a' (the previous student's
    attention) detached."""
    target, _, _ = shifted_attention(a_prev.detach())
    return (F.normalize(a.flatten(1)) - target).pow(2).mean()


def shift_features(f):
    """shift(F) = F + (shift(A) - A/|A|) |A| / C at every position, the same for every channel, A = A(F);
    F detached. The decoder turns it into student i's self-distillation targets."""
    f = f.detach().float()
    target, u, n = shifted_attention(attention(f))
    return f + ((target - u) * n / f.shape[1]).view(f.shape[0], 1, *f.shape[2:])


def sd_loss(maps, targets):
    """SD(F, targets) = sum_k AT(A(F^k), A(target^k)), targets (a decoder's outputs, shallow to deep) detached."""
    return sum(at_loss(attention(f), attention(t)) for f, t in zip(maps, targets))


def decoder_loss(outs, maps):
    """Rec(D) = sum_k [AT(D^k, F^k) + AT(A(D^k), A(F^k))]: D^k the decoder's output for stage k (from the net's
    detached last map), F^k the net's map, detached: this term trains the decoder only."""
    return sum(at_loss(d, f) + at_loss(attention(d), attention(f)) for d, f in zip(outs, maps))


def student_loss(logits, maps, sd_targets, y, T, l_div):
    """Student i: CE(z_i, y) + 1/(M-1) sum_{j!=i} KD(z_i <- z_j) and, for i >= 1 (0-based),
    l_div [Div(A(F_i), A(F_{i-1})) + SD(maps_i, sd_targets[i-1])]. Every other student's output is a target.
    Returns (total, {term: value}), summed over the students."""
    M = len(logits)
    ce = sum(F.cross_entropy(z, y) for z in logits)
    kl = sum(kd(logits[i], logits[j], T) for i in range(M) for j in range(M) if j != i) / (M - 1)
    div = l_div * sum(diversity_loss(attention(maps[i][-1]), attention(maps[i - 1][-1])) for i in range(1, M))
    sd = l_div * sum(sd_loss(maps[i], sd_targets[i - 1]) for i in range(1, M))  # l_div: the official weight
    return ce + kl + div + sd, {"ce": ce, "kd": kl, "div": div, "sd": sd}


def fusion_loss(z_f, logits, y, T):
    """CE(z_f, y) + KD(z_f <- z_ens), z_ens = mean_i z_i detached by kd(). Returns (total, {term: value})."""
    ce_f, fusion = F.cross_entropy(z_f, y), kd(z_f, torch.stack(logits).mean(0), T)
    return ce_f + fusion, {"ce_f": ce_f, "fusion": fusion}


def leader_loss(z_l, maps_l, tf, z_f, f_f, cat, sd_target, y, T, l_fus):
    """CE(z_l, y) + KD(z_l <- z_f) + l_fus [AT(A(F_l), A(F_f)) + AT(A(TF(F_l)), A(cat))
    + SD(maps_l, sd_target)]; z_f, F_f, cat (the students' last maps) and the decoder's targets are detached.
    Returns (total, {term: value}), the feature terms already multiplied by l_fus."""
    terms = {"ce_l": F.cross_entropy(z_l, y), "kd_l": kd(z_l, z_f, T),
             "fuse_l": l_fus * at_loss(attention(maps_l[-1]), attention(f_f)),
             "trans_l": l_fus * at_loss(attention(tf), attention(cat)),
             "sd_l": l_fus * sd_loss(maps_l, sd_target)}
    return sum(terms.values()), terms


def stage_maps(net, x):
    """(logits, [maps after every stage but the stem]) of a common.Net."""
    maps = []
    for stage in net.stages:
        x = stage(x)
        maps.append(x)
    return net.fc(x.mean((2, 3))), maps[1:]


def decode(decoder, f):
    """The decoder's output after each of its blocks, reordered shallow to deep (as the maps)."""
    outs = []
    for block in decoder:
        f = block(f)
        outs.append(f)
    return outs[::-1]


def make_decoder(shapes):
    """ConvTranspose 3x3 + BN + ReLU per stage, from the last map (C_L, H_L) back to (C_1, H_1); shapes[k] = (C, H)."""
    blocks = []
    for (cin, hin), (cout, hout) in zip(shapes[:0:-1], shapes[-2::-1]):
        if hout not in (hin, 2 * hin):
            raise ValueError(f"ffsd: a stage goes from {hout}x{hout} to {hin}x{hin}; the self-distillation decoder "
                             "needs each stage to keep or halve the resolution")
        s = hout // hin
        blocks.append(nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, s, 1, s - 1, bias=False),
                                    nn.BatchNorm2d(cout), nn.ReLU(inplace=True)))
    return nn.Sequential(*blocks)


class FFSD(nn.Module):
    def __init__(self, args, num_classes):
        super().__init__()
        M = args.students
        self.students = nn.ModuleList(common.build_model(args.arch, num_classes) for _ in range(M))
        self.leader = common.build_model(args.arch, num_classes)
        with torch.no_grad():  # (C, H) of every map, from one image of the training size (eval: BN untouched)
            size = getattr(args, "image_size", None) or 32
            maps = stage_maps(self.leader.eval(), torch.zeros(1, 3, size, size))[1]
            self.leader.train()
        shapes = [(f.shape[1], f.shape[2]) for f in maps]
        c = shapes[-1][0]  # C: channels of the last feature map
        cat = M * c
        # the fusion module is itself stages + global pool + FC, so common.Net builds it (as in ffl.py)
        self.fusion = common.Net([common.conv_bn(cat, cat, 3, groups=cat),  # depthwise 3x3 + BN + ReLU
                                  common.conv_bn(cat, c, 1)],                # pointwise M*C -> C + BN + ReLU
                                 nn.Linear(c, num_classes))
        self.trans_fusion = nn.Sequential(common.conv_bn(c, c, 3, groups=c),  # depthwise 3x3 + BN + ReLU
                                          common.conv_bn(c, cat, 1))          # pointwise C -> M*C + BN + ReLU
        common.init_weights(self.fusion)  # He-normal convs, BN 1/0, as the official modules
        common.init_weights(self.trans_fusion)
        # decoders[i - 1] serves student i + 1 (i = 1 .. M-1), decoders[-1] the leader; trained by Adam only
        self.decoders = nn.ModuleList(make_decoder(shapes) for _ in range(M))
        self.T, self.warmup, self.args = args.T, args.warmup, args
        self.lambdas = (args.lambda_div, args.lambda_fusion, args.lambda_sd)
        self.deploy = "leader"

    def forward(self, x, y, idx, epoch):
        w = common.ramp_up(epoch + 1, self.warmup)  # the official warm-up counts epochs from 1
        l_div, l_fus, l_sd = (w * lam for lam in self.lambdas)
        outs = [stage_maps(s, x) for s in self.students]
        logits, maps = [z.float() for z, _ in outs], [m for _, m in outs]  # losses in fp32 under autocast
        z_l, maps_l = stage_maps(self.leader, x)
        cat = torch.cat([m[-1] for m in maps], 1).detach()  # the fusion module does not train the students
        z_f, _, f_f = self.fusion(cat, features=True)
        tf = self.trans_fusion(maps_l[-1])
        with torch.no_grad():  # decoder targets: eval mode, before the training passes below update BN statistics
            self.decoders.eval()
            sd_targets = [decode(d, shift_features(maps[i][-1])) for i, d in enumerate(self.decoders[:-1])]
            sd_target_l = decode(self.decoders[-1], f_f)
            self.decoders.train(self.training)
        # each decoder learns to rebuild its net's maps from the net's last map (detached: trains the decoder only)
        rec = sum(decoder_loss(decode(d, m[-1].detach()), m) for d, m in zip(self.decoders, maps[1:] + [maps_l]))
        # the groups' terms ([1]); the loss is one sum over all of them in their logged order
        terms = {**student_loss(logits, maps, sd_targets, y, self.T, l_div)[1],
                 **fusion_loss(z_f.float(), logits, y, self.T)[1],
                 **leader_loss(z_l.float(), maps_l, tf, z_f.float(), f_f, cat, sd_target_l, y, self.T, l_fus)[1],
                 "dec": l_sd * rec}
        return sum(terms.values()), terms

    def extra_optimizer(self):
        """Adam for the decoders (left out of param_groups), as the official code. fused: its step counts stay
        on the device (the default implementation reads them with .item() every step)."""
        a = self.args
        self.decoder_opt = torch.optim.Adam(self.decoders.parameters(), lr=a.decoder_lr, weight_decay=a.decoder_wd,
                                            fused=True)
        return self.decoder_opt

    def on_epoch(self, epoch, holdout):
        """The decoders' lr follows the SGD schedule: --decoder-lr times the schedule's factor of --lr."""
        for g in self.decoder_opt.param_groups:
            g["lr"] = self.args.decoder_lr * common.lr_factor(self.args, epoch)

    def heads(self, x):
        outs = [s(x, features=True) for s in self.students]
        logits = [z.float() for z, _, _ in outs]
        heads = {f"student{k + 1}": z for k, z in enumerate(logits)}
        heads["fused"] = self.fusion(torch.cat([f for _, _, f in outs], 1)).float()
        heads["leader"] = self.leader(x).float()
        heads["ensemble"] = torch.stack(logits).mean(0)
        return heads

    def head_params(self):
        n = {f"student{k + 1}": common.count_params(s) for k, s in enumerate(self.students)}
        stages = sum(common.count_params(s.stages) for s in self.students)  # the fused head needs no student FC
        return {**n, "fused": stages + common.count_params(self.fusion), "leader": common.count_params(self.leader),
                "ensemble": common.count_params(self.students)}

    def param_groups(self, wd):
        """SGD: students, leader and trans-fusion decay with --wd, the fusion module with --fusion-wd; the
        decoders are left out (Adam, extra_optimizer)."""
        nets = [*self.students.parameters(), *self.leader.parameters(), *self.trans_fusion.parameters()]
        return [{"params": nets, "weight_decay": wd},
                {"params": list(self.fusion.parameters()), "weight_decay": self.args.fusion_wd}]


# --recipe paper: the official options.py / CIFARTrainer.py (SJLeo/FFSD): wd 1e-4 (fusion 1e-5), 299 epochs,
# x0.1 after 150 and 225, reflect padding
PAPER = dict(wd=1e-4, fusion_wd=1e-5, epochs=299, schedule=[150, 225], padding="reflect")


def main():
    p = common.parser(__doc__)
    common.add_arg(p, "--students", type=int, default=2, check="two+", help="number of students M (official --model_num)")
    common.add_arg(p, "--T", type=float, default=2.0, check="positive", help="distillation temperature")
    common.add_epochs_arg(p, "--warmup", 5, "epochs of the warm-up of lambda-div, -fusion and -sd; 0: none")
    common.add_arg(p, "--lambda-div", type=float, default=1e-5, check="nonneg", help="weight of the diversity and the students' "
                   "self-distillation terms")
    common.add_arg(p, "--lambda-fusion", type=float, default=10.0, check="nonneg", help="weight of the leader's feature terms")
    common.add_arg(p, "--lambda-sd", type=float, default=1000.0, check="nonneg", help="weight of the decoders' reconstruction")
    common.add_arg(p, "--fusion-wd", type=float, default=1e-5, check="nonneg", help="weight decay of the fusion module")
    common.add_arg(p, "--decoder-lr", type=float, default=1e-3, check="positive", help="Adam lr of the self-distillation decoders")
    common.add_arg(p, "--decoder-wd", type=float, default=1e-4, check="nonneg", help="Adam weight decay of the decoders")
    args = common.parse(p, "ffsd", paper=PAPER)
    if "," in args.arch:
        p.error("ffsd.py trains students and a leader of one architecture: give a single --arch")
    common.run(args, FFSD)


if __name__ == "__main__":
    main()
