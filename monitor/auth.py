"""Who may read packet contents and drop details: authentication and authorization.

The endpoints that serve per-pod packet captures, drop events and stored
captures hand out what flows through other people's pods, so each one asks an
Authenticator first and answers the AuthError it raises as is (its status and
reason are safe to send back). Three authenticators:

- TokenFileAuth: one shared bearer token, read from a file (a mounted Secret)
  and re-read when the file changes, so the token can be rotated without a
  restart.
- KubernetesAuth: the cluster decides, as kube-rbac-proxy does: a TokenReview
  says who the bearer is, a SubjectAccessReview whether they may `verb` the
  virtual subresource pods/capture, pods/drops or pods/captures. Users are
  granted those in RBAC like any other permission: a Role or ClusterRole rule
  with apiGroups [""], resources [pods/capture, pods/drops, pods/captures]
  and the verbs the endpoints use (get, list, create). No such resources
  exist in the API server; RBAC does not need them to.
- NoAuth: refuses everything; what the daemon runs with when it was given
  neither a token file nor a cluster, so a forgotten setting never serves
  packets to anyone who asks.

KubernetesAuth is in monitor/kubeauth.py, the limit on failed attempts per client
in monitor/failurelimit.py.

Bearer tokens never reach a log, an error reason or the decision cache: logs
carry the user name and the decision, the cache a SHA-256 of the token.
"""

from __future__ import annotations

import hmac
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from monitor import log
from monitor.tls import Certificate

VERBS = ("get", "list", "create")
SUBRESOURCES = ("capture", "drops", "captures")
SHARED_USER = "token"  # the user name TokenFileAuth reports: the token is shared, not personal
MAX_TOKEN_LENGTH = 16384  # service account JWTs are ~1 KB; OIDC ones with many groups a few KB
MAX_REASON_LENGTH = 300  # an authorizer's reason longer than this is not passed on
NO_AUTH_REASON = "no authentication is configured: set --auth-token-file or run in a cluster"
# The audience a podnetmon token is minted for (kubectl create token SA --audience podnetmon).
DEFAULT_AUDIENCES = ("podnetmon",)
CHALLENGE = 'Bearer realm="podnetmon"'  # RFC 6750's WWW-Authenticate for a 401


@dataclass(frozen=True)
class Request:
    """What the HTTP layer knows of a request; headers are looked up case-insensitively.

    certificate: the client certificate the TLS layer verified against the client CA,
    if the client presented one (then a bearer token is not needed).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    peer: str = ""
    tls: bool = False
    certificate: Certificate | None = None


@dataclass(frozen=True)
class Access:
    """What an endpoint is about to do, as Kubernetes RBAC names it.

    namespace "" is cluster scope (every namespace), pod "" every pod of the
    namespace. Checked here because a typo would otherwise be a
    SubjectAccessReview for a permission nobody was ever granted.
    """

    verb: str
    namespace: str = ""
    pod: str = ""
    subresource: str = ""
    path: str = ""  # a non-resource URL (/metrics), as kube-rbac-proxy authorizes it

    def __post_init__(self) -> None:
        if self.verb not in VERBS:
            raise ValueError(f"verb {self.verb!r} is not one of {', '.join(VERBS)}")
        if self.path:
            if not self.path.startswith("/") or self.namespace or self.pod or self.subresource:
                raise ValueError("a non-resource access is a path alone")
            return
        if self.subresource not in SUBRESOURCES:
            raise ValueError(f"subresource {self.subresource!r} is not one of {', '.join(SUBRESOURCES)}")
        if self.pod and not self.namespace:
            raise ValueError("a pod needs its namespace")

    def describe(self) -> str:
        if self.path:
            return f"{self.verb} {self.path}"
        where = f'in namespace "{self.namespace}"' if self.namespace else "in every namespace"
        what = f'pods/{self.subresource} of "{self.pod}"' if self.pod else f"pods/{self.subresource}"
        return f"{self.verb} {what} {where}"


class AuthError(Exception):
    """A refusal: 401 no or bad credentials, 403 not allowed, 503 nobody can decide now.

    `reason` goes back to the client as is, so it never holds a token.
    """

    def __init__(self, status: int, reason: str, *, retry_after: float = 0) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        """Headers the response should carry: the bearer challenge with a 401, when to
        come back with a 429 or 503."""
        if self.status == 401:
            return {"WWW-Authenticate": CHALLENGE}
        if self.retry_after > 0:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}
        return {}


class Authenticator(Protocol):
    def check(self, request: Request, access: Access) -> str:
        """The authenticated user's name, or AuthError."""
        ...


