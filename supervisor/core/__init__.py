"""The pure core: the lifecycle state machine and the small value types and errors everything
shares.
"""
