"""from_pretrained / save_pretrained keywords with diffusers' meaning, against live diffusers: dtypes, variants,
low_cpu_mem_usage, device_map, sharded checkpoints in both directions, the hub cache, and diffusers' EMA folders."""

import json
import os
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from ddpm import DDPMPipeline, Pipeline, UNet, UNet2DModel
from ddpm.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

TINY = dict(sample_size=8, block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
SHARD = "20KB"  # the tiny UNet holds about 50 KB of float32 weights: a few shards


@pytest.fixture
def reference(tmp_path):
    """diffusers' UNet2DModel with seeded random weights, saved as a plain folder."""
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**TINY).eval()
    model.save_pretrained(tmp_path / "ref")
    return model, tmp_path / "ref"


def assert_same_weights(ours, theirs, dtype=torch.float32):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == dtype, key
        torch.testing.assert_close(a[key], b[key].to(dtype), rtol=0, atol=0, msg=key)


def same_output(ours, theirs):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 5).sample, theirs(x, 5).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
@pytest.mark.parametrize("spelling", ["torch_dtype", "dtype"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_and_low_cpu_mem_usage_as_diffusers(reference, spelling, dtype, low_cpu_mem_usage):
    _, path = reference
    kwargs = {spelling: dtype, "low_cpu_mem_usage": low_cpu_mem_usage}
    theirs = diffusers.UNet2DModel.from_pretrained(path, **kwargs)
    ours = UNet2DModel.from_pretrained(path, **kwargs)
    assert ours.dtype == theirs.dtype == dtype
    assert not ours.training and not theirs.training
    assert_same_weights(ours, theirs, dtype)


def test_low_cpu_mem_usage_builds_on_meta_without_random_init(reference, monkeypatch):
    _, path = reference
    inits = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: inits.append(t.device.type) or t)
    UNet.from_pretrained(path)  # default True: every layer built on the meta device
    assert inits and set(inits) == {"meta"}
    inits.clear()
    UNet.from_pretrained(path, low_cpu_mem_usage=False)  # built for real, then overwritten
    assert inits and set(inits) == {"cpu"}


def test_variant_both_directions(reference, tmp_path):
    theirs, path = reference
    ours = UNet.from_pretrained(path)
    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    assert (tmp_path / "ours" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "ours" / WEIGHTS_NAME).exists()
    same_output(diffusers.UNet2DModel.from_pretrained(tmp_path / "ours", variant="fp16"), theirs)
    theirs.save_pretrained(tmp_path / "theirs", variant="ema")
    same_output(UNet.from_pretrained(tmp_path / "theirs", variant="ema"), theirs)
    # No plain weights: an OSError that names the folder and the variant it does hold (diffusers' first words kept)
    with pytest.raises(OSError, match="Error no file named diffusion_pytorch_model.bin found in directory") as e:
        UNet.from_pretrained(tmp_path / "theirs")
    assert "variant='ema'" in str(e.value)
    with pytest.raises(OSError, match="variant='ema'"):
        UNet.from_pretrained(tmp_path / "theirs", variant="fp16")
    with pytest.raises(ValueError, match="variant"):
        UNet.from_pretrained(tmp_path / "theirs", variant="../x")


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoints_both_directions(reference, tmp_path, variant):
    theirs, path = reference
    index_name = WEIGHTS_INDEX_NAME if variant is None else f"diffusion_pytorch_model.safetensors.index.{variant}.json"
    UNet.from_pretrained(path).save_pretrained(tmp_path / "ours", max_shard_size=SHARD, variant=variant)
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size=SHARD, variant=variant)
    # the same files and the same index as diffusers writes
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert index_name in names and sum(n.endswith(".safetensors") for n in names) > 1
    ours_index = json.loads((tmp_path / "ours" / index_name).read_text())
    assert ours_index == json.loads((tmp_path / "theirs" / index_name).read_text())
    # each library loads the other's shards
    same_output(diffusers.UNet2DModel.from_pretrained(tmp_path / "ours", variant=variant), theirs)
    same_output(UNet.from_pretrained(tmp_path / "theirs", variant=variant), theirs)
    # saving again unsharded into the same folder removes the shards and the index (no stale mix)
    UNet.from_pretrained(path).save_pretrained(tmp_path / "ours", variant=variant)
    left = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert left == ["config.json", WEIGHTS_NAME if variant is None else f"diffusion_pytorch_model.{variant}.safetensors"]


