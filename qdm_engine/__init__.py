"""qdm-engine: does a compressed language model keep its SAE features? A feature-by-feature audit."""

__version__ = "0.1.0"


def sweep(*args, **kwargs):
    """Audit FP vs compressed conditions through a frozen SAE; see `qdm_engine.audit.sweep`."""
    from qdm_engine.audit import sweep as _sweep

    return _sweep(*args, **kwargs)


__all__ = ["sweep", "__version__"]
