"""Shared parts of the online-distillation scripts: backbones, on-device data, the loop, the options.

A method file (dml.py, one.py, ...) holds the whole of its method: its losses, its extra
modules and its training step. This file holds what a reader of a method does not need to see;
copy a method file next to it and it runs. Its parts, in reading order:

  1. BACKBONES   32x32 classifiers by name, each a sequence of stages + pool + linear head, so a
                 method can share the first stages and give every branch its own copy of the rest;
                 torchvision's ImageNet ResNet-18/34/50 and MobileNetV2 cut into stages the same way.
  2. DATA        CIFAR-10/100 held on the training device as uint8, shuffled, cropped, flipped and
                 normalised there in batches; k augmented views per batch on request. ImageNet-style
                 folders (--dataset imagenet) through DataLoader workers, with the same interface.
  3. LOOP        run(), the training process(es), _train and its phases, train_step, evaluate, logging:
                 optimizer, schedule, DDP, bf16 autocast, checkpoints, resume, final.json.
  4. OPTIONS     the parser and its checks, the protocol's defaults, --recipe paper, the settings a
                 --resume takes from its run, the sets of option names; teacher checkpoints (kd.py,
                 sokd.py, reviewkd.py: load_teacher, check_teacher).
  5. RUN FOLDER  what a run may write where: the lock, atomic writes, --force, how Ctrl-C stops a run.
  6. BENCH       --bench N: images/s of the loop and of the bare step, on synthetic data.

The loop in one screen (part 3): who calls whom, and a method's hooks (<-) in the order they run.

  run(args, Method)              checks, the run folder locked; one line however it ends
    Method(args, num_classes)    built once here, so that its errors come first   <- __init__
    _check_data                  batch size, holdout, labels, memory              <- min_batch, check_data,
                                                                                     memory_needed
    _worker                      this process (--gpus 0,1,...: one per device, by _launch and _child)
      _train                     the method on its device, then the phases:
        _loaders                 train / test / holdout batches on the device     <- views, holdout
                                                                                  <- on_data(train_labels)
        _optimizers              SGD of the param groups (or the method's own),   <- param_groups(wd),
                                 and a second optimizer when it has one              make_optimizer,
                                                                                     extra_optimizer
        _start                   --resume's checkpoint, run.json, the first lines <- resolved
        for each epoch, _epoch:  the lr of the schedule                           <- on_epoch(epoch, holdout)
          _steps -> train_step   forward -> (loss, {term: value}), backward,      <- forward(x, y, idx, epoch)
                                 optimizer step(s); terms summed on the device    <- after_step()
          evaluate               top-1 of every head (every --eval-every epochs)  <- heads(x)
          _save_checkpoint, _log checkpoint.pt, then the epoch's line and log.csv
        _finish -> _final        training top-1, final.json                       <- deploy, head_params()

A method is an nn.Module with this contract (see dml.py for the smallest real one):

    forward(x, y, idx, epoch) -> (loss, {term: value})  one training step's loss. x is a batch of
                                 images, or a tuple of `views` independently augmented batches;
                                 idx are the samples' indices in the training set. Every value is
                                 a tensor (a term that is off: torch.tensor(0.0, device=y.device)).
    heads(x) -> {name: logits}   every head that is evaluated on the test set.
    deploy                       name of the head that is the deployable model.
    head_params() -> {name: n}   parameters a deployed head needs.
  optional:
    views = 1                    augmented views per batch.
    holdout = 0                  training images held out and passed to on_epoch (KDCL-general).
    param_groups(wd)             optimizer groups (default: every trainable parameter, decay wd); a
                                 group's "lr_scale" multiplies the scheduled lr for it (OEC-KD's adapters).
    make_optimizer(groups)       the optimizer of those groups, or None for the loop's SGD (OEC-KD's
                                 --optimizer adam); the lr schedule sets every group's lr all the same.
    extra_optimizer()            a second optimizer for parameters left out of param_groups (e.g.
                                 FFSD's Adam-trained decoders): stepped after the SGD step on the same
                                 backward pass, its state saved in checkpoints; the lr schedule is
                                 applied to the SGD groups only (on_epoch may apply lr_factor to it).
    after_step()                 called after every optimizer step (EMA teachers, memory banks).
    on_epoch(epoch, holdout)     called at the start of every training epoch (holdout: a Loader or None).
    on_data(train_labels)        called once, before the optimizer and resume, with the training
                                 labels on the device (one entry per sample index idx).
    resolved = {}                settings the method derived from the run (e.g. PCL's EMA decay, set
                                 in on_data): printed first, stored in run.json and final.json.
    min_batch = 1                images a training batch needs per process (ONE's BatchNorm1d gate: 2);
                                 min_batch_why says why. A --batch-size, or an epoch's short last batch,
                                 that gives a process fewer is refused before the run starts.
    check_data(train_labels)     raise ValueError (one line) for training labels the method cannot use
                                 (MCL: a single class); called before anything is written.
    memory_needed(n_train, batch) -> (bytes, what, fix)  memory a process needs for state that grows with
                                 the data (MCL's banks and negatives), checked against what is free.

Everything else (device, DDP, AMP, schedules, logging, checkpoints) stays here.

Tables, figures and the commands behind a table: summarize.py (no method imports it).
"""
import argparse
import csv
import errno
import io
import inspect
import json
import math
import os
import pickle
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta


# ---- Start-up: a signal while numpy and torch are imported (most of a start-up) is one line, no traceback

def _startup_stop(signum, frame):
    """A signal while a script of this folder starts (importing torch, parsing): one line, no traceback.
    run() replaces this handler with its own (Interrupt) before it touches a run folder."""
    print(f"\nstopped ({_signame(signum)}) during start-up: no run folder was touched", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def _signame(signum):
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s))


def _install_startup_handlers():
    """Only in a script run from this folder (not under pytest or in a notebook), and only for signals left
    at their default: one the parent ignores (nohup's SIGHUP, a --gpus launcher's children) stays ignored."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main or os.path.dirname(os.path.abspath(main)) != os.path.dirname(os.path.abspath(__file__)):
        return
    for s in STOP_SIGNALS:
        try:
            if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(s, _startup_stop)
        except (ValueError, OSError):  # not the main thread
            pass


_install_startup_handlers()  # before numpy and torch: their import is most of a start-up


import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# =================================================================================================
# 1. BACKBONES
# Every network is Net(stages, fc): x -> stages[0] -> ... -> stages[-1] -> global avg pool -> fc.
# The last stage ends with the final norm where the architecture has one (pre-activation WRN,
# DenseNet), so "the last stage" is exactly what a branch or SOKD's bridge must copy.
# =================================================================================================

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv_bn(cin, cout, k=1, stride=1, relu=True, groups=1):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """He et al. 3x3-3x3 residual block; 1x1 conv + BN shortcut when the shape changes."""
    expansion = 1

    def __init__(self, cin, planes, stride=1, width_mult=1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, planes, 3, stride), conv_bn(planes, planes, 3, relu=False))
        self.short = conv_bn(cin, planes, 1, stride, relu=False) if stride != 1 or cin != planes else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 block, output planes * 4; the 3x3 has planes * width_mult channels (torchvision)."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, width_mult=1):
        super().__init__()
        w, cout = planes * width_mult, planes * 4
        self.body = nn.Sequential(conv_bn(cin, w), conv_bn(w, w, 3, stride), conv_bn(w, cout, relu=False))
        self.short = conv_bn(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.short(x))


class PreActBlock(nn.Module):
    """Zagoruyko & Komodakis wide block: BN-ReLU-conv-BN-ReLU-conv, 1x1 conv shortcut on a shape change."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.short(o) if self.short is not None else x)


class Net(nn.Module):
    """A classifier as a sequence of stages, then global average pooling and a linear head.

    forward(x) -> logits; forward(x, features=True) -> (logits, pooled feature, last feature map).
    A branch of a multi-branch method is a Net whose stages are the tail of a backbone.
    """

    def __init__(self, stages, fc):
        super().__init__()
        self.stages, self.fc = nn.Sequential(*stages), fc

    def forward(self, x, features=False):
        fmap = self.stages(x)
        feat = fmap.mean((2, 3))
        logits = self.fc(feat)
        return (logits, feat, fmap) if features else logits


def _resnet(block, depths, widths, num_classes, stem=16, width_mult=1):
    stages, cin = [conv_bn(3, stem, 3)], stem
    for i, (n, planes) in enumerate(zip(depths, widths)):
        blocks = []
        for j in range(n):
            blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, width_mult))
            cin = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    return Net(stages, nn.Linear(cin, num_classes))


def _wrn(depth, k, num_classes):
    n, widths = (depth - 4) // 6, [16 * k, 32 * k, 64 * k]
    stages, cin = [conv3x3(3, 16)], 16
    for i, w in enumerate(widths):
        blocks = [PreActBlock(cin if j == 0 else w, w, 2 if i > 0 and j == 0 else 1) for j in range(n)]
        stages.append(nn.Sequential(*blocks))
        cin = w
    stages[-1].append(nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)))  # final norm
    return Net(stages, nn.Linear(cin, num_classes))


VGG_CFG = {8: [[64], [128], [256], [512], [512]],
           11: [[64], [128], [256, 256], [512, 512], [512, 512]],
           13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
           16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]}


class MaxPoolAt8(nn.Module):
    """RepDistiller's VGG max-pools before its last block only when the input is 64x64 (`if h == 64`),
    i.e. when the map arriving here is 8x8; the 4x4 map of a 32x32 input passes unpooled."""

    def forward(self, x):
        return F.max_pool2d(x, 2) if x.shape[-2] == 8 else x


def _vgg(depth, num_classes, style="repdistiller"):
    """VGG with BN, in three styles that differ only in conv bias and where they max-pool:
      "repdistiller"  RepDistiller's vgg8/11/13/16 (models/vgg.py, `vggN_bn`; the KD tables' vgg13 -> vgg8):
                      five blocks of 3x3 conv (bias kept) + BN + ReLU, a max-pool before blocks 1-3 but
                      not before block 4 at 32x32, so the last block runs at 4x4; global average pool, FC.
      "2x2"           this repo's VGG before issue 26 (`vgg8_2x2`, ...): convs without bias and a max-pool
                      before every block after the first, so the last block runs at 2x2.
      "mcl"           MCL-OKD's VGG-16 (winycg/MCL-OKD models/vgg.py and mcl_okd_vgg.py, `vgg16_mcl`): convs
                      with bias and a max-pool after every block, so the last block runs at 2x2 and is
                      max-pooled to 1x1 (the average pool of a 1x1 map changes nothing); 14,774,436 params
                      with a CIFAR-100 head, as RepDistiller's vgg16. MCL shares blocks 0-2 and branches 3-4,
                      as mcl_okd_vgg.py's layer3_i/layer4_i (split_model at=-2).
    OKDDip's VGG-16 (DefangChen/OKDDip) has MCL-OKD's convs and a 512-512-classes MLP classifier: not built."""
    if style not in ("repdistiller", "2x2", "mcl"):
        raise ValueError(f"unknown VGG style {style!r}: repdistiller, 2x2 or mcl")
    stages, cin, blocks = [], 3, VGG_CFG[depth]
    for i, block in enumerate(blocks):
        layers = [] if i == 0 else [MaxPoolAt8()] if style == "repdistiller" and i == 4 else [nn.MaxPool2d(2)]
        for c in block:
            layers.append(nn.Sequential(nn.Conv2d(cin, c, 3, 1, 1, bias=style != "2x2"), nn.BatchNorm2d(c),
                                        nn.ReLU(inplace=True)))
            cin = c
        if style == "mcl" and i == len(blocks) - 1:
            layers.append(nn.MaxPool2d(2))
        stages.append(nn.Sequential(*layers))
    return Net(stages, nn.Linear(cin, num_classes))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                               nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), conv3x3(4 * growth, growth))

    def forward(self, x):
        return torch.cat([x, self.f(x)], 1)


def _densenet_bc(depth, growth, num_classes, reduction=0.5):
    n, cin = (depth - 4) // 6, 2 * growth
    stages = [conv3x3(3, cin)]
    for i in range(3):
        layers = []
        for _ in range(n):
            layers.append(DenseLayer(cin, growth))
            cin += growth
        if i < 2:  # transition: BN-ReLU-1x1 conv (compression) - avg pool
            cout = int(math.floor(cin * reduction))
            layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2)]
            cin = cout
        else:
            layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]  # final norm
        stages.append(nn.Sequential(*layers))
    return Net(stages, nn.Linear(cin, num_classes))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        h = cin * expand
        self.f = nn.Sequential(conv_bn(cin, h), conv_bn(h, h, 3, stride, groups=h), conv_bn(h, cout, relu=False))
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.f(x) if self.res else self.f(x)


def _mobilenetv2(num_classes, width=1.0, stem_stride=1):
    """MobileNetV2 for 32x32. width 1.0: stride-1 stem and first stride-2 stage made stride 1.
    width 0.5, stem_stride 2: RepDistiller's `mobile_half` (models/mobilenetv2.py), the "MobileNetV2" of
    every KD table: channels int(c * 0.5), stride-2 stem, the last 1x1 conv still 1280 wide; its maps
    are 16/16/8/4/2 on a 32x32 input."""
    # (expansion, channels, blocks, stride), grouped into stages by output resolution (32/16/8/4 at width 1)
    cfg = [[(1, 16, 1, 1), (6, 24, 2, 1)], [(6, 32, 3, 2)], [(6, 64, 4, 2), (6, 96, 3, 1)], [(6, 160, 3, 2), (6, 320, 1, 1)]]
    cin = int(32 * width)
    stages = [conv_bn(3, cin, 3, stem_stride)]
    for group in cfg:
        blocks = []
        for t, c, n, s in group:
            for j in range(n):
                blocks.append(InvertedResidual(cin, int(c * width), s if j == 0 else 1, t))
                cin = int(c * width)
        stages.append(nn.Sequential(*blocks))
    stages[-1].append(conv_bn(cin, 1280))
    return Net(stages, nn.Linear(1280, num_classes))


class ChannelShuffle(nn.Module):
    """(N, C, H, W) -> (N, g, C/g, H, W) -> swap the two channel axes -> (N, C, H, W)."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """ShuffleNet unit as RepDistiller's (models/ShuffleNetv1.py): grouped 1x1 + BN + ReLU (one group right
    after the 24-channel stem), channel shuffle, depthwise 3x3 + BN + ReLU (RepDistiller keeps this ReLU;
    the paper has none), grouped 1x1 + BN; stride 2: concatenated with a 3x3 average-pooled input, else
    added to it; ReLU."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, g = cout // 4, 1 if cin == 24 else groups
        self.f = nn.Sequential(conv_bn(cin, mid, groups=g), ChannelShuffle(g), conv_bn(mid, mid, 3, stride, groups=mid),
                               conv_bn(mid, cout, groups=groups, relu=False))
        self.short = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x):
        y = self.f(x)
        return F.relu(torch.cat([y, self.short(x)], 1) if self.short is not None else y + x)


