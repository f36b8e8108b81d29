"""monitor.auth: who may read packet contents and drop details.

KubernetesAuth is tested through the official client against tests/fakeapi.py's
TokenReview and SubjectAccessReview endpoints, so what is checked is what the client
really sends (the recorded bodies) and how the answers really come back. Time is a
fake clock, so the cache's TTLs are exact.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from monitor import auth
from monitor import log as monitor_log
from monitor.auth import (
    NO_AUTH_REASON,
    Access,
    AuthError,
    NoAuth,
    Request,
    TokenFileAuth,
    authenticator,
)
from monitor.failurelimit import FailureLimiter
from monitor.kubeauth import KubernetesAuth
from monitor.tls import Certificate
from tests.fakeapi import AUTHN_REVIEWS_PATH, AUTHZ_REVIEWS_PATH, FakeApiServer

SHARED = "s3cr3t-T0ken.with_chars~+/="  # what TokenFileAuth expects
ALICE = "eyJhbGciOiJSUzI1NiJ9.alice-token.sig"  # a token the fake API knows as alice
BOB = "eyJhbGciOiJSUzI1NiJ9.bob-token.sig"  # ... as bob, in group "netops"
CAPTURE = Access("get", "shop", "web-1", "capture")


def req(authorization: str | None = None, path: str = "/api/v1/capture/shop/web-1") -> Request:
    headers = {} if authorization is None else {"Authorization": authorization}
    return Request("GET", path, headers)


def bearer(token: str) -> Request:
    return req(f"Bearer {token}")


def refused(authn: auth.Authenticator, request: Request, access: Access = CAPTURE) -> AuthError:
    with pytest.raises(AuthError) as info:
        authn.check(request, access)
    return info.value


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as entries:
        yield entries


# -- Request, Access, AuthError ---------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    pytest.param(("watch", "shop", "", "capture"), "verb 'watch'", id="verb"),
    pytest.param(("get", "shop", "", "exec"), "subresource 'exec'", id="subresource"),
    pytest.param(("get", "", "web-1", "drops"), "namespace", id="pod-without-namespace"),
])
def test_access_refuses_what_no_endpoint_means(args: tuple[str, str, str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Access(*args)


def test_access_values_the_endpoints_use() -> None:
    for verb in ("get", "list", "create"):
        for sub in ("capture", "drops", "captures"):
            assert Access(verb, "", "", sub).subresource == sub
    assert Access("list", "shop", "", "drops").describe() == 'list pods/drops in namespace "shop"'
    assert Access("list", "", "", "drops").describe() == "list pods/drops in every namespace"


def test_auth_error_carries_a_bearer_challenge_only_with_401() -> None:
    assert AuthError(401, "x").headers == {"WWW-Authenticate": 'Bearer realm="podnetmon"'}
    assert AuthError(403, "x").headers == {}
    assert AuthError(503, "x").headers == {}
    err = AuthError(403, "no")
    assert (err.status, err.reason) == (403, "no")


# -- TokenFileAuth -----------------------------------------------------------------------------

@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(SHARED + "\n")  # a trailing newline, as `echo` and most Secrets leave it
    return path


def test_token_file_right_token(token_file: Path) -> None:
    assert TokenFileAuth(str(token_file)).check(bearer(SHARED), CAPTURE) == "token"


def test_token_file_wrong_token(token_file: Path) -> None:
    a = TokenFileAuth(str(token_file))
    for wrong in (SHARED[:-1], SHARED + "x", SHARED.upper(), "x"):
        err = refused(a, bearer(wrong))
        assert (err.status, err.reason) == (401, "invalid bearer token")
        assert err.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_file_no_header(token_file: Path) -> None:
    err = refused(TokenFileAuth(str(token_file)), req())
    assert err.status == 401
    assert "Authorization: Bearer" in err.reason


@pytest.mark.parametrize("value", [
    pytest.param(f"Basic {SHARED}", id="basic"),
    pytest.param(f"Token {SHARED}", id="token-scheme"),
    pytest.param(SHARED, id="no-scheme"),
    pytest.param("Bearer", id="bearer-alone"),
    pytest.param("Bearer    ", id="bearer-blank"),
    pytest.param("", id="empty"),
    pytest.param(f"Bearer {SHARED} extra", id="two-tokens"),
    pytest.param(f"Bearer{SHARED}", id="no-space"),
    pytest.param(f"Bearer {'x' * 20000}", id="huge"),
])
def test_token_file_other_schemes(token_file: Path, value: str) -> None:
    assert refused(TokenFileAuth(str(token_file)), req(value)).status == 401


@pytest.mark.parametrize("value", [f"bearer {SHARED}", f"BEARER {SHARED}", f"  Bearer   {SHARED}  "])
def test_token_file_scheme_is_case_insensitive(token_file: Path, value: str) -> None:
    assert TokenFileAuth(str(token_file)).check(req(value), CAPTURE) == "token"


def test_token_file_header_name_is_case_insensitive(token_file: Path) -> None:
    from http.client import HTTPMessage

    a = TokenFileAuth(str(token_file))
    assert a.check(Request("GET", "/", {"authorization": f"Bearer {SHARED}"}), CAPTURE) == "token"
    message = HTTPMessage()  # what BaseHTTPRequestHandler.headers is
    message["AUTHORIZATION"] = f"Bearer {SHARED}"
    assert a.check(Request("GET", "/", message), CAPTURE) == "token"  # type: ignore[arg-type]


def test_token_file_non_ascii_token_is_refused_not_a_crash(token_file: Path) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII str: the comparison is on bytes.
    assert refused(TokenFileAuth(str(token_file)), bearer("tökén\udcff")).status == 401
    token_file.write_text("tökén-ünïcode")
    assert TokenFileAuth(str(token_file)).check(bearer("tökén-ünïcode"), CAPTURE) == "token"


def bump_mtime(path: Path, seconds: int = 10) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_token_file_rotated(token_file: Path) -> None:
    a = TokenFileAuth(str(token_file))
    assert a.check(bearer(SHARED), CAPTURE) == "token"
    new = "N" * len(SHARED)  # the same size: only the mtime tells
    token_file.write_text(new + "\n")
    bump_mtime(token_file)
    assert a.check(bearer(new), CAPTURE) == "token"
    assert refused(a, bearer(SHARED)).status == 401


def test_token_file_rotated_by_symlink_swap_keeping_the_mtime(tmp_path: Path) -> None:
    # How the kubelet updates a mounted Secret: a new directory, then an atomic rename
    # of the ..data symlink; the new file may carry the same mtime as the old one.
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "token").write_text(SHARED)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "token").symlink_to("..data/token")
    a = TokenFileAuth(str(tmp_path / "token"))
    assert a.check(bearer(SHARED), CAPTURE) == "token"
    (tmp_path / "v2").mkdir()
    new = "M" * len(SHARED)
    (tmp_path / "v2" / "token").write_text(new)
    old = (tmp_path / "v1" / "token").stat()
    os.utime(tmp_path / "v2" / "token", ns=(old.st_atime_ns, old.st_mtime_ns))
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert a.check(bearer(new), CAPTURE) == "token"
    assert refused(a, bearer(SHARED)).status == 401


def test_token_file_is_read_once_until_it_changes(token_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(auth, "open", counting_open, raising=False)
    a = TokenFileAuth(str(token_file))
    for _ in range(5):
        a.check(bearer(SHARED), CAPTURE)
    assert opened == [str(token_file)]
    bump_mtime(token_file)
    a.check(bearer(SHARED), CAPTURE)
    assert opened == [str(token_file)] * 2


@pytest.mark.parametrize("content", [None, "", "\n", "  \t\n"], ids=["missing", "empty", "newline", "blank"])
def test_token_file_missing_or_empty_refuses_everything(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    a = TokenFileAuth(str(path))
    for request in (bearer(SHARED), bearer(""), req(), bearer("anything")):
        err = refused(a, request)
        assert err.status == 503
        assert err.reason == "no token is configured: the token file is missing or empty"
        assert str(path) not in err.reason  # the client need not learn the daemon's paths


def test_token_file_removed_then_restored(token_file: Path) -> None:
    a = TokenFileAuth(str(token_file))
    assert a.check(bearer(SHARED), CAPTURE) == "token"
    token_file.unlink()
    assert refused(a, bearer(SHARED)).status == 503  # the old token is not kept
    token_file.write_text("back")
    assert a.check(bearer("back"), CAPTURE) == "token"


def test_token_file_compares_in_constant_time(token_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    a = TokenFileAuth(str(token_file))
    assert a.check(bearer(SHARED), CAPTURE) == "token"
    refused(a, bearer("wrong"))
    assert calls == [(SHARED.encode(), SHARED.encode()), (b"wrong", SHARED.encode())]


def test_token_file_ignores_the_access(token_file: Path) -> None:
    a = TokenFileAuth(str(token_file))
    for access in (Access("list", "", "", "drops"), Access("create", "kube-system", "x", "captures")):
        assert a.check(bearer(SHARED), access) == "token"


# -- NoAuth ------------------------------------------------------------------------------------

def test_no_auth_refuses_everything() -> None:
    for request in (req(), bearer(SHARED)):
        err = refused(NoAuth(), request)
        assert (err.status, err.reason) == (503, NO_AUTH_REASON)
    assert NO_AUTH_REASON == ("no authentication is configured: set --auth-token-file or run in "
                              "a cluster")


# -- KubernetesAuth against the fake API ------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    s = FakeApiServer().start()
    s.add_token(ALICE, "alice", ["devs", "system:authenticated"])
    s.add_token(BOB, "bob", ["netops", "system:authenticated"])
    yield s
    s.stop()


@pytest.fixture
def api_client(server: FakeApiServer, tmp_path: Path) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=server.write_kubeconfig(str(tmp_path / "kc")))


@pytest.fixture
def clock() -> Clock:
    return Clock()


KubeFactory = Callable[..., KubernetesAuth]


@pytest.fixture
def kube(api_client: Any, clock: Clock) -> KubeFactory:
    def build(**kwargs: Any) -> KubernetesAuth:
        return KubernetesAuth(api_client, clock=clock, **kwargs)

    return build


def posts(server: FakeApiServer) -> list[str]:
    return [p for m, p, _q in list(server.requests) if m == "POST"]


def test_kubernetes_authenticated_and_allowed(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("alice", "get", "shop", "pods", "capture", "web-1")
    assert kube().check(bearer(ALICE), CAPTURE) == "alice"
    assert posts(server) == [AUTHN_REVIEWS_PATH, AUTHZ_REVIEWS_PATH]


def test_kubernetes_allowed_through_a_group(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("netops", "list", "", "pods", "drops", "")
    a = kube()
    assert a.check(bearer(BOB), Access("list", "", "", "drops")) == "bob"
    assert refused(a, bearer(ALICE), Access("list", "", "", "drops")).status == 403


def test_kubernetes_authenticated_but_denied(server: FakeApiServer, kube: KubeFactory) -> None:
    server.deny_reason = "RBAC: no rule grants pods/capture"
    err = refused(kube(), bearer(ALICE))
    assert err.status == 403
    assert err.reason == ('forbidden: user "alice" may not get pods/capture of "web-1" in namespace '
                          '"shop": RBAC: no rule grants pods/capture')
    assert ALICE not in err.reason


def test_kubernetes_denied_without_a_reason(server: FakeApiServer, kube: KubeFactory) -> None:
    server.deny_reason = ""  # RBAC itself gives none when nothing matched
    err = refused(kube(), bearer(ALICE))
    assert (err.status, err.reason) == (
        403, 'forbidden: user "alice" may not get pods/capture of "web-1" in namespace "shop"')


@pytest.mark.parametrize("reason", [
    pytest.param(f"token {ALICE} has no rights", id="contains-the-token"),
    pytest.param("line one\nline two", id="control-characters"),
    pytest.param("x" * 400, id="too-long"),
    pytest.param("d\u00e9nied", id="non-ascii"),
])
def test_kubernetes_unsafe_reasons_are_not_passed_on(server: FakeApiServer, kube: KubeFactory,
                                                     reason: str) -> None:
    server.deny_reason = reason
    err = refused(kube(), bearer(ALICE))
    assert (err.status, err.reason) == (
        403, 'forbidden: user "alice" may not get pods/capture of "web-1" in namespace "shop"')


def test_kubernetes_unknown_token(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("*")  # everything allowed to everyone: still nobody without a known token
    err = refused(kube(), bearer("not-a-known-token"))
    assert (err.status, err.reason) == (401, "invalid or expired bearer token")
    assert err.headers == {"WWW-Authenticate": 'Bearer realm="podnetmon"'}
    assert posts(server) == [AUTHN_REVIEWS_PATH]  # no SubjectAccessReview for nobody


@pytest.mark.parametrize("value", [None, f"Basic {ALICE}", "Bearer"])
def test_kubernetes_no_bearer_token_asks_nothing(server: FakeApiServer, kube: KubeFactory,
                                                  value: str | None) -> None:
    assert refused(kube(), req(value)).status == 401
    assert server.requests == []


@pytest.mark.parametrize("access", [
    pytest.param(Access("get", "shop", "web-1", "drops"), id="other-subresource"),
    pytest.param(Access("get", "bank", "web-1", "capture"), id="other-namespace"),
    pytest.param(Access("get", "shop", "web-2", "capture"), id="other-pod"),
    pytest.param(Access("create", "shop", "web-1", "capture"), id="other-verb"),
    pytest.param(Access("get", "", "", "capture"), id="cluster-scope"),
    pytest.param(Access("get", "shop", "", "capture"), id="every-pod-of-the-namespace"),
])
def test_kubernetes_grants_are_exact(server: FakeApiServer, kube: KubeFactory, access: Access) -> None:
    server.grant("alice", "get", "shop", "pods", "capture", "web-1")
    a = kube()
    assert a.check(bearer(ALICE), CAPTURE) == "alice"
    assert refused(a, bearer(ALICE), access).status == 403


API_TOKEN = "eyJhbGciOiJSUzI1NiJ9.carol-api-token.sig"  # minted for the API server only


def test_kubernetes_refuses_a_token_meant_for_another_audience(
        server: FakeApiServer, kube: KubeFactory) -> None:
    server.add_token(API_TOKEN, "carol", ["system:authenticated"],
                     audiences=["https://kubernetes.default.svc"])
    server.grant("carol")
    a = kube()
    err = refused(a, bearer(API_TOKEN))
    assert err.status == 401
    assert server.access_reviews() == []  # refused before anyone asks what carol may do


def test_kubernetes_checks_the_audiences_the_answer_grants(
        server: FakeApiServer, kube: KubeFactory) -> None:
    # an authenticator webhook behind the API server that ignores spec.audiences
    server.ignore_audiences = True
    server.add_token(API_TOKEN, "carol", ["system:authenticated"],
                     audiences=["https://kubernetes.default.svc"])
    server.grant("carol")
    err = refused(kube(), bearer(API_TOKEN))
    assert err.status == 401
    assert "audience" in err.reason and "podnetmon" in err.reason


def test_kubernetes_takes_the_audiences_it_is_given(
        server: FakeApiServer, kube: KubeFactory) -> None:
    server.add_token(API_TOKEN, "carol", ["system:authenticated"], audiences=["netmon.example"])
    server.grant("carol")
    assert kube(audiences=["netmon.example", "podnetmon"]).check(bearer(API_TOKEN),
                                                                  CAPTURE) == "carol"
    assert server.token_reviews()[-1]["spec"]["audiences"] == ["netmon.example", "podnetmon"]
    assert refused(kube(), bearer(API_TOKEN)).status == 401  # the default: podnetmon only
    with pytest.raises(ValueError, match="audiences"):
        kube(audiences=[])


def test_kubernetes_sends_exactly_these_reviews(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("devs", "create", "shop", "pods", "captures", "")
    a = kube()
    assert a.check(bearer(ALICE), Access("create", "shop", "", "captures")) == "alice"
    assert server.token_reviews() == [{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                       "spec": {"token": ALICE, "audiences": ["podnetmon"]}}]
    [review] = server.access_reviews()
    assert review["apiVersion"] == "authorization.k8s.io/v1"
    assert review["kind"] == "SubjectAccessReview"
    spec = review["spec"]
    assert spec["user"] == "alice"
    assert spec["groups"] == ["devs", "system:authenticated"]
    assert spec["uid"]  # the TokenReview's uid, passed on as kube-rbac-proxy does
    assert spec["resourceAttributes"] == {"namespace": "shop", "verb": "create", "group": "",
                                          "resource": "pods", "subresource": "captures", "name": ""}
    assert set(spec) <= {"user", "groups", "uid", "extra", "resourceAttributes"}
    assert ALICE not in json.dumps(review)  # the token goes to the TokenReview only


def test_kubernetes_sends_the_pod_and_namespace_asked_for(server: FakeApiServer, kube: KubeFactory) -> None:
    a = kube()
    refused(a, bearer(BOB), Access("get", "kube-system", "coredns-abc", "drops"))
    refused(a, bearer(BOB), Access("list", "", "", "capture"))
    assert [r["spec"]["resourceAttributes"] for r in server.access_reviews()] == [
        {"namespace": "kube-system", "verb": "get", "group": "", "resource": "pods",
         "subresource": "drops", "name": "coredns-abc"},
        {"namespace": "", "verb": "list", "group": "", "resource": "pods", "subresource": "capture",
         "name": ""}]
    assert [r["spec"]["user"] for r in server.access_reviews()] == ["bob", "bob"]


@pytest.mark.parametrize("code", [500, 503, 403, 401, 429])
def test_kubernetes_token_review_fails(server: FakeApiServer, kube: KubeFactory, code: int) -> None:
    # 401/403 here are the API refusing *us* (no RBAC for tokenreviews): still nobody can decide.
    server.grant("alice")
    server.fail_next(1, code)
    err = refused(kube(), bearer(ALICE))
    assert err.status == 503
    assert "Kubernetes API" in err.reason
    assert posts(server) == [AUTHN_REVIEWS_PATH]


def test_kubernetes_access_review_fails(server: FakeApiServer, kube: KubeFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    answer_token_review = server._token_review

    def then_fail(review: dict[str, Any]) -> dict[str, Any]:
        server.fail_next(1, 500)  # the request after this TokenReview: the SubjectAccessReview
        return answer_token_review(review)

    monkeypatch.setattr(server, "_token_review", then_fail)
    server.grant("alice")
    err = refused(kube(), bearer(ALICE))
    assert (err.status, err.reason) == (503, "cannot check permissions now: the Kubernetes API is "
                                             "unavailable")
    assert posts(server) == [AUTHN_REVIEWS_PATH, AUTHZ_REVIEWS_PATH]


def test_kubernetes_api_unreachable(server: FakeApiServer, kube: KubeFactory) -> None:
    a = kube(timeout=2.0)
    server.stop()  # nothing listens on its port any more
    err = refused(a, bearer(ALICE))
    assert err.status == 503
    assert ALICE not in err.reason


def test_kubernetes_failures_are_not_cached(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("alice")
    a = kube()
    server.fail_next(1, 500)
    assert refused(a, bearer(ALICE)).status == 503
    assert a.cache_keys() == []
    assert a.check(bearer(ALICE), CAPTURE) == "alice"  # asked again at once, not after a TTL
    assert len(posts(server)) == 3


def test_kubernetes_cache_answers_the_same_check(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("alice")
    a = kube()
    assert a.check(bearer(ALICE), CAPTURE) == "alice"
    before = len(server.requests)
    for _ in range(5):
        assert a.check(bearer(ALICE), CAPTURE) == "alice"
    assert len(server.requests) == before == 2


def test_kubernetes_cache_expires_after_the_ttl(server: FakeApiServer, kube: KubeFactory,
                                                clock: Clock) -> None:
    server.grant("alice")
    a = kube(ttl=10.0)
    a.check(bearer(ALICE), CAPTURE)
    clock.now += 9.9
    a.check(bearer(ALICE), CAPTURE)
    assert len(posts(server)) == 2
    clock.now += 0.1
    a.check(bearer(ALICE), CAPTURE)
    assert len(posts(server)) == 4


def test_kubernetes_cache_default_ttl_is_ten_seconds(server: FakeApiServer, kube: KubeFactory,
                                                     clock: Clock) -> None:
    server.grant("alice")
    a = kube()
    a.check(bearer(ALICE), CAPTURE)
    refused(a, bearer(BOB))
    clock.now += 9.9
    a.check(bearer(ALICE), CAPTURE)
    refused(a, bearer(BOB))
    assert len(posts(server)) == 4
    clock.now += 0.1
    a.check(bearer(ALICE), CAPTURE)
    refused(a, bearer(BOB))
    assert len(posts(server)) == 8


def test_kubernetes_cache_sees_a_revoked_grant_after_the_ttl(server: FakeApiServer, kube: KubeFactory,
                                                             clock: Clock) -> None:
    server.grant("alice")
    a = kube(ttl=5.0, negative_ttl=5.0)
    assert a.check(bearer(ALICE), CAPTURE) == "alice"
    server.grants.clear()
    assert a.check(bearer(ALICE), CAPTURE) == "alice"  # within the TTL: the cached answer
    clock.now += 5.0
    assert refused(a, bearer(ALICE)).status == 403
    del server.tokens[ALICE]
    clock.now += 5.0
    assert refused(a, bearer(ALICE)).status == 401


def test_kubernetes_cache_keeps_denials_for_the_negative_ttl(server: FakeApiServer, kube: KubeFactory,
                                                             clock: Clock) -> None:
    a = kube(ttl=60.0, negative_ttl=2.0)
    assert refused(a, bearer(ALICE)).status == 403
    assert refused(a, bearer("unknown")).status == 401
    assert len(posts(server)) == 3
    assert refused(a, bearer(ALICE)).status == 403  # both from the cache
    assert refused(a, bearer("unknown")).status == 401
    assert len(posts(server)) == 3
    server.grant("alice")
    clock.now += 2.0
    assert a.check(bearer(ALICE), CAPTURE) == "alice"
    assert len(posts(server)) == 5


def test_kubernetes_cache_key_is_the_token_and_the_access(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("alice")
    server.grant("bob")
    a = kube()
    accesses = [CAPTURE, Access("get", "shop", "web-1", "drops"), Access("get", "shop", "web-2", "capture"),
                Access("get", "bank", "web-1", "capture"), Access("list", "shop", "", "capture")]
    for access in accesses:
        a.check(bearer(ALICE), access)
    a.check(bearer(BOB), CAPTURE)
    assert len(posts(server)) == 2 * 6  # each a round trip of its own
    for access in accesses:
        a.check(bearer(ALICE), access)
    a.check(bearer(BOB), CAPTURE)
    assert len(posts(server)) == 2 * 6  # and each cached under its own key


def test_kubernetes_cache_never_holds_the_token(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("alice")
    server.deny_reason = f"reason quoting {BOB}"
    a = kube()
    a.check(bearer(ALICE), CAPTURE)
    refused(a, bearer(BOB))
    refused(a, bearer("unknown-token-xyz"))
    keys = a.cache_keys()
    assert keys == [(hashlib.sha256(t.encode()).hexdigest(), CAPTURE) for t in (ALICE, BOB)]
    assert a.refused_keys() == [hashlib.sha256(b"unknown-token-xyz").hexdigest()]
    held = repr(keys) + repr(a._cache) + repr(a._refused)  # keys and decisions, as stored
    for token in (ALICE, BOB, "unknown-token-xyz"):
        assert token not in held


def test_kubernetes_cache_is_bounded(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("alice")
    a = kube(max_entries=3)
    pods = [Access("get", "shop", f"web-{i}", "capture") for i in range(5)]
    for access in pods[:3]:
        a.check(bearer(ALICE), access)
    a.check(bearer(ALICE), pods[0])  # used again: the least recently used is now web-1
    for access in pods[3:]:
        a.check(bearer(ALICE), access)
    assert [k[1].pod for k in a.cache_keys()] == ["web-0", "web-3", "web-4"]
    before = len(posts(server))
    a.check(bearer(ALICE), pods[0])
    assert len(posts(server)) == before
    a.check(bearer(ALICE), pods[1])  # evicted: asked again
    assert len(posts(server)) == before + 2


def test_kubernetes_rejects_bad_cache_settings(api_client: Any) -> None:
    for kwargs in ({"ttl": -1.0}, {"negative_ttl": -1.0}, {"max_entries": 0}, {"timeout": 0.0}):
        with pytest.raises(ValueError, match="ttl"):
            KubernetesAuth(api_client, **kwargs)


# -- authenticator() ---------------------------------------------------------------------------

def no_factory() -> Any:
    raise AssertionError("the API client factory must not be called")


def not_in_cluster() -> Any:
    from kubernetes.config import ConfigException

    raise ConfigException("Service host/port is not set.")


def test_mode_token(token_file: Path) -> None:
    a = authenticator("token", token_file=str(token_file), api_client_factory=no_factory)
    assert isinstance(a, TokenFileAuth)
    assert a.path == str(token_file)
    assert a.check(bearer(SHARED), CAPTURE) == "token"


def test_mode_token_needs_a_file() -> None:
    with pytest.raises(ValueError, match="token file"):
        authenticator("token", token_file="", api_client_factory=no_factory)


def test_mode_kubernetes(server: FakeApiServer, api_client: Any, token_file: Path) -> None:
    server.grant("alice")
    a = authenticator("kubernetes", token_file=str(token_file), api_client_factory=lambda: api_client)
    assert isinstance(a, KubernetesAuth)
    assert a.check(bearer(ALICE), CAPTURE) == "alice"


def test_mode_kubernetes_out_of_a_cluster_is_an_error() -> None:
    from kubernetes.config import ConfigException

    with pytest.raises(ConfigException):
        authenticator("kubernetes", token_file="", api_client_factory=not_in_cluster)
    with pytest.raises(ValueError, match="API client"):
        authenticator("kubernetes", token_file="", api_client_factory=lambda: None)


def test_mode_none(token_file: Path) -> None:
    a = authenticator("none", token_file=str(token_file), api_client_factory=no_factory)
    assert isinstance(a, NoAuth)
    assert refused(a, bearer(SHARED)).status == 503


def test_mode_auto_prefers_the_token_file(token_file: Path) -> None:
    a = authenticator("auto", token_file=str(token_file), api_client_factory=no_factory)
    assert isinstance(a, TokenFileAuth)


def test_mode_auto_in_a_cluster(server: FakeApiServer, api_client: Any) -> None:
    server.grant("alice")
    a = authenticator("auto", token_file="", api_client_factory=lambda: api_client)
    assert isinstance(a, KubernetesAuth)
    assert a.check(bearer(ALICE), CAPTURE) == "alice"


@pytest.mark.parametrize("factory", [not_in_cluster, lambda: None], ids=["raises", "returns-none"])
def test_mode_auto_with_nothing_refuses_everything(factory: Callable[[], Any]) -> None:
    a = authenticator("auto", token_file="", api_client_factory=factory)
    assert isinstance(a, NoAuth)
    assert refused(a, bearer(SHARED)).reason == NO_AUTH_REASON


@pytest.mark.parametrize("mode", ["", "off", "Token", "rbac"])
def test_unknown_mode(mode: str) -> None:
    with pytest.raises(ValueError, match="auth mode"):
        authenticator(mode, token_file="", api_client_factory=no_factory)


# -- logs --------------------------------------------------------------------------------------

def test_decisions_are_logged_with_the_user(server: FakeApiServer, kube: KubeFactory,
                                            logs: list[dict[str, Any]]) -> None:
    server.grant("alice")
    a = kube()
    a.check(bearer(ALICE), CAPTURE)
    a.check(bearer(ALICE), CAPTURE)
    refused(a, bearer(BOB))
    decisions = [(e["event"], e["user"], e.get("status"), e["cached"]) for e in logs
                 if e["event"].startswith("access")]
    assert decisions == [("access allowed", "alice", None, False), ("access allowed", "alice", None, True),
                         ("access refused", "bob", 403, False)]
    allowed = next(e for e in logs if e["event"] == "access allowed")
    assert {k: allowed[k] for k in ("verb", "namespace", "pod", "subresource", "path")} == {
        "verb": "get", "namespace": "shop", "pod": "web-1", "subresource": "capture",
        "path": "/api/v1/capture/shop/web-1"}


@pytest.fixture
def rendered() -> Iterator[io.StringIO]:
    """Everything logged, rendered as the daemon renders it (JSON lines), and stdlib logging."""
    saved = structlog.get_config()
    out = io.StringIO()
    monitor_log.configure("debug", "json", stream=out)
    yield out
    structlog.configure(**saved)


def test_the_log_never_contains_a_token(server: FakeApiServer, kube: KubeFactory, token_file: Path,
                                        rendered: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the client's and urllib3's own loggers too
    wrong = "wrong-" + SHARED
    files = TokenFileAuth(str(token_file))
    refused(files, bearer(wrong))  # failed
    refused(files, req(f"Basic {wrong}"))
    assert files.check(bearer(SHARED), CAPTURE) == "token"  # successful

    server.grant("alice", "get", "shop", "pods", "capture", "")
    server.deny_reason = f"bob's token {BOB} is not welcome"
    a = kube()
    assert a.check(req(f"Bearer {ALICE}", path=f"/api/v1/capture/shop/web-1?access_token={ALICE}"),
                   CAPTURE) == "alice"
    assert refused(a, bearer(BOB)).status == 403
    assert refused(a, bearer(wrong)).status == 401
    server.fail_next(1, 500)
    assert refused(a, bearer(BOB), Access("get", "shop", "web-1", "drops")).status == 503

    output = rendered.getvalue()
    events = [json.loads(line) for line in output.splitlines()]
    decisions = [(e["event"], e["user"], e.get("status")) for e in events if e["event"].startswith("access")]
    assert decisions == [("access refused", None, 401), ("access refused", None, 401),
                         ("access allowed", "token", None), ("access allowed", "alice", None),
                         ("access refused", "bob", 403), ("access refused", None, 401),
                         ("access refused", None, 503)]
    assert any(e["event"] == "kubernetes api review failed" for e in events)
    everything = output + caplog.text
    for token in (SHARED, wrong, ALICE, BOB):
        assert token not in everything


def test_the_log_never_contains_a_token_when_the_api_is_down(server: FakeApiServer, kube: KubeFactory,
                                                             rendered: io.StringIO,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a = kube(timeout=2.0)
    server.stop()
    assert refused(a, bearer(ALICE)).status == 503
    output = rendered.getvalue()
    assert '"kubernetes api review failed"' in output
    assert ALICE not in output + caplog.text


# -- issue 12: non-resource URLs, certificates, bounds under abuse ---------------------------


def test_kubernetes_non_resource_url_is_a_non_resource_review(server: FakeApiServer,
                                                              kube: KubeFactory) -> None:
    server.grant_path("alice", "/metrics")
    a = kube()
    assert a.check(bearer(ALICE), Access("get", path="/metrics")) == "alice"
    review = server.access_reviews()[-1]["spec"]
    assert review["nonResourceAttributes"] == {"path": "/metrics", "verb": "get"}
    assert "resourceAttributes" not in review
    err = refused(a, bearer(BOB), Access("get", path="/metrics"))
    assert err.status == 403 and "get /metrics" in err.reason
    assert refused(a, bearer(ALICE), Access("get", path="/api/v1/pods")).status == 403


def test_access_for_a_path_is_a_path_alone() -> None:
    with pytest.raises(ValueError, match="path alone"):
        Access("get", "shop", path="/metrics")
    with pytest.raises(ValueError, match="path alone"):
        Access("get", path="metrics")


def test_kubernetes_client_certificate_needs_no_token_review(server: FakeApiServer,
                                                             kube: KubeFactory) -> None:
    server.grant("netops", "get", "shop", "pods", "capture", "web-1")
    a = kube()
    carol = Request("GET", "/x", {}, certificate=Certificate("carol", ("netops",)))
    assert a.check(carol, CAPTURE) == "carol"
    assert posts(server) == [AUTHZ_REVIEWS_PATH]  # the certificate is the authentication
    spec = server.access_reviews()[-1]["spec"]
    assert spec["user"] == "carol" and spec["groups"] == ["netops"]
    dave = Request("GET", "/x", {}, certificate=Certificate("dave", ()))
    assert refused(a, dave).status == 403


def test_token_file_accepts_a_verified_client_certificate(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(SHARED)
    a = TokenFileAuth(str(path))
    assert a.check(Request("GET", "/x", {}, certificate=Certificate("ops", ())), CAPTURE) == "ops"
    # a token beside a certificate is still checked: a wrong one is not rescued by it
    both = Request("GET", "/x", {"Authorization": "Bearer wrong"},
                   certificate=Certificate("ops", ()))
    assert refused(a, both).status == 401


def test_kubernetes_garbage_tokens_cannot_evict_good_decisions(server: FakeApiServer,
                                                               kube: KubeFactory) -> None:
    server.grant("alice")
    a = kube(max_entries=3)
    a.check(bearer(ALICE), CAPTURE)
    for i in range(50):
        assert refused(a, bearer(f"garbage-{i}")).status == 401
    before = len(posts(server))
    assert a.check(bearer(ALICE), CAPTURE) == "alice"
    assert len(posts(server)) == before  # still cached: no review for it
    assert len(a.refused_keys()) == 3  # the garbage has a bounded cache of its own


def test_kubernetes_reviews_in_flight_are_bounded(server: FakeApiServer, kube: KubeFactory) -> None:
    server.grant("alice")
    a = kube(max_reviews=1, review_wait=0.05)
    a._reviews.acquire()  # one review in flight: the only slot
    try:
        err = refused(a, bearer(ALICE))
    finally:
        a._reviews.release()
    assert err.status == 503 and "in flight" in err.reason
    assert err.headers == {"Retry-After": "1"}
    assert posts(server) == []  # nothing was sent past the bound, and nothing cached
    assert a.check(bearer(ALICE), CAPTURE) == "alice"


def test_failure_limiter_blocks_an_address_past_its_rate(clock: Clock) -> None:
    limiter = FailureLimiter(60, clock=clock)  # one a second, bursts of 10
    for _ in range(10):
        assert limiter.wait("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.wait("10.0.0.1") == pytest.approx(1.0)
    assert limiter.wait("10.0.0.2") == 0  # others are not held up
    clock.now += 1.0
    assert limiter.wait("10.0.0.1") == 0  # one more try a second
    limiter.failed("10.0.0.1")
    assert limiter.wait("10.0.0.1") > 0


def test_failure_limiter_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4(clock: Clock) -> None:
    limiter = FailureLimiter(6, clock=clock)  # bursts of 1
    limiter.failed("2001:db8:1:2::5")
    assert limiter.wait("2001:db8:1:2:ffff::9") > 0  # the same /64: the same host
    assert limiter.wait("2001:db8:1:3::5") == 0
    limiter.failed("::ffff:10.1.2.3")
    assert limiter.wait("10.1.2.3") > 0


def test_failure_limiter_remembers_a_bounded_number_of_addresses(clock: Clock) -> None:
    limiter = FailureLimiter(6, max_addresses=100, clock=clock)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._buckets) == 100