def test_max_shard_size_accepts_bytes_and_refuses_nonsense(reference, tmp_path):
    _, path = reference
    unet = UNet.from_pretrained(path)
    unet.save_pretrained(tmp_path / "a", max_shard_size=20 * 1000)
    assert (tmp_path / "a" / WEIGHTS_INDEX_NAME).is_file()
    with pytest.raises(ValueError, match="max_shard_size"):
        unet.save_pretrained(tmp_path / "b", max_shard_size="lots")


def test_safe_serialization_false_is_refused_with_the_reason(reference, tmp_path):
    _, path = reference
    with pytest.raises(ValueError, match="safetensors only.*run arbitrary code"):
        UNet.from_pretrained(path).save_pretrained(tmp_path / "x", safe_serialization=False)
    with pytest.raises(ValueError, match="safetensors only"):
        Pipeline(UNet.from_pretrained(path), diffusers.DDPMScheduler()).save_pretrained(
            tmp_path / "y", safe_serialization=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    UNet.from_pretrained(path).save_pretrained(tmp_path / "z", safe_serialization=True)
    assert (tmp_path / "z" / WEIGHTS_NAME).is_file()


def test_use_safetensors(reference, tmp_path):
    theirs, _ = reference
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)  # diffusers writes a pickle; we only read it
    same_output(UNet.from_pretrained(tmp_path / "bin"), theirs)
    same_output(UNet.from_pretrained(tmp_path / "bin", use_safetensors=False), theirs)
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
        UNet.from_pretrained(tmp_path / "bin", use_safetensors=True)


def test_config_overrides_and_unknown_keywords(reference):
    _, path = reference
    assert UNet.from_pretrained(path, sample_size=16).config.sample_size == \
        diffusers.UNet2DModel.from_pretrained(path, sample_size=16).config.sample_size == 16
    with pytest.raises(TypeError, match="'proxies'"):
        UNet.from_pretrained(path, proxies={"http": "x"})
    with pytest.raises(TypeError, match="'low_cpu_mem'"):
        Pipeline.from_pretrained(path, low_cpu_mem=True)
    with pytest.raises(TypeError, match="safe_serialisation"):
        UNet.from_pretrained(path).save_pretrained(path, safe_serialisation=True)
    with pytest.raises(TypeError, match="torch_dtype"):
        UNet.from_pretrained(path, torch_dtype="float16")
    with pytest.raises(ValueError, match="disagree"):
        UNet.from_pretrained(path, torch_dtype=torch.float16, dtype=torch.bfloat16)


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}])
def test_device_map_one_device(reference, device_map):
    theirs, path = reference
    ours = UNet.from_pretrained(path, device_map=device_map)
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    same_output(ours, theirs)


def test_device_map_errors(reference):
    _, path = reference
    with pytest.raises(ValueError, match="'auto'.*one"):
        UNet.from_pretrained(path, device_map="auto")
    with pytest.raises(ValueError, match="not a device available here"):
        UNet.from_pretrained(path, device_map="cuda:99")
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True"):
        UNet.from_pretrained(path, device_map="cpu", low_cpu_mem_usage=False)


