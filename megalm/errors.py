class MegalmError(Exception):
    """An error the user can fix (bad config, data, checkpoint or command line); printed without a traceback."""
