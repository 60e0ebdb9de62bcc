import json
import os

import pytest
import torch
from conftest import diffusers_peer, randomize_
from peers.pytorch_diffusion_model import Model as PesserModel

from ddpm_fast import CheckpointError, UNet, UNetConfig, load_pretrained, save_pretrained
from ddpm_fast.checkpoint import WEIGHTS_NAME


def _same_function(a, b, cfg, labels=None):
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        ya = a(x, t) if labels is None else a(x, t, labels)
        yb = b(x, t) if labels is None else b(x, t, class_labels=labels)
    yb = getattr(yb, "sample", yb)
    torch.testing.assert_close(ya, yb, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "digits"])
def test_save_pretrained_is_read_by_diffusers_and_back(tmp_path, name):
    UNet2DModel = diffusers_peer().UNet2DModel

    cfg = UNetConfig.from_name(name)
    model = randomize_(UNet(cfg)).eval()
    save_pretrained(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", WEIGHTS_NAME]
    labels = torch.tensor([3, cfg.num_classes]) if cfg.num_classes else None
    _same_function(model, UNet2DModel.from_pretrained(tmp_path / "m").eval(), cfg, labels)
    back = load_pretrained(tmp_path / "m")
    assert back.config == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("safe", [True, False])
def test_reads_what_diffusers_writes(tmp_path, safe):
    UNet2DModel = diffusers_peer().UNet2DModel

    twin = UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    randomize_(twin)
    twin.save_pretrained(tmp_path / "d", safe_serialization=safe)
    model = load_pretrained(tmp_path / "d")
    # diffusers' defaults (flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, eps 1e-5) come through
    assert model.config.flip_sin_to_cos and model.config.freq_shift == 0
    assert model.config.downsample_padding == 1 and model.config.attn_resolutions == (8,)
    _same_function(model, twin, model.config)


def _to_old_attention_layout(sd, conv):
    """Rename to diffusers' pre-0.14 attention keys, optionally as 1x1-conv weights."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in sd.items():
        for new, old in names.items():
            if f".{new}." in k and "attentions" in k:
                k = k.replace(f".{new}.", f".{old}.")
                if conv and v.dim() == 2:
                    v = v[:, :, None, None]
        out[k] = v
    return out


@pytest.mark.parametrize("conv", [False, True])
def test_old_attention_naming_and_conv_weights(tmp_path, conv):
    from safetensors.torch import save_file

    from ddpm_fast.config import to_diffusers_config

    cfg = UNetConfig.from_name("tiny")
    model = randomize_(UNet(cfg)).eval()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in _to_old_attention_layout(model.state_dict(), conv).items()},
              folder / WEIGHTS_NAME)
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(cfg)))
    _same_function(model, load_pretrained(folder), cfg)


def test_pytorch_diffusion_ckpt(tmp_path):
    # A cifar10-shaped pytorch_diffusion model at a quarter of the width: the layout and the
    # image-size inference are the same as for the published 4- and 6-level checkpoints.
    peer = PesserModel(ch=32, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                       dropout=0.0, in_channels=3, resolution=32).eval()
    randomize_(peer)
    torch.save(peer.state_dict(), tmp_path / "model.ckpt")
    model = load_pretrained(tmp_path / "model.ckpt")
    assert model.config.ch == 32 and model.config.ch_mult == (1, 2, 2, 2)
    assert model.config.attn_resolutions == (16,) and model.config.sample_size == 32
    _same_function(model, peer, model.config)


def test_pytorch_diffusion_256_layout_maps_every_key():
    # The 256px models: 6 levels, attention at 16. Checked by key names and shapes only (113M params).
    with torch.device("meta"):
        peer = PesserModel(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                           attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=256)
        ours = UNet(UNetConfig.from_name("celebahq256"))
    from ddpm_fast.checkpoint import _from_pytorch_diffusion_keys

    mapped = _from_pytorch_diffusion_keys(peer.state_dict(), 6)
    own = ours.state_dict()
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        assert v.numel() == own[k].numel(), k


def test_errors_name_the_problem(tmp_path):
    cfg = UNetConfig.from_name("tiny")
    model = randomize_(UNet(cfg))
    save_pretrained(model, tmp_path / "good")

    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")

    def variant(name, mutate):
        from safetensors.torch import load_file, save_file

        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
        sd = load_file(tmp_path / "good" / WEIGHTS_NAME)
        mutate(sd)
        save_file(sd, folder / WEIGHTS_NAME)
        return folder

    missing = variant("missing", lambda sd: sd.pop("conv_in.weight"))
    with pytest.raises(CheckpointError, match="missing keys: conv_in.weight"):
        load_pretrained(missing)
    extra = variant("extra", lambda sd: sd.update(bogus=torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected keys: bogus"):
        load_pretrained(extra)
    shaped = variant("shaped", lambda sd: sd.update({"conv_out.bias": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"conv_out.bias: checkpoint \(4,\) vs model \(3,\)"):
        load_pretrained(shaped)

    corrupt = variant("corrupt", lambda sd: None)
    data = (corrupt / WEIGHTS_NAME).read_bytes()
    (corrupt / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(corrupt)
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read JSON config"):
        load_pretrained(corrupt)

    bad_cfg = variant("badcfg", lambda sd: None)
    d = json.loads((bad_cfg / "config.json").read_text())
    d["act_fn"] = "gelu"
    (bad_cfg / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="unsupported act_fn='gelu'"):
        load_pretrained(bad_cfg)

    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_pretrained(tmp_path / "junk.ckpt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a pytorch_diffusion checkpoint"):
        load_pretrained(tmp_path / "other.ckpt")
