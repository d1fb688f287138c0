"""Flax ports of the diffusers UNets and the DDPM/DDIM samplers."""
