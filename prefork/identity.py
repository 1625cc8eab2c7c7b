"""Who the workers run as (--user, --group), and the modes of files prefork creates.

The master starts as root when it must (ports below 1024, sockets in /run), binds, and
keeps root: a HUP or USR2 may have to bind again, and it never runs request handlers.
Each worker switches to the configured user and group right after the fork, before any
hook or app code runs; a worker that cannot switch reports a boot error and never
serves as root.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
from typing import NamedTuple

from .errors import ConfigError, PreforkError
from .paths import Owner


class IdentityError(PreforkError):
    """A worker could not become the configured user or group."""


class Identity(NamedTuple):
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    group_only: bool = False  # --group without --user: the user stays the master's

    @classmethod
    @functools.cache
    def resolve(cls, user: str | None, group: str | None) -> Identity | None:
        """Look the names up, once per (user, group) for the life of the master (the
        start, each bind, each HUP and each fork ask again). None: run workers as the
        master runs. A failed lookup is not remembered: it raises each time."""
        if user is None and group is None:
            return None
        entry = _user_entry(str(os.geteuid()) if user is None else user)
        name, uid = (entry.pw_name, entry.pw_uid) if entry else (str(user), int(str(user)))
        if group is not None:
            gid = _group_id(group)
        elif entry is not None:
            gid = entry.pw_gid
        else:
            raise ConfigError(f"user {user} has no entry in the user database; give --group")
        groups = tuple(os.getgrouplist(name, gid)) if entry else (gid,)
        if user is None:  # only the group changes: keep no other supplementary groups
            groups = (gid,)
        return cls(name, uid, gid, groups, group_only=user is None)

    def switch(self) -> None:
        """In a worker: become this user for good, or raise IdentityError."""
        already = (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) == (
            self.uid,
            self.uid,
            self.gid,
            self.gid,
        )
        if already and set(os.getgroups()) <= set(self.groups):
            return
        try:
            os.setgroups(list(self.groups))
            os.setgid(self.gid)
            os.setuid(self.uid)
        except OSError as exc:
            raise IdentityError(f"cannot switch to {self}: {exc.strerror}") from None
        if self.uid != 0 and 0 in (os.getuid(), os.geteuid()):
            raise IdentityError(f"still root after switching to {self}; refusing to serve")

    @property
    def owner(self) -> Owner:
        """Who the files prefork hands to the workers belong to (see paths.py for how)."""
        return Owner(self.uid, self.gid)

    @property
    def keeps_root(self) -> bool:
        """--group without --user under a root master: the workers stay uid 0."""
        return self.group_only and self.uid == 0

    def __str__(self) -> str:
        return f"user {self.user} (uid {self.uid}, gid {self.gid})"


def file_owner(identity: Identity | None) -> Owner | None:
    """Whom the files prefork makes for the workers go to: only a root master can give
    files away, and only with --user or --group set."""
    return identity.owner if identity is not None and os.geteuid() == 0 else None


def _user_entry(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if user.isdigit():
            return None  # a bare uid is allowed without an entry (containers)
        raise ConfigError(f"unknown user {user!r}") from None


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {group!r}") from None


def parse_mode(name: str, text: str) -> int:
    """'660', '0660' or '0o660' -> 0o660; ConfigError naming the setting otherwise."""
    digits = text[2:] if text.lower().startswith("0o") else text
    if not digits or len(digits.lstrip("0")) > 3 or any(c not in "01234567" for c in digits):
        raise ConfigError(f"{name} must be an octal mode such as 660 or 027, got {text!r}")
    return int(digits, 8)
