"""Tests of the core branch (common.py read top to bottom, one load_teacher, a plain-number term in one line);
to be folded into test_methods.py. Run: python -m pytest -q test_core_new.py"""
import ast
import os
import re

import pytest
import torch
import torch.nn as nn

import common
import dml
import kd
import reviewkd
import sokd
from test_methods import HERE, TINY, fake_cifar, run_main

METHOD_FILES = ("baseline", "cl", "dml", "ffl", "ffsd", "kd", "kdcl", "mcl", "oeckd", "okddip", "one", "pcl",
                "reviewkd", "sokd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_cifar(tmp_path_factory.mktemp("core_cifar"), n_train=64, n_test=32)


def _source(name):
    with open(os.path.join(HERE, name + ".py")) as f:
        return f.read()


# ---- a loss term given as a plain number: one line, not a traceback

class _Terms(nn.Module):
    """A linear model whose forward returns `extra` as one more loss term."""

    def __init__(self, extra):
        super().__init__()
        self.fc, self.extra = nn.Linear(4, 3), extra

    def forward(self, x, y, idx, epoch):
        ce = nn.functional.cross_entropy(self.fc(x), y)
        return ce, {"ce": ce, "off": self.extra}


def _step(extra):
    model = _Terms(extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    return common.train_step(model, model, [opt], x, y, torch.arange(8), 0, False)


@pytest.mark.parametrize("extra", [0.0, 0, 1.5])
def test_train_step_names_a_term_given_as_a_plain_number(extra):
    with pytest.raises(ValueError) as e:
        _step(extra)
    msg = str(e.value)
    assert "\n" not in msg and "_Terms.forward" in msg and "'off'" in msg and repr(extra) in msg
    assert "not a tensor" in msg and "torch.tensor(0.0, device=y.device)" in msg


def test_train_step_stacks_tensor_terms_as_before():
    names, vals = _step(torch.tensor(0.25))
    assert names == ["loss", "ce", "off"] and vals.dtype == torch.float32 and vals.shape == (3,)
    assert vals[0] == vals[1] and vals[2] == 0.25


def test_a_plain_number_term_ends_the_run_in_one_line(data, tmp_path, monkeypatch, capsys):
    real = dml.DML.forward

    def forward(self, x, y, idx, epoch):
        loss, terms = real(self, x, y, idx, epoch)
        return loss, {**terms, "kd": 0.0}  # as a method with its weight off might write it
    monkeypatch.setattr(dml.DML, "forward", forward)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        run_main("dml", *TINY, "--data-dir", data, "--epochs", 1, "--out", out)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert e.value.code == common.EXIT_ERROR and len(lines) == 1 and "Traceback" not in err
    assert "DML.forward returned the loss term 'kd' as 0.0 (a float), not a tensor" in lines[0]
    assert not out.exists()  # nothing was kept: the start was undone


# ---- one load_teacher, in common.py

def test_teacher_loading_lives_in_common_only():
    for mod in (kd, sokd, reviewkd):
        assert not hasattr(mod, "load_teacher") and not hasattr(mod, "_train_teacher_hint"), mod.__name__
        assert "common.load_teacher(" in _source(mod.__name__)


@pytest.mark.parametrize("default", ["resnet110", "wrn_40_2"])
def test_load_teacher_names_the_default_teacher_when_no_arch_is_given(default, tmp_path):
    kw = {} if default == "resnet110" else {"default_arch": default}
    with pytest.raises(ValueError) as e:
        common.load_teacher(str(tmp_path / "nope.pt"), None, "cifar100", 100, **kw)
    msg = str(e.value)
    assert "nope.pt" in msg and f"python baseline.py --arch {default} --dataset cifar100" in msg
    assert f"runs/baseline-{default}-cifar100-s0/checkpoint.pt" in msg and "--teacher PATH" in msg


# ---- common.py reads top to bottom

def _defs(tree):
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_common_names_its_parts_in_order_and_train_step_on_its_first_screen():
    src = _source("common")
    first_screen = "\n".join(src.splitlines()[:50])
    assert "train_step" in first_screen and "evaluate" in first_screen and "final.json" in first_screen
    parts = ["BACKBONES", "DATA", "LOOP", "OPTIONS", "RUN FOLDER", "BENCH"]
    doc = ast.get_docstring(ast.parse(src))
    assert [doc.index(f"{i}. {p}") for i, p in enumerate(parts, 1)] == \
        sorted(doc.index(f"{i}. {p}") for i, p in enumerate(parts, 1))
    banners = re.findall(r"^# =+\n# (\d)\. ([A-Z ]+?)(?::|\n)", src, re.M)
    assert [(int(n), name) for n, name in banners] == list(enumerate(parts, 1))


def test_train_is_an_outline_of_phases_of_at_most_40_lines():
    defs = _defs(ast.parse(_source("common")))
    train = defs["_train"]
    called = [n.func.id for n in ast.walk(train) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    phases = ["_loaders", "_optimizers", "_step_model", "_start", "_epoch", "_save_checkpoint", "_finish"]
    assert all(p in called for p in phases)
    for name in ["_train", *phases, "_steps", "train_step", "evaluate"]:
        assert defs[name].end_lineno - defs[name].lineno + 1 <= 40, name
    # top-down: each phase comes after _train, in the order _train calls it
    assert [defs[p].lineno for p in phases] == sorted(defs[p].lineno for p in phases)
    assert train.lineno < defs["_loaders"].lineno and defs["_steps"].lineno < defs["train_step"].lineno


def test_the_sets_of_option_names_stand_together_in_options_with_a_comment_each():
    src = _source("common")
    lines = src.splitlines()
    options, run_folder = src.index("# 4. OPTIONS"), src.index("# 5. RUN FOLDER")
    at = {}
    for name in ("MARKER", "RUN_CONTROL", "INHERITED", "RUN_SETTINGS", "RECORDS", "_LEGACY_ARGS"):
        i = next(k for k, ln in enumerate(lines) if ln.startswith(name + " = "))
        assert options < src.index(lines[i]) < run_folder, name
        assert lines[i - 1].startswith("# "), name  # its one comment says how it differs
        at[name] = i
    assert max(at.values()) - min(at.values()) < 30


def test_common_imports_no_method_file_and_each_method_only_common():
    def local_imports(name):
        mods = set()
        for n in ast.walk(ast.parse(_source(name))):
            if isinstance(n, ast.Import):
                mods |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                mods.add((n.module or "").split(".")[0])
        return {m for m in mods if os.path.exists(os.path.join(HERE, m + ".py"))}
    assert local_imports("common") == set()
    for name in METHOD_FILES:
        assert local_imports(name) == {"common"}, name
