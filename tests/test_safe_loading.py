"""Loading never runs code from a checkpoint, and every bad file is an error that names it and the problem."""

import json
import os
import pickle

import pytest
import torch

from ddpm import UNet
from ddpm.checkpoint import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

TINY = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    unet = UNet(**TINY)
    unet.save_pretrained(tmp_path / "unet")
    return unet, tmp_path / "unet"


class RunsACommand:
    """Unpickling this calls os.system: what a malicious .bin would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_a_command_is_refused(saved, tmp_path):
    _, folder = saved
    marker = tmp_path / "pwned"
    (folder / WEIGHTS_NAME).unlink()
    with open(folder / LEGACY_WEIGHTS_NAME, "wb") as fh:
        pickle.dump({"conv_in.weight": RunsACommand(marker)}, fh)
    with pytest.raises(ValueError, match=f"{LEGACY_WEIGHTS_NAME}.*refused"):
        UNet.from_pretrained(folder)
    assert not marker.exists(), "the pickle's command ran"


def test_plain_tensor_bin_loads_through_weights_only(saved):
    unet, folder = saved
    (folder / WEIGHTS_NAME).unlink()
    torch.save(unet.state_dict(), folder / LEGACY_WEIGHTS_NAME)
    loaded = UNet.from_pretrained(folder)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(loaded(x, 3).sample, unet(x, 3).sample, rtol=0, atol=0)


def test_safetensors_is_preferred_over_bin(saved, tmp_path):
    """With both files present, the weights come from the safetensors file: the loaded UNet computes what the
    saved one does, not what the .bin's other weights would, and a .bin that would run a command is never read."""
    unet, folder = saved
    other = {k: v + 0.5 for k, v in unet.state_dict().items()}
    torch.save(other, folder / LEGACY_WEIGHTS_NAME)  # loadable, but other weights
    x = torch.randn(1, 3, 8, 8)
    loaded = UNet.from_pretrained(folder)
    torch.testing.assert_close(loaded(x, 3).sample, unet(x, 3).sample, rtol=0, atol=0)
    from_bin = UNet(**TINY)
    from_bin.load_state_dict(other)
    assert not torch.allclose(from_bin(x, 3).sample, unet(x, 3).sample)  # the .bin would have given other outputs
    marker = tmp_path / "pwned"
    with open(folder / LEGACY_WEIGHTS_NAME, "wb") as fh:
        pickle.dump({"conv_in.weight": RunsACommand(marker)}, fh)
    UNet.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_names_the_file(saved, damage):
    _, folder = saved
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xff" * 100, "empty": b""}[damage])
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}.*(corrupted|truncated)"):
        UNet.from_pretrained(folder)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_config_that_does_not_match_the_weights(saved):
    _, folder = saved
    edit_config(folder, block_out_channels=[8, 32])  # shapes differ
    with pytest.raises(ValueError, match="shape") as e:
        UNet.from_pretrained(folder)
    assert WEIGHTS_NAME in str(e.value)
    edit_config(folder, block_out_channels=[8, 16], layers_per_block=2)  # missing keys
    with pytest.raises(ValueError, match="missing") as e:
        UNet.from_pretrained(folder)
    assert "resnets.1" in str(e.value)
    edit_config(folder, layers_per_block=1, down_block_types=["DownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "UpBlock2D"])  # the attention weights are unexpected
    with pytest.raises(ValueError, match="unexpected") as e:
        UNet.from_pretrained(folder)
    assert "attentions" in str(e.value)


def test_unknown_class_name_and_unknown_key(saved):
    _, folder = saved
    edit_config(folder, _class_name="UNet2DConditionModel")
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        UNet.from_pretrained(folder)
    edit_config(folder, _class_name="UNet2DModel", cross_attention_dim=768)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        UNet.from_pretrained(folder)


def test_invalid_json_names_the_file(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        UNet.from_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.uint8, torch.int64])
def test_integer_or_bool_weights_name_the_tensor_and_file(saved, dtype):
    """A quantized or damaged file: a one-line ValueError, not a traceback from load_state_dict or forward."""
    from safetensors.torch import load_file, save_file

    _, folder = saved
    state = load_file(folder / WEIGHTS_NAME)
    state["conv_in.weight"] = state["conv_in.weight"].to(dtype)
    save_file(state, folder / WEIGHTS_NAME)
    for low_cpu_mem_usage in (True, False):
        with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}.*not floating point.*conv_in.weight is {dtype}"):
            UNet.from_pretrained(folder, low_cpu_mem_usage=low_cpu_mem_usage)


@pytest.mark.parametrize("name", ["config.json", "scheduler_config.json", "model_index.json",
                                  "diffusion_pytorch_model.safetensors.index.json"])
def test_deeply_nested_or_binary_json_names_the_file(tmp_path, name):
    from ddpm import DDPMScheduler, Pipeline

    torch.manual_seed(0)
    pipe = Pipeline(UNet(**TINY), DDPMScheduler(num_train_timesteps=10))
    pipe.save_pretrained(tmp_path / "p", max_shard_size="20KB")
    path = next((tmp_path / "p").rglob(name))
    for content, why in ((b"[" * 100_000 + b"]" * 100_000, "nested too deeply"), (b"\xff\xfe{}", "not UTF-8"),
                         (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply")):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.*{why}"):
            Pipeline.from_pretrained(tmp_path / "p")


def test_sharded_checkpoint_damage_names_the_file(saved, tmp_path):
    unet, _ = saved
    folder = tmp_path / "sharded"
    unet.save_pretrained(folder, max_shard_size="20KB")
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (folder / shards[-1]).rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"lists the shard {shards[-1]}, which is missing"):
        UNet.from_pretrained(folder)
    (tmp_path / "moved").rename(folder / shards[-1])
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[-1]  # the index says the tensor is elsewhere
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"does not hold what .*index.json lists.*{key}"):
        UNet.from_pretrained(folder)
    index["weight_map"][key] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="must be a .safetensors file name in the same folder"):
        UNet.from_pretrained(folder)
    index_path.write_text(json.dumps({"weight_map": []}))
    with pytest.raises(ValueError, match="weight_map"):
        UNet.from_pretrained(folder)