def _shufflev1(num_classes, widths=(240, 480, 960), depths=(4, 8, 4), groups=3):
    """RepDistiller's ShuffleV1 (groups 3): 1x1 conv stem to 24 channels at 32x32, three stages at 16/8/4,
    each opened by a stride-2 unit that concatenates."""
    stages, cin = [conv_bn(3, 24)], 24
    for w, n in zip(widths, depths):
        blocks = [ShuffleV1Block(cin, w - cin, 2, groups)]  # + the pooled input's cin channels = w
        blocks += [ShuffleV1Block(w, w, 1, groups) for _ in range(n - 1)]
        stages.append(nn.Sequential(*blocks))
        cin = w
    return Net(stages, nn.Linear(cin, num_classes))


class ShuffleV2Block(nn.Module):
    """ShuffleNetV2 unit as RepDistiller's (models/ShuffleNetv2.py). Stride 1: the second half of the
    channels through 1x1 + BN + ReLU, depthwise 3x3 + BN, 1x1 + BN + ReLU, concatenated after the first
    half. Stride 2 (cin -> cout): depthwise 3x3/2 + BN, 1x1 + BN + ReLU beside 1x1 + BN + ReLU, depthwise
    3x3/2 + BN, 1x1 + BN + ReLU, cout/2 channels each, concatenated. Then a shuffle in 2 groups."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        c = cout // 2
        self.down = stride == 2
        if self.down:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, 2, relu=False, groups=cin), conv_bn(cin, c))
        b = cin if self.down else c
        self.right = nn.Sequential(conv_bn(b, c), conv_bn(c, c, 3, stride, relu=False, groups=c), conv_bn(c, c))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        if self.down:
            y = torch.cat([self.left(x), self.right(x)], 1)
        else:
            c = x.shape[1] // 2
            y = torch.cat([x[:, :c], self.right(x[:, c:])], 1)
        return self.shuffle(y)


def _shufflev2(num_classes, widths=(116, 232, 464), depths=(3, 7, 3), last=1024):
    """RepDistiller's ShuffleV2 (net_size 1): 1x1 conv stem to 24 channels at 32x32, three stages at 16/8/4,
    each a stride-2 unit and `depth` stride-1 units; the last stage ends with 1x1 conv to 1024 + BN + ReLU."""
    stages, cin = [conv_bn(3, 24)], 24
    for w, n in zip(widths, depths):
        stages.append(nn.Sequential(ShuffleV2Block(cin, w, 2), *[ShuffleV2Block(w, w, 1) for _ in range(n)]))
        cin = w
    stages[-1].append(conv_bn(cin, last))
    return Net(stages, nn.Linear(last, num_classes))


ARCHS = {
    **{f"resnet{d}": (lambda d: lambda nc: _resnet(BasicBlock, [(d - 2) // 6] * 3, [16, 32, 64], nc))(d)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet110b": lambda nc: _resnet(Bottleneck, [12, 12, 12], [16, 32, 64], nc),  # PCL/OKDDip/MCL "ResNet-110"
    "resnet8x4": lambda nc: _resnet(BasicBlock, [1, 1, 1], [64, 128, 256], nc, stem=32),
    "resnet32x4": lambda nc: _resnet(BasicBlock, [5, 5, 5], [64, 128, 256], nc, stem=32),
    "wrn_16_1": lambda nc: _wrn(16, 1, nc), "wrn_16_2": lambda nc: _wrn(16, 2, nc),
    "wrn_40_1": lambda nc: _wrn(40, 1, nc), "wrn_40_2": lambda nc: _wrn(40, 2, nc),
    "wrn_28_10": lambda nc: _wrn(28, 10, nc),
    "wrn_20_8": lambda nc: _resnet(Bottleneck, [2, 2, 2], [16, 32, 64], nc, width_mult=8),  # PCL's "WRN-20-8"
    **{f"vgg{d}": (lambda d: lambda nc: _vgg(d, nc))(d) for d in VGG_CFG},  # RepDistiller's
    # vgg8..vgg16 before issue 26 (no conv bias, last block at 2x2), kept so that older runs still build
    **{f"vgg{d}_2x2": (lambda d: lambda nc: _vgg(d, nc, style="2x2"))(d) for d in VGG_CFG},
    "vgg16_mcl": lambda nc: _vgg(16, nc, style="mcl"),  # MCL-OKD's VGG-16 (its VGG-16 rows)
    "densenet40_12": lambda nc: _densenet_bc(40, 12, nc),
    "mobilenetv2": _mobilenetv2,
    "mobilenetv2_half": lambda nc: _mobilenetv2(nc, width=0.5, stem_stride=2),  # RepDistiller's "MobileNetV2"
    "shufflev1": _shufflev1, "shufflev2": _shufflev2,  # RepDistiller's ShuffleV1 / ShuffleV2
}


# ---- ImageNet backbones: torchvision's networks (weights=None, torchvision's init) cut into stages,
# so that split_model, the branches of ONE/PCL/MCL and SOKD's bridge work on them unchanged.

def _tv_resnet(name, num_classes):
    """torchvision's ImageNet ResNet as stages: stem (conv1, bn1, relu, maxpool), layer1..layer4; fc."""
    import torchvision
    m = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return Net([nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3, m.layer4], m.fc)


def _tv_mobilenet_v2(num_classes):
    """torchvision's ImageNet MobileNetV2 with `features` cut where the resolution halves: stem + first
    block (1/2), then 1/4, 1/8, 1/16 and 1/32, the last ending with the 1x1 conv to 1280 channels.
    fc is the classifier's Linear: torchvision's Dropout(0.2) before it is left out (fc stays a Linear)."""
    import torchvision
    m = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    f = m.features
    return Net([f[0:2], f[2:4], f[4:7], f[7:14], f[14:]], m.classifier[1])


TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2_imagenet")
ARCHS.update({
    "resnet18": lambda nc: _tv_resnet("resnet18", nc),
    "resnet34": lambda nc: _tv_resnet("resnet34", nc),
    "resnet50": lambda nc: _tv_resnet("resnet50", nc),
    "mobilenet_v2_imagenet": _tv_mobilenet_v2,  # "mobilenetv2" is the 32x32 CIFAR variant above
})


