"""The request path: parsing and mode detection, image and URL inputs, the engine that batches them to the
model service, scoring, and the OpenAI embeddings API on top. Runs in the gateway; never imports torch."""
