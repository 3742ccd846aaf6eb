"""Who may see the dashboard and who may approve or roll back from it.

Read-only on a loopback address, the dashboard needs no login: only this machine's users reach
it, as they reach the files it shows. A login is needed as soon as the dashboard can do more
or be reached from elsewhere:

- started with the coordinator's signing key (``--signing-key``), the Versions page approves
  and rolls back, through the same signed registry calls as ``fedretrain registry``;
- on any other address it must serve TLS (``--tls-cert``/``--tls-key``) and every page needs a login.

The login is a secret token: from ``--token-file`` (readable by its owner only, as ssh wants
of a key), or made here and printed once. A login gets a session cookie (HttpOnly,
SameSite=Strict, Secure under TLS) that lives in this process only, and a form token that
every approve and rollback must carry (and its request must come from the dashboard's own
origin): a page elsewhere cannot make a signed-in browser act.
"""

from __future__ import annotations

import hmac
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedretrain.errors import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

COOKIE = "fedretrain-session"
SESSION_S = 12 * 3600  # a login lasts a working day
MIN_TOKEN = 16


@dataclass
class Access:
    """The dashboard's login and signing rights (see the module docstring)."""

    token: str | None = None  # None: no login (read-only, loopback)
    signing_key: Ed25519PrivateKey | None = None
    key_path: Path | None = None
    approver: str = "dashboard"
    tls: bool = False
    sessions: dict[str, tuple[str, float]] = field(default_factory=dict)  # session -> (form token, expiry)

    def __post_init__(self) -> None:
        if self.signing_key is not None and self.token is None:
            raise ConfigError("approving from the page needs a login: give a token (a --token-file, or one made)")

    @property
    def login_required(self) -> bool:
        return self.token is not None

    @property
    def can_sign(self) -> bool:
        return self.signing_key is not None

    def token_matches(self, offered: str) -> bool:
        """Whether ``offered`` is the login token (compared in constant time)."""
        return self.token is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    def login(self, offered: str) -> str | None:
        """A new session id if ``offered`` is the token, else None."""
        if not self.token_matches(offered):
            return None
        now = time.time()
        self.sessions = {s: v for s, v in self.sessions.items() if v[1] > now}
        session = secrets.token_urlsafe(32)
        self.sessions[session] = (secrets.token_urlsafe(32), now + SESSION_S)
        return session

    def logout(self, session: str | None) -> None:
        self.sessions.pop(session or "", None)

    def form_token(self, session: str | None) -> str | None:
        """The form token of a live session, or None (no such session, or it expired)."""
        entry = self.sessions.get(session or "")
        if entry is None or entry[1] <= time.time():
            return None
        return entry[0]

    def valid_form(self, session: str | None, offered: str) -> bool:
        expected = self.form_token(session)
        return expected is not None and hmac.compare_digest(offered.encode(), expected.encode())


def read_token(path: Path) -> str:
    """The login token in ``path`` (its first line); ConfigError unless only its owner can read it."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"--token-file {path}: not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"--token-file {path}: readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                f"chmod 600 {path}, as for a private key"
            )
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"--token-file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path}: not text") from None
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN:
        raise ConfigError(
            f"--token-file {path}: line 1 holds a token of {len(token)} characters; give at least {MIN_TOKEN}"
        )
    return token


def new_token() -> str:
    """A fresh login token (256 bits)."""
    return secrets.token_urlsafe(32)
