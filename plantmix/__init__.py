"""plantmix: build plant/general image-text mixtures as parquet manifests and webdataset shards."""

__version__ = "0.1.0"