def test_pipeline_passes_keywords_to_its_components(tmp_path):
    torch.manual_seed(0)
    theirs = diffusers.DDPMPipeline(diffusers.UNet2DModel(**TINY), diffusers.DDPMScheduler(num_train_timesteps=20))
    theirs.save_pretrained(tmp_path / "theirs", variant="fp16")
    ours = DDPMPipeline.from_pretrained(tmp_path / "theirs", variant="fp16", torch_dtype=torch.bfloat16,
                                        device_map="cpu")
    assert ours.dtype == ours.unet.dtype == torch.bfloat16 and ours.device.type == "cpu"
    assert_same_weights(ours.unet, theirs.unet, torch.bfloat16)
    copied = DDPMPipeline.from_pretrained(tmp_path / "theirs", variant="fp16", low_cpu_mem_usage=False)
    assert_same_weights(copied.unet, theirs.unet)
    with pytest.raises(ValueError, match="low_cpu_mem_usage=True"):
        DDPMPipeline.from_pretrained(tmp_path / "theirs", variant="fp16", low_cpu_mem_usage=False, device_map="cpu")
    per_component = Pipeline.from_pretrained(tmp_path / "theirs", variant="fp16",
                                             dtype={"unet": torch.float16, "default": torch.bfloat16})
    assert per_component.unet.dtype == torch.float16
    assert Pipeline.from_pretrained(tmp_path / "theirs", variant="fp16", dtype={"default": torch.float16}).dtype \
        == torch.float16
    with pytest.raises(ValueError, match="'vae'"):
        Pipeline.from_pretrained(tmp_path / "theirs", variant="fp16", dtype={"vae": torch.float16})
    with pytest.raises(OSError, match="variant='fp16'"):
        Pipeline.from_pretrained(tmp_path / "theirs")
    with pytest.raises(ValueError, match="the `variant=bf16`, but no such modeling files.*variant='fp16'"):
        Pipeline.from_pretrained(tmp_path / "theirs", variant="bf16")  # diffusers' error type and words
    with pytest.raises(ValueError, match="variant=bf16"):
        diffusers.DDPMPipeline.from_pretrained(tmp_path / "theirs", variant="bf16")
    # and back: our variant + shards, read by diffusers' pipeline
    ours.to(torch.float32).save_pretrained(tmp_path / "ours", variant="ema", max_shard_size=SHARD)
    assert (tmp_path / "ours" / "unet" / "diffusion_pytorch_model.safetensors.index.ema.json").is_file()
    back = diffusers.DDPMPipeline.from_pretrained(tmp_path / "ours", variant="ema")
    assert_same_weights(back.unet, ours.unet)


# ---- the hub: a hand-built huggingface_hub cache stands in for downloaded repos ------------------------------

