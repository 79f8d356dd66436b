"""The one error type a user can fix, and how an operating-system error reads as one.

Every error umarvel raises about its input (a malformed line, a bad setting, an index that does not
match, an output it cannot write) is a `UserError`; the CLI prints its message verbatim and exits 2
(`cli.py`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re

# Operating-system errors about a path the user named: no such file, no permission, a file where a
# folder must be (or the reverse), a read-only or full file system.
_USER_ERRNOS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
    errno.EEXIST: "already exists",
}
# numpy and some writers report a full disk as a short write, without an errno.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class UserError(ValueError):
    """Something the user can fix; the message says what and where (`path:line: what is wrong`)."""


def os_error_message(error: OSError) -> str | None:
    """`path: what is wrong` for an operating-system error about a user's path, else None (a bug)."""
    if error.errno in _USER_ERRNOS:
        where = error.filename
        what = _USER_ERRNOS[error.errno]
        if error.filename2 is not None:
            where = f"{error.filename} -> {error.filename2}"
        return f"{where}: {what}" if where else what
    if error.errno is None and _SHORT_WRITE.search(str(error)):
        return f"no space left on device (a write came up short: {error})"
    return None
