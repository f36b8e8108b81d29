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

Bearer tokens never reach a log, an error reason or the decision cache: logs
carry the user name and the decision, the cache a SHA-256 of the token.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from monitor import log

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
    """What the HTTP layer knows of a request; headers are looked up case-insensitively."""

    method: str
    path: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Access:
    """What an endpoint is about to do, as Kubernetes RBAC names it.

    namespace "" is cluster scope (every namespace), pod "" every pod of the
    namespace. Checked here because a typo would otherwise be a
    SubjectAccessReview for a permission nobody was ever granted.
    """

    verb: str
    namespace: str
    pod: str
    subresource: str

    def __post_init__(self) -> None:
        if self.verb not in VERBS:
            raise ValueError(f"verb {self.verb!r} is not one of {', '.join(VERBS)}")
        if self.subresource not in SUBRESOURCES:
            raise ValueError(f"subresource {self.subresource!r} is not one of {', '.join(SUBRESOURCES)}")
        if self.pod and not self.namespace:
            raise ValueError("a pod needs its namespace")

    def describe(self) -> str:
        where = f'in namespace "{self.namespace}"' if self.namespace else "in every namespace"
        what = f'pods/{self.subresource} of "{self.pod}"' if self.pod else f"pods/{self.subresource}"
        return f"{self.verb} {what} {where}"


class AuthError(Exception):
    """A refusal: 401 no or bad credentials, 403 not allowed, 503 nobody can decide now.

    `reason` goes back to the client as is, so it never holds a token.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason

    @property
    def headers(self) -> dict[str, str]:
        """Headers the response should carry: the bearer challenge with a 401."""
        return {"WWW-Authenticate": CHALLENGE} if self.status == 401 else {}


class Authenticator(Protocol):
    def check(self, request: Request, access: Access) -> str:
        """The authenticated user's name, or AuthError."""
        ...


# -- shared pieces -------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # http.server's headers (email.message) ignore case themselves
    if value is None:
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    return value


def bearer_token(request: Request) -> str:
    """The token of `Authorization: Bearer <token>`; AuthError 401 for anything else.

    The scheme is case-insensitive (RFC 7235), as the API server's own parser has it.
    """
    value = _header(request.headers, "Authorization")
    if value is None:
        raise AuthError(401, "authentication required: send Authorization: Bearer <token>")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError(401, "unsupported authorization: send Authorization: Bearer <token>")
    if len(token) > MAX_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise AuthError(401, "malformed bearer token")
    return token


def _token_bytes(token: str) -> bytes:
    # surrogatepass: any str encodes, one way only, so compare_digest (which refuses
    # non-ASCII str) never raises and two different tokens never compare equal.
    return token.encode("utf-8", "surrogatepass")


def _safe(text: str | None, token: str) -> str:
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


