"""DataModules on real on-disk formats (a tiny CIFAR-10 pickle set, JPEG ImageFolders), the
embedded digits, synthetic data and the tensor augmentation of the resident CIFAR loader."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import datasets

from resens.data import build_datamodule
from resens.data.cifar10 import MEAN, STD
from resens.data.gpu_augment import ResidentLoader, epoch_indices, normalize, random_crop_flip
from resens.errors import DataError

PER_BATCH = 20  # images per CIFAR batch file: 100 training, 20 test


def data_cfg(**over):
    cfg = dict(
        name="digits",
        root="data",
        download=False,
        eval_batch_size=16,
        num_workers=0,
        val_split=0,
        seed=0,
        image_size=32,
        num_classes=10,
        synthetic_size=64,
        gpu_augment=False,
    )
    return OmegaConf.create({**cfg, **over})


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """A tiny CIFAR-10 in the real pickle format; returns (root, train uint8 [100, 3, 32, 32],
    train labels, test images, test labels). torchvision's md5 lists point at these files."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images, labels = {}, {}
    for k, name in enumerate(names):
        data = rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8)
        labs = [(k + i) % 10 for i in range(PER_BATCH)]
        # str keys: what the original Python 2 pickles decode to with encoding="latin1"
        entry = {
            "batch_label": name,
            "labels": labs,
            "data": data,
            "filenames": [f"{name}_{i}.png" for i in range(PER_BATCH)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
        images[name], labels[name] = data.reshape(-1, 3, 32, 32), labs
    meta = folder / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, md5(folder / n)] for n in names[:5]])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setitem(datasets.CIFAR10.meta, "md5", md5(meta))
    train_x = np.concatenate([images[n] for n in names[:5]])
    train_y = sum((labels[n] for n in names[:5]), [])
    return tmp_path, train_x, train_y, images["test_batch"], labels["test_batch"]


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalized CIFAR images [B, 3, H, W] back to [0, 1]."""
    return x * torch.tensor(STD).view(-1, 1, 1) + torch.tensor(MEAN).view(-1, 1, 1)


def crop_params(out: torch.Tensor, image: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """Every (row offset, column offset, flipped) whose crop of the zero-padded image is ``out``."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    h, w = image.shape[-2:]
    found = []
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[:, oy : oy + h, ox : ox + w]
            found += [
                (oy, ox, f) for f in (False, True) if torch.equal(out, crop.flip(-1) if f else crop)
            ]
    return found


def test_cifar_decodes_the_files_and_normalizes(cifar):
    root, train_x, _, test_x, test_y = cifar
    dm = build_datamodule(data_cfg(name="cifar10", root=str(root)), batch_size=8)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    dm.setup("fit")
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.test_set)) == (100, 20)
    assert dm.val_set is dm.test_set  # val_split=0 validates on the test set
    batches = list(dm.test_dataloader())
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    # Pixel for pixel what was written: the real pickle decoding and the normalization.
    torch.testing.assert_close(unnormalize(x), torch.from_numpy(test_x).float() / 255)
    assert float(x[3, 2, 17, 5]) == pytest.approx(
        (test_x[3, 2, 17, 5] / 255 - MEAN[2]) / STD[2], abs=1e-5
    )
    assert torch.cat([b[1] for b in batches]).tolist() == test_y
    # Uniform random pixels: mean 0.5, std 0.289 before normalization.
    means, stds = x.mean((0, 2, 3)), x.std((0, 2, 3))
    torch.testing.assert_close(
        means, (0.5 - torch.tensor(MEAN)) / torch.tensor(STD), atol=0.05, rtol=0
    )
    torch.testing.assert_close(stds, 0.289 / torch.tensor(STD), atol=0.05, rtol=0)
    again = torch.cat([b[0] for b in dm.test_dataloader()])
    assert torch.equal(x, again)
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == 100 // 8 and train_batches[0][0].shape == (8, 3, 32, 32)
    loader = dm.train_dataloader()
    assert not loader.persistent_workers and loader.drop_last


def test_cifar_augmentation_crops_and_flips_but_keeps_the_label(cifar):
    root, train_x, train_y, _, _ = cifar
    dm = build_datamodule(data_cfg(name="cifar10", root=str(root)), batch_size=8)
    dm.setup("fit")
    image = torch.from_numpy(train_x[7]).float() / 255
    # fb.resnet.torch's order: normalise, then pad with zeros (the mean colour), crop, flip
    normalized = dm.test_transform(dm.train_set.dataset[7][0])
    params = set()
    for _ in range(20):
        x, y = dm.train_set[7]
        assert y == train_y[7]
        found = crop_params(x, normalized, pad=4)
        assert found, "augmented image is no crop of the normalised, zero-padded original"
        params.update(found)
    assert len(params) > 1  # it does change the image
    x, y = dm.analysis_set[7]
    torch.testing.assert_close(unnormalize(x), image)


