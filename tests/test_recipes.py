"""The README's recipes, checked against the code: a new solver is its class (and its test), a new model family
its module and one table entry (and its tests), nothing else.

The toy solver and the toy family live in this file only: the solver registers itself by subclassing, the
family by one register_family call, and the commands offer them without an edit anywhere in the package.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import randomize_

from ddpm_fast import NoiseSchedule, UNet, UNetConfig, load_pretrained, save_pretrained
from ddpm_fast import sample as sample_cli
from ddpm_fast import train as train_cli
from ddpm_fast.families import FAMILIES, ModelFamily, family_of, register_family, unregister_family
from ddpm_fast.plan import DenoiserConfig
from ddpm_fast.samplers import SAMPLERS, DDIMSampler, Sampler
from ddpm_fast.schedule import dpm_timesteps
from ddpm_fast.solvers import CompiledSampler, Trace


def _toy_euler_class():
    class ToyEuler(CompiledSampler):
        """Euler on the probability-flow ODE, written on the trace's symbols: deterministic DDIM."""

        cli_name = "toy-euler"
        cli_help = "a recipe's Euler"
        default_steps = 3
        form = "eps"

        def __init__(self, schedule: NoiseSchedule, num_steps: int = 3, spacing: str = "linspace"):
            ts = dpm_timesteps(schedule.num_timesteps, num_steps, spacing)
            acp = schedule.alphas_cumprod.double().tolist()
            tr = Trace(len(ts), "eps")
            x = tr.start()
            for i, t in enumerate(ts):
                x0, eps = tr.evaluate(x, t, acp[t] ** 0.5, (1 - acp[t]) ** 0.5)
                nxt = acp[ts[i + 1]] if i + 1 < len(ts) else 1.0
                x = nxt**0.5 * x0 + (1 - nxt) ** 0.5 * eps
            tr.finish(x)
            self._compile(schedule, tr, 0, False)

    return ToyEuler


@pytest.fixture
def toy_solver():
    cls = _toy_euler_class()
    yield cls
    SAMPLERS.pop(cls.cli_name, None)


@pytest.fixture
def tiny_model(tmp_path):
    path = tmp_path / "tiny_model"
    save_pretrained(randomize_(UNet(UNetConfig.from_name("tiny")), 0.05), path, schedule=NoiseSchedule.linear(40))
    return str(path)


