"""Generators: the DDPM++ UNet of DPDM/PrivImage with its official sizes by name."""

from privimage.models.unet import PRESETS, UNet, UNetConfig, build_unet, count_parameters

__all__ = ["PRESETS", "UNet", "UNetConfig", "build_unet", "count_parameters"]
