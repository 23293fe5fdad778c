"""Training data: the bundled subset, folders with bad files, and the script's preprocessing."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ddpm import data
from ddpm.training.dataset import EpochSampler, TrainDataset


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
    s = EpochSampler(10, seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(p for p, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    s.set_epoch(1)
    second = list(s)
    assert [p for p, _ in second] != [p for p, _ in first]
    fresh = EpochSampler(10, seed=3)
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
    dataset = TrainDataset(source, rows, data.Preprocess(8, center_crop=True), seed=0)
    item = dataset[(2, 0)]
    assert item["input"].shape == (3, 8, 8) and item["index"] == rows[2]


@pytest.mark.parametrize("layout", ["flat", "class_folders", "split_folders", "split_in_file_names", "metadata"])
def test_image_folder_holds_what_datasets_imagefolder_reads_from_the_folder(tmp_path, monkeypatch, layout):
    """The rows (files, in order) are datasets' own load_dataset("imagefolder", data_dir=...) train split, for
    plain folders (read with one "**" pattern instead of datasets' split inference: faster) and for folders whose
    names tell datasets about splits (left to its inference: only the train files)."""
    import datasets

    folder = tmp_path / "imgs"
    names = {"flat": ["a.png", "b.png", "c/d.png"], "class_folders": ["cat/1.png", "cat/2.png", "dog/1.png"],
             "split_folders": ["train/1.png", "train/2.png", "test/1.png"],
             "split_in_file_names": ["train_1.png", "train_2.png", "val_1.png"],
             "metadata": ["1.png", "2.png"]}[layout]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), 30 * i, np.uint8)).save(folder / name)
    if layout == "metadata":
        (folder / "metadata.jsonl").write_text('{"file_name": "1.png", "caption": "a"}\n'
                                               '{"file_name": "2.png", "caption": "b"}\n')
    calls, real = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    source = data.open_image_folder(str(folder), cache_dir=str(tmp_path / "cache"))
    monkeypatch.undo()
    plain = layout in ("flat", "class_folders")
    assert ("data_files" in calls[0]) == plain  # the fast path exactly where datasets would fall back to "**"
    reference = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(tmp_path / "ref"),
                                      split="train")

    def paths(dataset):
        return [row["path"] for row in dataset.cast_column("image", datasets.Image(decode=False))["image"]]

    assert [row["path"] for row in source.rows[source.column]] == paths(reference)
    expected = {"split_folders": 2, "split_in_file_names": 2}.get(layout, len(names))
    assert len(source) == expected


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


def _folder(tmp_path, images):
    """Save ``images`` (numpy arrays or PIL images) as PNG/TIFF files and open the folder as training data."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(images):
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        image.save(folder / (f"{i}.tiff" if image.mode == "F" else f"{i}.png"))
    return folder, data.open_image_folder(str(folder), cache_dir=str(tmp_path / "cache"))


def _random_rgb(rng, count, size):
    return [(rng.random((*size, 3)) * 255).astype(np.uint8) for _ in range(count)]


def test_batches_are_a_function_of_seed_epoch_and_row_whatever_the_cache_or_batching(tmp_path):
    _, source = _folder(tmp_path, _random_rgb(np.random.default_rng(0), 6, (9, 14)))
    pre = data.Preprocess(8, random_flip=True)
    cached = TrainDataset(source, range(6), pre, seed=5)
    uncached = TrainDataset(source, range(6), pre, seed=5, cache_bytes=0)
    keys = [(p, e) for e in range(3) for p in range(6)]
    together = cached.__getitems__(keys)  # one batch of all 18 keys
    one_by_one = [uncached[k] for k in reversed(keys)][::-1]
    for a, b in zip(together, one_by_one):
        assert a["index"] == b["index"] and torch.equal(a["input"], b["input"])
    epochs = [torch.stack([item["input"] for item in together[6 * e:6 * e + 6]]) for e in range(3)]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])  # new crops each epoch
    other_seed = TrainDataset(source, range(6), pre, seed=6).__getitems__(keys[:6])
    assert not all(torch.equal(a["input"], b["input"]) for a, b in zip(other_seed, together))
    # Each item is a window of its resized image (14x9 -> 12x8), maybe mirrored, in [-1, 1] as the script makes it.
    reference = transforms.Compose([transforms.Resize(8), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    for item in together:
        with source.open(item["index"]) as image:
            full = reference(image)
        windows = [full[:, :, j:j + 8] for j in range(full.shape[-1] - 7)]
        assert any(torch.equal(item["input"], w) or torch.equal(item["input"], w.flip(-1)) for w in windows)


def test_second_epoch_reads_the_cache_not_the_files(tmp_path):
    folder, source = _folder(tmp_path, _random_rgb(np.random.default_rng(1), 4, (8, 8)))
    cached = TrainDataset(source, range(4), data.Preprocess(8), seed=0)
    uncached = TrainDataset(source, range(4), data.Preprocess(8), seed=0, cache_bytes=0)
    first = cached.__getitems__([(p, 0) for p in range(4)])
    assert len(cached._cache) == 4 and len(uncached._cache) == 0
    (folder / "2.png").unlink()
    again = cached.__getitems__([(p, 1) for p in range(4)])
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(first, again))  # square: no crop, no flip
    with pytest.raises(data.DataError, match="2.png can no longer be read"):
        uncached.__getitems__([(p, 1) for p in range(4)])
    small = TrainDataset(source, [0, 1, 3], data.Preprocess(8), seed=0, cache_bytes=2 * 3 * 8 * 8)
    small.__getitems__([(p, 0) for p in range(3)])
    assert len(small._cache) == 2  # the cap: two 3x8x8 uint8 images


def test_a_worker_error_names_the_file(tmp_path):
    folder, source = _folder(tmp_path, _random_rgb(np.random.default_rng(2), 4, (8, 8)))
    rows = data.readable_rows(source)
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n changed since the check")
    dataset = TrainDataset(source, rows, data.Preprocess(8), seed=0)
    sampler = EpochSampler(len(dataset), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=1)
    with pytest.raises(data.DataError) as info:
        next(iter(loader))
    first_line = str(info.value).splitlines()[0]
    assert "3.png can no longer be read (" in first_line
    assert "DataLoader worker process 0" in first_line


def test_16_bit_and_float_images_keep_their_picture_at_8_bits_with_a_warning(tmp_path, caplog):
    ramp = np.linspace(0, 1, 8 * 8).reshape(8, 8)
    deep = Image.fromarray((ramp * 65535).astype(np.uint16))
    floats = Image.fromarray(ramp.astype(np.float32))
    folder, source = _folder(tmp_path, [deep, floats])
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        rows = data.readable_rows(source, preserve_input_precision=False)
    assert rows == [0, 1]
    assert "2 of 2 images are 16-bit or float (e.g. " in caplog.text and "0.png" in caplog.text
    assert caplog.text.count("warning") == 1
    expected = torch.from_numpy(np.round(ramp * 255) / 255 * 2 - 1).float()  # the ramp at 8 bits, in [-1, 1]
    for row in rows:
        with source.open(row) as image:
            assert image.mode in ("I;16", "F")
            x = data.Preprocess(8, center_crop=True, channels=1)(image, torch.Generator())
        torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        data.readable_rows(source, preserve_input_precision=True)
        data.readable_rows(source)
    assert caplog.text == ""


@pytest.mark.parametrize("channels", [1, 3])
def test_one_warning_counts_the_images_whose_channels_the_model_lacks(tmp_path, caplog, channels):
    rng = np.random.default_rng(3)
    gray = [(rng.random((8, 8)) * 255).astype(np.uint8) for _ in range(2)]
    _, source = _folder(tmp_path, _random_rgb(rng, 3, (8, 8)) + gray)
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        data.readable_rows(source, channels=channels)
    expected = {1: "3 of 5 images are in colour and the model takes 1 channel",
                3: "2 of 5 images are grayscale and the model takes 3 channels"}[channels]
    assert expected in caplog.text and caplog.text.count("warning") == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        assert data.readable_rows(data.EmbeddedImages(), channels=1) == list(range(5000))
    assert caplog.text == ""


@pytest.mark.parametrize("size", [(30, 44), (44, 30), (17, 17), (9, 100), (16, 16)])
def test_resize_is_torchvisions_bit_for_bit_on_images_and_tensors(size):
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(4)
    image = Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))
    pre = data.Preprocess(16)
    expected = TF.pil_to_tensor(TF.resize(image, [16], interpolation=transforms.InterpolationMode.BILINEAR))
    assert torch.equal(pre.resize(image), expected)
    precise = data.Preprocess(16, preserve_input_precision=True)
    unit = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    expected = TF.resize(unit, [16], interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)
    assert torch.equal(precise.resize(image), expected)


def test_worker_processes_change_no_batch(tmp_path):
    _, source = _folder(tmp_path, _random_rgb(np.random.default_rng(5), 10, (10, 13)))
    dataset = TrainDataset(source, range(10), data.Preprocess(8, random_flip=True), seed=3)
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(len(dataset), seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
        batches[workers] = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            batches[workers] += [b["input"] for b in loader]
    assert len(batches[0]) == 6
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