# How the reference implementations initialise their CIFAR nets (RepDistiller's models/, ONE, FFL,
# MCL-OKD, SOKD, the PCL re-implementation): every conv He-normal with fan_out, std sqrt(2 / (k*k*out)),
# bias 0; every BatchNorm weight 1, bias 0; the classifier by family: PyTorch's default (ResNet,
# DenseNet), default weight with bias 0 (WRN), N(0, 0.01) with bias 0 (VGG, MobileNetV2). RepDistiller's
# ShuffleV1/V2 initialise nothing: PyTorch's defaults throughout, as torchvision's nets keep torchvision's.
LINEAR_INIT = {**{a: "zero_bias" for a in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_10")},
               **{a: "normal" for a in ARCHS if a.startswith(("vgg", "mobilenetv2"))}}
OWN_INIT = (*TORCHVISION_ARCHS, "shufflev1", "shufflev2")  # left as their constructors made them


@torch.no_grad()
def init_weights(module, linear="default"):
    """The references' initialisation (above), in place, for every submodule of `module`.
    linear: "default" (PyTorch's), "zero_bias" or "normal" (N(0, 0.01), bias 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            m.weight.fill_(1)
            m.bias.zero_()
        elif isinstance(m, nn.Linear) and linear != "default":
            if linear == "normal":
                m.weight.normal_(0, 0.01)
            m.bias.zero_()
    return module


def build_model(arch, num_classes):
    """A backbone by name, e.g. build_model('resnet32', 100), initialised as its reference does
    (torchvision's ImageNet nets and the ShuffleNets keep their constructors' initialisation: OWN_INIT)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    net = ARCHS[arch](num_classes)
    if arch in OWN_INIT:
        return net
    return init_weights(net, LINEAR_INIT.get(arch, "default"))  # wrn_20_8 is a ResNet: default


def split_model(arch, num_classes, at, copies):
    """Shared trunk = stages[:at] of one net; `copies` branches = stages[at:] + fc, each from its own
    freshly initialised net (so branches, classifiers included, start from independent weights).
    at=-1 shares all but the last stage (ONE, FFL, PCL); at=-2 all but the last two (MCL)."""
    nets = [build_model(arch, num_classes) for _ in range(copies)]
    trunk = nn.Sequential(*nets[0].stages[:at])
    return trunk, nn.ModuleList(Net(list(n.stages[at:]), n.fc) for n in nets)


def count_params(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


# =================================================================================================
# 2. DATA: the whole split lives on the device as uint8; augmentation runs there in batches.
# =================================================================================================

DATASETS = {  # folder in torchvision's layout, train files, test files, label key, classes, mean, std
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# --norm: statistics some official codes use on every dataset. "cifar10-legacy": CIFAR-10's mean with the
# std that circulates in many CIFAR repositories (ONE's cifar_one.py), not the pixel std of CIFAR-10
NORMS = {"cifar10": DATASETS["cifar10"][5:7],
         "cifar10-legacy": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
         "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}  # pixels in [0, 1], as ToTensor alone (OEC-KD)


class DataError(RuntimeError):
    pass


def _read_split(dataset, data_dir, files):
    folder, _, _, key, nc, _, _ = DATASETS[dataset]
    xs, ys = [], []
    for name in files:
        path = os.path.join(data_dir, folder, name)
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            x, y = np.asarray(d["data"]), np.asarray(d[key])
        except FileNotFoundError:
            raise DataError(f"missing {path}; expected {data_dir}/{folder}/ with {', '.join(files)} (torchvision layout)")
        except Exception as e:  # truncated pickle, wrong keys, not a pickle at all
            raise DataError(f"cannot read {path} as a CIFAR pickle ({type(e).__name__}: {e})")
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
            raise DataError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, "
                            f"got {x.dtype} {x.shape} and {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= nc):
            raise DataError(f"{path}: labels must lie in [0, {nc}), found {y.min()}..{y.max()}")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar(dataset, data_dir):
    """(train_x, train_y, test_x, test_y) as numpy uint8 (N, 3, 32, 32) / int64, read without a
    checksum check. Downloads through torchvision only when the folder is absent."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    folder, train_files, test_files = DATASETS[dataset][:3]
    if not os.path.isdir(os.path.join(data_dir, folder)):
        try:
            import torchvision
            cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
            cls(data_dir, train=True, download=True)
        except Exception as e:
            raise DataError(f"{dataset} not found in {os.path.join(data_dir, folder)} and the download failed "
                            f"({type(e).__name__}); put the python-version CIFAR archive's folder '{folder}' "
                            f"in --data-dir {data_dir}") from None
    train, test = _read_split(dataset, data_dir, train_files), _read_split(dataset, data_dir, test_files)
    for (x, _), files, split in ((train, train_files, "training"), (test, test_files, "test")):
        if len(x) == 0:  # nothing to train on, or nothing to measure: every accuracy would be 0/0
            raise DataError(f"the {split} split of {os.path.join(data_dir, folder)} ({', '.join(files)}) holds no "
                            f"images; put the full {dataset} files there")
    nc, present = DATASETS[dataset][4], len(np.unique(train[1]))
    if present < nc:  # e.g. a subset written by hand: accuracy is then out of fewer classes than the head has
        print(f"warning: the training labels in {os.path.join(data_dir, folder)} use {present} of the {nc} "
              f"classes of {dataset}", file=sys.stderr)
    return (*train, *test)


def _reflect(n, pad, device):
    """Indices of a length-n axis reflect-padded by `pad` (the edge not repeated, as torchvision's
    padding_mode="reflect"): -pad..n+pad-1 folded back into 0..n-1."""
    i = torch.arange(-pad, n + pad, device=device).abs()
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def crop_flip(x, dy, dx, flip, pad=4, padding="zeros"):
    """Per-image window [dy:dy+H, dx:dx+W] of x padded by `pad` ("zeros", or "reflect": the image
    mirrored at its edges), mirrored where flip; one gather.
    x: (B, C, H, W) uint8; dy, dx: (B,) ints in [0, 2*pad]; flip: (B,) bool."""
    B, C, H, W = x.shape
    if padding == "reflect":  # by indexing, which every dtype and device supports
        xp = x.index_select(2, _reflect(H, pad, x.device)).index_select(3, _reflect(W, pad, x.device)).flatten(2)
    else:
        xp = F.pad(x, (pad, pad, pad, pad)).flatten(2)                         # (B, C, Hp*Wp)
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    rows = dy[:, None] + ar_h                                                   # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], W - 1 - ar_w, ar_w)         # (B, W)
    where = rows[:, :, None] * (W + 2 * pad) + cols[:, None, :]                 # (B, H, W) into the padded image
    return xp.gather(2, where.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)


class _DeviceNormalize:
    """What Loader and FolderLoader share: uint8 batches become normalised floats on the device."""

    def __init__(self, mean, std, device, channels_last):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.device, self.channels_last = device, channels_last

    def normalize(self, x):
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def holdout_split(n, k, seed):
    """(held-out indices, training indices): k of n training images chosen by a permutation of `seed`."""
    perm = np.random.RandomState(seed).permutation(n)
    return perm[:k], perm[k:]


class Loader(_DeviceNormalize):
    """Batches of one CIFAR split held on `device` as uint8.

    train=True: one permutation per epoch from a generator seeded by (seed, epoch), so an epoch's
    batches do not depend on what ran before (exact resume); `views` independent crop+flip draws of
    every batch. Under DDP (world > 1) every rank draws the same global batch and takes its share.
    Yields (x, y, idx): x normalised float (a tuple of `views` tensors when views > 1)."""

    def __init__(self, x, y, mean, std, device, batch_size, train, views=1, seed=0, rank=0, world=1,
                 channels_last=False, padding="zeros"):
        super().__init__(mean, std, device, channels_last)
        self.x = torch.as_tensor(x).to(device)                   # uint8, never a float copy of the split
        self.y = torch.as_tensor(y).to(device)
        self.batch_size, self.train, self.views, self.padding = batch_size, train, views, padding
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def epoch(self, epoch=0):
        n, B = len(self.y), self.batch_size
        if self.train:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, device=self.device, generator=g)
        else:
            order = torch.arange(n, device=self.device)
        for start in range(0, n, B):
            idx = order[start:start + B]
            if self.train:  # draw augmentation for the global batch, then keep this rank's share
                params = [(torch.randint(0, 9, (len(idx),), device=self.device, generator=g),
                           torch.randint(0, 9, (len(idx),), device=self.device, generator=g),
                           torch.rand(len(idx), device=self.device, generator=g) < 0.5) for _ in range(self.views)]
            idx = idx[self.rank::self.world]
            imgs = self.x[idx]
            if not self.train:
                yield self.normalize(imgs), self.y[idx], idx
                continue
            xs = tuple(self.normalize(crop_flip(imgs, *(p[self.rank::self.world] for p in v), padding=self.padding))
                       for v in params)
            yield (xs[0] if self.views == 1 else xs), self.y[idx], idx


# ---- ImageNet-style folders (--dataset imagenet): too big for the device, so DataLoader workers read
# and augment the images and FolderLoader hands them over with Loader's interface.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder_layout(data_dir):
    return (f"--dataset imagenet expects {data_dir}/train/<class>/<image> and "
            f"{data_dir}/val/<class>/<image> (ImageFolder layout)")


def dataset_info(args):
    """(num_classes, mean, std) of --dataset: CIFAR's from DATASETS; imagenet: as many classes as
    class folders in DIR/train (1000 under --bench when there is no folder), ImageNet's statistics."""
    if args.dataset != "imagenet":  # --norm: other statistics whatever the dataset (ONE, SOKD)
        norm = getattr(args, "norm", "dataset")
        return DATASETS[args.dataset][4], *(NORMS[norm] if norm in NORMS else DATASETS[args.dataset][5:7])
    train = os.path.join(args.data_dir, "train")
    if not os.path.isdir(train):
        if getattr(args, "bench", 0):
            return 1000, IMAGENET_MEAN, IMAGENET_STD
        raise DataError(f"missing {train}; {_folder_layout(args.data_dir)}")
    from torchvision.datasets.folder import find_classes
    try:
        return len(find_classes(train)[0]), IMAGENET_MEAN, IMAGENET_STD
    except FileNotFoundError as e:
        raise DataError(f"{train}: {str(e).strip()}; {_folder_layout(args.data_dir)}") from None


def load_image_folders(data_dir):
    """(train, val) of an ImageFolder tree as lists of (path, label); labels number train's class
    folders in sorted order, and val must have the same class folders."""
    from torchvision.datasets import ImageFolder
    splits = []
    for name in ("train", "val"):
        d = os.path.join(data_dir, name)
        if not os.path.isdir(d):
            raise DataError(f"missing {d}; {_folder_layout(data_dir)}")
        try:
            splits.append(ImageFolder(d))
        except (FileNotFoundError, OSError) as e:  # no class folder, or a class folder without images
            raise DataError(f"{d}: {str(e).strip().splitlines()[0]}; {_folder_layout(data_dir)}") from None
    train, val = splits
    if train.classes != val.classes:
        raise DataError(f"{data_dir}/val has other class folders than {data_dir}/train "
                        f"({len(val.classes)} vs {len(train.classes)}); {_folder_layout(data_dir)}")
    return train.samples, val.samples


class _FolderImages(torch.utils.data.Dataset):
    """samples[i] = (path, label) -> (uint8 image, or a tuple of `views` independent draws, label, i)."""

    def __init__(self, samples, transform, views):
        from torchvision.datasets.folder import default_loader
        self.samples, self.transform, self.views, self.load = samples, transform, views, default_loader

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = self.load(path)  # PIL, RGB
        xs = tuple(self.transform(img) for _ in range(self.views))
        return (xs[0] if self.views == 1 else xs), label, i


class FolderLoader(_DeviceNormalize):
    """Batches of an image-folder split (a list of (path, label)) with Loader's interface: epoch(e)
    yields (x, y, idx) on `device` (idx: the position in `samples`), len() batches, .y every label.

    DataLoader workers (`workers` per process) decode, crop and flip; images travel as uint8 and are
    normalised on the device, as in Loader. batch_size is the global batch: each rank takes
    batch_size // world.
    train=True: RandomResizedCrop(size) + horizontal flip, `views` independent draws per image; a
    DistributedSampler shuffles by (seed, epoch) and gives rank `rank` of `world` its share; the
    workers' random state is seeded by (seed, epoch, rank), so an epoch is the same after a resume
    (with the same number of processes and workers). The last incomplete batch is dropped: every step
    has the same size (ONE's BatchNorm1d gate cannot train on a batch of 1).
    train=False: resize to size*256/224, center crop; this rank's images rank::world, in order."""

    def __init__(self, samples, size, mean, std, device, batch_size, train, views=1, seed=0, rank=0, world=1,
                 workers=8, channels_last=False):
        import torchvision.transforms as T
        super().__init__(mean, std, device, channels_last)
        self.y = torch.tensor([label for _, label in samples], dtype=torch.long).to(device)
        self.train, self.views, self.seed, self.rank = train, views if train else 1, seed, rank
        if train:
            tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
        else:
            tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.PILToTensor()])
        images = _FolderImages(samples, tf, self.views)
        sampler = torch.utils.data.DistributedSampler(images, world, rank, shuffle=True, seed=seed) if train \
            else range(rank, len(samples), world)
        self.gen = torch.Generator()  # seeds the workers' random state (augmentation)
        # fork on Linux: in a process started by --gpus' mp.spawn the default would be spawn, and every
        # worker would import torch again at the start of every epoch (workers never touch CUDA)
        fork = "fork" if workers and sys.platform.startswith("linux") else None
        self.dl = torch.utils.data.DataLoader(images, max(1, batch_size // world), sampler=sampler,
                                              num_workers=workers, pin_memory=device.startswith("cuda"),
                                              drop_last=train, generator=self.gen, multiprocessing_context=fork)
        if train and len(self.dl) == 0:
            raise DataError(f"{len(samples)} training images make no full batch of {batch_size // world} "
                            f"on each of {world} process(es); lower --batch-size")

    def __len__(self):
        return len(self.dl)

    def epoch(self, epoch=0):
        if self.train:
            self.dl.sampler.set_epoch(epoch)
            self.gen.manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + self.rank)
        for x, y, idx in self.dl:
            xs = tuple(self.normalize(v.to(self.device, non_blocking=True)) for v in (x if self.views > 1 else [x]))
            yield (xs[0] if self.views == 1 else xs), y.to(self.device, non_blocking=True), \
                idx.to(self.device, non_blocking=True)


def folder_loaders(args, data, views, holdout, device, rank, world, channels_last=False):
    """(train, test, holdout) FolderLoaders for --dataset imagenet from load_image_folders' lists. The
    holdout (KDCL-general) is `holdout` training images chosen by a permutation seeded by --seed, as on
    CIFAR, taken out of the training set and read with the evaluation transform; None when 0."""
    train, val = data
    _, mean, std = dataset_info(args)
    kw = dict(size=args.image_size, mean=mean, std=std, device=device, workers=args.workers,
              channels_last=channels_last)
    hold = None
    if holdout:
        if holdout >= len(train):
            raise DataError(f"a holdout of {holdout} images leaves nothing of the {len(train)} training images")
        held, kept = holdout_split(len(train), holdout, args.seed)
        hold = FolderLoader([train[i] for i in held], batch_size=args.batch_size, train=False, **kw)
        train = [train[i] for i in kept]
    return (FolderLoader(train, batch_size=args.batch_size, train=True, views=views, seed=args.seed, rank=rank,
                         world=world, **kw),
            FolderLoader(val, batch_size=args.batch_size, train=False, rank=rank, world=world, **kw), hold)


# =================================================================================================
# 3. LOOP
# run() -> a training process -> _train's phases -> train_step -> evaluate -> final.json
# =================================================================================================

# ---- How a run ends: one line, and 0 (done, or nothing to do) or one of these exit codes
EXIT_ERROR = 2      # an error said in one line: a refusal before anything was written (or the start undone)
EXIT_NONFINITE = 3  # a non-finite loss: the last good checkpoint is kept
EXIT_WRITE = 4      # the run folder could not be written during training (disk full, I/O error): last checkpoint kept
EXIT_PROCESS = 5    # a training process of a --gpus run died (raised or was killed): every process was stopped
# stopped by signal n (Ctrl-C, SIGTERM, SIGHUP): 128 + n, the shell's convention (130, 143, 129)


class DiskFull(RuntimeError):
    pass


class RunFolderError(RuntimeError):
    """The run folder cannot be created, locked or written (read-only, no permission, not a folder, I/O)."""


class NonFinite(RuntimeError):
    pass


class ProcessDied(RuntimeError):
    def __init__(self, msg, exit_code):
        super().__init__(msg)
        self.exit_code = exit_code


def fail(msg, code=EXIT_ERROR):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ---- The run: checks, the run folder, the training process(es); one line however it ends

def run(args, Method):
    """The whole life of a run: checks, run folder, (DDP) training, final.json. However it ends, it says so
    in one line and exits with 0 (done, or nothing to do) or a code above (EXIT_*, 128 + signal)."""
    global _STOP
    out = run_dir(args) if not args.bench else (args.out or run_dir(args) + "-bench")
    _STOP = stop = Interrupt(phase="startup")
    made = None
    try:
        kind = _check_run_dir_kind(out)
        if not args.bench and kind in ("ours", "legacy") and not (args.resume or args.force) and \
                any(os.path.exists(os.path.join(out, n)) for n in _TRAINING_FILES):
            fail(f"run folder {out} exists; pass --resume to continue it or --force to start over")
        if args.resume and not args.bench and _finished(out, args):
            print(f"{out} is finished ({args.epochs} epochs): {out}/final.json; nothing to do "
                  f"(a larger --epochs extends it)")
            return
        if args.resume and not args.bench and os.path.isfile(os.path.join(out, "final.json")) and \
                not os.path.isfile(os.path.join(out, "checkpoint.pt")):  # e.g. a record kept without its weights
            fail(f"--resume: {out} holds a finished run without its checkpoint.pt: there are no weights to continue "
                 f"from; start a new run elsewhere (another --out), or --force to replace this one")
        try:
            data = None if args.bench else load_image_folders(args.data_dir) if args.dataset == "imagenet" \
                else load_cifar(args.dataset, args.data_dir)
            num_classes = dataset_info(args)[0]
            model = Method(args, num_classes)  # built once here so that model errors (e.g. SOKD's teacher) come first
        except (DataError, FileNotFoundError, RuntimeError, ValueError) as e:
            fail(e)
        if not args.bench:
            _check_data(args, model, data, out)
        del model
        _LOADED.clear()
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process runs this: rank 0 alone may
            made = _prepare_run_dir(args, out, kind)  # lock, clean and create the folder (the others write nothing)
        stop.phase = "prepared"
        world = len(args.devices)
        if world > 1 and "RANK" not in os.environ:
            _launch(world, args, Method, out, data, stop)
        elif "RANK" in os.environ:  # torchrun
            _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, Method, out, data)
        else:
            _worker(0, 1, args, Method, out, data)
    except Stopped as e:
        name = _signame(e.signum)
        if e.before_final:
            print(f"stopped ({name}) after the last epoch, before the final evaluation: final.json was not written; "
                  f"the checkpoint of epoch {e.kept} is kept in {out}: --resume evaluates it and writes final.json",
                  flush=True)
        else:
            note = _undo_start(out, made) if not e.kept else ""
            print(f"stopped in epoch {e.epoch + 1} ({name}): {_kept(out, e.kept, note)}", flush=True)
        sys.exit(128 + e.signum)
    except Stop as e:
        name = _signame(e.signum)
        if made and _finished(out, args):  # final.json was written just before the signal
            print(f"{out} finished before the stop ({name}): {out}/final.json", flush=True)
            return
        if e.where == "startup" and made is None:
            print(f"stopped ({name}) during start-up: nothing was written", flush=True)
        elif e.where == "final":
            print(f"stopped ({name}) during the final evaluation: final.json was not written; the checkpoint of "
                  f"epoch {_kept_epoch(out, stop.done)} (the last) is kept in {out}: --resume evaluates it and "
                  f"writes final.json", flush=True)
        else:
            kept = _kept_epoch(out, stop.done)
            note = _undo_start(out, made) if not kept else ""
            print((f"stopped at once (second {name}): " if e.where == "again" else
                   f"stopped ({name}) during start-up: ") + _kept(out, kept, note), flush=True)
        sys.exit(128 + e.signum)
    except Exception as e:
        note = _undo_start(out, made)
        code = _exit_code(e, stop.phase)
        if code:
            fail(f"{e}{note}", code)
        raise
    finally:
        _unlock()
        stop.restore()
        _STOP = None


def _exit_code(e, phase):
    """The exit code of an exception said in one line (None: a bug, shown with its traceback)."""
    if isinstance(e, ProcessDied):
        return e.exit_code
    if isinstance(e, NonFinite):
        return EXIT_NONFINITE
    if isinstance(e, (DiskFull, RunFolderError)):
        return EXIT_WRITE if phase in ("training", "final", "launcher") else EXIT_ERROR
    if isinstance(e, (DataError, FileNotFoundError, RuntimeError, ValueError)):
        return EXIT_ERROR
    return None


# ---- Checks that need the data: before anything is written

def _check_data(args, model, data, out):
    """What the loaded data makes impossible, in one line each: --resume onto other data; a holdout that
    leaves less than a batch; a batch (or an epoch's last, short batch) the method cannot take, or that
    leaves a process without images; a method's own limits (check_data) and memory (memory_needed)."""
    identity = data_identity(args, data)
    if args.resume:
        stored, source = stored_data(out)
        diff = [f"{k} {stored[k]!r} ({source}) vs {identity.get(k)!r} (now)"
                for k in ("dataset", "train_images", "test_images", "labels_sha256")
                if stored and k in stored and stored[k] != identity.get(k)]
        if diff:
            fail(f"--resume: the run in {out} was trained on other data: {'; '.join(diff)}; point --data-dir at "
                 f"the data it was trained on (--data-dir {args.data_dir} now), or start a new run (--force, or "
                 f"another --out)")
    labels = np.asarray([t[1] for t in data[0]] if args.dataset == "imagenet" else data[1])
    n, B, world = len(labels), args.batch_size, len(args.devices)
    if B % world:
        fail(f"--batch-size {B} is not divisible by the {world} processes of --gpus {args.gpus}: give a multiple "
             f"of {world}")
    holdout = getattr(model, "holdout", 0)
    left = n - holdout
    if holdout and left < B:
        fail(f"a holdout of {holdout} images leaves {max(left, 0)} of the {n} training images, less than one "
             f"batch of {B}: lower the holdout (--val-size) or --batch-size")
    if holdout:  # the method trains on the images left
        labels = np.delete(labels, holdout_split(n, holdout, args.seed)[0])
    need, per = max(1, getattr(model, "min_batch", 1)), B // world
    short = 0 if args.dataset == "imagenet" else left % B  # imagenet's loader drops the last short batch
    smallest = min(per, short // world) if short else per
    if smallest < need:
        what = (f"--batch-size {B} gives each of the {world} process(es) {per}" if per < need else
                f"the last batch of each epoch holds {short} of the {left} training images, {short // world} "
                f"for a process")
        fail(f"{args.method} cannot train on a batch of {smallest} image(s) per process (it needs {need}"
             f"{': ' + model.min_batch_why if hasattr(model, 'min_batch_why') else ''}); {what}: choose another "
             f"--batch-size (one dividing {left} leaves no short batch)")
    if hasattr(model, "check_data"):
        try:
            model.check_data(torch.as_tensor(labels))
        except ValueError as e:
            fail(e)
    if all(d == "cpu" for d in args.devices):
        _check_memory(model, left, B // world, "cpu", world)


def _check_memory(model, n_train, batch, device, processes=1):
    """A method's state that grows with the data (memory_needed: MCL's banks and negatives) against the
    memory free on `device` (shared by `processes` on the CPU): refused in one line rather than killed by
    the kernel's OOM killer minutes later."""
    if not hasattr(model, "memory_needed"):
        return
    need, what, fix = model.memory_needed(n_train, batch)
    free = _available_bytes(device)
    if free is not None and need * processes > free:
        raise ValueError(f"{what} need about {need * processes / 2**30:.1f} GiB but {free / 2**30:.1f} GiB are "
                         f"free on {device}: {fix}")


def _available_bytes(device):
    """Memory free for this run: on a GPU what CUDA reports free, on the CPU /proc/meminfo's MemAvailable
    (None where neither can be read)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


# ---- One training process: its phases, the step, the evaluation

def _worker(rank, world, args, Method, out, data):
    """One training process (`rank` of `world`): its device and process group, then _train."""
    device = args.devices[rank % len(args.devices)] if "LOCAL_RANK" not in os.environ else \
        (f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() and args.devices[0] != "cpu" else "cpu")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        if not cuda:  # CPU processes share the cores instead of each taking all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
        warnings.simplefilter("ignore")
    try:
        fail_rank, _, how = os.environ.get("OKD_FAIL_RANK", "").partition(":")  # tests: one rank dies ("R"
        if fail_rank == str(rank):                                             # raises, "R:kill" is killed);
            if how == "kill":                                                  # the others must not hang
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"rank {rank}: failure injected by OKD_FAIL_RANK")
        _train(rank, world, args, Method, out, data, device)
        if world > 1:  # leave together: a rank that tears gloo down while the other still sends or
            dist.barrier()  # writes final.json can abort it (SIGABRT, seen once in CI)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(rank, world, args, Method, out, data, device):
    """One process's run as an outline: each phase is a function below, in the order it runs."""
    amp = use_amp(args, device)
    torch.manual_seed(args.seed)
    # channels_last on every device: faster convolutions on GPUs, and on CPUs too (resnet32 training
    # step ~1.1-1.3x on this project's CPU; `python summarize.py speed` measures it)
    model = Method(args, dataset_info(args)[0]).to(device).to(memory_format=torch.channels_last)
    identity = data_identity(args, data)  # before the holdout and the split between processes
    train_data, test_data, hold, train_images = _loaders(args, model, data, device, rank, world)
    if hasattr(model, "on_data"):  # e.g. MCL's memory banks: one row per training sample, labels for negatives
        model.on_data(train_data.y)
    opts = _optimizers(args, model)
    step_model = _step_model(args, model, world)
    if args.bench:  # part 6: --bench times steps on synthetic data instead
        return _bench(args, model, step_model, opts, train_data, device, amp, out)
    history, start = _start(args, out, model, opts, identity, rank, world, device, amp, len(train_data.y))
    stop = _STOP if _STOP is not None else Interrupt()
    stop.done, stop.phase = start, "training"
    agree = _Agreement(world)  # every process stops after the same step
    for epoch in range(start, args.epochs):
        row, terms, heads = _epoch(args, epoch, rank, world, model, step_model, opts, (train_data, test_data, hold),
                                   amp, agree, stop, out)
        history.append(row)
        if rank == 0:  # the checkpoint first, then the log row: the log never runs ahead of the checkpoint
            _save_checkpoint(args, out, epoch, model, opts, history, identity)
            _log(out, row, terms, heads, model.deploy, args.epochs, header=epoch == start)
            stop.done = epoch + 1
        if args.halt_after and epoch + 1 >= args.halt_after and epoch + 1 < args.epochs:
            agree.close()
            print(f"halted after epoch {epoch + 1} (--halt-after)")
            return
    stopping = agree.close(stop.hit)  # a signal while the last epoch was evaluated and saved
    if stopping:
        raise Stopped(stopping, args.epochs, args.epochs, before_final=True)
    stop.phase = "final"  # a signal from here on stops at once: the run is finished only with final.json
    _finish(args, out, model, history, train_images, identity, rank, world, device, amp)


def _loaders(args, model, data, device, rank, world):
    """This process's (train, test, holdout, training images for _finish): Loaders of CIFAR on the device
    (of synthetic images under --bench), FolderLoaders of imagenet (no training images for _finish then).
    The holdout (KDCL-general; None without one) comes off the training split with a fixed permutation."""
    num_classes, mean, std = dataset_info(args)
    views = getattr(model, "views", 1)
    if args.bench:  # synthetic data already on the device, no dataset needed
        gen = torch.Generator().manual_seed(0)
        size = args.image_size or 32  # imagenet: synthetic squares of --image-size through the on-device Loader
        tx = torch.randint(0, 256, (4 * args.batch_size, 3, size, size), dtype=torch.uint8, generator=gen)
        ty = torch.randint(0, num_classes, (4 * args.batch_size,), generator=gen)
        data = (tx, ty, tx[:0], ty[:0])
    if args.dataset == "imagenet" and not args.bench:  # DataLoader workers read the folders
        train_data, test_data, hold = folder_loaders(args, data, views, getattr(model, "holdout", 0), device,
                                                     rank, world, True)
        train_images = None
    else:
        tx, ty, vx, vy = data
        holdout_n, hold = (0 if args.bench else getattr(model, "holdout", 0)), None  # --bench: no holdout
        if holdout_n >= len(ty):
            raise DataError(f"a holdout of {holdout_n} images leaves nothing of the {len(ty)} training images")
        if holdout_n:
            held, kept = holdout_split(len(ty), holdout_n, args.seed)
            tx, ty, hx, hy = tx[kept], ty[kept], tx[held], ty[held]
            hold = Loader(hx, hy, mean, std, device, 500, train=False, channels_last=True)
        train_data = Loader(tx, ty, mean, std, device, args.batch_size, True, views, args.seed, rank, world, True,
                            args.padding)
        test_data = Loader(vx, vy, mean, std, device, 1000, False, rank=rank, world=world, channels_last=True)
        train_images = tx, ty
    if device.startswith("cuda") and not args.bench:  # what CUDA has free is known here only (run() checked the CPU's)
        _check_memory(model, len(train_data.y), args.batch_size // world, device)
    return train_data, test_data, hold, train_images


def _optimizers(args, model):
    """[the SGD of the method's param_groups (or its make_optimizer's), then its extra_optimizer if any]."""
    groups = model.param_groups(args.wd) if hasattr(model, "param_groups") else \
        [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": args.wd}]
    opt = model.make_optimizer(groups) if hasattr(model, "make_optimizer") else None
    if opt is None:
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov)
    extra = model.extra_optimizer() if hasattr(model, "extra_optimizer") else None
    return [opt] + ([extra] if extra is not None else [])


def _step_model(args, model, world):
    """What a training step calls: the model, in DDP with several processes, compiled with --compile."""
    if world > 1 and args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by {world} processes")
    ddp = nn.parallel.DistributedDataParallel(model, **_rank_local_buffers()) if world > 1 else model
    # OKD_COMPILE_BACKEND (rehearsals only, e.g. gpu_check.py --tiny: "eager" traces without inductor's codegen)
    return torch.compile(ddp, backend=os.environ.get("OKD_COMPILE_BACKEND", "inductor")) if args.compile else ddp


def _rank_local_buffers():
    """DDP's option for "never sync buffers in forward" (each rank keeps its own BatchNorm statistics, as
    one-process-per-GPU BN does): `forward_sync_buffers=False` where torch has it (it replaces the deprecated
    `broadcast_buffers=False`), else `broadcast_buffers=False`. The newer one also copies rank 0's buffers
    once when DDP wraps the model; that copies equal values, because every rank has just built the model
    from the same seed (a checkpoint is loaded after the wrap, by every rank alike). The copy includes
    MCL's memory banks: about 100 MB on CIFAR, 2.6 GB on ImageNet, once per start."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _start(args, out, model, opts, identity, rank, world, device, amp, n_train):
    """(history, epochs done): the checkpoint's, its weights and optimizer states loaded, when --resume
    finds one; else ([], 0). Then rank 0 writes run.json and log.csv and prints the run's first lines."""
    history, start = [], 0
    ck = _resume_checkpoint(args, os.path.join(out, "checkpoint.pt"), rank, world)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opts[0].load_state_dict(ck["opt"])
        if len(opts) > 1:
            opts[1].load_state_dict(ck["opt_extra"])
        history, start = ck["history"], ck["epoch"]
        print(f"resumed {out} from the checkpoint of epoch {start}: continuing with epoch {start + 1}")
    if rank == 0:
        resolved = getattr(model, "resolved", {})
        # run.json lets `summarize` show runs in progress; log.csv is rewritten from the checkpoint's
        # history, so that it never holds an epoch the checkpoint does not (a crash between the two)
        atomic_json({**MARKER, **_plain_args(args), "resolved": resolved, "data": identity,
                     "machine": machine_info(device)},
                    os.path.join(out, "run.json"))
        _write_log(out, history)
        print(describe_schedule(args, resolved))  # the first line: what this run is
        if getattr(args, "extended_from", None):
            print(f"--epochs {args.epochs}: extending the run from {args.extended_from} epochs")
        if start == 0:
            print(f"{args.method} {args.arch} {args.dataset}: "
                  f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} parameters in training, "
                  f"{n_train} training images, device {device} x{world}, amp {'bf16' if amp else 'off'}")
    return history, start


def _resume_checkpoint(args, path, rank, world):
    """The checkpoint to resume from (None: start from epoch 1): rank 0 reads it and sends it to the
    other ranks, so that the processes on other machines need no shared disk (they never read or
    write the run folder)."""
    ck = load_checkpoint(path) if rank == 0 and args.resume and os.path.isfile(path) else None
    if world == 1:
        return ck
    box = [ck]
    dist.broadcast_object_list(box, 0)
    return box[0]


def _epoch(args, epoch, rank, world, model, step_model, opts, loaders, amp, agree, stop, out):
    """One epoch: its lr, the steps, the terms' means over the steps and processes, the test top-1 of every
    head (every --eval-every epochs and at the last). Returns its row of log.csv, its terms and heads."""
    train_data, test_data, hold = loaders
    lr = _set_lr(opts[0], args, epoch)
    # randomness inside a step (e.g. MCL's negatives) depends on (seed, epoch, rank) only: exact resume
    torch.manual_seed(args.seed * 10_007 + epoch + 1_000_003 * rank)
    model.train()
    if hasattr(model, "on_epoch"):
        model.on_epoch(epoch, hold)
    t0 = time.time()
    names, sums, n_steps = _steps(args, epoch, model, step_model, opts, train_data, amp, rank, agree, stop, out)
    if world > 1:
        dist.all_reduce(sums)
        sums /= world
        for b in model.buffers():  # one broadcast per epoch keeps BN statistics (and banks) identical
            dist.broadcast(b, 0)
    mean_terms = dict(zip(names, (sums / n_steps).tolist()))
    seconds = time.time() - t0
    tested = (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
    acc = evaluate(model, test_data, amp, world) if tested else dict.fromkeys(model.head_params())
    row = {"epoch": epoch + 1, "lr": lr, **mean_terms, **acc, "seconds": round(seconds, 2),
           "images_per_second": round(len(train_data.y) / seconds, 1)}
    return row, list(mean_terms), list(acc)


def _steps(args, epoch, model, step_model, opts, train_data, amp, rank, agree, stop, out):
    """The epoch's training steps: (term names, their sums, steps). The sums and the first non-finite step
    stay on the device until the epoch ends (no host sync per step). Raises Stopped when a signal stops
    the run after a step (every process after the same one), NonFinite after an epoch with a non-finite loss."""
    progress = Progress(len(train_data), args.batch_size) if rank == 0 and sys.stdout.isatty() else None
    sums, names, first_bad, bad_terms, n_steps, stopping = None, None, None, None, 0, 0
    for step, (x, y, idx) in enumerate(train_data.epoch(epoch)):
        names, vals = train_step(model, step_model, opts, x, y, idx, epoch, amp)
        if sums is None:
            sums = torch.zeros_like(vals)
            first_bad = torch.full((), -1, device=vals.device)
            bad_terms = torch.zeros_like(vals, dtype=torch.bool)
        sums += vals
        finite = torch.isfinite(vals)
        new_bad = (first_bad < 0) & ~finite.all()
        first_bad = torch.where(new_bad, step, first_bad)
        bad_terms = torch.where(new_bad, ~finite, bad_terms)
        n_steps += 1
        if progress:
            progress.step(epoch, args.epochs, n_steps)
        stopping = agree(stop.hit)
        if stopping:
            break
    if progress:
        progress.clear()
    if stopping:  # run() says so and exits 128 + the signal; the checkpoint of `epoch` epochs is kept
        agree.close()
        raise Stopped(stopping, epoch, epoch)
    if first_bad.item() >= 0:
        bad = [n for n, b in zip(names, bad_terms.tolist()) if b]
        raise NonFinite(f"non-finite loss at epoch {epoch + 1} step {first_bad.item() + 1} in term(s) "
                        f"{', '.join(bad)}; stopped; the checkpoint of the last good epoch ({epoch}) is kept in {out}")
    return names, sums, n_steps


def train_step(model, step_model, opts, x, y, idx, epoch, amp):
    """One optimizer step (of each optimizer in `opts`, one backward pass). Returns the term names and
    their values as one device tensor (no host sync). amp: bf16 autocast on the batch's device type."""
    opts = opts if isinstance(opts, (list, tuple)) else [opts]
    with torch.autocast(y.device.type, torch.bfloat16, enabled=amp):
        loss, terms = step_model(x, y, idx, epoch)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in opts:
        opt.step()
    if hasattr(model, "after_step"):
        model.after_step()
    return ["loss", *terms], _stacked(model, loss, terms)


def _stacked(model, loss, terms):
    """The loss and its terms as one fp32 tensor on the device. A term that is a plain number (a Python
    float, e.g. 0.0 for a weight that is off) cannot be stacked: a ValueError names it, in one line."""
    try:
        return torch.stack([loss.detach().float()] + [v.detach().float() for v in terms.values()])
    except (AttributeError, TypeError):  # only when it fails: nothing checked, no cost, on every other step
        plain = [(k, v) for k, v in terms.items() if not isinstance(v, torch.Tensor)]
        if not plain:
            raise
        k, v = plain[0]
        raise ValueError(f"{type(model).__name__}.forward returned the loss term {k!r} as {v!r} (a "
                         f"{type(v).__name__}), not a tensor: return a tensor on the batch's device, e.g. "
                         f"torch.tensor(0.0, device=y.device) for a term that is off") from None


@torch.no_grad()
def evaluate(model, data, amp, world=1):
    """Top-1 accuracy (%) of every head; counts stay on the device until the end."""
    model.eval()
    correct, n = None, 0
    for x, y, _ in data.epoch():
        with torch.autocast(y.device.type, torch.bfloat16, enabled=amp):
            heads = model.heads(x)
        hits = torch.stack([(z.argmax(1) == y).sum() for z in heads.values()])
        correct = hits if correct is None else correct + hits
        n += len(y)
    total = torch.tensor([n], device=correct.device)
    if world > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    model.train()
    return {k: round(100.0 * c / total.item(), 2) for k, c in zip(heads, correct.tolist())}


def _save_checkpoint(args, out, epoch, model, opts, history, identity):
    """checkpoint.pt after epoch `epoch` (0-based; atomically): what --resume continues from."""
    try:
        atomic_save({**MARKER, "model": model.state_dict(), "opt": opts[0].state_dict(), "epoch": epoch + 1,
                     **({"opt_extra": opts[1].state_dict()} if len(opts) > 1 else {}),
                     "history": history, "args": _plain_args(args), "data": identity},
                    os.path.join(out, "checkpoint.pt"))
    except (DiskFull, RunFolderError) as e:
        kept = f"the checkpoint of epoch {epoch} is intact" if epoch else "no checkpoint was written yet"
        raise type(e)(f"{e}; {kept}: free space (or fix the folder), then --resume") from None


def _finish(args, out, model, history, train_images, identity, rank, world, device, amp):
    """After the last epoch: top-1 on training images, a checksum of the weights per process, final.json."""
    train_top1 = None  # overfitting shows as training top-1 far above test top-1: measured once, at the end
    if train_images is not None:
        tx, ty = train_images
        _, mean, std = dataset_info(args)
        k = min(len(tx), TRAIN_EVAL_IMAGES)
        train_top1 = evaluate(model, Loader(tx[:k], ty[:k], mean, std, device, 1000, False, rank=rank, world=world,
                                            channels_last=True), amp, world)
    if rank == 0 or world > 1:
        with torch.no_grad():  # a checksum of the weights per rank: DDP must keep them identical
            sums = [float(sum(p.double().sum() for p in model.parameters()))]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, sums[0])
            sums = gathered
        if rank == 0:
            _final(args, out, model, history, sums, device, train_top1, getattr(model, "resolved", {}), identity)


# ---- The lr of an epoch, the ramp-up of a method's term, bf16 autocast

def lr_factor(args, epoch):
    """The learning-rate schedule as a factor of --lr in the 0-based epoch `epoch`: one cosine from 1 over
    --epochs (--cosine), or x0.1 at each --schedule milestone. The loop's SGD gets --lr times it (_set_lr);
    a method's other optimizer may follow it too (ffsd.py's decoders)."""
    if args.cosine:
        return 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return 0.1 ** sum(epoch >= m for m in args.schedule)


def _set_lr(opt, args, epoch):
    """The lr of `epoch`, --lr x lr_factor, set in every group times its lr_scale."""
    lr = args.lr * lr_factor(args, epoch)  # the same float as 0.5 * lr * (1 + cos): a factor of 0.5 is exact
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch < 2.3: never under --compile's trace


def ramp_up(epoch, length=80):
    """Sigmoid ramp-up of Laine & Aila: exp(-5 (1 - min(e, L)/L)^2) for epoch index e; 1 when L = 0.
    Under --compile it is computed outside the graph and enters it as an input: a value traced into the
    graph would be a constant guarded on, a recompilation every epoch of the ramp, and after 8 of them
    (dynamo's recompile limit) the rest of the run in eager mode."""
    if _is_compiling():
        return torch.compiler.disable(_ramp_up)(epoch, length)
    return _ramp_up(epoch, length)


def _ramp_up(epoch, length):
    if length == 0:
        return 1.0
    t = min(epoch, length) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def use_amp(args, device):
    """bf16 autocast: on CUDA unless --no-amp; on the CPU only with --amp (off by default there, so that a
    CPU run is plain fp32). One autocast path on every device: torch.autocast(device type, bfloat16)."""
    return not args.no_amp and (device.startswith("cuda") or getattr(args, "amp", False))


# ---- What a run says and records: its first line, the epoch lines, log.csv, final.json

def describe_schedule(args, resolved):
    """One line: the learning-rate schedule, the ramp-ups and derived settings in force, and which
    were scaled to --epochs."""
    lr = "cosine" if args.cosine else (f"x0.1 at epochs {' '.join(map(str, args.schedule))}" if args.schedule
                                       else "constant")
    extra = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("rampup", "warmup", "init") if hasattr(args, k)]
    opt = getattr(args, "optimizer", "sgd")  # a method's own --optimizer (OEC-KD): momentum and Nesterov are SGD's
    opt = f"{'no ' if args.no_nesterov else ''}Nesterov" if opt == "sgd" else f"optimizer {opt}"
    extra += [f"{k} {v}" for k, v in resolved.items()]
    scaled = getattr(args, "scaled", [])
    return (f"recipe {getattr(args, 'recipe', 'protocol')}: {args.epochs} epochs, batch {args.batch_size}, "
            f"lr {args.lr:g} {lr}, wd {args.wd:g}, {opt}, "
            f"{getattr(args, 'padding', 'zeros')} padding, {getattr(args, 'norm', 'dataset')} statistics"
            + "".join(f", {e}" for e in extra)
            + (f" (scaled to --epochs: {', '.join(scaled + list(resolved))})" if scaled or resolved else ""))


class Progress:
    """On a terminal: one line rewritten in place during an epoch (steps, images/s, time left), at
    most twice a second. It reads only the wall clock, never a device value: no host sync."""

    def __init__(self, steps, batch_size):
        self.steps, self.batch, self.t0, self.last = steps, batch_size, None, 0.0

    def step(self, epoch, epochs, done):
        now = time.time()
        if done == 1:
            self.t0 = now
            return
        if now - self.last < 0.5:
            return
        self.last = now
        rate = (done - 1) * self.batch / (now - self.t0)
        left = (self.steps - done) * self.batch / rate
        print(f"\r  epoch {epoch + 1}/{epochs}: step {done}/{self.steps}, {rate:.0f} img/s, {left:.0f} s left ",
              end="", flush=True)

    def clear(self):
        if self.last:
            print("\r\033[K", end="", flush=True)
            self.last = 0.0


def _log(out, row, term_names, head_names, deploy, epochs, header=False):
    """One fixed-width line per epoch (the column names first in every process) and the row in log.csv."""
    if header:
        print(f"{'epoch':>9} {'lr':>7} | " + " ".join(f"{t:>8}" for t in term_names) + " | "
              + " ".join(f"{h + ('*' if h == deploy else ''):>9}" for h in head_names) + " | s/ep     img/s")
    print(f"{row['epoch']:>4}/{epochs:<4} {row['lr']:7.4f} | " + " ".join(f"{row[t]:8.4f}" for t in term_names)
          + " | " + " ".join(f"{row[h]:9.2f}" if row[h] is not None else f"{'-':>9}" for h in head_names)
          + f" | {row['seconds']:5.1f} {row['images_per_second']:9.0f}", flush=True)
    path = os.path.join(out, "log.csv")
    try:
        with open(path, "rb") as f:
            old = f.read()
    except FileNotFoundError:
        old = b""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(row))
    if not old:
        w.writeheader()
    w.writerow(row)
    try:  # the whole file again, atomically: a full disk leaves the previous log.csv, never a truncated one
        atomic_write(path, lambda f: f.write(old + text.getvalue().encode()), len(old))
    except (DiskFull, RunFolderError) as e:
        raise type(e)(f"{e}; the checkpoint of epoch {row['epoch']} is intact (log.csv is rewritten from it): "
                      f"free space (or fix the folder), then --resume") from None


def _write_log(out, history):
    """log.csv as the checkpoint's history says (atomically): what a resume continues from."""
    path = os.path.join(out, "log.csv")
    if not history:
        if os.path.exists(path):
            os.remove(path)
        return

    def write(f):
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
        f.write(text.getvalue().encode())
    atomic_write(path, write)


TRAIN_EVAL_IMAGES = 10_000  # final.json's "train_last": top-1 on the first (un-augmented) training images


def _final(args, out, model, history, rank_sums, device, train_top1=None, resolved=None, identity=None):
    heads = [k for k in history[-1] if k in model.head_params()]
    best = {h: max(((r[h], r["epoch"]) for r in history if r[h] is not None), key=lambda t: t[0]) for h in heads}
    final = {**MARKER, "method": args.method, "arch": args.arch, "dataset": args.dataset, "epochs": args.epochs,
             "seed": args.seed, "deploy": model.deploy, "last": {h: history[-1][h] for h in heads},
             "best": {h: list(v) for h, v in best.items()}, "params": model.head_params(),
             "train_last": train_top1, "resolved": resolved or {},
             "seconds": round(sum(r["seconds"] for r in history), 1),
             "images_per_second": round(sum(r["images_per_second"] for r in history) / len(history), 1),
             "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
             "processes": len(rank_sums), "rank_param_sums": rank_sums,
             "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
             "data": identity,
             "machine": machine_info(device), "args": _plain_args(args)}
    atomic_json(final, os.path.join(out, "final.json"))
    if _STOP is not None:
        _STOP.phase = "done"  # finished: a signal from now on changes nothing
    d = model.deploy
    others = ", ".join(f"{h} {a:.2f}" for h, a in final["last"].items() if h != d)
    print(f"done: {d} (deployable) {final['last'][d]:.2f}% top-1 at the last epoch"
          + (f"; {others}" if others else "") + f"; {out}/final.json")


def data_identity(args, data):
    """What identifies a run's data, for its record and for --resume: the data set, the number of
    training and test images, and a checksum of the training labels in their order."""
    import hashlib
    if data is None:
        return None
    train, test = (data[0], data[1]) if args.dataset == "imagenet" else (data[1], data[3])
    labels = [t[1] for t in train] if args.dataset == "imagenet" else train.tolist()
    return {"dataset": args.dataset, "train_images": len(labels), "test_images": len(test),
            "labels_sha256": hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]}


