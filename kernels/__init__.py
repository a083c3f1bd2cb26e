"""Triton kernels of gradsae, installed as ``gradsae.kernels``."""
