import gzip
import os
import random
import sys

import numpy as np
import pytest
import torch

from oialr.cli.data import (
    FASHION_MNIST_DIR, DataError, Loader, augment_images, load_dataset, load_fashion_mnist)


def write_idx(path, array, magic=None, gz=False, cut=0):
    """Write ``array`` (uint8) as an IDX file; ``magic`` overrides the magic number, ``cut`` drops trailing bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x800 | array.ndim) if magic is None else magic
    blob = magic.to_bytes(4, "big") + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()
    blob = blob[:len(blob) - cut]
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(blob)


def fake_fashion(folder, n_train=20, n_test=10, gz=False):
    rng = np.random.default_rng(0)
    raw = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
        raw[prefix] = images, labels
    return raw


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    raw = fake_fashion(tmp_path, gz=gz)
    data = load_dataset("fashion-mnist", str(tmp_path))
    assert (data.name, data.num_classes, data.input_shape) == ("fashion-mnist", 10, (1, 28, 28))
    assert data.train.x.shape == (20, 1, 28, 28) and data.test.x.shape == (10, 1, 28, 28)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert data.train.x.mean().abs() < 1e-5 and abs(data.train.x.std().item() - 1) < 1e-5
    for split, prefix in ((data.train, "train"), (data.test, "t10k")):
        images, labels = raw[prefix]
        torch.testing.assert_close(split.x[:, 0] * data.std + data.mean, torch.tensor(images / 255.0).float())
        assert split.y.tolist() == labels.tolist()
    assert data.pad_value == pytest.approx(-data.mean / data.std)


def one_line_error(match_path, fn, *args):
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and str(match_path) in message and "apt-get install dataset-fashion-mnist" in message
    return message


@pytest.mark.parametrize("corruption, expected", [
    (dict(magic=0x803), "magic number 0x00000803, expected 0x00000801"),
    (dict(cut=3), "truncated or corrupt"),
])
def test_corrupt_idx(tmp_path, corruption, expected):
    fake_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(20) % 10, **corruption)
    assert expected in one_line_error(tmp_path / "train-labels-idx1-ubyte", load_fashion_mnist, str(tmp_path))


def test_missing_mismatched_and_bad_files(tmp_path):
    fake_fashion(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(9) % 10)          # 10 images, 9 labels
    assert "holds 10 images but" in one_line_error(tmp_path / "t10k-labels-idx1-ubyte", load_fashion_mnist,
                                                   str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10) + 3)           # label 12
    assert "outside 0..9" in one_line_error(tmp_path / "t10k-labels-idx1-ubyte", load_fashion_mnist, str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    os.remove(tmp_path / "train-images-idx3-ubyte")
    assert "cannot be read" in one_line_error(tmp_path / "train-images-idx3-ubyte.gz", load_fashion_mnist,
                                              str(tmp_path))
    os.remove(tmp_path / "train-images-idx3-ubyte.gz")
    assert "not found" in one_line_error(tmp_path / "train-images-idx3-ubyte", load_fashion_mnist, str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of: mnist1d, fashion-mnist"):
        load_dataset("mnist")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    data = load_dataset("fashion-mnist")
    assert data.train.x.shape == (60000, 1, 28, 28) and data.test.x.shape == (10000, 1, 28, 28)
    assert data.train.y.unique().tolist() == list(range(10)) == data.test.y.unique().tolist()
    assert data.mean == pytest.approx(0.286, abs=1e-3) and data.std == pytest.approx(0.353, abs=1e-3)


def test_mnist1d_shapes_rng_cache_and_determinism(tmp_path, monkeypatch):
    np.random.seed(7)
    random.seed(7)
    data = load_dataset("mnist1d", str(tmp_path / "cache"), seed=42)
    after = np.random.rand(3), random.random()
    np.random.seed(7)
    random.seed(7)
    assert np.array_equal(after[0], np.random.rand(3)) and after[1] == random.random()   # callers' RNGs untouched
    assert data.train.x.shape == (4000, 1, 40) and data.test.x.shape == (1000, 1, 40)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert (data.num_classes, data.input_shape) == (10, (1, 40))
    assert [f for f in os.listdir(tmp_path / "cache") if not f.endswith(".pt")] == []           # no temp file left

    fresh = load_dataset("mnist1d", seed=42)                                   # generated again, no cache
    assert torch.equal(fresh.train.x, data.train.x) and torch.equal(fresh.test.y, data.test.y)
    import mnist1d.data
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: pytest.fail("cache not used"))
    cached = load_dataset("mnist1d", str(tmp_path / "cache"), seed=42)
    assert torch.equal(cached.train.x, data.train.x) and torch.equal(cached.test.y, data.test.y)
    monkeypatch.undo()
    other = load_dataset("mnist1d", seed=43)
    assert not torch.equal(other.train.x, data.train.x)


def test_mnist1d_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(DataError, match=r"pip install mnist1d \(or pip install -e \.\[cli\]\)"):
        load_dataset("mnist1d")


def ids(loader):
    return torch.cat([y for _, y in loader])


def test_loader_epochs_are_deterministic_permutations():
    x, y = torch.arange(50.0)[:, None], torch.arange(50)
    loader = Loader(x, y, 7, seed=3)
    assert len(loader) == 8 and [len(b) for _, b in loader] == [7] * 7 + [1]
    epoch0 = ids(loader)
    assert sorted(epoch0.tolist()) == list(range(50)) and epoch0.tolist() != list(range(50))
    assert torch.equal(ids(loader), epoch0)
    loader.set_epoch(1)
    epoch1 = ids(loader)
    assert sorted(epoch1.tolist()) == list(range(50)) and not torch.equal(epoch1, epoch0)
    resumed = Loader(x, y, 7, seed=3)
    resumed.set_epoch(1)
    assert torch.equal(ids(resumed), epoch1)
    dropped = Loader(x, y, 7, seed=3, drop_last=True)
    assert len(dropped) == 7 and all(len(b) == 7 for _, b in dropped)
    for xb, yb in Loader(x, y, 7, seed=3):
        assert torch.equal(xb[:, 0].long(), yb)


@pytest.mark.parametrize("n", [50, 51])
def test_loader_shards(n):
    x, y = torch.zeros(n, 1), torch.arange(n)
    shards = [Loader(x, y, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    a, b = (ids(s) for s in shards)
    assert len(a) == len(b) == 25 == shards[0].num_samples and len(shards[0]) == 7
    assert not set(a.tolist()) & set(b.tolist())
    assert len(set(a.tolist()) | set(b.tolist())) == 50
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, order[0:50:2]) and torch.equal(b, order[1:50:2])


def test_loader_in_order_and_argument_errors():
    x, y = torch.randn(10, 1, 28, 28), torch.arange(10) % 3
    xs, ys = zip(*Loader(x, y, 4, shuffle=False))
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)
    with pytest.raises(ValueError, match=r"augment needs images \(N, C, H, W\), got x of shape \(10, 1, 40\)"):
        Loader(torch.zeros(10, 1, 40), y, 4, augment=True)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        Loader(x, y, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="same length, got 10 and 9"):
        Loader(x, y[:9], 4)


def test_augmentation_is_crop_or_flip_of_each_image():
    torch.manual_seed(0)
    x = torch.rand(64, 2, 28, 28)
    out = augment_images(x, torch.Generator().manual_seed(0), padding=2, pad_value=-1.0)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 28, dx:dx + 28]))]
        assert found, f"sample {i} is no crop/flip of its input"
        shifts.add(found[0])
    assert len(shifts) > 10                                                     # offsets and flips vary per sample


def test_loader_augments_images_not_labels():
    x, y = torch.rand(40, 1, 28, 28), torch.arange(40)
    plain, aug = Loader(x, y, 16, seed=5), Loader(x, y, 16, seed=5, augment=True)
    for (xp, yp), (xa, ya) in zip(plain, aug):
        assert torch.equal(yp, ya) and xa.shape == xp.shape and not torch.equal(xa, xp)
    again = Loader(x, y, 16, seed=5, augment=True)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(aug, again))
    same = x[:1].expand(40, -1, -1, -1).clone()                                 # ranks draw their own offsets
    ranks = [next(iter(Loader(same, y, 8, seed=5, augment=True, rank=r, world_size=2)))[0] for r in range(2)]
    assert not torch.equal(ranks[0], ranks[1])
