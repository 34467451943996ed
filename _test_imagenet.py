from test_methods import *

import argparse
import shutil

import torchvision
from PIL import Image

# red and green fixed by the class (labels can be read off the pixels), blue a horizontal ramp (crops differ)
IMAGENET_RED = (20, 100, 180)


def fake_image_folder(root, n_train=8, n_val=4, classes=3):
    """A tiny ImageFolder tree root/train/classK/*.png, root/val/classK/*.png of 40x36 images."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = np.zeros((36, 40, 3), np.uint8)
                img[..., 0], img[..., 1], img[..., 2] = IMAGENET_RED[c], 200 - 60 * c, np.arange(40) * 5 + 5 * i
                Image.fromarray(img).save(os.path.join(d, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fake_image_folder(tmp_path_factory.mktemp("imagenet"))


IMAGENET_TINY = ["--dataset", "imagenet", "--image-size", 32, "--batch-size", 8, "--workers", 1,
                 "--epochs", 1, "--schedule"]


def _torchrun(script, *argv, nproc=2, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           os.path.join(HERE, script + ".py"), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


# ------------------------------------------------------------------------------------------------
# end to end: two gloo processes, through --gpus 0,1 (mp.spawn) and through torchrun
# ------------------------------------------------------------------------------------------------

def test_imagenet_baseline_under_torchrun_two_processes(folder, tmp_path):
    out = tmp_path / "b"
    r = _torchrun("baseline", *IMAGENET_TINY, "--arch", "resnet18", "--data-dir", folder, "--gpus", "cpu",
                  "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    fin = read_final(out)
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert fin["dataset"] == "imagenet" and set(fin["last"]) == {"net"}
    assert fin["params"]["net"] == common.count_params(torchvision.models.resnet18(num_classes=3))  # 3 class folders
    a = fin["args"]  # the ImageNet protocol where not given: lr 0.1 x 8/256, wd 1e-4
    assert a["lr"] == 0.1 * 8 / 256 and a["wd"] == 1e-4 and a["image_size"] == 32 and a["schedule"] == []
    assert "24 training images" in r.stdout


def test_imagenet_one_two_gloo_processes(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a shared CPU: no OpenMP oversubscription
    out = tmp_path / "one"
    r = run_cli("one", *IMAGENET_TINY, "--arch", "resnet8", "--data-dir", folder, "--gpus", "0,1", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    fin = read_final(out)
    assert fin["processes"] == 2 and fin["rank_param_sums"][0] == fin["rank_param_sums"][1]
    assert set(fin["last"]) == {"branch1", "branch2", "branch3", "ensemble"} and fin["deploy"] == "branch1"
    assert fin["params"]["branch1"] == common.count_params(common.build_model("resnet8", 3))
    assert len(read_log(out)) == 1


# ------------------------------------------------------------------------------------------------
# torchvision backbones cut into stages
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tv", [("resnet18", "resnet18"), ("resnet50", "resnet50"),  # resnet34: as resnet18
                                     ("mobilenet_v2_imagenet", "mobilenet_v2")])
def test_imagenet_stages_reproduce_torchvision(arch, tv):
    """Net(stages, fc) with torchvision's weights computes exactly torchvision's network."""
    torch.manual_seed(0)
    net = common.build_model(arch, 10).eval()
    ref = getattr(torchvision.models, tv)(num_classes=10).eval()
    assert isinstance(net, common.Net) and len(net.stages) == 5 and isinstance(net.fc, torch.nn.Linear)
    sd, ref_sd = net.state_dict(), ref.state_dict()
    assert len(sd) == len(ref_sd)  # same tensors in the same order (mobilenet's dropout has none)
    assert all(a.shape == b.shape for a, b in zip(sd.values(), ref_sd.values()))
    net.load_state_dict(dict(zip(sd, ref_sd.values())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5)
        sizes, h = [], x
        for s in net.stages:
            h = s(h)
            sizes.append(h.shape[-1])
    assert sizes == ([16, 16, 8, 4, 2] if "resnet" in arch else [32, 16, 8, 4, 2])  # stem, then one halving each
    assert h.shape[1] == net.fc.in_features == {"resnet50": 2048, "mobilenet_v2_imagenet": 1280}.get(arch, 512)


@pytest.mark.parametrize("arch,at", [("resnet18", -1), ("mobilenet_v2_imagenet", -2)])
def test_imagenet_split_reproduces_the_whole_net(arch, at):
    test_split_reproduces_the_whole_net(arch, at)  # the CIFAR nets' check, on 32x32 inputs


# ------------------------------------------------------------------------------------------------
# data: the folder loader, the protocol's defaults, the errors
# ------------------------------------------------------------------------------------------------

def _norm_red(c):
    return (IMAGENET_RED[c] / 255 - common.IMAGENET_MEAN[0]) / common.IMAGENET_STD[0]


def test_imagenet_folder_loader_interface_and_sharding(folder):
    tr, va = common.load_image_folders(folder)
    kw = dict(size=32, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, device="cpu", batch_size=8)
    L = common.FolderLoader(tr, train=True, views=2, seed=1, workers=1, **kw)
    assert torch.equal(L.y, torch.tensor([c for c in range(3) for _ in range(8)])) and len(L) == 3
    batches = list(L.epoch(0))
    for x, y, idx in batches:
        assert isinstance(x, tuple) and len(x) == 2 and x[0].shape == (8, 3, 32, 32) and x[0].dtype == torch.float32
        assert torch.equal(y, L.y[idx])
        for v in x:  # red stays flat under crop and flip and tells the class; ImageNet's normalisation
            assert torch.allclose(v[:, 0], torch.tensor([_norm_red(c) for c in y])[:, None, None], atol=0.03)
        assert not torch.equal(x[0][:, 2], x[1][:, 2])  # the views are independent draws
    assert sorted(torch.cat([i for _, _, i in batches]).tolist()) == list(range(24))
    again = list(L.epoch(0))  # an epoch depends on (seed, epoch) only
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[0][1], b[0][1]) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat([i for _, _, i in L.epoch(1)]), torch.cat([i for _, _, i in batches]))
    # two ranks: disjoint halves of the epoch, batch_size // world each
    shards = [list(common.FolderLoader(tr, train=True, seed=1, rank=r, world=2, workers=0, **kw).epoch(0))
              for r in range(2)]
    i0, i1 = (torch.cat([i for _, _, i in s]) for s in shards)
    assert len(shards[0][0][2]) == 4 and not set(i0.tolist()) & set(i1.tolist()) and len(i0) + len(i1) == 24
    # evaluation: center crop, rank::world, in order
    V = common.FolderLoader(va, train=False, rank=1, world=2, workers=0, **kw)
    batches = list(V.epoch())
    assert [len(i) for _, _, i in batches] == [4, 2] and batches[0][0].shape == (4, 3, 32, 32)
    assert torch.cat([i for _, _, i in batches]).tolist() == list(range(1, 12, 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, V.epoch()))  # no randomness


def test_imagenet_holdout_comes_off_the_training_folder(folder):
    args = argparse.Namespace(dataset="imagenet", data_dir=folder, image_size=32, workers=0, batch_size=8, seed=0)
    data = common.load_image_folders(folder)
    train, test, hold = common.folder_loaders(args, data, 1, 5, "cpu", 0, 1)
    assert len(hold.y) == 5 and len(train.y) == 19 and len(test.y) == 12
    held = {p for p, _ in hold.dl.dataset.samples}
    assert not held & {p for p, _ in train.dl.dataset.samples} and held <= {p for p, _ in data[0]}
    assert common.folder_loaders(args, data, 1, 0, "cpu", 0, 1)[2] is None
    with pytest.raises(common.DataError, match="leaves nothing"):
        common.folder_loaders(args, data, 1, 24, "cpu", 0, 1)


def _parsed(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["x.py", *map(str, argv)])
    return common.parse(common.parser("x"), "x")


def test_imagenet_protocol_defaults(monkeypatch, capsys):
    a = _parsed(monkeypatch, "--gpus", "cpu")  # CIFAR: exactly the old defaults
    assert (a.epochs, a.lr, a.batch_size, a.wd, a.schedule, a.image_size) == (300, 0.1, 128, 5e-4, [150, 225], None)
    a = _parsed(monkeypatch, "--gpus", "cpu", "--dataset", "imagenet")
    assert (a.epochs, a.lr, a.batch_size, a.wd, a.schedule, a.image_size) == (90, 0.1, 256, 1e-4, [30, 60, 80], 224)
    a = _parsed(monkeypatch, "--gpus", "cpu", "--dataset", "imagenet", "--batch-size", 1024, "--wd", 5e-5)
    assert (a.lr, a.wd, a.workers) == (0.4, 5e-5, 8)  # linear scaling with the batch; given values win
    assert _parsed(monkeypatch, "--gpus", "cpu", "--dataset", "imagenet", "--lr", 0.2, "--batch-size", 512).lr == 0.2
    for argv, msg in ((["--dataset", "imagenet", "--epochs", 50], "lie in (0, --epochs=50)"),  # defaults validated
                      (["--image-size", 64], "--image-size applies to --dataset imagenet only")):
        with pytest.raises(SystemExit):
            _parsed(monkeypatch, "--gpus", "cpu", *argv)
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("layout,msg", [
    ("none", "missing {d}/train; --dataset imagenet expects {d}/train/<class>/<image> and {d}/val/<class>/<image>"),
    ("train", "missing {d}/val; --dataset imagenet expects"),
    ("flat_val", "{d}/val: Couldn't find any class folder"),
    ("other_classes", "{d}/val has other class folders than {d}/train (2 vs 3)"),
])
def test_imagenet_missing_folder_is_a_one_line_error(tmp_path, capsys, layout, msg):
    d = tmp_path / "data"
    os.makedirs(d)
    if layout != "none":
        fake_image_folder(d, n_train=2, n_val=1)
        shutil.rmtree(d / "val")
        if layout == "flat_val":
            os.makedirs(d / "val")
            Image.new("RGB", (8, 8)).save(d / "val" / "0.png")
        if layout == "other_classes":
            fake_image_folder(d, n_train=2, n_val=1, classes=2)
    with pytest.raises(SystemExit) as e:
        run_main("baseline", "--dataset", "imagenet", "--data-dir", d, "--gpus", "cpu", "--out", tmp_path / "r")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg.format(d=d) in err, err
    assert not os.path.exists(tmp_path / "r")
