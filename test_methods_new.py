"""Tests of issue 27's method-file part, to be folded into test_methods.py: every loss function that makes
a method's training loss returns (total, {term: value}), and the schedule has one definition."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import cl
import common
import dml
import ffl
import ffsd
import kd
import kdcl
import mcl
import oeckd
import okddip
import one
import pcl
import reviewkd
import sokd
from test_methods import _Y, _Z1, _Z2, _Z3, _ffsd_maps, _ffsd_model


def _loss_cases():
    """(name, call, term names in logged order, the trained terms' sum as the loss computes it)."""
    g = torch.Generator().manual_seed(0)
    z = [_Z1, _Z2, _Z3]
    gate = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    alpha = torch.rand(2, 3, 3, generator=g).softmax(-1)
    memory = F.normalize(torch.randn(3, 8, 4, generator=g), dim=2)
    emb = F.normalize(torch.randn(3, 2, 4, generator=g), dim=2)
    maps = [_ffsd_maps(g), _ffsd_maps(g)]
    sd_t = [[torch.rand(2, 2, 4, 4, generator=g), torch.rand(2, 3, 2, 2, generator=g)]]
    f_f, tf, cat = torch.rand(2, 4, 1, 3, generator=g), torch.rand(2, 8, 1, 3, generator=g), torch.rand(2, 8, 1, 3)
    levels = [torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 1, 1, generator=g)]
    t_levels = [torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 1, 1, generator=g)]
    s = lambda t, *k: sum(t[n] for n in k)  # noqa: E731
    return [
        ("dml", lambda: dml.dml_loss(z, _Y, 2.0), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("cl", lambda: cl.cl_loss(z, _Y, 2.0, 0.5), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("kdcl", lambda: kdcl.kdcl_loss(z, _Y, 3.0, 0.7, "minlogit"), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("one", lambda: one.one_loss(z, gate, _Y, 3.0, 0.4), ["ce", "ce_e", "kd"],
         lambda t: s(t, "ce", "ce_e", "kd")),
        ("okddip", lambda: okddip.okddip_loss(z, _Z1.flip(1), alpha, _Y, 3.0, 0.4), ["ce", "ce_l", "kd", "kd_l"],
         lambda t: s(t, "ce", "ce_l", "kd", "kd_l")),
        ("ffl", lambda: ffl.ffl_loss([_Z1, _Z2], _Z3, _Y, 3.0, 0.4), ["ce", "ce_f", "kd", "fusion"],
         lambda t: s(t, "ce", "ce_f", "kd", "fusion")),
        ("pcl", lambda: pcl.pcl_loss(z, _Z1.flip(1), [_Z3, _Z1, _Z2], _Y, 3.0, 0.4), ["ce", "ce_e", "kd", "ema"],
         lambda t: s(t, "ce_e", "ce", "kd", "ema")),
        ("mcl", lambda: mcl.mcl_loss(z, memory, emb, torch.tensor([0, 5]), torch.tensor([[1, 2], [3, 4]]), _Y,
                                     3.0, 0.1, 1.0, 0.025), ["ce", "dot", "nce"],
         lambda t: t["ce"] + 1.0 * t["dot"] + 0.025 * t["nce"]),
        ("sokd", lambda: sokd.sokd_loss(_Z1, _Z2, _Z3, _Y, 4.0), ["ce", "kd", "ce_b", "kd_b"],
         lambda t: s(t, "ce", "kd") + s(t, "ce_b", "kd_b")),
        ("sokd-kd_t", lambda: sokd.sokd_loss(_Z1, _Z2, _Z3, _Y, 4.0, 0.5), ["ce", "kd", "ce_b", "kd_b", "kd_t"],
         lambda t: s(t, "ce", "kd", "kd_t") + s(t, "ce_b", "kd_b")),
        ("ffsd-students", lambda: ffsd.student_loss([_Z1, _Z2], maps, sd_t, _Y, 2.0, 0.3), ["ce", "kd", "div", "sd"],
         lambda t: s(t, "ce", "kd", "div", "sd")),
        ("ffsd-fusion", lambda: ffsd.fusion_loss(_Z3, [_Z1, _Z2], _Y, 2.0), ["ce_f", "fusion"],
         lambda t: s(t, "ce_f", "fusion")),
        ("ffsd-leader", lambda: ffsd.leader_loss(_Z1.flip(1), _ffsd_maps(g), tf, _Z3, f_f, cat, sd_t[0], _Y, 2.0, 7.0),
         ["ce_l", "kd_l", "fuse_l", "trans_l", "sd_l"], lambda t: s(t, "ce_l", "kd_l", "fuse_l", "trans_l", "sd_l")),
        ("oeckd", lambda: oeckd.oeckd_loss(z, torch.tensor(0.8), _Y, 2.0, 0.7, 0.15, 0.15), ["ce", "feat", "kd", "ce_e"],
         lambda t: s(t, "ce", "feat", "kd")),  # ce_e: logged, not trained
        ("kd", lambda: kd.kd_loss(_Z1, _Z2, _Y, 4.0), ["ce", "kd"], lambda t: s(t, "ce", "kd")),
        ("reviewkd", lambda: reviewkd.reviewkd_loss(_Z1, levels, t_levels, _Y, 0.5), ["ce", "hcl"],
         lambda t: s(t, "ce", "hcl")),
    ]


@pytest.mark.parametrize("name,call,names,trained", _loss_cases(), ids=[c[0] for c in _loss_cases()])
def test_every_loss_function_returns_its_total_and_named_terms(name, call, names, trained):
    """One convention in every method file: (total, {term: value}), the terms named as log.csv's columns
    and in their order, the total their sum as the loss adds them (bit for bit)."""
    total, terms = call()
    assert isinstance(terms, dict) and list(terms) == names
    assert total.dim() == 0 and all(v.dim() == 0 for v in terms.values())
    assert torch.equal(total, trained(terms))


def test_sokd_student_loss_logs_kd_t_only_with_a_weight():
    total, terms = sokd.student_loss(_Z1, _Z2, _Z3, _Y, 4.0, 0.0)
    assert list(terms) == ["ce", "kd"] and torch.equal(total, terms["ce"] + terms["kd"])


@pytest.mark.parametrize("cosine,schedule", [(False, [2, 4]), (True, [])])
def test_lr_factor_is_the_loops_schedule_and_the_ffsd_decoders_follow_it(cosine, schedule):
    """common.lr_factor is the schedule _set_lr applies (bit for bit), and FFSD's decoders get --decoder-lr x it."""
    args = argparse.Namespace(cosine=cosine, schedule=schedule, lr=0.1, epochs=6)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    m = _ffsd_model(schedule=schedule or [2, 4], epochs=6, cosine=cosine)
    adam = m.extra_optimizer()
    for e in range(6):
        assert common._set_lr(opt, args, e) == args.lr * common.lr_factor(args, e)
        m.on_epoch(e, None)
        assert adam.param_groups[0]["lr"] == m.args.decoder_lr * common.lr_factor(m.args, e)
