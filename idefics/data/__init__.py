"""Training data: the WebDataset sample schema, shard reader/writer, source mixtures and the synthetic
idefics-mini data set. See docs/data_format.md."""

from idefics.data.mixture import Mixture, Source
from idefics.data.schema import DataError, Sample, Turn, decode_sample, encode_sample, validate_sample
from idefics.data.shards import ShardReader, ShardWriter, assign_shards, expand_shards

__all__ = [
    "DataError",
    "Mixture",
    "Sample",
    "ShardReader",
    "ShardWriter",
    "Source",
    "Turn",
    "assign_shards",
    "decode_sample",
    "encode_sample",
    "expand_shards",
    "validate_sample",
]