def fake_hub_cache(cache: Path, repo_id: str, folders: dict[str, Path]) -> None:
    """A huggingface_hub cache holding ``repo_id`` at each revision name -> the files of a local folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for i, (revision, folder) in enumerate(folders.items()):
        commit = f"{i:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        snapshot = repo / "snapshots" / commit
        for file in folder.rglob("*"):
            if file.is_file():
                target = snapshot / file.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())


def test_hub_repo_from_the_cache_with_revision_and_local_files_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    pipes = {}
    for revision, steps in (("main", 20), ("v2", 30)):
        pipes[revision] = diffusers.DDPMPipeline(diffusers.UNet2DModel(**TINY),
                                                 diffusers.DDPMScheduler(num_train_timesteps=steps))
        pipes[revision].save_pretrained(tmp_path / revision)
    fake_hub_cache(tmp_path / "cache", "someone/tiny-ddpm", {r: tmp_path / r for r in pipes})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for revision, pipe in pipes.items():
        kwargs = dict(cache_dir=tmp_path / "cache", revision=revision, local_files_only=True)
        ours = Pipeline.from_pretrained("someone/tiny-ddpm", **kwargs)
        assert ours.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps
        assert_same_weights(ours.unet, pipe.unet)
        assert_same_weights(UNet.from_pretrained("someone/tiny-ddpm", subfolder="unet", **kwargs), pipe.unet)
        assert UNet.load_config("someone/tiny-ddpm", subfolder="unet", **kwargs) == \
            diffusers.UNet2DModel.load_config("someone/tiny-ddpm", subfolder="unet", **kwargs)
    with pytest.raises(OSError, match="revision 'v3'.*pass a local folder path instead"):
        UNet.from_pretrained("someone/tiny-ddpm", subfolder="unet", cache_dir=tmp_path / "cache", revision="v3")
    with pytest.raises(FileNotFoundError, match="no file named diffusion_pytorch_model.fp16.* someone/tiny-ddpm/unet"):
        UNet.from_pretrained("someone/tiny-ddpm", subfolder="unet", cache_dir=tmp_path / "cache", variant="fp16",
                             use_safetensors=True)
    with pytest.raises(FileNotFoundError, match="the cached copy of hub repo 'someone/tiny-ddpm' has no vae/config"):
        UNet.from_pretrained("someone/tiny-ddpm", subfolder="vae", cache_dir=tmp_path / "cache")


def test_hub_repo_in_the_single_folder_layout_of_the_google_repos(tmp_path, monkeypatch):
    """google/ddpm-* repos: no unet/ subfolder. Offline, probing for files the snapshot lacks must not fail."""
    torch.manual_seed(0)
    theirs = diffusers.DDPMPipeline(diffusers.UNet2DModel(**TINY), diffusers.DDPMScheduler(num_train_timesteps=20))
    theirs.unet.save_pretrained(tmp_path / "flat")
    theirs.scheduler.save_pretrained(tmp_path / "flat")
    fake_hub_cache(tmp_path / "cache", "google/ddpm-tiny", {"main": tmp_path / "flat"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = Pipeline.from_pretrained("google/ddpm-tiny", cache_dir=tmp_path / "cache")
    assert_same_weights(ours.unet, theirs.unet)
    assert ours.scheduler.config.num_train_timesteps == 20


def test_hub_keywords_reach_huggingface_hub(tmp_path, monkeypatch):
    """token, revision, cache_dir, local_files_only and force_download are passed to hf_hub_download."""
    import huggingface_hub

    torch.manual_seed(0)
    diffusers.UNet2DModel(**TINY).save_pretrained(tmp_path / "repo")
    calls = []

    def fake_download(repo_id, filename, subfolder=None, **kwargs):
        calls.append(dict(repo_id=repo_id, filename=filename, **kwargs))
        path = tmp_path / "repo" / filename
        if not path.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not found")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = dict(cache_dir=str(tmp_path / "c"), revision="abc", token="hf_secret", local_files_only=False,
               force_download=True)
    UNet.from_pretrained("someone/private-unet", **hub)
    assert {c["filename"] for c in calls} >= {"config.json", WEIGHTS_NAME}
    for call in calls:
        assert call["repo_id"] == "someone/private-unet"
        assert {k: call[k] for k in hub} == hub


def test_offline_error_names_the_way_out(tmp_path):
    """What a user sees with HF_HUB_OFFLINE=1 and a repo that was never downloaded: one line, no traceback."""
    import subprocess
    import sys

    code = ("from ddpm import DDPMPipeline\n"
            "try:\n"
            "    DDPMPipeline.from_pretrained('google/ddpm-cifar10-32', cache_dir=%r)\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, e)\n") % str(tmp_path / "empty-cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("OSError 'google/ddpm-cifar10-32' is not a local folder")
    assert "offline" in line and "pass a local folder path instead" in line


# ---- diffusers' EMA folders (contract 1) -------------------------------------------------------------------

def test_diffusers_ema_folder_loads_and_only_its_keys_are_ignored(tmp_path):
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**TINY)
    ema = EMAModel(model.parameters(), model_cls=diffusers.UNet2DModel, model_config=model.config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    ema.step(model.parameters())
    ema.save_pretrained(tmp_path / "unet_ema")
    config = json.loads((tmp_path / "unet_ema" / "config.json").read_text())
    ema_keys = {"decay", "inv_gamma", "min_decay", "optimization_step", "power", "update_after_step",
                "use_ema_warmup"}
    assert ema_keys <= set(config)
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet_ema")
    ours = UNet.from_pretrained(tmp_path / "unet_ema")
    assert_same_weights(ours, theirs)
    # from_config reports the EMA keys as diffusers does, and diffusers' EMAModel can load through our class
    _, unused = UNet.from_config(UNet.load_config(tmp_path / "unet_ema"), return_unused_kwargs=True)
    _, their_unused = diffusers.UNet2DModel.from_config(
        diffusers.UNet2DModel.load_config(tmp_path / "unet_ema"), return_unused_kwargs=True)
    assert unused == {k: v for k, v in their_unused.items() if not k.startswith("_")}
    restored = EMAModel.from_pretrained(tmp_path / "unet_ema", model_cls=UNet2DModel)
    assert restored.optimization_step == ema.optimization_step == 1
    # a key outside that list is still an error
    config["decay_rate"] = 0.5
    (tmp_path / "unet_ema" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="decay_rate"):
        UNet.from_pretrained(tmp_path / "unet_ema")


def test_variant_weights_in_fp16_file_load_to_requested_dtype(reference, tmp_path):
    theirs, _ = reference
    theirs.to(torch.float16).save_pretrained(tmp_path / "half", variant="fp16")
    theirs.float()
    ours = UNet.from_pretrained(tmp_path / "half", variant="fp16")  # float32 unless asked, as diffusers
    assert ours.dtype == torch.float32 == diffusers.UNet2DModel.from_pretrained(tmp_path / "half",
                                                                               variant="fp16").dtype
    half = UNet.from_pretrained(tmp_path / "half", variant="fp16", torch_dtype=torch.float16)
    np.testing.assert_array_equal(half.conv_in.weight.detach().numpy(),
                                  theirs.conv_in.weight.detach().half().numpy())
