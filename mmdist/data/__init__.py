"""Streaming data: WebDataset reader, safe decoding, shard tools, preprocessing, collation/packing, feature cache.

Import the module you need (``from mmdist.data.loader import build_loader``): this
package imports nothing, so that importing the settings (``mmdist.data.settings``,
done by every config command) does not import torch or webdataset.
"""