def machine_info(device):
    """Where a run ran, for its record: the GPU's name or the CPU's model, torch/CUDA/cuDNN/Python
    versions, threads, and the git commit of this file's folder ("+dirty" when tracked files differ;
    None when it is not a git checkout, e.g. a method file copied elsewhere)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    commit, here = None, os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=10)
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            commit = head.stdout.strip()[:12] + ("+dirty" if git("status", "--porcelain", "-uno").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.startswith("cuda") else None,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "commit": commit}


def _plain_args(args):
    return {k: v for k, v in vars(args).items() if k != "devices"}


# ---- --gpus 0,1,...: one training process per device, started and watched by this one

def _launch(world, args, Method, out, data, stop):
    """--gpus with several devices: one training process per device (spawned; INT/TERM/HUP reach them
    through this one, see Interrupt), and one line however they end. When one dies (raised, or killed), the
    others are stopped at once (SIGUSR2, then SIGKILL after a grace period): its error is raised here."""
    import multiprocessing as mp
    import multiprocessing.connection
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    shared = ctx.RawArray("i", 2)  # the launcher's first and second signal, for the processes' messages
    report_dir = tempfile.mkdtemp(prefix="okd-processes-")
    usr = {signal.SIGUSR1, signal.SIGUSR2}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, usr | set(STOP_SIGNALS))  # pending until we listen
    saved = {}
    procs = []
    try:
        for s in STOP_SIGNALS:  # the processes start with these ignored (their USR1/USR2 blocked until ready)
            try:
                saved[s] = signal.signal(s, signal.SIG_IGN)
            except ValueError:  # not the main thread: signals reach the processes directly
                pass
        for r in range(world):
            procs.append(ctx.Process(target=_child, args=(r, world, args, Method, out, data, shared, report_dir),
                                     name=f"training process {r}"))
            procs[-1].start()
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        stop.phase, stop.procs, stop.shared = "launcher", procs, shared
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        failed = _join(procs)
        reports = {r: _read_json(os.path.join(report_dir, f"{r}.json")) or {} for r in range(world)}
    finally:
        stop.procs = []
        shutil.rmtree(report_dir, ignore_errors=True)
    _LOADED.clear()
    if _finished(out, args):  # rank 0 wrote final.json and said so
        return
    first = reports.get(0, {})
    if failed is not None and reports.get(failed, {}).get("kind") not in ("stopped", "stop"):
        p, rep = procs[failed], reports.get(failed, {})
        if rep.get("kind") == "error":
            what, code = f"failed: {rep.get('message')}", rep.get("code", EXIT_PROCESS)
        elif p.exitcode is not None and p.exitcode < 0:
            what, code = f"was killed by {signal.Signals(-p.exitcode).name}", EXIT_PROCESS
        else:
            what, code = f"ended with exit code {p.exitcode}", EXIT_PROCESS
        kept = _kept_epoch(out, max((r.get("done", 0) for r in reports.values()), default=0))
        raise ProcessDied(f"training process {failed} of {world} (pid {p.pid}) {what}; every process was stopped; "
                          + (f"the checkpoint of epoch {kept} is kept in {out}: --resume continues from it" if kept
                             else "there is no checkpoint"), code if code in (EXIT_ERROR, EXIT_NONFINITE, EXIT_WRITE)
                          else EXIT_PROCESS)
    signum = shared[0] or first.get("signum") or 0
    if first.get("kind") == "stopped":
        raise Stopped(first["signum"], first["epoch"], first["kept"], first.get("before_final", False))
    if first.get("kind") == "stop" or signum:
        stop.done = first.get("done", 0)
        raise Stop(first.get("signum") or shared[1] or signum or signal.SIGTERM,
                   first.get("where", "again" if stop.count > 1 else "startup"))


def _join(procs, grace=10.0):
    """Wait for every process; when one ends with an error, stop the others at once (SIGUSR2; SIGKILL after
    `grace` seconds for one stuck in a collective). Returns the rank that failed first, or None."""
    import multiprocessing.connection
    alive = {p.sentinel: r for r, p in enumerate(procs)}
    failed, deadline = None, None
    while alive:
        ready = multiprocessing.connection.wait(list(alive), None if deadline is None else
                                                max(0.0, deadline - time.monotonic()))
        if not ready:  # the grace period is over
            for r in alive.values():
                procs[r].kill()
            deadline = time.monotonic() + 1
            continue
        batch = []
        for s in ready:
            batch.append(alive.pop(s))
            procs[batch[-1]].join()
        bad = sorted((r for r in batch if procs[r].exitcode != 0),
                     key=lambda r: (procs[r].exitcode >= 0, r))  # one killed by a signal is the likelier cause
        if bad and failed is None:
            failed, deadline = bad[0], time.monotonic() + grace
            for r in alive.values():
                try:
                    os.kill(procs[r].pid, signal.SIGUSR2)
                except OSError:
                    pass
    return failed


def _set_parent_death_signal(sig):
    """Linux: `sig` when the launcher dies (e.g. killed by the OOM killer), so that no process trains on alone."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(rank, world, args, Method, out, data, shared, reports):
    """A training process of a --gpus run (started by _launch): its outcome goes to reports/<rank>.json
    for the launcher's one line; a bug's traceback is printed here."""
    global _STOP
    _STOP = stop = Interrupt(phase="startup", child=shared)
    stop.verbose = rank == 0
    _set_parent_death_signal(signal.SIGUSR1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGUSR2})
    code, report = 0, None
    try:
        _worker(rank, world, args, Method, out, data)
    except Stopped as e:
        report = {"kind": "stopped", "signum": e.signum, "epoch": e.epoch, "kept": e.kept,
                  "before_final": e.before_final}
    except Stop as e:
        code, report = 128 + e.signum, {"kind": "stop", "signum": e.signum, "where": e.where}
    except Exception as e:
        code = _exit_code(e, stop.phase) or EXIT_PROCESS
        if code == EXIT_PROCESS:
            import traceback
            traceback.print_exc()
        lines = str(e).strip().splitlines()
        report = {"kind": "error", "code": code,
                  "message": (lines[0] if lines else "") if code != EXIT_PROCESS else
                  f"{type(e).__name__}: {lines[-1] if lines else ''}"}
    if report is not None:
        report["done"] = stop.done
        try:
            with open(os.path.join(reports, f"{rank}.json"), "w") as f:
                json.dump(report, f)
        except OSError:
            pass
    sys.stdout.flush()
    sys.exit(code)