def test_cifar_val_split_and_analysis_loader(cifar):
    root, *_ = cifar
    dm = build_datamodule(data_cfg(name="cifar10", root=str(root), val_split=30), batch_size=8)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (70, 30, 20)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert dm.val_set.transform is dm.test_transform
    v1, v2 = (torch.cat([b[0] for b in dm.val_dataloader()]) for _ in range(2))
    assert torch.equal(v1, v2)
    other = build_datamodule(data_cfg(name="cifar10", root=str(root), val_split=30), batch_size=8)
    other.setup("fit")
    assert other.val_set.indices == dm.val_set.indices  # seeded

    a1, a2, a3 = (list(dm.analysis_train_dataloader(16, seed=s)) for s in (3, 3, 4))
    assert len(a1) == 70 // 16
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a1, a2, strict=True))
    assert not torch.equal(a1[0][1], a3[0][1])
    analysis_images = torch.stack([dm.analysis_set[i][0] for i in range(70)])
    for x in a1[0][0][:4]:  # un-augmented training images
        assert (analysis_images - x).abs().flatten(1).amax(1).min() < 1e-6


def test_cifar_missing_folder(tmp_path):
    dm = build_datamodule(data_cfg(name="cifar10", root=str(tmp_path / "nowhere")), batch_size=8)
    with pytest.raises(DataError, match="cifar-10-batches-py") as info:
        dm.setup("fit")
    assert str(tmp_path / "nowhere") in str(info.value)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [("truncated", "md5"), ("unpicklable", "unpickled"), ("missing", "missing")],
)
def test_cifar_damaged_file(cifar, monkeypatch, damage, problem):
    root, *_ = cifar
    path = root / "cifar-10-batches-py" / "data_batch_3"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:1000])
    if damage == "unpicklable":  # passes the md5 check, fails when loaded
        listed = [
            [n, md5(path) if n == "data_batch_3" else m] for n, m in datasets.CIFAR10.train_list
        ]
        monkeypatch.setattr(datasets.CIFAR10, "train_list", listed)
    dm = build_datamodule(data_cfg(name="cifar10", root=str(root)), batch_size=8)
    with pytest.raises(DataError, match="data_batch_3") as info:
        dm.setup("fit")
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_cifar_resident_loader(cifar):
    root, *_ = cifar
    cfg = data_cfg(name="cifar10", root=str(root), gpu_augment=True, val_split=4)
    dm = build_datamodule(cfg, batch_size=8)
    loader = dm.train_dataloader()
    assert isinstance(loader, ResidentLoader)
    assert len(loader) == 96 // 8
    batches = list(loader)
    assert len(batches) == 12
    x, y = batches[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([b[1] for b in batches]).sort().values
    train_labels = torch.tensor([dm.train_set[i][1] for i in range(96)]).sort().values
    assert torch.equal(labels, train_labels)  # every training image once


def test_random_crop_flip_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = random_crop_flip(x, pad=4, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for o, image in zip(out, x, strict=True):
        assert crop_params(o, image, pad=4)
    assert random_crop_flip(x.float(), 4, g).dtype == torch.float32


def test_random_crop_flip_distribution():
    # Pixel values encode their position, so each output's offsets and flip can be read off.
    n, size, pad = 4000, 32, 4
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = ((rows + 1) * 100 + cols + 1).float()
    out = random_crop_flip(image.expand(n, 1, size, size), pad, torch.Generator().manual_seed(1))
    centre, right = out[:, 0, 16, 16], out[:, 0, 16, 17]
    flipped = right < centre
    oy = (centre // 100 - 1 - 16 + pad).long()
    ox = (centre % 100 - 1 - 16 + pad + flipped.long()).long()
    assert abs(flipped.float().mean().item() - 0.5) < 0.05
    for offsets in (oy, ox):
        counts = torch.bincount(offsets, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1
        assert (counts - n / 9).abs().max() < n / 9 * 0.3


def test_normalize():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_epoch_indices_shard_disjointly():
    shards = [epoch_indices(100, seed=5, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(100))
    assert torch.equal(shards[0], epoch_indices(100, seed=5, rank=0, world=2))
    assert not torch.equal(shards[0], epoch_indices(100, seed=6, rank=0, world=2))
    thirds = [epoch_indices(100, seed=5, rank=r, world=3) for r in range(3)]
    assert [len(s) for s in thirds] == [33] * 3
    assert len(set(torch.cat(thirds).tolist())) == 99


def test_resident_loader_keeps_labels_with_images():
    labels = torch.arange(40) % 10
    images = (labels * 25).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    loader = ResidentLoader(images, labels, batch_size=8, mean=MEAN, std=STD, seed=2)
    assert len(loader) == 5
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 5
        for x, y in batches:
            centre = (unnormalize(x)[:, :, 16, 16] * 255).round()  # never in the padding
            assert torch.equal(centre, (y * 25).float()[:, None].expand(-1, 3))
    assert not torch.equal(epochs[0][0][1], epochs[1][0][1])  # reshuffled per epoch


@pytest.fixture
def imagenet(tmp_path):
    """train/ with 3 classes × 4 JPEGs and val/ with 3 × 2, each class one solid colour."""
    colours = {"n01": (255, 0, 0), "n02": (0, 255, 0), "n03": (0, 0, 255)}
    for split, count in (("train", 4), ("val", 2)):
        for cls, colour in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (300 + 10 * i, 260), colour)
                image.save(tmp_path / split / cls / f"{cls}_{i}.JPEG", quality=95)
    return tmp_path


def test_imagenet_folders(imagenet):
    dm = build_datamodule(data_cfg(name="imagenet", root=str(imagenet)), batch_size=4)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 224)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 224, 224)
    assert set(y.tolist()) <= {0, 1, 2}
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 224, 224) and y.tolist() == [0, 0, 1, 1, 2, 2]
    # The brightest channel is the class colour: labels belong to their images.
    assert x.mean((2, 3)).argmax(1).tolist() == y.tolist()
    assert len(list(dm.analysis_train_dataloader(5, seed=0))) == 12 // 5


def test_imagenet_missing_or_empty_folders(imagenet, tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        build_datamodule(data_cfg(name="imagenet", root=str(tmp_path / "nowhere")), batch_size=4)
    for image in (imagenet / "val" / "n02").iterdir():
        image.unlink()
    dm = build_datamodule(data_cfg(name="imagenet", root=str(imagenet)), batch_size=4)
    with pytest.raises(DataError, match="n02"):
        dm.setup("fit")
    for folder in (imagenet / "val").iterdir():
        for image in folder.iterdir():
            image.unlink()
        folder.rmdir()
    (imagenet / "val").rmdir()
    dm = build_datamodule(data_cfg(name="imagenet", root=str(imagenet)), batch_size=4)
    with pytest.raises(DataError, match=str(imagenet / "val")):
        dm.setup("fit")


def test_digits_split():
    dm = build_datamodule(data_cfg(name="digits", seed=3), batch_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.test_set)) == (1297, 500)
    x_train, y_train = dm.train_set.tensors
    assert abs(x_train.mean().item()) < 1e-4 and abs(x_train.std().item() - 1) < 1e-3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 9
    assert torch.bincount(dm.test_set.tensors[1]).min() >= 45  # stratified
    same = build_datamodule(data_cfg(name="digits", seed=3), batch_size=32)
    same.setup("test")
    assert torch.equal(same.test_set.tensors[0], dm.test_set.tensors[0])
    other = build_datamodule(data_cfg(name="digits", seed=4), batch_size=32)
    other.setup("test")
    assert not torch.equal(other.test_set.tensors[1], dm.test_set.tensors[1])
    held = build_datamodule(data_cfg(name="digits", seed=3, val_split=97), batch_size=32)
    held.setup("fit")
    assert (len(held.train_set), len(held.val_set)) == (1200, 97)


def test_synthetic_shapes():
    cfg = data_cfg(name="synthetic", image_size=16, num_classes=7, synthetic_size=64)
    dm = build_datamodule(cfg, batch_size=8)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (7, 3, 16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.max() < 7
    assert len(dm.test_set) == 16 and dm.val_set is dm.test_set
    with pytest.raises(DataError, match="val_split"):
        build_datamodule(data_cfg(name="synthetic", val_split=64), batch_size=8).setup("fit")


def test_unknown_name():
    with pytest.raises(DataError, match="mnist"):
        build_datamodule(data_cfg(name="mnist"), batch_size=8)


class _Recorder(L.LightningModule):
    """Records the labels of each training batch by epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 10)
        self.labels: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.labels.setdefault(self.current_epoch, []).append(y)
        return torch.nn.functional.cross_entropy(self.linear(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_cifar_resident_loader_under_a_trainer(cifar):
    root, _, train_y, _, _ = cifar
    dm = build_datamodule(data_cfg(name="cifar10", root=str(root), gpu_augment=True), batch_size=10)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    epochs = [torch.cat(model.labels[e]) for e in (0, 1)]
    for labels in epochs:
        assert torch.equal(labels.sort().values, torch.tensor(train_y).sort().values)
    assert not torch.equal(epochs[0], epochs[1])
