"""The engine. ``bench.load_cell`` and ``bench.load_exported`` give back trained models
(bench/reuse.py); they are imported on first use, so ``import bench`` stays torch-free for the
reporter."""

__all__ = ["load_cell", "load_exported", "export_transform"]


def __getattr__(name: str):
    if name in __all__:
        from bench import reuse

        return getattr(reuse, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