# -- shared pieces -------------------------------------------------------------------------


def header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # http.server's headers (email.message) ignore case themselves
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    return value


def bearer_token(request: Request) -> str:
    """The token of `Authorization: Bearer <token>`; AuthError 401 for anything else.

    The scheme is case-insensitive (RFC 7235), as the API server's own parser has it.
    """
    value = header(request.headers, "Authorization")
    if value is None:
        raise AuthError(401, "authentication required: send Authorization: Bearer <token>")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError(401, "unsupported authorization: send Authorization: Bearer <token>")
    if len(token) > MAX_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise AuthError(401, "malformed bearer token")
    return token


def token_bytes(token: str) -> bytes:
    # surrogatepass: any str encodes, one way only, so compare_digest (which refuses
    # non-ASCII str) never raises and two different tokens never compare equal.
    return token.encode("utf-8", "surrogatepass")


def client_safe(text: str | None, token: str) -> str:
    """text when it can go to a client and a log unchanged, else "".

    Authorizers' reasons are meant for people, but a webhook may put anything there:
    only short printable ASCII that does not contain the token is passed on.
    """
    if not text:
        return ""
    text = text.strip()
    if len(text) > MAX_REASON_LENGTH or not all(" " <= c <= "~" for c in text):
        return ""
    if token and token in text:
        return ""
    return text


def log_decision(logger: Any, request: Request, access: Access, *, user: str, status: int,
                  reason: str = "", **extra: Any) -> None:
    """One line per decision, the audit trail of who read whose packets; never a token.

    The path goes without its query string: nothing here reads credentials from a
    query, but a client might still put one there.
    """
    fields = {"user": user or None, "method": request.method, "path": urlsplit(request.path).path,
              "verb": access.verb, "namespace": access.namespace, "pod": access.pod,
              "subresource": access.subresource, **extra}
    if status == 200:
        logger.info("access allowed", **fields)
    else:
        logger.info("access refused", status=status, reason=reason, **fields)


# -- NoAuth --------------------------------------------------------------------------------


class NoAuth:
    """Refuses everything: the safe default when no authenticator is configured."""

    def __init__(self) -> None:
        self._log = log.get("auth").bind(mode="none")

    def check(self, request: Request, access: Access) -> str:
        log_decision(self._log, request, access, user="", status=503, reason=NO_AUTH_REASON)
        raise AuthError(503, NO_AUTH_REASON)


# -- TokenFileAuth -------------------------------------------------------------------------


