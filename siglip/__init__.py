"""SigLIP 2 serving on BentoML. ``siglip.api``: the request path; ``siglip.server``: what guards and serves it;
``siglip.model``: the model and its backends; beside them the settings, observability, the Python client, bento
packaging and the catalog indexer (``siglip.index``)."""
