class MegalmError(Exception):
    """An error the user can fix (bad config, data, checkpoint or command line); printed without a traceback."""


def read_utf8(path, what: str) -> str:
    """The text of `path`; MegalmError naming `what` (an option) and the first bad byte if it is not UTF-8."""
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MegalmError(
            f"{what} {path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
