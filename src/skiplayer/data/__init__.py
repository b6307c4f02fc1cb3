"""Benchmark datasets (loaders, registry) and their prompt formats."""
from skiplayer.data.datasets import DATASETS, DatasetSpec, Sample, load_dataset

__all__ = ["DATASETS", "DatasetSpec", "Sample", "load_dataset"]
