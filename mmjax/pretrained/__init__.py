"""Published checkpoints: reading them from local files into mmjax params, and back.

Nothing here downloads: every loader takes the path of a file the user already has.
"""