def _log_decision(logger: Any, request: Request, access: Access, *, user: str, status: int,
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
        _log_decision(self._log, request, access, user="", status=503, reason=NO_AUTH_REASON)
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
        expected = self._current()
        try:
            if not expected:
                raise AuthError(503, "no token is configured: the token file is missing or empty")
            given = _token_bytes(bearer_token(request))
            # Constant time: how long the comparison takes must not tell how much matched.
            if not hmac.compare_digest(given, expected):
                raise AuthError(401, "invalid bearer token")
        except AuthError as err:
            _log_decision(self._log, request, access, user="", status=err.status, reason=err.reason)
            raise
        _log_decision(self._log, request, access, user=SHARED_USER, status=200)
        return SHARED_USER


# -- KubernetesAuth ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Decision:
    expires: float
    user: str
    status: int  # 200: allowed
    reason: str


CacheKey = tuple[str, Access]


def token_digest(token: str) -> str:
    """What the decision cache knows a token by: its SHA-256, hex."""
    return hashlib.sha256(_token_bytes(token)).hexdigest()


class KubernetesAuth:
    """TokenReview, then SubjectAccessReview, through the official client; decisions cached.

    `api_client` is a kubernetes.client.ApiClient (in-cluster, or from a kubeconfig).
    Allowed, denied (403) and unauthenticated (401) answers are kept for `ttl` and
    `negative_ttl` seconds under (SHA-256 of the token, access), so a client polling an
    endpoint costs the API two requests per TTL and not two per request; at most
    `max_entries` are kept, the least recently used going first. A 503 (the API
    unreachable or failing) is never kept: the next request asks again.
    """

    def __init__(self, api_client: Any, *, audiences: Sequence[str] = DEFAULT_AUDIENCES,
                 ttl: float = 10.0, negative_ttl: float = 10.0,
                 max_entries: int = 4096, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from kubernetes import client  # the client is imported late, as everywhere else

        if ttl < 0 or negative_ttl < 0 or max_entries < 1 or timeout <= 0:
            raise ValueError("ttl and negative_ttl must be >= 0, max_entries >= 1, timeout > 0")
        if not audiences or not all(audiences):
            raise ValueError("audiences: at least one, none empty")
        self.audiences = tuple(audiences)
        self._client = client
        self._authn = client.AuthenticationV1Api(api_client)
        self._authz = client.AuthorizationV1Api(api_client)
        self.ttl, self.negative_ttl, self.max_entries = ttl, negative_ttl, max_entries
        self._timeout, self._clock = timeout, clock
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[CacheKey, _Decision] = collections.OrderedDict()
        self._log = log.get("auth").bind(mode="kubernetes")

    def cache_keys(self) -> list[CacheKey]:
        """What the cache holds decisions under (for tests and debugging): no tokens."""
        with self._lock:
            return list(self._cache)

    def check(self, request: Request, access: Access) -> str:
        try:
            token = bearer_token(request)
        except AuthError as err:
            _log_decision(self._log, request, access, user="", status=err.status, reason=err.reason)
            raise
        key = (token_digest(token), access)
        decision = self._cached(key)
        cached = decision is not None
        if decision is None:
            decision = self._decide(token, access)
            if decision.status != 503:
                self._store(key, decision)
        _log_decision(self._log, request, access, user=decision.user, status=decision.status,
                      reason=decision.reason, cached=cached)
        if decision.status != 200:
            raise AuthError(decision.status, decision.reason)
        return decision.user

    # -- the cache -----------------------------------------------------------------------

    def _cached(self, key: CacheKey) -> _Decision | None:
        with self._lock:
            decision = self._cache.get(key)
            if decision is None:
                return None
            if self._clock() >= decision.expires:
                del self._cache[key]
                return None
            self._cache.move_to_end(key)
            return decision

    def _store(self, key: CacheKey, decision: _Decision) -> None:
        with self._lock:
            self._cache[key] = decision
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    # -- the reviews ---------------------------------------------------------------------

    def _decide(self, token: str, access: Access) -> _Decision:
        now = self._clock()
        try:
            user = self._review_token(token)
        except AuthError as err:
            if err.status == 503:
                return _Decision(now, "", 503, err.reason)
            return _Decision(now + self.negative_ttl, "", err.status, err.reason)
        allowed, reason = self._review_access(token, user, access)
        name = str(user.username)
        if allowed is None:
            return _Decision(now, name, 503, reason)
        if allowed:
            return _Decision(now + self.ttl, name, 200, "")
        shown = _safe(name, token)
        who = f'user "{shown}"' if shown else "this user"
        refusal = f"forbidden: {who} may not {access.describe()}"
        return _Decision(now + self.negative_ttl, name, 403, f"{refusal}: {reason}" if reason else refusal)

    def _review_token(self, token: str) -> Any:
        """The V1UserInfo of the token's user; AuthError 401 if nobody, 503 if unknown."""
        c = self._client
        review = c.V1TokenReview(api_version="authentication.k8s.io/v1", kind="TokenReview",
                                 spec=c.V1TokenReviewSpec(token=token,
                                                          audiences=list(self.audiences)))
        try:
            answer = self._authn.create_token_review(review, _request_timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001 - whatever broke, nobody can vouch for the token
            self._api_failed("TokenReview", exc)
            raise AuthError(503, "cannot check credentials now: the Kubernetes API is unavailable") \
                from None
        result = answer.status
        user = result.user if result is not None else None
        if result is None or not result.authenticated or user is None or not user.username:
            # status.error says why (expired, wrong signature...), but in the API server's
            # words, which may be detailed: the client only learns that it failed.
            error = _safe(result.error if result is not None else None, token)
            self._log.debug("token not authenticated", error=error or None)
            raise AuthError(401, "invalid or expired bearer token")
        # The API server refuses a token for other audiences itself, but an authenticator
        # it delegates to may ignore spec.audiences: the answer must name one of ours
        # (as the TokenReview API asks of every client).
        if not set(result.audiences or ()) & set(self.audiences):
            self._log.debug("token not meant for this service", audiences=result.audiences)
            raise AuthError(401, f"bearer token not meant for {' or '.join(self.audiences)} "
                                 "(its audience)")
        return user

    def _review_access(self, token: str, user: Any, access: Access) -> tuple[bool | None, str]:
        """(allowed, reason): None when the API could not answer; reason client-safe."""
        c = self._client
        review = c.V1SubjectAccessReview(
            api_version="authorization.k8s.io/v1", kind="SubjectAccessReview",
            spec=c.V1SubjectAccessReviewSpec(
                user=user.username, groups=user.groups, uid=user.uid, extra=user.extra,
                resource_attributes=c.V1ResourceAttributes(
                    namespace=access.namespace, verb=access.verb, group="", resource="pods",
                    subresource=access.subresource, name=access.pod)))
        try:
            answer = self._authz.create_subject_access_review(review, _request_timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001 - no answer is not a no
            self._api_failed("SubjectAccessReview", exc)
            return None, "cannot check permissions now: the Kubernetes API is unavailable"
        result = answer.status
        if result is None:
            return None, "cannot check permissions now: the Kubernetes API gave no answer"
        if result.evaluation_error:
            # Often harmless (a binding to a role that does not exist); a denial stays one.
            self._log.info("authorizer evaluation error", user=user.username,
                           error=_safe(result.evaluation_error, token) or "(not shown)")
        if result.allowed and not result.denied:
            return True, ""
        return False, _safe(result.reason, token)

    def _api_failed(self, what: str, exc: Exception) -> None:
        # Only the type and the HTTP status: an ApiException's text carries the whole
        # response, and a TokenReview's response echoes its spec, the token included.
        self._log.warning("kubernetes api review failed", review=what, error=type(exc).__name__,
                          status=getattr(exc, "status", None))


# -- choosing one --------------------------------------------------------------------------

MODES = ("auto", "token", "kubernetes", "none")


def authenticator(mode: str, *, token_file: str, api_client_factory: Callable[[], Any],
                  audiences: Sequence[str] = DEFAULT_AUDIENCES) -> Authenticator:
    """The Authenticator for a mode: token, kubernetes, none, or auto.

    auto: the token file if one is given; else the cluster, if `api_client_factory`
    can build an ApiClient (it raises, or returns None, outside a cluster); else NoAuth.
    An explicit mode that cannot work is an error (ValueError, or the factory's own),
    so the daemon stops at start-up instead of refusing every request later.
    """
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
        return KubernetesAuth(api_client, audiences=audiences)
    try:
        api_client = api_client_factory()
    except Exception as exc:  # noqa: BLE001 - not in a cluster, which auto allows for
        logger.info("no kubernetes api for authentication", error=type(exc).__name__)
        api_client = None
    if api_client is None:
        logger.warning("no authentication configured: capture and drop endpoints refuse everything")
        return NoAuth()
    logger.info("authenticating with the kubernetes api", audiences=list(audiences))
    return KubernetesAuth(api_client, audiences=audiences)

