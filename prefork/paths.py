"""Paths the master opens, creates or hands over, without following a planted symlink.

The master often runs as root while the workers run as ``--user``, who may be able to
write to the directories of the log files, the pid file or the Unix sockets. Anything
the master does there by path could then be redirected by a symlink or a rename that
user plants between two system calls. So every path is resolved here one component at
a time with ``O_NOFOLLOW``, holding a descriptor of each directory reached:

- A symlink on the way is followed only if no other user could have planted it: the
  link belongs to root or to the master's own user, and so does the directory that
  holds it, which nobody else may write to (or which is sticky, like /tmp, where only
  a link's owner may replace it). Anything else is refused with one line naming it.
- The last component is never followed when the master writes to it (log files, the
  pid file, socket files): a symlink there is refused.
- Ownership and modes change only through a descriptor this module opened (``fchown``,
  ``fchmod``), or inside a private directory nobody else can enter (socket files, which
  have no descriptor of their own), so a swap after the open changes nothing.
- Files are opened with ``O_NONBLOCK`` and checked for their type, so a FIFO planted
  where a log file or a config file should be cannot hang the master.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import ConfigError

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's own path walk (ELOOP beyond)
READ_LIMIT = 1 << 20  # the largest config or pid file read (a planted /dev/zero ends here)


class PathError(ConfigError):
    """A path the master refuses to use, or cannot reach; the message names it and says
    why. ``errno``: the system's error, when there was one (not for a refusal)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class Owner:
    """Who files handed to the workers should belong to (the workers' user and group)."""

    uid: int
    gid: int


def _trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _may_follow(link: os.stat_result, directory: os.stat_result) -> bool:
    """A symlink is followed only if nobody but root or us could have put it there."""
    trusted = _trusted_uids()
    if link.st_uid not in trusted or directory.st_uid not in trusted:
        return False
    others_write = directory.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return not others_write or bool(directory.st_mode & stat.S_ISVTX)


@contextlib.contextmanager
def parent_of(path: str, action: str | None = None) -> Iterator[tuple[int, str]]:
    """(descriptor of the directory holding ``path``, last component), reached safely.
    ``action`` ("cannot open log file X") starts the message of a PathError."""
    action = action or path
    head, name = os.path.split(path)
    if not name or name in (".", ".."):
        raise PathError(f"{action}: not a file name")
    fd = open_directory(head or ".", action)
    try:
        yield fd, name
    finally:
        os.close(fd)


def open_directory(path: str, shown: str | None = None) -> int:
    """An O_PATH descriptor of directory ``path``; symlinks only as the rules above allow.
    ``shown`` starts the message of a PathError (default: the path)."""
    shown = shown or path
    pending = _components(path)
    current = os.open("/" if path.startswith("/") else ".", _DIR_FLAGS)
    followed = 0
    try:
        while pending:
            name = pending.pop(0)
            if name in ("", "."):
                continue
            try:
                following = os.open(name, _DIR_FLAGS, dir_fd=current)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise PathError(f"{shown}: {_reason(exc)}", exc.errno) from None
                target = _trusted_link(current, name, shown)
                followed += 1
                if followed > _MAX_SYMLINKS:
                    raise PathError(f"{shown}: too many symbolic links") from None
                if target.startswith("/"):
                    os.close(current)
                    current = os.open("/", _DIR_FLAGS)
                pending[:0] = _components(target)
                continue
            os.close(current)
            current = following
    except BaseException:
        os.close(current)
        raise
    return current


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _trusted_link(directory: int, name: str, shown: str) -> str:
    """The target of symlink ``name`` in ``directory``, if it may be followed."""
    try:
        link = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError as exc:
        raise PathError(f"{shown}: {_reason(exc)}") from None
    if not stat.S_ISLNK(link.st_mode):
        raise PathError(f"{shown}: {name} is not a directory", errno.ENOTDIR)
    if not _may_follow(link, os.fstat(directory)):
        raise PathError(
            f"{shown}: refusing to follow the symbolic link {name}, which another user "
            "could have planted (it or its directory belongs to, or is writable by, "
            "someone other than root)"
        )
    return os.readlink(name, dir_fd=directory)


