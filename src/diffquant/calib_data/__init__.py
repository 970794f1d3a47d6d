"""Calibration data: the denoiser's named inputs along sampling trajectories, stored as safetensors shards."""

from diffquant.calib_data.collect import CalibConfig, CalibSet, check_calib, collect, load_calib

__all__ = ["CalibConfig", "CalibSet", "check_calib", "collect", "load_calib"]
