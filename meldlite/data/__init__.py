"""Files shipped inside the package: the built-in default model."""

from importlib import resources

DEFAULT_MODEL = "tinystories-moe-q4_k_m.gguf"


def default_model_path():
    """Path of the built-in default model (qwen3moe, Q4_K_M, 14.6 MB)."""
    return str(resources.files(__name__) / DEFAULT_MODEL)
