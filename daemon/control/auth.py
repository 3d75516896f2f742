"""Who may change the daemon: root, the daemon's own uid, or a member of ``admin_group``.

The peer's groups are the ones the kernel recorded when it connected (``SO_PEERGROUPS``), so a
process cannot borrow another's groups by exiting and letting its pid be reused. The admin
group's gid is looked up once per start or reload: an NSS lookup may go to LDAP, and must not
run on the event loop for every request.
"""

from __future__ import annotations

import grp
import os
import pwd

from .messages import Peer


class Authorizer:
    """Answers "may this peer change things?" for one ``admin_group``."""

    def __init__(self, admin_group: str, daemon_uid: int | None = None) -> None:
        self.admin_group = admin_group
        self.daemon_uid = os.getuid() if daemon_uid is None else daemon_uid
        self._gid: int | None = None
        self._looked_up = False

    def check(self, peer: Peer | None) -> str | None:
        """None when the peer may change things, else why it may not."""
        if peer is None:
            return "requests over TCP may only read"
        if peer.uid in (0, self.daemon_uid):
            return None
        group = self.admin_group
        if not group:
            return (f"uid {peer.uid} is neither root nor the daemon's uid ({self.daemon_uid}) "
                    "and no admin_group is configured")
        gid = self.admin_gid()
        if gid is None:
            return f'uid {peer.uid} is not root and admin group "{group}" does not exist'
        if gid in peer_groups(peer):
            return None
        return (f"uid {peer.uid} is neither root, the daemon's uid ({self.daemon_uid}), "
                f'nor a member of group "{group}"')

    def admin_gid(self) -> int | None:
        """The admin group's gid (None when it does not exist), looked up once."""
        if not self._looked_up:
            try:
                self._gid = grp.getgrnam(self.admin_group).gr_gid
            except KeyError:
                self._gid = None
            self._looked_up = True
        return self._gid


def peer_groups(peer: Peer) -> set[int]:
    """The peer's groups: as the kernel recorded them at connect time (SO_PEERGROUPS), or,
    where it cannot say, from the group database for the peer's user."""
    groups = {peer.gid}
    if peer.groups is not None:
        return groups | set(peer.groups)
    try:
        user = pwd.getpwuid(peer.uid)
        groups.update(os.getgrouplist(user.pw_name, user.pw_gid))
    except KeyError:
        pass
    return groups
