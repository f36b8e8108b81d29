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
import ipaddress
import math
import os
import threading
import time
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
        if request.certificate is not None and _header(request.headers, "Authorization") is None:
            # Signed by the client CA the operator named: as good as the shared token.
            user = request.certificate.user
            _log_decision(self._log, request, access, user=user, status=200, via="certificate")
            return user
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
                 max_entries: int = 4096, timeout: float = 5.0, max_reviews: int = 4,
                 review_wait: float = 1.0,
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
        # Two caches: decisions about users the API vouched for, and tokens it did not
        # know. Garbage tokens only ever fill the second, so a flood of them cannot push
        # a good decision out (and make the next scrape of a trace pay two reviews).
        self._cache: collections.OrderedDict[CacheKey, _Decision] = collections.OrderedDict()
        self._refused: collections.OrderedDict[str, _Decision] = collections.OrderedDict()
        # Reviews in flight at once, at most: a burst of new tokens waits for a slot, and
        # past review_wait is told to retry (503), instead of each costing the API server.
        self._reviews = threading.BoundedSemaphore(max_reviews)
        self.review_wait = review_wait
        self.reviews_sent = 0
        self._log = log.get("auth").bind(mode="kubernetes")

    def cache_keys(self) -> list[CacheKey]:
        """What the cache holds decisions under (for tests and debugging): no tokens."""
        with self._lock:
            return list(self._cache)

    def refused_keys(self) -> list[str]:
        """Digests of tokens the API did not authenticate, still remembered."""
        with self._lock:
            return list(self._refused)

    def check(self, request: Request, access: Access) -> str:
        if request.certificate is not None and _header(request.headers, "Authorization") is None:
            return self._check_certificate(request, access, request.certificate)
        try:
            token = bearer_token(request)
        except AuthError as err:
            _log_decision(self._log, request, access, user="", status=err.status, reason=err.reason)
            raise
        digest = token_digest(token)
        key = (digest, access)
        decision = self._cached(self._refused, digest) or self._cached(self._cache, key)
        cached = decision is not None
        if decision is None:
            decision = self._bounded(lambda: self._decide(token, access))
            if decision.status == 401:
                self._store(self._refused, digest, decision)
            elif decision.status != 503:
                self._store(self._cache, key, decision)
        _log_decision(self._log, request, access, user=decision.user, status=decision.status,
                      reason=decision.reason, cached=cached)
        if decision.status != 200:
            raise AuthError(decision.status, decision.reason,
                            retry_after=1 if decision.status == 503 else 0)
        return decision.user

    def _check_certificate(self, request: Request, access: Access, cert: Certificate) -> str:
        """A client certificate the TLS layer verified names the user: no TokenReview,
        the SubjectAccessReview as for a token (kubelet's x509 authenticator)."""
        user = _CertUser(cert.user, list(cert.groups))
        key = ("x509:" + cert.user + "\0" + "\0".join(cert.groups), access)
        decision = self._cached(self._cache, key)
        cached = decision is not None
        if decision is None:
            decision = self._bounded(lambda: self._authorize(user, access, token=""))
            if decision.status != 503:
                self._store(self._cache, key, decision)
        _log_decision(self._log, request, access, user=decision.user, status=decision.status,
                      reason=decision.reason, cached=cached, via="certificate")
        if decision.status != 200:
            raise AuthError(decision.status, decision.reason,
                            retry_after=1 if decision.status == 503 else 0)
        return decision.user

    def _bounded(self, decide: Callable[[], _Decision]) -> _Decision:
        if not self._reviews.acquire(timeout=self.review_wait):
            return _Decision(self._clock(), "", 503, "too many credential checks in flight: "
                                                      "retry in a second")
        try:
            return decide()
        finally:
            self._reviews.release()

    # -- the cache -----------------------------------------------------------------------

    def _cached(self, cache: collections.OrderedDict[Any, _Decision], key: Any) -> _Decision | None:
        with self._lock:
            decision = cache.get(key)
            if decision is None:
                return None
            if self._clock() >= decision.expires:
                del cache[key]
                return None
            cache.move_to_end(key)
            return decision

    def _store(self, cache: collections.OrderedDict[Any, _Decision], key: Any,
               decision: _Decision) -> None:
        with self._lock:
            cache[key] = decision
            cache.move_to_end(key)
            while len(cache) > self.max_entries:
                cache.popitem(last=False)

    # -- the reviews ---------------------------------------------------------------------

    def _decide(self, token: str, access: Access) -> _Decision:
        now = self._clock()
        try:
            user = self._review_token(token)
        except AuthError as err:
            if err.status == 503:
                return _Decision(now, "", 503, err.reason)
            return _Decision(now + self.negative_ttl, "", err.status, err.reason)
        return self._authorize(user, access, token=token)

    def _authorize(self, user: Any, access: Access, *, token: str) -> _Decision:
        now = self._clock()
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
            self.reviews_sent += 1
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
        if access.path:
            what = {"non_resource_attributes": c.V1NonResourceAttributes(path=access.path,
                                                                        verb=access.verb)}
        else:
            what = {"resource_attributes": c.V1ResourceAttributes(
                namespace=access.namespace, verb=access.verb, group="", resource="pods",
                subresource=access.subresource, name=access.pod)}
        review = c.V1SubjectAccessReview(
            api_version="authorization.k8s.io/v1", kind="SubjectAccessReview",
            spec=c.V1SubjectAccessReviewSpec(
                user=user.username, groups=user.groups, uid=user.uid, extra=user.extra, **what))
        try:
            self.reviews_sent += 1
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


@dataclass(frozen=True)
class _CertUser:
    """A certificate's user in the shape of the TokenReview's V1UserInfo."""

    username: str
    groups: list[str]
    uid: str | None = None
    extra: dict[str, list[str]] | None = None


# -- failed authentications ----------------------------------------------------------------


class FailureLimiter:
    """Failed authentications per client address: a token bucket each.

    `per_minute` failures a minute, in bursts of a sixth of that; an address past it
    waits (429) before anything it sends is checked again, so garbage tokens cost the
    API server at most this many TokenReviews per address. IPv6 clients are counted
    per /64, which is what one host can pick its addresses from. At most
    `max_addresses` are remembered, those idle longest forgotten first (an address
    forgotten starts again with a full bucket, which is the worst it can gain).
    """

    def __init__(self, per_minute: int = 60, *, max_addresses: int = 10000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1 or max_addresses < 1:
            raise ValueError("per_minute and max_addresses must be at least 1")
        self.rate = per_minute / 60.0
        self.burst = max(1.0, per_minute / 6.0)
        self.max_addresses, self._clock = max_addresses, clock
        self._lock = threading.Lock()
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self.limited = 0  # requests answered 429, for the figures

    @staticmethod
    def _key(peer: str) -> str:
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return peer
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(getattr(ip, "ipv4_mapped", None) or ip)

    def _tokens(self, key: str, now: float) -> float:
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def wait(self, peer: str) -> float:
        """Seconds until this address may try again; 0: now."""
        key, now = self._key(peer), self._clock()
        with self._lock:
            if key not in self._buckets:
                return 0.0
            tokens = self._tokens(key, now)
            if tokens >= 1.0:
                return 0.0
            self.limited += 1
            return (1.0 - tokens) / self.rate

    def failed(self, peer: str) -> None:
        key, now = self._key(peer), self._clock()
        with self._lock:
            self._buckets[key] = (self._tokens(key, now) - 1.0, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)


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

