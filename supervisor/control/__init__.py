"""Operators' control plane: the Unix control socket, its client, status documents, sd_notify."""