def test_a_new_solver_is_its_class_alone(toy_solver, tiny_model, tmp_path, capsys):
    assert SAMPLERS["toy-euler"] is toy_solver
    help_text = sample_cli.build_parser().format_help()
    assert "toy-euler: a recipe's Euler" in " ".join(help_text.split())
    assert "3 for toy-euler" in " ".join(help_text.split())  # its default steps, from the class
    out = tmp_path / "toy"
    assert sample_cli.main(["--checkpoint", tiny_model, "--sampler", "toy-euler", "--num-samples", "3",
                            "--no-progress", "--out", str(out)]) == 0
    assert "toy-euler 3 steps" in capsys.readouterr().out
    with np.load(out / "samples_3x8x8x3.npz") as f:
        got = f["arr_0"]
    # Deterministic DDIM on the same timesteps is the same update: the same images.
    schedule = NoiseSchedule.linear(40)
    ddim = DDIMSampler(schedule, timesteps=dpm_timesteps(40, 3, "linspace"), clip_denoised=False)
    toy = toy_solver(schedule, 3)
    model = randomize_(UNet(UNetConfig.from_name("tiny")), 0.05)
    a = toy.sample(model, (2, 3, 8, 8), seed=1, progress=False)
    b = ddim.sample(model, (2, 3, 8, 8), seed=1, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got.shape == (3, 8, 8, 3)


def test_the_cli_refuses_what_a_solver_does_not_declare(toy_solver, tiny_model, tmp_path, capsys):
    for flag in (["--order", "2"], ["--eta", "0.5"], ["--variance", "fixed_large"]):
        with pytest.raises(SystemExit):
            sample_cli.main(["--checkpoint", tiny_model, "--sampler", "toy-euler", *flag, "--out", str(tmp_path)])
        assert "toy-euler" in capsys.readouterr().err


def test_a_sampler_name_is_taken_once():
    with pytest.raises(ValueError, match="sampler name 'ddim' is taken"):
        type("OtherDDIM", (Sampler,), {"cli_name": "ddim"})
    with pytest.raises(ValueError, match="default_order"):
        type("NoDefault", (Sampler,), {"cli_name": "no-default", "orders": (1, 2)})
    assert "no-default" not in SAMPLERS


def test_every_registered_sampler_declares_itself():
    assert list(SAMPLERS)[:2] == ["ddpm", "ddim"]
    assert {"dpm++", "dpm++sde", "unipc", "deis", "plms", "heun", "ipndm"} <= set(SAMPLERS)
    for name, cls in SAMPLERS.items():
        assert cls.cli_name == name and cls.cli_help, name
        assert cls.default_spacing in ("leading", "trailing", "linspace"), name
        assert not cls.orders or cls.default_order in cls.orders, name


def _toy_family():
    """A model family that lives in this file only: its config, its model, one table entry."""

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        sample_size: int = 8
        in_channels: int = 3
        width: int = 8
        learn_sigma: bool = False
        num_classes: int | None = None

        def to_dict(self) -> dict:
            return dataclasses.asdict(self)

        @classmethod
        def from_dict(cls, d: dict):
            return cls(**d)

    class ToyNet(torch.nn.Module):
        """eps from a 3x3 convolution, a time embedding and a second convolution."""

        compute_dtype = None

        def __init__(self, config: ToyConfig):
            super().__init__()
            self.config = config
            self.conv_in = torch.nn.Conv2d(config.in_channels, config.width, 3, padding=1)
            self.time = torch.nn.Linear(1, config.width)
            self.conv_out = torch.nn.Conv2d(config.width, config.in_channels, 3, padding=1)

        def forward(self, x, t, class_labels=None):
            t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
            h = self.conv_in(x) + self.time(t / 1000.0)[:, :, None, None]
            return self.conv_out(torch.nn.functional.silu(h))

    def config_json(config):
        return {"_class_name": "ToyNet", **config.to_dict()}

    def config_from_json(raw, source):
        return ToyConfig.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})

    return ModelFamily(name="toy", config_class=ToyConfig, model_class=ToyNet, class_name="ToyNet",
                       config_json=config_json, config_from_json=config_from_json,
                       presets={"toy-small": ToyConfig(in_channels=1)})


@pytest.fixture
def toy_family():
    family = register_family(_toy_family())
    yield family
    unregister_family(family.name)


def test_a_new_family_is_its_module_and_one_table_entry(toy_family, tmp_path, capsys):
    """Saved, loaded, sampled, trained and resumed through the same commands as the built-in families."""
    model = randomize_(toy_family.model_class(toy_family.presets["toy-small"]), 0.1)
    folder = tmp_path / "toy_model"
    save_pretrained(model, folder, schedule=NoiseSchedule.linear(30))
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "ToyNet"
    loaded = load_pretrained(folder)
    assert family_of(loaded) is toy_family and type(loaded) is toy_family.model_class
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    out = tmp_path / "samples"
    assert sample_cli.main(["--checkpoint", str(folder), "--sampler", "ddim", "--steps", "3", "--num-samples", "2",
                            "--no-progress", "--out", str(out)]) == 0
    assert (out / "samples_2x8x8x1.npz").is_file()
    run = tmp_path / "run"
    assert train_cli.main(["--data", "digits", "--config", "toy-small", "--steps", "2", "--batch-size", "4",
                           "--num-timesteps", "30", "--sample-every", "0", "--out", str(run), "--no-progress"]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["unet_config"]["_class_name"] == "ToyNet"
    assert family_of(load_pretrained(run)) is toy_family  # the exported model folder
    assert "toy-small" in train_cli.build_parser().format_help()


def test_every_family_declares_a_denoiser_config(toy_family):
    for family in FAMILIES.values():
        for name, config in family.presets.items():
            assert isinstance(config, DenoiserConfig), (family.name, name)
            assert family_of(config) is family and family.config_class.from_dict(config.to_dict()) == config


def test_a_family_name_is_taken_once():
    with pytest.raises(ValueError, match="registered already"):
        register_family(dataclasses.replace(FAMILIES["ddpm"], name="ddpm-again"))
    assert "ddpm-again" not in FAMILIES
