"""Training data: the bundled subset, folders with bad files, and the script's preprocessing."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ddpm import data


def test_embedded_subset_is_balanced_fashion_mnist():
    source = data.EmbeddedImages()
    assert len(source) == 5000
    assert source.pixels.shape == (5000, 28, 28) and source.pixels.dtype == np.uint8
    assert np.bincount(source.labels).tolist() == [500] * 10
    assert (data.EMBEDDED_DIR / "COPYRIGHT").is_file() and (data.EMBEDDED_DIR / "README.md").is_file()
    image = source.open(0)
    assert image.size == (28, 28) and image.mode == "L"
    assert data.readable_rows(source) == list(range(5000))


def test_center_crop_pipeline_matches_torchvision_compose():
    # The script's transforms with --center_crop: Resize(bilinear), CenterCrop, ToTensor, Normalize([0.5], [0.5]).
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((30, 44, 3)) * 255).astype("uint8"))
    reference = transforms.Compose([
        transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(16), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    ours = data.Preprocess(16, center_crop=True)(image, torch.Generator().manual_seed(0))
    assert ours.shape == (3, 16, 16)
    assert torch.equal(ours, reference(image))
    assert ours.min() >= -1 and ours.max() <= 1


def test_random_crop_and_flip_come_from_the_generator():
    rng = np.random.default_rng(1)
    image = Image.fromarray((rng.random((16, 40, 3)) * 255).astype("uint8"))
    pre = data.Preprocess(16, random_flip=True)
    outs = [pre(image, torch.Generator().manual_seed(s)) for s in range(6)]
    again = [pre(image, torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))
    assert len({o.numpy().tobytes() for o in outs}) > 1  # different seeds crop/flip differently
    # Each output is some 16x16 window of the resized image, possibly mirrored.
    full = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(image))  # already 16 high
    windows = [full[:, :, j:j + 16] for j in range(40 - 16 + 1)]
    for o in outs:
        assert any(torch.equal(o, w) or torch.equal(o, w.flip(-1)) for w in windows)


def test_grayscale_becomes_rgb_and_16_bit_keeps_precision():
    gray = Image.fromarray(np.full((8, 8), 128, np.uint8), mode="L")
    x = data.Preprocess(8, center_crop=True)(gray, torch.Generator())
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.full_like(x, 128 / 255 * 2 - 1))
    # A 16-bit value between two 8-bit levels survives --preserve_input_precision.
    value = 40000
    deep = Image.fromarray(np.full((8, 8), value, np.uint16))
    x = data.Preprocess(8, center_crop=True, preserve_input_precision=True)(deep, torch.Generator())
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.full_like(x, value / 65535 * 2 - 1))


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = data.EpochSampler(10, seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(p for p, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    s.set_epoch(1)
    second = list(s)
    assert [p for p, _ in second] != [p for p, _ in first]
    fresh = data.EpochSampler(10, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == second


def test_folder_with_corrupt_image_skips_it_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = data.open_image_folder(str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(source) == 4
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        rows = data.readable_rows(source)
    assert len(rows) == 3
    assert "broken.png" in caplog.text
    dataset = data.TrainDataset(source, rows, data.Preprocess(8, center_crop=True), seed=0)
    item = dataset[(2, 0)]
    assert item["input"].shape == (3, 8, 8) and item["index"] == rows[2]


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_images", "only_corrupt"])
def test_bad_folders_are_one_line_errors(tmp_path, case):
    folder = tmp_path / "d"
    if case == "file":
        folder.write_text("x")
    elif case != "missing":
        folder.mkdir()
    if case == "no_images":
        (folder / "notes.txt").write_text("hello")
    if case == "only_corrupt":
        (folder / "a.png").write_bytes(b"nope")
        (folder / "b.jpg").write_bytes(b"")
    expected = {"missing": "does not exist", "file": "is not a folder", "empty": "is empty",
                "no_images": "holds no image files", "only_corrupt": "no readable images"}[case]
    with pytest.raises(data.DataError, match=expected) as info:
        source = data.open_image_folder(str(folder), cache_dir=str(tmp_path / "cache"))
        data.readable_rows(source)
    assert "\n" not in str(info.value)


def test_unreachable_hub_dataset_suggests_train_data_dir():
    with pytest.raises(data.DataError, match="--train_data_dir") as info:
        data.open_dataset("someone/some-dataset")  # HF_HUB_OFFLINE=1 in tests
    assert "Hub" in str(info.value)
    with pytest.raises(data.DataError, match="does not exist"):
        data.open_dataset("./no/such/dataset")


def test_dataset_name_accepts_a_local_dataset_path(tmp_path):
    folder = tmp_path / "local_ds"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((6, 6, 3), 100 * i, np.uint8)).save(folder / f"{i}.png")
    source = data.open_dataset(str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(source) == 2 and source.column == "image"
    assert source.open(1).size == (6, 6)
