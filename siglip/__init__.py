"""SigLIP 2 serving on BentoML. ``siglip.api``: the request path; ``siglip.server``: what guards and serves it;
``siglip.model``: the model and its backends; beside them the settings, observability, the Python client, bento
packaging and the catalog indexer (``siglip.index``)."""

# The one home of the version: pyproject.toml reads it (a bento carries the sources, not the package metadata).
__version__ = "0.1.0"
