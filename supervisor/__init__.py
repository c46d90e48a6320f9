"""supervisor: keeps a platform's services alive and reports on them to Prometheus."""

__version__ = "0.1.0"