# =================================================================================================
# 4. OPTIONS
# the command line, checked and completed (protocol, --recipe paper, --resume) before a run
# =================================================================================================

def parser(description):
    """The protocol's command-line options; a method adds its own before parse()."""
    p = argparse.ArgumentParser(description=description.split("\n\n")[0], allow_abbrev=False,  # exact names:
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)      # see _given()
    # a negative value in exponent form (--wd -1e-5) is a value, not an unknown option: argparse before
    # Python 3.13 knows only -1 and -0.5, and would answer "expected one argument" instead of the check's line
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    # every refusal is one line: the error without argparse's usage block in front of it
    p.error = lambda msg: p.exit(2, f"{p.prog}: error: {msg} (--help lists the options)\n")
    add_arg(p, "--arch", default="resnet32", help="backbone; a comma list gives one per peer where the method allows")
    add_arg(p, "--dataset", default="cifar100", choices=[*DATASETS, "imagenet"],
            help="imagenet: any ImageFolder tree, --data-dir DIR with DIR/train/<class>/ and DIR/val/<class>/")
    add_arg(p, "--data-dir", default="./data", help="where the dataset is read (CIFAR: downloaded there when absent)")
    add_arg(p, "--image-size", type=int, default=None, check="positive", help="imagenet: training crop, 224 when not given; "
            "evaluation resizes to size*256/224 and center-crops")
    add_arg(p, "--workers", type=int, default=8, check="nonneg", help="imagenet: DataLoader processes per training process")
    # None: the dataset's protocol (PROTOCOL), filled in by parse()
    add_arg(p, "--epochs", type=int, default=None, check="positive", help="when not given: 300 on CIFAR, 90 on imagenet")
    add_arg(p, "--lr", type=float, default=None, check="positive", help="when not given: 0.1 on CIFAR, 0.1 x batch/256 on imagenet")
    add_arg(p, "--batch-size", type=int, default=None, check="positive", help="global batch, whatever the number of GPUs; "
            "when not given: 128 on CIFAR, 256 on imagenet")
    add_arg(p, "--wd", type=float, default=None, check="nonneg", help="when not given: 5e-4 on CIFAR, 1e-4 on imagenet")
    add_arg(p, "--momentum", type=float, default=0.9, check="unit", help="SGD momentum")
    add_arg(p, "--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    add_arg(p, "--schedule", type=int, nargs="*", default=None, help="epochs where lr drops x0.1; "
            "when not given: 150 225 on CIFAR, 30 60 80 on imagenet")
    add_arg(p, "--cosine", action="store_true", help="cosine decay (per epoch) instead of --schedule")
    add_arg(p, "--padding", default="zeros", choices=["zeros", "reflect"],
            help="CIFAR random crop: from the image padded by 4 with zeros or mirrored at its edges")
    add_arg(p, "--norm", default="dataset", choices=["dataset", *NORMS],
            help="normalisation statistics: the dataset's own, CIFAR-10's on every dataset (SOKD), or the "
                 "CIFAR-10 mean with the widespread std (0.2023, 0.1994, 0.2010) on every dataset (ONE), or "
                 "none: pixels in [0, 1] (OEC-KD)")
    add_arg(p, "--recipe", default="protocol", choices=["protocol", "paper"],
            help="protocol: the shared protocol (README); paper: the method's paper / official script, for "
                 "every option not given (each script's PAPER)")
    add_arg(p, "--seed", type=int, default=0, check="seed", help="initialisation, data order and augmentation")
    add_arg(p, "--eval-every", type=int, default=1, metavar="N", check="positive", help="test every N epochs and at the last "
            "(the log shows '-' in between); 1: every epoch")
    add_arg(p, "--gpus", default="0", help="'0' one GPU, '0,1,2,3' DDP; 'cpu' the CPU (no CUDA: CPU with a warning)")
    add_arg(p, "--out", default=None, help="run folder; None: runs/<method>-<arch>-<dataset>-s<seed>")
    add_arg(p, "--resume", action="store_true", help="continue the run in the run folder with its stored settings "
            "(start it when there is none; a finished run is left as it is)")
    add_arg(p, "--force", action="store_true", help="start over in an existing run folder (its run files are removed)")
    add_arg(p, "--amp", action="store_true", help="bf16 autocast on the CPU too (on CUDA it is on by default)")
    add_arg(p, "--no-amp", action="store_true", help="no bf16 autocast on CUDA (fp32 throughout)")
    add_arg(p, "--compile", action="store_true", help="torch.compile the model")
    add_arg(p, "--bench", type=int, default=0, metavar="N", check="nonneg", help="time N steps on synthetic data, write bench.json")
    add_arg(p, "--halt-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: stop as if killed
    return p


def add_arg(p, name, check=None, **kw):
    """Add a --kebab-case option with its --snake_case alias. check: a key of CHECKS, tested by parse()
    (every float option must also be finite: nan and inf are refused)."""
    names = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    action = p.add_argument(*names, **kw)
    action.check = check
    return action


def add_epochs_arg(p, name, protocol_epochs, help):
    """An option counted in epochs (a ramp-up, a warm-up) whose value under the 300-epoch CIFAR protocol
    is `protocol_epochs`. Left out, parse() scales it with --epochs: max(1, round(protocol_epochs *
    epochs / protocol's epochs)); given explicitly, the value given is used as it is."""
    action = add_arg(p, name, type=int, default=None, check="nonneg", help=f"{help}; when not given: "
                     f"{protocol_epochs} x epochs/300 on CIFAR (x epochs/90 on imagenet), at least 1")
    action.protocol_epochs = protocol_epochs
    return action


def parse(p, method, argv=None, paper=None):
    """Parse and validate: every error here happens before anything is written. paper: what --recipe
    paper sets (the method file's PAPER dict)."""
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.method = method
    if args.resume and args.force:
        p.error("--resume continues a run and --force starts it over: give one of them")
    if args.amp and args.no_amp:
        p.error("--amp turns bf16 autocast on (on the CPU too) and --no-amp turns it off: give one of them")
    if args.out is not None and not args.out.strip():
        p.error(f"argument --out: {args.out!r} is no folder; give one, or leave --out out for "
                f"runs/<method>-<arch>-<dataset>-s<seed>")
    given = typed = _given(p, argv)
    typed_schedule = args.schedule if "schedule" in typed else None  # before a resume or a recipe fills it in
    if args.resume and not args.bench and _merge_stored(p, args, given):
        given = set(vars(args))  # the stored run's values stand; its recipe was applied when it started
    apply_recipe(args, paper or {}, given)
    if args.dataset == "imagenet" and (args.padding != "zeros" or args.norm != "dataset"):
        p.error("--padding and --norm apply to CIFAR (imagenet: RandomResizedCrop, ImageNet statistics)")
    protocol_defaults(p, args)
    _validate(p, args)
    for a in args.arch.split(","):
        if a not in ARCHS:
            p.error(f"argument --arch: invalid choice: {a!r} (choose from {', '.join(ARCHS)})")
    if args.cosine and typed_schedule:  # the cosine decay has no milestones: one of the two would be ignored
        why = ("--cosine" if "cosine" in typed else
               "the resumed run's --cosine" if args.resume else f"--recipe paper (the recipe of {method} decays by cosine)")
        p.error(f"--schedule {' '.join(map(str, typed_schedule))} and {why} contradict: the cosine decay has no "
                f"milestones; give one of them")
    s = args.schedule
    if not args.cosine and (any(b <= a for a, b in zip(s, s[1:])) or any(m <= 0 or m >= args.epochs for m in s)):
        p.error(f"--schedule {' '.join(map(str, s))}: milestones must increase and lie in (0, --epochs={args.epochs})")
    try:
        args.devices = _devices(args.gpus)
    except ValueError as e:
        p.error(str(e))
    return args


def _given(p, argv):
    """The dests of the options typed on the command line (exact names: the parser has allow_abbrev=False)."""
    given = set()
    for a in p._actions:
        if any(t == o or t.startswith(o + "=") for t in argv for o in a.option_strings):
            given.add(a.dest)
    return given


# add_arg(check=...): what parse() demands of a value, with the words of its error
CHECKS = {"positive": (lambda v: v > 0, "must be positive"),
          "nonneg": (lambda v: v >= 0, "must be non-negative"),
          "unit": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
          "two+": (lambda v: v >= 2, "must be at least 2"),
          # numpy's RandomState takes seeds below 2**32 (the holdout's permutation); torch's generators,
          # seeded with seed * 1_000_003 + epoch and the like, stay below 2**64 with them
          "seed": (lambda v: 0 <= v < 2 ** 32, "must lie in [0, 4294967295] (2**32 - 1)")}


def _validate(p, args):
    """Every option's value against its check (and floats against nan/inf): one line, nothing written."""
    for a in p._actions:
        v = getattr(args, a.dest, None)
        if v is None or isinstance(v, bool):
            continue
        name = a.option_strings[0] if a.option_strings else a.dest
        for x in (v if isinstance(v, list) else [v]):
            if isinstance(x, float) and not math.isfinite(x):
                p.error(f"argument {name}: {x} is not a finite number")
            check = getattr(a, "check", None)
            if check and not CHECKS[check][0](x):
                p.error(f"argument {name}: {x} {CHECKS[check][1]}")


def _devices(gpus):
    """'0,1' -> ['cuda:0', 'cuda:1']; with no CUDA -> as many 'cpu' entries, with a warning."""
    if gpus == "cpu":
        return ["cpu"]
    ids = [g.strip() for g in gpus.split(",")]
    if not all(g.isdigit() for g in ids):  # '' and '0,' included: an empty entry is no GPU
        raise ValueError(f"--gpus {gpus!r}: expected GPU indices like 0 or 0,1,2,3, or 'cpu'")
    twice = sorted({g for g in ids if ids.count(g) > 1}, key=int)
    if twice:
        raise ValueError(f"--gpus {gpus}: GPU {','.join(twice)} given twice; each process needs a GPU of its own "
                         f"(give each index once)")
    if not torch.cuda.is_available():
        print(f"warning: CUDA is not available; training on the CPU ({len(ids)} process(es)) instead of --gpus {gpus}",
              file=sys.stderr)
        return ["cpu"] * len(ids)
    n = torch.cuda.device_count()
    bad = [g for g in ids if int(g) >= n]
    if bad:
        raise ValueError(f"--gpus {gpus}: no GPU {','.join(bad)} (this machine has {n}: 0..{n - 1})")
    return [f"cuda:{g}" for g in ids]


def run_dir(args):
    arch = args.arch.replace(",", "+")
    return args.out or os.path.join("runs", f"{args.method}-{arch}-{args.dataset}-s{args.seed}")


# ---- Protocol defaults: what an option left out means

# the training protocol of each kind of dataset: what an option left out means (lr None: 0.1 x batch/256)
# --schedule left out: the protocol's milestones at the same fractions of --epochs (150/300, 225/300).
PROTOCOL = {"cifar": {"epochs": 300, "lr": 0.1, "batch_size": 128, "wd": 5e-4, "schedule": [150, 225],
                      "train_images": 50_000},
            "imagenet": {"epochs": 90, "lr": None, "batch_size": 256, "wd": 1e-4, "schedule": [30, 60, 80],
                         "image_size": 224, "train_images": 1_281_167}}


def protocol_defaults(p, args):
    """Fill in the options that were not given with the dataset's PROTOCOL (before any validation).
    The filled-in values are what checkpoints store, so --resume compares like with like."""
    imagenet = args.dataset == "imagenet"
    if not imagenet and args.image_size is not None:
        p.error("--image-size applies to --dataset imagenet only (CIFAR images are 32x32)")
    P = PROTOCOL["imagenet" if imagenet else "cifar"]
    args.scaled = getattr(args, "scaled", None) or []  # options derived from --epochs (named in the first log line)
    for k in RUN_SETTINGS:
        if k in P and getattr(args, k) is None:
            setattr(args, k, list(P[k]) if isinstance(P[k], list) else P[k])
            if k == "schedule" and args.epochs != P["epochs"]:  # same fractions of a shorter/longer run
                args.schedule = sorted({m for m in (_scale(m, args.epochs, P["epochs"]) for m in P[k])
                                        if 0 < m < args.epochs})
                args.scaled.append("schedule")
    if args.epochs > 0:
        for a in p._actions:  # options counted in epochs (ramp-ups): the same fraction of training
            if hasattr(a, "protocol_epochs") and getattr(args, a.dest) is None:
                setattr(args, a.dest, max(1, _scale(a.protocol_epochs, args.epochs, P["epochs"])))
                if getattr(args, a.dest) != a.protocol_epochs:
                    args.scaled.append(a.dest)
    if args.lr is None:  # Goyal et al.'s linear scaling, the torchvision/ImageNet reference
        args.lr = 0.1 * args.batch_size / 256


def _scale(value, epochs, protocol_epochs):
    """round(value * epochs / protocol_epochs), halves rounded up, in integers."""
    return (2 * value * epochs + protocol_epochs) // (2 * protocol_epochs)


def run_fraction(args, n_train):
    """This run's optimizer steps as a fraction of the dataset protocol's run (300 epochs of 50,000 CIFAR
    images at batch 128, or 90 epochs of ImageNet's 1,281,167 at 256). Lengths counted in steps (PCL's
    EMA horizon) scale by it, so they stay the same fraction of training when a run is shorter."""
    P = PROTOCOL["imagenet" if args.dataset == "imagenet" else "cifar"]
    ref = P["epochs"] * math.ceil(P["train_images"] / P["batch_size"])
    return args.epochs * math.ceil(n_train / args.batch_size) / ref


# ---- --recipe paper: the method's own recipe (its PAPER dict)

def apply_recipe(args, paper, given):
    """--recipe paper: the method's paper recipe (`paper`, a dict of option -> value) for every option
    not given. Its milestones belong to its own epochs: with another --epochs they scale with it."""
    if args.recipe != "paper":
        return
    for k, v in paper.items():
        if k not in given:
            setattr(args, k, list(v) if isinstance(v, list) else v)
    own = paper.get("epochs", PROTOCOL["cifar"]["epochs"])  # the epochs the recipe's milestones belong to
    if "schedule" in paper and "schedule" not in given and "epochs" in given and args.epochs != own:
        args.schedule = sorted({m for m in (_scale(m, args.epochs, own) for m in paper["schedule"])
                                if 0 < m < args.epochs})
        args.scaled = ["schedule"]


# ---- Stored settings: what --resume takes from the run it continues

def _merge_stored(p, args, given):
    """--resume: options not typed take the run's stored values; typed ones must equal them, except a
    larger --epochs, which extends the run (its stored milestones and ramp-ups stay as they were)."""
    _check_run_dir_kind(run_dir(args))  # a folder this repository did not make is not read as a run either
    try:
        stored, source = stored_settings(run_dir(args))
    except (RuntimeError, FileNotFoundError) as e:
        fail(f"--resume: {e}")
    if stored is None:
        return False
    diff = []
    for k, v in stored.items():
        if k in INHERITED and k not in given:  # how it ran: the same unless told otherwise
            setattr(args, k, v)
        if k in RUN_CONTROL or k in RECORDS:  # how it ran, and records: not compared
            continue
        if k not in given:
            setattr(args, k, v)
        elif getattr(args, k, None) != v and not (k == "epochs" and args.epochs > v):
            diff.append(f"--{k.replace('_', '-')} {v!r} ({source}) vs {getattr(args, k)!r} (now)")
    if stored.get("method", args.method) != args.method:
        diff.insert(0, f"method {stored['method']!r} ({source}) vs {args.method!r} (now)")
    if diff:
        fail(f"--resume: the run in {run_dir(args)} was made with other settings: " + "; ".join(diff))
    if args.epochs > stored.get("epochs", args.epochs):
        args.extended_from = stored["epochs"]
    return True


def stored_settings(out):
    """(settings, source) of the run in folder `out`: the checkpoint's arguments when there is one (what
    the weights were trained with), else run.json's (a run stopped in its first epoch); (None, None)."""
    ckpt, started = os.path.join(out, "checkpoint.pt"), os.path.join(out, "run.json")
    if os.path.isfile(ckpt):
        return _load_once(ckpt)["args"], "checkpoint"
    if os.path.isfile(started):
        try:
            with open(started) as f:
                return json.load(f), "run.json"
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cannot read {started} ({e})") from None
    return None, None


def stored_data(out):
    """(identity, source): what identified the data of the run in `out` (data_identity): the checkpoint's,
    else run.json's (checkpoints of older versions do not hold it); (None, None) when none is recorded."""
    ckpt, started = os.path.join(out, "checkpoint.pt"), os.path.join(out, "run.json")
    if os.path.isfile(ckpt):
        ck = _load_once(ckpt)
        if isinstance(ck, dict) and isinstance(ck.get("data"), dict):
            return ck["data"], "checkpoint"
    rec = _read_json(started)
    if isinstance(rec, dict) and isinstance(rec.get("data"), dict):
        return rec["data"], "run.json"
    return None, None


_LOADED = {}  # path -> ((mtime, size), checkpoint): the start reads a checkpoint's settings and data once


def _load_once(path):
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size)
    if _LOADED.get(path, (None,))[0] != key:
        _LOADED.clear()
        _LOADED[path] = (key, load_checkpoint(path))
    return _LOADED[path][1]


