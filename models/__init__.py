"""Flax ports of the diffusers UNets (in progress) and the DDPM/DDIM samplers (`models.schedulers`)."""