def open_for_append(path: str, owner: Owner | None = None, what: str = "file") -> int:
    """A descriptor appending to ``path`` (created 0644 under the umask if missing).

    A symlink at ``path`` is refused, never followed. With ``owner`` (root handing the
    file to the workers' user) a regular file is given to them through the descriptor.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    action = f"cannot open {what} {path}"
    with parent_of(path, action) as (directory, name):
        try:
            fd = os.open(name, flags, 0o644, dir_fd=directory)
        except OSError as exc:
            raise PathError(f"{action}: {_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            os.set_blocking(fd, True)
            if owner is not None:
                give(fd, info, owner, f"{what} {path}")
        elif stat.S_ISFIFO(info.st_mode) or stat.S_ISCHR(info.st_mode):
            os.set_blocking(fd, True)  # /dev/null, a pipe someone reads: used as it is
        else:
            raise PathError(f"{action}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def give(fd: int, info: os.stat_result, owner: Owner, shown: str) -> None:
    """fchown a regular file we opened to ``owner``; refuse one with other hard links."""
    if (info.st_uid, info.st_gid) == (owner.uid, owner.gid):
        return
    if info.st_nlink > 1:
        raise PathError(
            f"refusing to give {shown} to uid {owner.uid}: it has {info.st_nlink} hard "
            "links, and one of them may be a file nobody should own"
        )
    try:
        os.fchown(fd, owner.uid, owner.gid)
    except OSError as exc:
        raise PathError(f"cannot give {shown} to uid {owner.uid}: {_reason(exc)}") from None


def read_small_file(path: str, what: str = "file", follow: bool = True) -> bytes:
    """The content of a regular file of at most READ_LIMIT bytes.

    ``follow``: a symlink as the last component is followed under the same rules as the
    directories on the way (a config file linked from a release directory); otherwise
    it is refused. A FIFO or device is refused without blocking.
    """
    for _ in range(_MAX_SYMLINKS):
        action = f"cannot read {what} {path}"
        with parent_of(path, action) as (directory, name):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(name, flags, dir_fd=directory)
            except OSError as exc:
                if exc.errno != errno.ELOOP or not follow:
                    raise PathError(f"{action}: {_reason(exc)}") from None
                target = _trusted_link(directory, name, action)
                path = (
                    target
                    if target.startswith("/")
                    else os.path.join(os.path.dirname(path) or ".", target)
                )
                continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PathError(f"{action}: not a regular file")
            data = os.read(fd, READ_LIMIT + 1)
        finally:
            os.close(fd)
        if len(data) > READ_LIMIT:
            raise PathError(f"{action}: larger than {READ_LIMIT} bytes")
        return data
    raise PathError(f"cannot read {what} {path}: too many symbolic links")


def replace_file(path: str, data: bytes, mode: int = 0o644, what: str = "file") -> None:
    """Write ``path`` atomically: a new file beside it, renamed over it. A symlink at
    ``path`` is replaced by the file, never written through."""
    action = f"cannot write {what} {path}"
    with parent_of(path, action) as (directory, name):
        temporary = f".{name}.{secrets.token_hex(6)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temporary, flags, 0o600, dir_fd=directory)
        except OSError as exc:
            raise PathError(f"{action}: {_reason(exc)}") from None
        try:
            try:
                os.fchmod(fd, mode)
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise


def unlink_if(
    path: str, identity: tuple[int, int] | None = None, content: bytes | None = None
) -> bool:
    """Remove ``path`` (never through a symlink) if it is still what we made: the same
    inode (``identity`` = (st_dev, st_ino)) or the same ``content``. True if removed."""
    try:
        with parent_of(path) as (directory, name):
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if identity is not None and (info.st_dev, info.st_ino) != identity:
                return False
            if content is not None:
                if not stat.S_ISREG(info.st_mode):
                    return False
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(name, flags, dir_fd=directory)
                try:
                    if os.read(fd, len(content) + 1) != content:
                        return False
                finally:
                    os.close(fd)
            os.unlink(name, dir_fd=directory)
            return True
    except (OSError, PathError):
        return False


def bind_unix(
    sock: socket.socket, path: str, owner: Owner | None = None, mode: int | None = None
) -> tuple[int, int]:
    """Bind ``sock`` to the Unix socket file ``path``, owned and moded from the start.

    The socket is bound inside a private directory (mode 0700, ours) made next to
    ``path``, given its owner and mode there, where nobody else can swap it for a
    symlink, and then linked into place: ``link`` never replaces what is there, so a
    live socket or any other file at ``path`` fails as bind() would ("address already
    in use"), and a stale socket (nobody listening) is removed first. Returns the
    file's (st_dev, st_ino), which ``unlink_if`` checks before removing it.
    """
    try:
        with parent_of(path, f"cannot bind unix:{path}") as (directory, name):
            return _bind_in_private_dir(sock, directory, name, owner, mode)
    except PathError as exc:
        if exc.errno is None:
            raise  # a refusal: said as it is
        raise OSError(exc.errno, os.strerror(exc.errno)) from None  # said as bind() says it


def _bind_in_private_dir(
    sock: socket.socket, directory: int, name: str, owner: Owner | None, mode: int | None
) -> tuple[int, int]:
    _remove_stale_socket(directory, name, sock.type)
    private = f".prefork-{secrets.token_hex(8)}"
    os.mkdir(private, 0o700, dir_fd=directory)
    try:
        inside = os.open(private, _DIR_FLAGS, dir_fd=directory)
        try:
            # Whoever may write to ``directory`` may have swapped our new directory for
            # one of theirs before it was opened: only ours, 0700, is a private place.
            info = os.fstat(inside)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700:
                raise PathError(f"{private}: replaced by someone else while binding")
            # bind() takes no directory descriptor; the kernel's /proc link to one is
            # as good, and keeps the path short whatever the directory's length.
            sock.bind(f"/proc/self/fd/{inside}/s")
            if mode is not None:
                os.chmod("s", mode, dir_fd=inside)
            if owner is not None:
                os.chown("s", owner.uid, owner.gid, dir_fd=inside, follow_symlinks=False)
            info = os.stat("s", dir_fd=inside, follow_symlinks=False)
            try:
                os.link("s", name, src_dir_fd=inside, dst_dir_fd=directory)
            except FileExistsError:
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink("s", dir_fd=inside)
            os.close(inside)
    finally:
        os.rmdir(private, dir_fd=directory)
    return info.st_dev, info.st_ino


def _remove_stale_socket(directory: int, name: str, sock_type: int) -> None:
    """Delete ``name`` if it is a Unix socket nobody listens on; leave anything else."""
    try:
        info = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        return
    with socket.socket(socket.AF_UNIX, sock_type) as probe:
        try:
            probe.connect(f"/proc/self/fd/{directory}/{name}")
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=directory)
        except OSError:
            pass


def writable_by(path: str, uid: int, gids: tuple[int, ...]) -> bool:
    """Could user ``uid`` (with groups ``gids``) change ``path`` or replace it?"""
    try:
        targets = [os.stat(path), os.stat(os.path.dirname(os.path.abspath(path)))]
    except OSError:
        return False
    for index, info in enumerate(targets):
        mode = info.st_mode
        sticky_dir = index == 1 and mode & stat.S_ISVTX
        if info.st_uid == uid or mode & stat.S_IWOTH and not sticky_dir:
            return True
        if mode & stat.S_IWGRP and info.st_gid in gids and not sticky_dir:
            return True
    return False


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link (refusing to follow it)"
    if exc.errno == errno.ENXIO:
        return "a FIFO or socket nobody reads"
    return exc.strerror or str(exc)
