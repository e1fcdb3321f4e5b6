"""Catalog indexer and search CLI on top of ``siglip.client``: ``siglip-index`` / ``python -m siglip.index``.

``sources`` reads a folder, URL list or CSV into items with ids; ``build`` embeds them through the service
(batches, bounded concurrency, retries, per-item failures); ``store`` writes and searches the LanceDB table;
``cli`` is the command line. Needs ``lancedb`` (and its ``pyarrow``) and ``tqdm``; the service does not.
"""
