"""KubernetesAuth: the cluster decides who may read packets, as kube-rbac-proxy does.

A TokenReview says who the bearer is (or a client certificate the TLS layer verified
does), a SubjectAccessReview whether they may use the virtual subresource; decisions
are cached under a digest of the token, never the token. The shared vocabulary
(Request, Access, AuthError) and the simpler authenticators are in monitor/auth.py.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monitor import log
from monitor.auth import (
    DEFAULT_AUDIENCES,
    Access,
    AuthError,
    Request,
    bearer_token,
    client_safe,
    header,
    log_decision,
    token_bytes,
)
from monitor.tls import Certificate


@dataclass(frozen=True)
class _Decision:
    expires: float
    user: str
    status: int  # 200: allowed
    reason: str


CacheKey = tuple[str, Access]


def token_digest(token: str) -> str:
    """What the decision cache knows a token by: its SHA-256, hex."""
    return hashlib.sha256(token_bytes(token)).hexdigest()


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
        if request.certificate is not None and header(request.headers, "Authorization") is None:
            return self._check_certificate(request, access, request.certificate)
        try:
            token = bearer_token(request)
        except AuthError as err:
            log_decision(self._log, request, access, user="", status=err.status, reason=err.reason)
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
        log_decision(self._log, request, access, user=decision.user, status=decision.status,
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
        log_decision(self._log, request, access, user=decision.user, status=decision.status,
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
        shown = client_safe(name, token)
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
            error = client_safe(result.error if result is not None else None, token)
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
                           error=client_safe(result.evaluation_error, token) or "(not shown)")
        if result.allowed and not result.denied:
            return True, ""
        return False, client_safe(result.reason, token)

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
