"""visionkit: train, fine-tune, evaluate, explain and ship image models. Nothing runs at import."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: `import visionkit` stays fast (no torch import) and has no side effects
    if name in ("train", "load", "evaluate_checkpoint", "Predictor"):
        from . import api
        return getattr(api, name)
    if name in ("create_model", "list_models"):
        from . import models
        return getattr(models, name)
    raise AttributeError(f"module 'visionkit' has no attribute {name!r}")


__all__ = ["Predictor", "__version__", "create_model", "evaluate_checkpoint", "list_models", "load", "train"]
