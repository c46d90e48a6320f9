"""Child processes: spawning, reaping, containment (cgroups, descendants, the orphan guard),
statistics, output.
"""