# ---- The sets of names that look alike, together: each comment says how the set differs from the others

# not options: what run.json, final.json, bench.json and checkpoints carry, the mark of a run folder this file
# made. --force, --resume and --bench act only on a folder with it (or on a new or empty folder, or one an older
# version of this file made: see classify_run_dir); run_format counts changes of the folder's layout
MARKER = {"made_by": "online-kd common.py", "run_format": 1}

# how a run runs, not what it trains: the options that may change between a run and its --resume (every other
# option must match); with the marker's keys, records rather than options, which summarize.py never counts as settings
RUN_CONTROL = {"resume", "force", "gpus", "data_dir", "out", "compile", "amp", "no_amp", "bench", "halt_after",
               "workers", "eval_every", *MARKER}

# the part of RUN_CONTROL a bare `--resume` takes from the stored run when they are not given (the rest: as typed)
INHERITED = {"data_dir", "gpus", "workers", "compile", "amp", "no_amp", "eval_every"}

# what the run trains with, and what PROTOCOL fills in when left out (so --resume compares like with like)
RUN_SETTINGS = ("epochs", "lr", "batch_size", "wd", "schedule", "image_size")

# not options: what a stored run records beside its options, which --resume neither takes nor compares as such
# (the method is checked on its own)
RECORDS = ("method", "resolved", "data", "machine")

