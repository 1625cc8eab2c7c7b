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
  ``fchmod``), or not at all: a socket file, which has no descriptor of its own, is
  created with its owner and mode, so a swap after the bind changes nothing.
- Files are opened with ``O_NONBLOCK`` and checked for their type, so a FIFO planted
  where a log file or a config file should be cannot hang the master.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from typing import NamedTuple

from .errors import ConfigError
from .libc import libc

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's own path walk (ELOOP beyond)
READ_LIMIT = 1 << 20  # the largest config or pid file read (a planted /dev/zero ends here)


class PathError(ConfigError):
    """A path the master refuses to use, or cannot reach; the message names it and says
    why. ``errno``: the system's error, when there was one (not for a refusal)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class Owner(NamedTuple):
    """Who files handed to the workers should belong to (the workers' user and group)."""

    uid: int
    gid: int


def _trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _only_ours(directory: int) -> bool:
    """Nobody but root (or the master's user) may change what is in ``directory``."""
    info = os.fstat(directory)
    others_write = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    return info.st_uid in _trusted_uids() and not others_write


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

    A symlink at ``path`` is refused, never followed; so is anything but a regular file
    or a character device (/dev/null): a FIFO could block every line the master logs.
    With ``owner`` (root making the file for the workers' user) a file this call created
    is given to them through its descriptor; one that was there already must be theirs
    already: giving away an existing file is how /etc/shadow was handed over, and even
    with the checks here (one hard link, not a symlink) a hard link made and removed
    around the open could not be told apart.
    """
    action = f"cannot open {what} {path}"
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with parent_of(path, action) as (directory, name):
        created = True
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=directory)
        except FileExistsError:
            created = False
            try:
                fd = os.open(name, flags, dir_fd=directory)
            except OSError as exc:
                raise PathError(f"{action}: {_reason(exc)}") from None
        except OSError as exc:
            raise PathError(f"{action}: {_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISCHR(info.st_mode)):
            raise PathError(f"{action}: not a regular file")
        os.set_blocking(fd, True)
        if owner is not None and stat.S_ISREG(info.st_mode):
            give(fd, info, owner, created, f"{what} {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_appendable(path: str, owner: Owner | None = None, what: str = "file") -> None:
    """What ``open_for_append`` would refuse, without creating anything (--check-config)."""
    action = f"cannot open {what} {path}"
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with parent_of(path, action) as (directory, name):
        try:
            fd = os.open(name, flags, dir_fd=directory)
        except FileNotFoundError:
            return  # it would be made, as the owner's
        except OSError as exc:
            raise PathError(f"{action}: {_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISCHR(info.st_mode)):
            raise PathError(f"{action}: not a regular file")
        if owner is not None and stat.S_ISREG(info.st_mode) and info.st_uid != owner.uid:
            give(fd, info, owner, False, f"{what} {path}")  # raises: not theirs
    finally:
        os.close(fd)


def give(fd: int, info: os.stat_result, owner: Owner, created: bool, shown: str) -> None:
    """fchown the regular file we just created to ``owner``; one that existed must be
    theirs already (see ``open_for_append``)."""
    if info.st_uid == owner.uid:
        return
    if not created:
        raise PathError(
            f"{shown} exists and belongs to uid {info.st_uid}, not to uid {owner.uid} who "
            "must write to it; prefork gives away only files it creates: remove it, or "
            "give it to them"
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
        temporary = f".{name}.{os.urandom(6).hex()}"
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

    Nothing is changed after the file appears (a chown or chmod by path could be
    redirected by a symlink swapped in meanwhile): the file is created with its mode
    (through the umask) and its owner, as the kernel gives a new file the filesystem
    user and group of its creator (``setfsuid``/``setfsgid`` for the bind). It belongs
    to ``owner`` when that user may create files in the directory; otherwise (a
    directory only root may write to) to root and ``owner``'s group. The directories on
    the way are checked as ``parent_of`` checks them; a stale socket (nobody listening)
    is removed first, and anything else at ``path`` fails as bind() fails ("address
    already in use"). The socket keeps its real name (getsockname, ``ss -xl``). Returns
    the file's (st_dev, st_ino), which ``unlink_if`` checks before removing it.
    """
    try:
        with parent_of(path, f"cannot bind unix:{path}") as (directory, name):
            # bind() takes a path, not a directory descriptor: the kernel walks it again.
            # Where someone else could change a directory on the way, they could swap in
            # a symlink meanwhile, and root would make the file wherever it points.
            swappable = _swappable_by_others(path)
            if swappable and (owner is None or owner.uid == 0):
                raise PathError(
                    f"refusing to bind unix:{path} as root: {swappable} (give --user, who "
                    "then makes the socket, or use a directory only root can change)"
                )
            _remove_stale_socket(directory, name, sock.type)
            umask = os.umask(0o777 & ~mode) if mode is not None else None
            try:
                _bind_as(sock, path, owner, root_may=not swappable)
            finally:
                if umask is not None:
                    os.umask(umask)
            info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if owner is not None and info.st_uid != owner.uid and _only_ours(directory):
                # Made by root in a directory nobody else may write to: nobody can have
                # swapped it, so it is given to the workers' user where it lies.
                os.chown(name, owner.uid, owner.gid, dir_fd=directory, follow_symlinks=False)
    except PathError as exc:
        if exc.errno is None:
            raise  # a refusal: said as it is
        raise OSError(exc.errno, os.strerror(exc.errno)) from None  # said as bind() says it
    return info.st_dev, info.st_ino


def _swappable_by_others(path: str) -> str | None:
    """Why someone other than root could change a directory on the way to ``path``
    (None for a master that is not root: it has nothing to lend)."""
    if os.geteuid() != 0:
        return None
    # The directory itself may be anyone's: bind() makes the file in it and follows no
    # final symlink. What matters is that nobody else can swap that directory.
    return changeable_by_others(os.path.dirname(os.path.abspath(path)) or "/", contents=False)


def _bind_as(sock: socket.socket, path: str, owner: Owner | None, root_may: bool) -> None:
    """``root_may``: no one but root can change the way to ``path``, so root may make
    the file where the workers' user may not."""
    if owner is None:
        sock.bind(path)
        return
    try:
        with _filesystem_identity(owner.uid, owner.gid):
            # The workers' user makes it: a file of theirs, where they may make files,
            # whatever symlink the path may meet meanwhile.
            sock.bind(path)
            return
    except PermissionError:
        if not root_may:
            raise
    with _filesystem_identity(os.geteuid(), owner.gid):  # a directory only root may write
        sock.bind(path)


@contextlib.contextmanager
def _filesystem_identity(uid: int, gid: int) -> Iterator[None]:
    """setfsuid/setfsgid for this thread: files it creates belong to (uid, gid), and the
    kernel checks its access to them as that user's."""
    c = libc()
    previous_gid = c.setfsgid(gid)
    previous_uid = c.setfsuid(uid)
    try:
        if (c.setfsuid(-1), c.setfsgid(-1)) != (uid, gid):  # -1 asks, changes nothing
            raise PathError(f"cannot create files as uid {uid}, gid {gid}")
        yield
    finally:
        c.setfsuid(previous_uid)
        c.setfsgid(previous_gid)


def _remove_stale_socket(directory: int, name: str, sock_type: int) -> None:
    """Delete ``name`` if it is a Unix socket nobody listens on; leave anything else.

    The probe connects through a descriptor of the very file looked at (O_PATH, not
    following a symlink), so a symlink swapped in meanwhile cannot make root connect
    elsewhere; only a refused connection is stale; the file is removed only if it is
    still that one."""
    try:
        node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError:
        return
    try:
        info = os.fstat(node)
        if not stat.S_ISSOCK(info.st_mode):
            return
        with socket.socket(socket.AF_UNIX, sock_type) as probe:
            # Non-blocking: a listener whose backlog is full (EAGAIN) is alive, and a
            # squatter's full backlog must not hold the root master in connect().
            probe.setblocking(False)
            try:
                probe.connect(f"/proc/self/fd/{node}")
            except ConnectionRefusedError:
                with contextlib.suppress(OSError):
                    now = os.stat(name, dir_fd=directory, follow_symlinks=False)
                    if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
                        os.unlink(name, dir_fd=directory)
            except OSError:
                pass
    finally:
        os.close(node)


def changeable_by_others(
    path: str, contents: bool = True, also_trusted: frozenset[int] = frozenset()
) -> str | None:
    """Why someone other than root (or the master's user) could change ``path``, or None.

    Whoever may write to the file, or to any directory on its way (they could rename
    what follows and put their own in its place), could change it. A sticky directory
    (/tmp) protects what its owner put there. Used for what a root master reads its
    settings or code from (sshd's StrictModes, for the same reason). ``contents=False``:
    only whether ``path`` itself could be replaced (a directory whose entries others may
    make, but which they cannot swap for another). ``also_trusted``: more owners who
    count as root here.
    """
    trusted = _trusted_uids() | also_trusted
    absolute = os.path.realpath(path)
    chain = [absolute]
    while chain[-1] != "/":
        chain.append(os.path.dirname(chain[-1]))
    try:
        infos = [os.stat(p) for p in chain]
    except OSError as exc:
        return f"{path}: {_reason(exc)}"
    for index, (where, info) in enumerate(zip(chain, infos, strict=True)):
        if index == 0 and not contents:
            continue
        if info.st_uid not in trusted:
            return f"{where} belongs to uid {info.st_uid}"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            below = infos[index - 1] if index else None
            sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
            if not (sticky and below is not None and below.st_uid in trusted):
                who = "others" if info.st_mode & stat.S_IWOTH else f"group {info.st_gid}"
                return f"{where} is writable by {who}"
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link (refusing to follow it)"
    if exc.errno == errno.ENXIO:
        return "a FIFO or socket nobody reads"
    return exc.strerror or str(exc)
