"""condense-pipeline: dataset condensation (DM, M3D, DataDAM) as a Ray Data pipeline."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import condense_pipeline` stays cheap for the CLI and for Ray workers.
    if name in ("load_condensed", "load_condensed_ray"):
        from condense_pipeline.evaluate import loader

        return getattr(loader, name)
    if name in ("run", "condense_dataset"):
        from condense_pipeline import api

        return getattr(api, name)
    raise AttributeError(name)
