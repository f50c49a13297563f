"""ubt core: the UBT algorithm and its data contract, in plain torch + open_clip."""

__version__ = "0.1.0"
