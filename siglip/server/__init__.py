"""The server around the request path: connection and request guards, metrics and access logs, memory,
shutdown order, and the pages the service serves (API docs, playground)."""
