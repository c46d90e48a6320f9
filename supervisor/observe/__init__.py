"""What goes on /v1/metrics: the daemon's own families, scraping, FR52 screening, merging,
rendering.
"""
