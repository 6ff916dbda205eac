"""Generators: the DDPM++ UNet of DPDM/PrivImage and the GAN of PRIVIMAGE+G, with their official sizes by name."""

from privimage.models.gan import GAN_PRESETS, Discriminator, GANConfig, Generator, build_gan
from privimage.models.unet import PRESETS, UNet, UNetConfig, build_unet, count_parameters

__all__ = ["GAN_PRESETS", "Discriminator", "GANConfig", "Generator", "PRESETS", "UNet", "UNetConfig", "build_gan",
           "build_unet", "count_parameters"]
