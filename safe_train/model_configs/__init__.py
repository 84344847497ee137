"""Small OpenCLIP model configs shipped with safe-train (CPU tests and the offline benchmark)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).parent
_registered = False


def register_model_configs() -> None:
    """Add this folder to OpenCLIP's model-config registry (idempotent).

    `st-tiny-vit` is a 4-layer ViT on 32x32 inputs with a 3-layer text tower (7.8M parameters):
    it trains end to end on a laptop CPU in seconds, which is what tests and the benchmark need.
    """
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)
    _registered = True
