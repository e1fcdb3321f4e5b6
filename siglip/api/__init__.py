"""The request path: parsing and mode detection, image and URL inputs, the engine that merges concurrent calls to
the model service, scoring, and the OpenAI embeddings API on top. It runs in the gateway and never imports torch
(the model service borrows its image helpers only)."""
