"""The HTTP stack: hardened request heads, the WSGI server, the exporter-toolkit web config."""
