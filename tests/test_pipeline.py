"""Pipeline parity with diffusers' DDPMPipeline (same weights, same generator) and its folder layout."""

import json

import diffusers
import numpy as np
import pytest
import torch

from ddpm import DDIMScheduler, DDPMScheduler, Pipeline, UNet

TINY = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def reference_pipeline(tmp_path, scheduler="ddpm", **scheduler_kwargs):
    """A diffusers pipeline with seeded random weights, saved, plus ours loaded from that folder."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY)
    cls = diffusers.DDIMScheduler if scheduler == "ddim" else diffusers.DDPMScheduler
    theirs = diffusers.DDPMPipeline(unet=unet, scheduler=cls(num_train_timesteps=50, **scheduler_kwargs))
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(tmp_path / "ref")
    ours = Pipeline.from_pretrained(tmp_path / "ref")
    ours.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_same_images_as_diffusers(tmp_path, scheduler):
    theirs, ours = reference_pipeline(tmp_path, scheduler)
    assert isinstance(ours.scheduler, DDIMScheduler if scheduler == "ddim" else DDPMScheduler)
    kwargs = dict(batch_size=3, num_inference_steps=10, output_type="np")
    expected = theirs(generator=torch.Generator().manual_seed(7), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(7), **kwargs).images
    assert got.shape == expected.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def test_ddim_with_eta_matches_diffusers_ddim_pipeline(tmp_path):
    _, ours = reference_pipeline(tmp_path, "ddim")
    theirs = diffusers.DDIMPipeline.from_pretrained(tmp_path / "ref")
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(batch_size=2, generator=torch.Generator().manual_seed(3), eta=0.5, num_inference_steps=8,
                      output_type="np").images
    got = ours(batch_size=2, generator=torch.Generator().manual_seed(3), eta=0.5, num_inference_steps=8,
               output_type="np").images
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_generator_list_gives_per_sample_reproducibility(tmp_path, scheduler):
    theirs, ours = reference_pipeline(tmp_path, scheduler)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    kw = dict(num_inference_steps=6, output_type="np", eta=1.0) if scheduler == "ddim" else dict(
        num_inference_steps=6, output_type="np")
    batch = ours(batch_size=3, generator=gens([10, 11, 12]), **kw).images
    single = ours(batch_size=1, generator=gens([11]), **kw).images
    np.testing.assert_allclose(batch[1:2], single, atol=1e-6, rtol=0)
    kw.pop("eta", None)
    expected = theirs(batch_size=3, generator=gens([10, 11, 12]), **kw).images
    if scheduler == "ddpm":
        np.testing.assert_allclose(batch, expected, atol=2e-5, rtol=0)


def test_output_types_and_tuple(tmp_path):
    _, ours = reference_pipeline(tmp_path)
    pil = ours(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    pt = ours(batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.manual_seed(0)).images
    assert pt.shape == (2, 3, 8, 8) and 0 <= pt.min() and pt.max() <= 1
    (np_images,) = ours(batch_size=2, num_inference_steps=2, output_type="np", return_dict=False,
                        generator=torch.manual_seed(0))
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(pil[0]), (np_images[0] * 255).round().astype("uint8"))
    with pytest.raises(ValueError, match="output_type"):
        ours(output_type="latent")


def test_progress_bar_can_be_disabled(tmp_path, capsys):
    _, ours = reference_pipeline(tmp_path)
    ours.set_progress_bar_config(disable=False)
    ours(num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err
    ours.set_progress_bar_config(disable=True)
    ours(num_inference_steps=3)
    assert "3/3" not in capsys.readouterr().err


def test_bf16_weights_run(tmp_path):
    _, ours = reference_pipeline(tmp_path)
    ours.to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    images = ours(batch_size=2, num_inference_steps=3, output_type="pt", generator=torch.manual_seed(0)).images
    assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim"])
def test_diffusers_loads_what_we_save(tmp_path, scheduler):
    _, ours = reference_pipeline(tmp_path, scheduler)
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler" if scheduler == "ddim" else "DDPMScheduler"]
    assert sorted(p.name for p in (tmp_path / "ours" / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path / "ours")
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == index["scheduler"][1]
    expected = theirs(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.manual_seed(1)).images
    got = ours(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.manual_seed(1)).images
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)


def test_single_folder_layout_of_original_ddpm_repos(tmp_path):
    """google/ddpm-* repos: config.json, weights and scheduler_config.json side by side at the root."""
    theirs, _ = reference_pipeline(tmp_path)
    root = tmp_path / "google-style"
    theirs.unet.save_pretrained(root)
    theirs.scheduler.save_pretrained(root)
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    ours = Pipeline.from_pretrained(root)
    ours.set_progress_bar_config(disable=True)
    expected = theirs(batch_size=1, num_inference_steps=3, output_type="np", generator=torch.manual_seed(2)).images
    got = ours(batch_size=1, num_inference_steps=3, output_type="np", generator=torch.manual_seed(2)).images
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
    (root / "model_index.json").unlink()  # and without any model_index.json at all
    assert isinstance(Pipeline.from_pretrained(root).unet, UNet)


def test_component_override_and_errors(tmp_path):
    _, ours = reference_pipeline(tmp_path)
    ddim = DDIMScheduler.from_config(ours.scheduler.config)
    swapped = Pipeline.from_pretrained(tmp_path / "ref", scheduler=ddim)
    assert swapped.scheduler is ddim
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        Pipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        Pipeline.from_pretrained(tmp_path / "no-such-dir")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        Pipeline.from_pretrained(bad)


def test_hub_id_offline_says_to_use_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local folder"):
        Pipeline.from_pretrained("google/ddpm-cifar10-32")
