"""ddpm_fast: a fast, trustworthy DDPM engine (Ho et al. 2020).

Public API: schedules, the U-Net and its presets, samplers, the training loss, checkpoints.
"""

from ddpm_fast import engine
from ddpm_fast.adm import ADMConfig, ADMUNet, FastADMUNet
from ddpm_fast.base import keep_freed_memory
from ddpm_fast.checkpoint import CheckpointError, load_pretrained, load_schedule, save_pretrained
from ddpm_fast.classifier import ClassifierConfig, EncoderUNet, classifier_grad
from ddpm_fast.config import PRESETS, UNetConfig
from ddpm_fast.families import FAMILIES, ModelFamily, family_of, register_family
from ddpm_fast.losses import training_loss
from ddpm_fast.openai import load_openai, load_openai_classifier
from ddpm_fast.samplers import DDIMSampler, DDPMSampler, RunOptions, SamplingPlan, to_uint8
from ddpm_fast.schedule import NoiseSchedule, openai_timesteps
from ddpm_fast.solvers import (
    SAMPLERS,
    DEISSampler,
    DPMSolverSampler,
    HeunSampler,
    IPNDMSampler,
    PLMSSampler,
    UniPCSampler,
)
from ddpm_fast.unet import FastUNet, UNet, compile_model

__version__ = "0.1.0"

__all__ = [
    "ClassifierConfig",
    "EncoderUNet",
    "classifier_grad",
    "ADMConfig",
    "ADMUNet",
    "FastADMUNet",
    "FAMILIES",
    "PRESETS",
    "CheckpointError",
    "DDIMSampler",
    "DEISSampler",
    "DPMSolverSampler",
    "DDPMSampler",
    "FastUNet",
    "HeunSampler",
    "IPNDMSampler",
    "ModelFamily",
    "NoiseSchedule",
    "PLMSSampler",
    "RunOptions",
    "SAMPLERS",
    "SamplingPlan",
    "UNet",
    "UNetConfig",
    "UniPCSampler",
    "compile_model",
    "engine",
    "family_of",
    "keep_freed_memory",
    "load_openai",
    "load_openai_classifier",
    "load_pretrained",
    "openai_timesteps",
    "register_family",
    "load_schedule",
    "save_pretrained",
    "to_uint8",
    "training_loss",
]