# the options every version of this file stored, from the first on: how run.json / final.json args / checkpoint
# args of a folder made before MARKER are recognised (their bench.json: _LEGACY_BENCH, part 5)
_LEGACY_ARGS = {"method", "arch", "dataset", "epochs", "lr", "batch_size", "seed", "gpus", "resume", "force",
                "halt_after"}


# ---- Teacher checkpoints (kd.py, sokd.py, reviewkd.py): checked against the options before run()

def load_teacher(path, arch, dataset, num_classes, args=None, default_arch="resnet110"):
    """A baseline.py checkpoint as (arch, Net with its weights, one-line description), for kd.py, sokd.py
    and reviewkd.py. Raises ValueError, naming the baseline.py command that trains a fitting teacher, when
    the file is missing or unreadable, or holds another architecture (arch=None: any), dataset or class
    count. default_arch: the teacher named in that command when arch is None. With the run's args, also
    another normalisation is refused and another padding warned about (check_teacher; its warnings printed)."""
    try:
        ck = load_checkpoint(path, "teacher checkpoint")
    except (FileNotFoundError, RuntimeError) as e:
        a = arch or default_arch
        raise ValueError(f"{e}; {_train_teacher_hint(a, dataset)} (it writes "
                         f"runs/baseline-{a}-{dataset}-s0/checkpoint.pt) or pass --teacher PATH") from None
    meta = ck.get("args") if isinstance(ck, dict) else None
    model = ck.get("model") if isinstance(ck, dict) else None
    if not isinstance(meta, dict) or not isinstance(model, dict) or meta.get("arch") not in ARCHS:
        raise ValueError(f"{path} is not a baseline.py checkpoint (no 'args' with a known 'arch' and 'model'); "
                         + _train_teacher_hint(arch or default_arch, dataset))
    t_arch, t_data = meta["arch"], meta.get("dataset")
    if (arch is not None and arch != t_arch) or t_data != dataset:
        raise ValueError(f"teacher checkpoint {path} holds a {t_arch} trained on {t_data}, not a "
                         f"{arch or t_arch} on {dataset} (--teacher-arch / --dataset); "
                         + _train_teacher_hint(arch or t_arch, dataset))
    if args is not None:
        for w in check_teacher(path, meta, args, ck.get("data")):
            print(f"warning: {w}", file=sys.stderr)
    net = build_model(t_arch, num_classes)
    try:
        net.load_state_dict({k[len("net."):]: v for k, v in model.items() if k.startswith("net.")})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"the weights in {path} do not fit a {t_arch} with {num_classes} classes ({first}); "
                         + _train_teacher_hint(t_arch, dataset)) from None
    hist = ck.get("history")
    acc = hist[-1].get("net") if isinstance(hist, list) and hist and isinstance(hist[-1], dict) else None
    desc = (f"a {t_arch} trained {ck.get('epoch', '?')}/{meta.get('epochs', '?')} epochs by {meta.get('method', '?')}"
            + (f", last test top-1 {acc:.2f}%" if isinstance(acc, (int, float)) else ""))
    return t_arch, net, desc


def _train_teacher_hint(arch, dataset):
    return f"train one with `python baseline.py --arch {arch} --dataset {dataset}`"


def check_teacher(path, teacher_args, args, teacher_data=None, data=None):
    """Whether a teacher checkpoint fits this run (sokd.py; kd.py, reviewkd.py): teacher_args is the
    checkpoint's "args" (baseline.py's options), teacher_data its "data" (data_identity; None for
    checkpoints of older versions), data this run's identity when known. Raises ValueError, in one line
    naming the setting, for what makes the teacher's predictions wrong: another dataset, other
    normalisation statistics (--norm). Returns warnings (one line each) for what only shifts its inputs:
    another --padding, another --image-size (imagenet), other training data of the same dataset."""
    t = teacher_args if isinstance(teacher_args, dict) else {}
    t_data, t_norm, t_pad = t.get("dataset"), t.get("norm", "dataset"), t.get("padding", "zeros")
    hint = f"train a teacher with `python baseline.py --arch {t.get('arch', '?')} --dataset {args.dataset}"
    if t_data != args.dataset:
        raise ValueError(f"teacher checkpoint {path} was trained on {t_data}, this run is on {args.dataset}: "
                         f"{hint}`")
    norm = getattr(args, "norm", "dataset")
    if args.dataset != "imagenet" and t_norm in (*NORMS, "dataset") and \
            _norm_stats(t_data, t_norm) != _norm_stats(args.dataset, norm):
        fmt = lambda s: "mean " + "/".join(f"{v:g}" for v in s[0]) + ", std " + "/".join(f"{v:g}" for v in s[1])
        raise ValueError(f"teacher checkpoint {path} was trained with --norm {t_norm} "
                         f"({fmt(_norm_stats(t_data, t_norm))}), this run normalises with --norm {norm} "
                         f"({fmt(_norm_stats(args.dataset, norm))}): the teacher would see differently scaled "
                         f"images; pass --norm {t_norm}, or {hint} --norm {norm}`")
    warn = []
    if args.dataset != "imagenet" and t_pad != getattr(args, "padding", "zeros"):
        warn.append(f"teacher {path} was trained with --padding {t_pad}, this run crops with --padding "
                    f"{args.padding}: the teacher sees training crops unlike its own (test images are the same)")
    if args.dataset == "imagenet" and t.get("image_size") not in (None, getattr(args, "image_size", None)):
        warn.append(f"teacher {path} was trained with --image-size {t['image_size']}, this run uses "
                    f"{args.image_size}")
    if isinstance(teacher_data, dict) and isinstance(data, dict):
        diff = [f"{k} {teacher_data[k]} vs {data.get(k)} now" for k in ("train_images", "labels_sha256")
                if k in teacher_data and teacher_data[k] != data.get(k)]
        if diff:
            warn.append(f"teacher {path} was trained on other {args.dataset} training data ({'; '.join(diff)})")
    return warn


def _norm_stats(dataset, norm):
    if dataset == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return NORMS[norm] if norm in NORMS else DATASETS[dataset][5:7]


# =================================================================================================
# 5. RUN FOLDER
# what a run may write, and where: the lock, --force, atomic writes, how a signal (Ctrl-C) stops a run.
# =================================================================================================

# files a run writes in its folder: --force removes these (and retired records) and nothing else
RUN_FILES = ("run.json", "log.csv", "checkpoint.pt", "final.json", "bench.json", "improved_teacher.pt")
_TRAINING_FILES = ("run.json", "log.csv", "checkpoint.pt", "final.json")
_TEMP_FILE = re.compile(r"^\.tmp-(?:(?:" + "|".join(map(re.escape, RUN_FILES)) + r")-)?[a-z0-9_]{8}$")  # atomic_write's
_RETIRED = re.compile(r"^final-\d+-epochs\.json$")  # the record of a finished run that --epochs then extended
# what the bench.json of every earlier version of this file holds (their run.json: _LEGACY_ARGS, part 4)
_LEGACY_BENCH = {"method", "arch", "batch_size", "steps", "images_per_second", "seconds_per_step"}
_LOCK = None  # the open lock file of this process's run folder, held until the process ends


def _check_run_dir_kind(out):
    """Refuse, in one line and before anything is written, a --out that is a file or a folder this
    repository did not make. Returns classify_run_dir's kind."""
    kind, why = classify_run_dir(out)
    if kind == "file":
        fail(f"--out {out} is a file, not a folder: give a folder for the run")
    if kind == "unreadable":
        fail(f"cannot read the run folder {out} ({why}): choose another --out")
    if kind == "foreign":
        fail(f"{out} is not a run folder of this repository ({why}); nothing in it was changed: "
             f"choose another --out")
    return kind


def classify_run_dir(out):
    """What `out` is to the commands that write into it, as (kind, why):
      absent   nothing there yet
      empty    a folder holding nothing but a lock and atomic_write's temp files
      ours     run.json, final.json or bench.json carries MARKER: a run (or bench) folder of this repository
      legacy   made by an earlier version of this file (no marker): its run.json or final.json holds this
               parser's options, or its bench.json this file's fields; or, as the oldest versions left it,
               a checkpoint.pt alone whose weights-only load holds those options (it is then treated as a
               run folder: --resume continues it and writes the marker, --force starts it over)
      foreign  anything else (why says what was found): nothing is written or removed there
      file     not a folder;  unreadable: a folder that cannot be listed (why: the OS's words)"""
    if not os.path.lexists(out):
        return "absent", ""
    if not os.path.isdir(out):
        return "file", ""
    try:
        names = [n for n in os.listdir(out) if n != ".lock" and not _TEMP_FILE.match(n)]
    except OSError as e:
        return "unreadable", e.strerror or str(e)
    if not names:
        return "empty", ""
    rec = {n: _read_json(os.path.join(out, n)) for n in ("run.json", "final.json", "bench.json") if n in names}
    if any(isinstance(r, dict) and r.get("made_by") == MARKER["made_by"] for r in rec.values()):
        return "ours", ""
    if _has(rec.get("run.json"), _LEGACY_ARGS) or _has((rec.get("final.json") or {}).get("args"), _LEGACY_ARGS) \
            or _has(rec.get("bench.json"), _LEGACY_BENCH):
        return "legacy", ""
    if "checkpoint.pt" in names and not rec:
        try:
            ck = _load_once(os.path.join(out, "checkpoint.pt"))
        except (RuntimeError, OSError) as e:
            return "foreign", str(e)
        if isinstance(ck, dict) and "model" in ck and _has(ck.get("args"), _LEGACY_ARGS):
            return "legacy", ""
    shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
    return "foreign", f"it holds {shown} and no run.json, final.json or bench.json written by its common.py"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _has(d, keys):
    return isinstance(d, dict) and keys <= d.keys()


def _finished(out, args):
    """True when `out` holds a finished run of --epochs (final.json), which --resume leaves as it is."""
    rec = _read_json(os.path.join(out, "final.json"))
    return isinstance(rec, dict) and rec.get("epochs") == args.epochs


def _prepare_run_dir(args, out, kind):
    """Create and lock the run folder; then, under the lock: remove what a killed writer left (temp files);
    with --force, the previous run's files; with --resume, retire a final.json of fewer epochs (an
    extension: summarize then shows the run as unfinished). Returns what _undo_start needs."""
    created = kind == "absent"
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _folder_error(e, out, "create the run folder") from None
    made = {"created": created, "bench": bool(args.bench)}
    try:
        try:
            _lock_run_dir(out)
            _remove_temp_files(out)
            if not args.bench:
                _clean_run_dir(args, out, kind)
        except OSError as e:
            raise _folder_error(e, out, "prepare the run folder") from None
    except BaseException:  # refused (another process holds it), an OS error, a signal: a new folder goes again
        if created and not [n for n in os.listdir(out) if n != ".lock"]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return made


