"""The server around the request path: connection and request guards, error responses, memory, shutdown order,
and the pages the service serves (API docs, playground). It builds on ``siglip.api``, never the other way round."""
