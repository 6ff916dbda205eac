"""The errors a user can cause, one class per kind of cause; the ``privimage`` command prints them as one line.

Every problem with what a user asked for or with the files a run keeps is raised as a :class:`PrivimageError`
whose message is ONE line that names the value or the file, says what is wrong and what to do. The command
line (:mod:`privimage.cli`) prints that line and exits with code 2; ``PRIVIMAGE_DEBUG=1`` shows the
traceback instead. Anything else that escapes is a bug in privimage and keeps its traceback.

::

    PrivimageError
    ├── ConfigError       a setting: wrong type, out of range, unknown key; named by its key path
    │                     ("pretrain.steps") or its flag ("--epsilon")
    ├── DataError         a data spec, or a data file that is missing, corrupt or of the wrong shape
    ├── DeviceError       a device that is not there (``--device cuda`` on a machine without a GPU)
    ├── PrivacyError      settings that would not protect anyone (δ ≥ 1/n)
    ├── RunDirError       a run directory: not one, a stage out of order, a file unreadable (named, with the fix)
    │   ├── MissingRunFile    a file the stage needs does not exist (also a FileNotFoundError)
    │   └── RunDirLocked      another process is writing to the run directory
    └── StorageError      the file system refused a write (full disk, read-only, no permission): path, cause;
                          also an OSError with the original ``errno``

The classes other than :class:`StorageError` are also ``ValueError`` s, so code written against the older
``ValueError`` messages keeps working.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["ConfigError", "DataError", "DeviceError", "MissingRunFile", "PrivacyError", "PrivimageError",
           "RunDirError", "RunDirLocked", "StorageError", "describe_os_error"]


class PrivimageError(Exception):
    """Base of every error privimage raises for bad input or bad state (module docstring)."""


class ConfigError(PrivimageError, ValueError):
    """A setting is of the wrong type, out of range, or unknown; the message names its key path or flag."""


class DataError(PrivimageError, ValueError):
    """A data spec is invalid, or a data file is missing, truncated, corrupt or inconsistent (named)."""


class DeviceError(PrivimageError, ValueError):
    """The device asked for is not available on this machine."""


class PrivacyError(PrivimageError, ValueError):
    """Privacy settings that give no meaningful guarantee (e.g. δ ≥ 1/n)."""


class RunDirError(PrivimageError, ValueError):
    """A run directory is not one, is in the wrong state for the command, or holds an unreadable file."""


class MissingRunFile(RunDirError, FileNotFoundError):
    """A file of the run directory that the command needs does not exist (the message says which stage makes it)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0])


class RunDirLocked(RunDirError):
    """Another process holds the run directory's lock (the message names it: pid, host, command, start)."""


class StorageError(PrivimageError, OSError):
    """The file system refused a write: ``path`` and the OS's reason (``errno`` is kept)."""

    def __init__(self, path: str | os.PathLike, cause: OSError, *, note: str = ""):
        OSError.__init__(self, cause.errno, cause.strerror or str(cause), str(path))
        self.path, self.cause, self.note = str(path), cause, note

    def __str__(self) -> str:
        return f"could not write {self.path}: {describe_os_error(self.cause)}" + (f"; {self.note}" if self.note else "")


def describe_os_error(err: OSError) -> str:
    """``'No space left on device (ENOSPC)'``: the OS's words and the errno's name, without the traceback."""
    code = _errno.errorcode.get(err.errno or 0)
    text = err.strerror or str(err)
    hint = {_errno.ENOSPC: "free some space", _errno.EDQUOT: "free some space",
            _errno.EROFS: "the file system is read-only", _errno.EACCES: "check the folder's permissions",
            _errno.EPERM: "check the folder's permissions"}.get(err.errno or 0)
    return f"{text} ({code})" + (f": {hint}" if hint else "") if code else text
