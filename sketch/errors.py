"""Every error blocksketch reports to a user, with the exit code a script sees.

Each class carries a message a user can act on; the CLI prints ``str(error)`` on one
line and exits with ``exit_code`` (2 for usage errors, 1 for failures).
"""


class BlocksketchError(Exception):
    """Base class: a failure the user can understand and act on."""

    exit_code = 1


class UsageError(BlocksketchError):
    """The command was called wrongly (bad option value, wrong kind of path)."""

    exit_code = 2


class ForceNeeded(UsageError):
    """An output file exists and overwriting it was not asked for (the CLI names its flag)."""


class OutputError(BlocksketchError):
    """A file cannot be written: permission denied, disk full, no such directory."""


class ImageError(BlocksketchError):
    """An image cannot be read: missing, unreadable, empty, or of an unsupported kind."""


class FormatError(BlocksketchError):
    """A stored or shipped structure (index entry, filter, manifest, bundle) is corrupt or of an unknown version."""


class BlockSizeMismatch(BlocksketchError):
    """Two things that must share a block size do not."""

    def __init__(self, what: str, expected: int, got: int):
        super().__init__(f"block size mismatch: {what} uses {expected} bytes, but {got} was asked for")
        self.expected = expected
        self.got = got


class NotFound(BlocksketchError):
    """An unknown host or image was named."""


class StoreError(BlocksketchError):
    """The index store (Redis) cannot be reached or refused an operation."""


class VerificationError(BlocksketchError):
    """Data failed a strong-hash check; nothing unverified was written."""


class GeometryMismatch(BlocksketchError):
    """Two Bloom filters that must share their hash count (k) do not: they cannot be combined."""
