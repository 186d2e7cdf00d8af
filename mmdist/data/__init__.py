"""Streaming data: WebDataset reader, safe decoding, shard tools, preprocessing, collation/packing, feature cache."""
