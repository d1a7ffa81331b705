"""catchup: Catch-up Mix and mixup baselines for timm CNNs.

Importing the package registers its CIFAR / Tiny-ImageNet models with timm (`timm.create_model("preactresnet18")`):
at once if timm is loaded, else the moment timm is imported. Waiting for timm keeps torch out of the scripts'
argument checks (`train.py --lrr 3` answers in a second, not after loading torch).
"""
import importlib.abc
import importlib.util
import sys

from catchup.errors import CatchupError

__all__ = ["CatchupError", "CatchUpMix", "MIXERS", "build_mixer", "catchup_mix"]


def __getattr__(name: str):
    # The mixers (and torch) load on first use, so the scripts check their arguments before paying for them.
    if name in __all__:
        from catchup import mix
        return getattr(mix, name)
    raise AttributeError(f"module 'catchup' has no attribute {name!r}")


class _RegisterModelsWithTimm(importlib.abc.MetaPathFinder):
    """Finds timm through the other finders and registers the model zoo right after timm's module has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            run_timm = spec.loader.exec_module

            def run_timm_then_register(module):
                run_timm(module)
                import catchup.models  # noqa: F401

            spec.loader.exec_module = run_timm_then_register
        return spec


if "timm" in sys.modules:
    import catchup.models  # noqa: F401
elif not any(isinstance(finder, _RegisterModelsWithTimm) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterModelsWithTimm())
