"""SAE loaders (placeholder until the format readers land)."""


def load_sae(path, format=None, device="cpu", dtype=None):
    raise NotImplementedError
