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