def _lock_run_dir(out):
    """An exclusive lock on out/.lock for this process's whole life: a second process on the same run
    folder is refused. The OS releases it when the process ends, however it ends (no stale lock)."""
    global _LOCK
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer per folder is then up to the user
        return
    try:
        fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _folder_error(e, out, "lock the run folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        fail(f"run folder {out} is in use by another process (pid {holder}); wait for it to end or stop it")
    try:  # the pid is for the line above only: a full disk here changes nothing
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError:
        pass
    _LOCK = fd


def _unlock():
    """Release the run folder (the OS does it anyway when the process ends; run() in a longer-lived
    process, e.g. a test or a notebook, releases it when the run is over)."""
    global _LOCK
    if _LOCK is not None:
        os.close(_LOCK)
        _LOCK = None


def _remove_temp_files(out):
    """atomic_write's temp files left by a writer that was killed (a checkpoint's: as large as one)."""
    gone = []
    for n in os.listdir(out):
        if _TEMP_FILE.match(n):
            try:
                os.remove(os.path.join(out, n))
                gone.append(n)
            except FileNotFoundError:
                pass
    return gone


def _clean_run_dir(args, out, kind):
    """Under the lock: --force removes the previous run's files; --resume retires a final.json of fewer
    epochs (renamed final-<epochs>-epochs.json)."""
    final, ckpt = os.path.join(out, "final.json"), os.path.join(out, "checkpoint.pt")
    if args.force and kind in ("ours", "legacy"):
        removed = []
        for name in sorted(os.listdir(out)):
            if name in RUN_FILES or _RETIRED.match(name):
                os.remove(os.path.join(out, name))
                removed.append(name)
        if removed:
            print(f"--force: starting over in {out}; removed {', '.join(removed)}")
    elif args.resume and os.path.isfile(final):
        rec = _read_json(final)
        old = rec.get("epochs") if isinstance(rec, dict) and isinstance(rec.get("epochs"), int) else None
        name = f"final-{old if old is not None else getattr(args, 'extended_from', 0)}-epochs.json"
        os.replace(final, os.path.join(out, name))  # a rename: no space needed, and the record is kept
        print(f"--resume: {out} is no longer finished: its final.json (a {old}-epoch run) is now {name}", flush=True)
    if args.resume and not os.path.isfile(ckpt):
        print(f"--resume: no checkpoint in {out} yet; starting the run from epoch 1")


def _undo_start(out, made):
    """After a failure or a stop before this start's first checkpoint: undo what the start wrote (never
    another file). log.csv goes; run.json goes too unless the folder holds other files (a user's, a bench):
    it stays their marker; a folder this start created goes when nothing else is in it. Returns a note."""
    if not made or not os.path.isdir(out) or os.path.isfile(os.path.join(out, "checkpoint.pt")):
        return ""
    try:
        return _undo(out, made)
    except OSError as e:
        return f" ({out} could not be cleaned: {e.strerror or e})"


def _undo(out, made):
    _remove_temp_files(out)
    if not made["bench"]:
        for name in ("log.csv", "final.json"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    others = [n for n in os.listdir(out) if n not in ("run.json", ".lock")]
    if made["bench"] or others:
        if made["bench"] and made["created"] and not others:
            shutil.rmtree(out, ignore_errors=True)
            return f" (nothing was kept: {out} removed)"
        return "" if made["bench"] else f" (no checkpoint was written: {out}/log.csv removed, run.json kept)"
    if os.path.exists(os.path.join(out, "run.json")):
        os.remove(os.path.join(out, "run.json"))
    if made["created"]:
        shutil.rmtree(out, ignore_errors=True)  # holds nothing but the lock now
        return f" (nothing was kept: {out} removed)"
    return f" (no checkpoint was written: the run files of {out} removed)"


def _kept_epoch(out, known=None):
    """Epochs in the run's checkpoint (known: as the loop counted them), 0 when there is none."""
    if known:
        return known
    try:
        return int(load_checkpoint(os.path.join(out, "checkpoint.pt"))["epoch"])
    except (FileNotFoundError, RuntimeError, KeyError, TypeError, ValueError):
        return 0


def _kept(out, epochs, note=""):
    return (f"the checkpoint of epoch {epochs} is kept in {out}: --resume continues from it" if epochs else
            f"there is no checkpoint{note or ', nothing was kept'}: the next start begins at epoch 1")


# ---- Atomic writes: a crash or a full disk leaves the old file whole

def atomic_write(path, write, size_hint=0):
    """write(f) into a temp file in the same folder (.tmp-<name>-XXXXXXXX), fsync, rename: a crash or a full
    disk leaves the old file whole, never a 0-byte or truncated one, and no temp file (a killed writer's is
    removed by the next start in that folder, under its lock). The file gets the umask's mode, like any
    other file written here. A full disk raises DiskFull naming the folder and the space needed, another OS
    error RunFolderError, in one line."""
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.path.basename(path)}-")
        os.fchmod(fd, 0o666 & ~_umask()) if hasattr(os, "fchmod") else None  # mkstemp makes it 0600
        with _open_temp(fd) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        cause = _os_cause(e) if isinstance(e, Exception) else None
        if cause is None or cause.errno is None:  # not the OS's: a bug in write(), shown as it is
            raise
        if cause.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise DiskFull(f"disk full while writing {path}: {_free_mib(folder)} MiB free in {folder}, "
                           f"about {max(size_hint, 2**20) / 2**20:.0f} MiB needed") from None
        raise _folder_error(cause, path, "write") from None


def atomic_save(obj, path):
    """torch.save through atomic_write; the previous file's size is the space a full disk is told to free."""
    hint = os.path.getsize(path) if os.path.exists(path) else 0
    atomic_write(path, lambda f: torch.save(obj, f), hint)


def atomic_json(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True) with one-line errors for missing, truncated or unsafe files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot load {what} {path}: not a valid checkpoint or unsafe to unpickle ({first})") from None


def _open_temp(fd):
    return os.fdopen(fd, "wb")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_cause(e):
    """The OSError behind e: e itself, or the one a library's error was raised while handling (torch.save
    turns a failed write into a RuntimeError of its own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _folder_error(e, path, doing):
    """A one-line error for OSError e met while `doing` (e.g. 'write') `path`."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".")
        return DiskFull(f"disk full while trying to {doing} {path}: {_free_mib(folder)} MiB free in {folder}")
    return RunFolderError(f"cannot {doing} {path} ({e.strerror or e}): choose a writable --out, or fix the "
                          f"folder's permissions")


def _free_mib(folder):
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f}"
    except OSError:
        return "?"


# ---- Signals: how a run stops (README "When things go wrong")

class Stop(KeyboardInterrupt):
    """A stop at once: a second signal in training ("again"), or one during start-up ("startup") or the
    final evaluation ("final"). Unwinds to run(), which says what was kept."""

    def __init__(self, signum, where):
        super().__init__(signum)
        self.signum, self.where = signum, where


class Stopped(Exception):
    """The training loop stopped after a step on a signal (every process at the same step): epoch is the
    0-based epoch it stopped in, kept the epochs in the checkpoint; before_final: all epochs were done."""

    def __init__(self, signum, epoch, kept, before_final=False):
        super().__init__(signum)
        self.signum, self.epoch, self.kept, self.before_final = signum, epoch, kept, before_final


class Interrupt:
    """This process's answer to SIGINT, SIGTERM and SIGHUP (those not ignored: under nohup SIGHUP stays
    ignored), by phase:
      startup, prepared  stop at once (Stop): nothing of the run exists yet, or the start is undone
      training           the first signal sets `hit`: the loop stops after the current step (every process
                         at the same step) and keeps the last full epoch; a second one stops at once
      final              (the final evaluation and final.json) stop at once: the run is not finished
      done               final.json is written: the run is finished, the signal changes nothing
      launcher           (the parent of the --gpus processes) passed on: SIGUSR1 for the first, SIGUSR2 for
                         the second; the processes stop together and the launcher says how
    A process started by the launcher (child: the launcher's shared [first, second] signal numbers) ignores
    INT/TERM/HUP (the launcher got them too); SIGUSR1 counts as a first signal in every phase but final,
    SIGUSR2 stops at once."""

    def __init__(self, phase="training", child=None, install=True):
        self.hit, self.done, self.phase, self.child = 0, 0, phase, child  # done: epochs in the checkpoint
        self.verbose, self.stopping, self.count, self.procs, self.shared = True, False, 0, [], None
        self._old = {}
        if install:
            self.install()

    def install(self):
        sigs = STOP_SIGNALS if self.child is None else (signal.SIGUSR1, signal.SIGUSR2)
        for s in sigs:
            try:
                if self.child is None and signal.getsignal(s) == signal.SIG_IGN:
                    continue  # ignored by whoever started us (nohup): left ignored
                self._old[s] = signal.signal(s, self._handle)
            except (ValueError, OSError):  # not the main thread
                pass

    def restore(self):
        for s, h in self._old.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass
        self._old = {}

    def _handle(self, signum=signal.SIGINT, frame=None):
        if self.phase == "done" or self.stopping:
            return
        if self.phase == "launcher":
            return self._forward(signum)
        if self.child is not None:
            again = signum == getattr(signal, "SIGUSR2", None)
            signum = self.child[1 if again else 0] or signal.SIGTERM  # the launcher's signal (0: it died)
            if again or self.phase == "final":
                self._stop(signum, "again" if again else "final")
            if not self.hit:
                self._first(signum)
            return
        if self.hit and self.phase == "training":
            self._stop(signum, "again")
        if self.phase != "training":
            self._stop(signum, "final" if self.phase == "final" else "startup")
        self._first(signum)

    def _first(self, signum):
        self.hit = signum
        if not self.verbose:
            return
        kept = (f"--resume continues from the checkpoint of epoch {self.done}" if self.done else
                "no epoch is complete yet, so there is no checkpoint: --resume starts the run over from epoch 1")
        again = "Ctrl-C again" if signum == signal.SIGINT else f"a second {_signame(signum)}"
        print(f"\ninterrupted ({_signame(signum)}): stopping after this step ({kept}); {again} stops at once",
              flush=True)

    def _stop(self, signum, where):
        self.stopping = True  # further signals while stopping change nothing
        raise Stop(signum, where)

    def _forward(self, signum):
        self.count += 1
        first = self.count == 1
        if self.shared is not None:
            self.shared[0 if first else 1] = signum
        for p in self.procs:
            try:
                os.kill(p.pid, signal.SIGUSR1 if first else signal.SIGUSR2)
            except (ProcessLookupError, OSError):
                pass


_STOP = None  # this process's Interrupt while run() (or a --gpus process) runs


class _Agreement:
    """Where every process stops: with one process, where its flag is set. Under DDP every step starts an
    all-reduce (MAX) of the flag (the signal number, 0 for none) on a gloo group of CPU tensors and reads
    the one started a step before, so that every process breaks after the same step, with no device sync."""

    def __init__(self, world):
        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.work = self.buf = None

    def _wait(self):
        if self.work is None:
            return 0
        self.work.wait()
        self.work = None
        return int(self.buf.item())

    def __call__(self, flag):
        if self.group is None:
            return flag
        agreed = self._wait()
        self.buf = torch.tensor([flag], dtype=torch.int64)
        self.work = dist.all_reduce(self.buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self, flag=0):
        """Wait for the all-reduce in flight, then agree once more on `flag` (a signal since the last step)."""
        if self.group is None:
            return flag
        agreed = self._wait()
        buf = torch.tensor([flag], dtype=torch.int64)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        return max(agreed, int(buf.item()))


# =================================================================================================
# 6. BENCH
# --bench N: the loop's images/s and the bare step's, on synthetic data on the device.
# =================================================================================================

def load_average():
    """The machine's 1/5/15-minute load averages (None where the OS has none): how idle a bench ran."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class _PlainNet(nn.Module):
    """--bench's yardstick: baseline.py's step (one net of the same arch, cross-entropy), first view only."""

    def __init__(self, arch, num_classes):
        super().__init__()
        self.net = build_model(arch, num_classes)

    def forward(self, x, y, idx, epoch):
        x = x[0] if isinstance(x, (tuple, list)) else x
        ce = F.cross_entropy(self.net(x).float(), y)
        return ce, {"ce": ce}


def _bench(args, model, step_model, opt, data, device, amp, out):
    """Time --bench N training steps on synthetic data already on the device (no dataset read):
    the loop's path (draw + augment each batch on the device, step, accumulate the terms), the bare
    step (forward/backward/SGD on one fixed batch), and, in one process without --compile, the
    baseline's loop path on a plain net of the same arch. Bare/loop is the loop's overhead; method/
    baseline is the method's cost, both measured in the same run, in alternating chunks."""
    model.train()
    if hasattr(model, "on_epoch"):
        model.on_epoch(0, None)
    cuda = device.startswith("cuda")
    fixed = next(data.epoch(0))

    def batches():
        e = 0
        while True:
            yield from data.epoch(e)
            e += 1

    def loop_steps(n, it, m=model, step=step_model, opts=opt):
        sums = None
        for _ in range(n):
            x, y, idx = next(it)
            _, vals = train_step(m, step, opts, x, y, idx, 0, amp)
            sums = vals if sums is None else sums + vals
        return sums

    # the yardstick: compiled or wrapped in DDP, the method's step is not comparable to a plain eager one
    yard = None
    if not args.compile and not dist.is_initialized():
        with torch.random.fork_rng(devices=[]):  # the method's random state stays as it was
            torch.manual_seed(args.seed)
            ref = _PlainNet(args.arch, dataset_info(args)[0])
        ref = ref.to(device).to(memory_format=torch.channels_last).train()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=args.lr, momentum=args.momentum,
                                  nesterov=not args.no_nesterov, weight_decay=args.wd)
        yard = lambda n, it: loop_steps(n, it, ref, ref, [ref_opt])

    def bare_steps(n, _):
        for _ in range(n):
            train_step(model, step_model, opt, *fixed, 0, amp)

    def timed(fn, n, it):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(n, it)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    load_before = load_average()
    it = batches()
    t0 = time.perf_counter()
    bare_steps(3, it)  # warm-up (cudnn autotuning, compilation)
    loop_steps(3, it)
    if yard:
        yard(3, it)
    if cuda:
        torch.cuda.synchronize()
    warmup = time.perf_counter() - t0
    ready, go = os.environ.get("OKD_BENCH_READY"), os.environ.get("OKD_BENCH_GO")
    if ready and go:  # gpu_check.py: benches warm up (compile) side by side, then each is timed when told to
        open(ready, "w").close()
        while not os.path.exists(go):
            time.sleep(0.02)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    # the two paths alternate in chunks, so that drift of a shared machine's speed hits both alike
    chunks = [len(c) for c in np.array_split(np.arange(args.bench), min(5, args.bench))]
    dt_bare = dt = dt_yard = 0.0
    for k in chunks:
        dt_bare += timed(bare_steps, k, it)
        dt += timed(loop_steps, k, it)
        if yard:
            dt_yard += timed(yard, k, it)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = {**MARKER, "method": args.method, "arch": args.arch, "batch_size": args.batch_size, "steps": args.bench,
           "images_per_second": round(args.batch_size * args.bench / dt, 1),
           "seconds_per_step": round(dt / args.bench, 5), "peak_memory_bytes": int(peak),
           "bare_step_images_per_second": round(args.batch_size * args.bench / dt_bare, 1),
           "loop_over_bare": round(dt_bare / dt, 3),  # the loop's img/s over the bare step's
           # the method's step time over the baseline's (plain net, same arch, same loop), same run; None: not timed
           "cost_vs_baseline": round(dt / dt_yard, 3) if yard else None,
           "baseline_images_per_second": round(args.batch_size * args.bench / dt_yard, 1) if yard else None,
           "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": amp, "compile": args.compile,
           "warmup_seconds": round(warmup, 2),
           # where it ran, with what, and how busy the machine was (1/5/15-minute load averages, before and after)
           "machine": machine_info(device), "args": _plain_args(args),
           "load_average": {"before": load_before, "after": load_average()}}
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    atomic_json(res, os.path.join(out, "bench.json"))
    print(f"bench {args.method} {args.arch}: {res['images_per_second']:.0f} img/s, "
          f"{1000 * res['seconds_per_step']:.1f} ms/step (bare step {res['bare_step_images_per_second']:.0f} img/s, "
          f"loop/bare {res['loop_over_bare']:.3f}"
          + (f"; {res['cost_vs_baseline']:.2f}x the baseline's step" if yard else "")
          + f"), peak {peak / 2**20:.0f} MiB -> {out}/bench.json")