class TokenFileAuth:
    """One shared bearer token, from a file re-read whenever it changes.

    A change is a new (mtime, size, inode, device) of the file the path leads to:
    mtime as asked, and the inode because Kubernetes rotates a mounted Secret by
    swapping a symlink to a new file, which may well keep the old mtime. A missing,
    unreadable or empty file refuses every request with 503: there is no token that
    could be right, and a misconfiguration is not the client's fault.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._token = b""
        self._log = log.get("auth").bind(mode="token")

    def _current(self) -> bytes:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        except OSError:
            stamp = None
        with self._lock:
            if stamp is None:
                if self._stamp is not None or self._token:
                    self._log.warning("token file gone: refusing every request", path=self.path)
                self._stamp, self._token = None, b""
                return b""
            if stamp != self._stamp:
                # Stat first, read second: a write that lands between the two leaves a
                # newer stamp on the file, so the next request reads it again.
                try:
                    with open(self.path, "rb") as f:
                        token = f.read(MAX_TOKEN_LENGTH + 1).strip()
                except OSError as exc:
                    self._log.warning("token file unreadable: refusing every request",
                                      path=self.path, error=type(exc).__name__)
                    token = b""
                if len(token) > MAX_TOKEN_LENGTH:
                    self._log.warning("token file too long: refusing every request", path=self.path)
                    token = b""
                if token:
                    self._log.info("token file read", path=self.path, rotated=self._stamp is not None)
                else:
                    self._log.warning("token file empty: refusing every request", path=self.path)
                self._stamp, self._token = stamp, token
            return self._token

    def check(self, request: Request, access: Access) -> str:
        if request.certificate is not None and header(request.headers, "Authorization") is None:
            # Signed by the client CA the operator named: as good as the shared token.
            user = request.certificate.user
            log_decision(self._log, request, access, user=user, status=200, via="certificate")
            return user
        expected = self._current()
        try:
            if not expected:
                raise AuthError(503, "no token is configured: the token file is missing or empty")
            given = token_bytes(bearer_token(request))
            # Constant time: how long the comparison takes must not tell how much matched.
            if not hmac.compare_digest(given, expected):
                raise AuthError(401, "invalid bearer token")
        except AuthError as err:
            log_decision(self._log, request, access, user="", status=err.status, reason=err.reason)
            raise
        log_decision(self._log, request, access, user=SHARED_USER, status=200)
        return SHARED_USER
# -- choosing one --------------------------------------------------------------------------

MODES = ("auto", "token", "kubernetes", "none")


def authenticator(mode: str, *, token_file: str, api_client_factory: Callable[[], Any],
                  audiences: Sequence[str] = DEFAULT_AUDIENCES,
                  max_reviews: int = 4) -> Authenticator:
    """The Authenticator for a mode: token, kubernetes, none, or auto.

    auto: the token file if one is given; else the cluster, if `api_client_factory`
    can build an ApiClient (it raises, or returns None, outside a cluster); else NoAuth.
    An explicit mode that cannot work is an error (ValueError, or the factory's own),
    so the daemon stops at start-up instead of refusing every request later.
    """
    # KubernetesAuth is built on this module's Request and AuthError: imported here,
    # where it is chosen, so that neither module is half-made when the other loads
    from monitor.kubeauth import KubernetesAuth

    logger = log.get("auth")
    if mode not in MODES:
        raise ValueError(f"auth mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        logger.warning("no authentication configured: capture and drop endpoints refuse everything")
        return NoAuth()
    if mode == "token" or (mode == "auto" and token_file):
        if not token_file:
            raise ValueError("auth mode token needs a token file (--auth-token-file)")
        logger.info("authenticating with a token file", path=token_file)
        return TokenFileAuth(token_file)
    if mode == "kubernetes":
        api_client = api_client_factory()
        if api_client is None:
            raise ValueError("auth mode kubernetes needs a Kubernetes API client")
        logger.info("authenticating with the kubernetes api", audiences=list(audiences))
        return KubernetesAuth(api_client, audiences=audiences, max_reviews=max_reviews)
    try:
        api_client = api_client_factory()
    except Exception as exc:  # noqa: BLE001 - not in a cluster, which auto allows for
        logger.info("no kubernetes api for authentication", error=type(exc).__name__)
        api_client = None
    if api_client is None:
        logger.warning("no authentication configured: capture and drop endpoints refuse everything")
        return NoAuth()
    logger.info("authenticating with the kubernetes api", audiences=list(audiences))
    return KubernetesAuth(api_client, audiences=audiences, max_reviews=max_reviews)
