"""Resource rules of the HTTP plugin: normalisation, refusal of ambiguous paths, access checks."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from backchannel_http._resources import (
    Allowed,
    AmbiguousPath,
    Decision,
    Denied,
    ResourceRule,
    check_access,
    normalise_request_target,
    validate_rule_path,
)

RULES = (
    ResourceRule("/sap/opu/odata", "prefix"),
    ResourceRule("/public/index.html", "exact"),
)

#: Hostile targets that the normaliser must refuse outright.
REFUSED = [
    # Encoded traversal, every case mix and spelling.
    "/sap/opu/odata/..%2f..%2fadmin",
    "/sap/opu/odata/..%2F..%2Fadmin",
    "/sap/opu/odata/%2e%2e/%2e%2e/admin",
    "/sap/opu/odata/%2E%2E/%2E%2E/admin",
    "/sap/opu/odata/%2E%2e/admin",
    "/sap/opu/odata/%2e%2E/admin",
    "/sap/opu/odata/.%2E/x",
    "/sap/opu/odata/.%2e/x",
    "/sap/opu/odata/%2e./x",
    "/sap/opu/odata/%2e/x",
    "/sap/opu/odata%2f../admin",
    "/sap/opu/odata%2F..%2Fadmin",
    "/sap/opu/odata/%2e%2e%2fadmin",
    "/sap/opu/odata/..",
    "/sap/opu/odata/.",
    "/sap/opu/odata/%2e%2e",
    "/sap/opu/odata/../admin",
    "/sap/opu/odata/./x",
    "/sap/opu/odata/.../admin",
    "/sap/opu/odata/..%20/admin",
    "/sap/opu/odata/.%20./admin",
    # Path parameters (Tomcat, Jetty, Spring).
    "/sap/opu/odata/..;/admin",
    "/sap/opu/odata/x;/../admin",
    "/sap/opu/odata/%2e%2e;/admin",
    "/sap/opu/odata/..%3b/admin",
    "/sap/opu/odata/..%3B/admin",
    "/public/index.html;jsessionid=1",
    # Overlong and invalid UTF-8.
    "/sap/opu/odata/%c0%ae%c0%ae/admin",
    "/sap/opu/odata/%C0%AE%C0%AE/admin",
    "/sap/opu/odata/%e0%80%ae%e0%80%ae/admin",
    "/sap/opu/odata/%c0%af../admin",
    "/sap/opu/odata/%80/x",
    "/sap/opu/odata/%c3",
    "/sap/opu/odata/%ed%a0%80",
    "/sap/opu/odata/%f8%80%80%80%ae",
    # Unicode compatibility forms of delimiters.
    "/sap/opu/odata/%ef%bc%8e%ef%bc%8e/admin",
    "/sap/opu/odata/%e2%80%a5/admin",
    "/sap/opu/odata/%ef%bc%8fadmin",
    "/sap/opu/odata/%c2%a0../admin",
    # Double encoding.
    "/sap/opu/odata/%252e%252e/admin",
    "/sap/opu/odata/%252f..%252fadmin",
    "/sap/opu/odata/%25%32%65%25%32%65/admin",
    "/sap/opu/odata/%25",
    # Backslashes.
    "/sap/opu/odata\\..\\admin",
    "/sap/opu/odata/..\\admin",
    "/sap/opu/odata/%5c../admin",
    "/sap/opu/odata/%5C..%5Cadmin",
    # NUL and control characters, raw and encoded.
    "/sap/opu/odata/%00/x",
    "/sap/opu/odata/x%00.html",
    "/sap/opu/odata/\x00/x",
    "/sap/opu/odata/%0d%0aX-Injected:%201",
    "/sap/opu/odata/%09",
    "/sap/opu/odata/%7f",
    "/sap/opu/odata/\x7f",
    "/sap/opu/odata/\x1b",
    # Invalid escapes.
    "/sap/opu/odata/%zz",
    "/sap/opu/odata/%4",
    "/sap/opu/odata/%",
    "/sap/opu/odata/%u002e%u002e/admin",
    "/sap/opu/odata/%%32%65",
    # Empty segments.
    "//sap/opu/odata",
    "/sap//opu/odata",
    "/sap/opu/odata//x",
    "/sap/opu/odata//../admin",
    # Dot segments around an exact rule.
    "/public/index.html/..",
    "/public/./index.html",
    "/public/x/../index.html",
    # Not origin-form.
    "http://evil/sap/opu/odata/x",
    "https://backend:443/public/index.html",
    "backend:443",
    "sap/opu/odata/x",
    "*",
    "",
    # Fragments, whitespace, line breaks.
    "/sap/opu/odata/x#frag",
    "/public/index.html#",
    "/sap/opu/odata/x?a=1#frag",
    "/sap/opu/odata/\t/x",
    "/sap/opu/odata/ x",
    "/sap/opu/odata/x HTTP/1.1",
    "/sap/opu/odata/x\r\nHost: evil",
    "/sap/opu/odata/x\n",
    "/sap/opu/odata/x?q=a b",
    # Non-ASCII raw characters and characters outside pchar.
    "/sap/opu/odata/caf\u00e9",
    "/sap/opu/odata/\uff0e\uff0e/admin",
    "/sap/opu/odata/<script>",
    "/sap/opu/odata/{x}",
    "/sap/opu/odata/a|b",
    "/sap/opu/odata/`x`",
    '/sap/opu/odata/"x"',
    "/sap/opu/odata/[::1]",
]

#: Well-formed targets that no active rule covers.
DENIED = [
    "/SAP/opu/odata/x",
    "/sap/OPU/odata",
    "/sap/opu/odatax",
    "/sap/opu/odata.json",
    "/sap/opu/odata-admin/x",
    "/sap/opu/odat%61x",
    "/sap/opu",
    "/sap/opu/",
    "/",
    "/admin",
    "/public/index.html/",
    "/public/index.html/x",
    "/public/index.htm",
    "/public/INDEX.html",
    "/public/index.html.",
    "/public/index.html%3A%3A$DATA",
    "/public/",
    "/public",
]

#: (target, canonical path) pairs that must be allowed under RULES.
ALLOWED = [
    ("/sap/opu/odata", "/sap/opu/odata"),
    ("/sap/opu/odata/", "/sap/opu/odata/"),
    ("/sap/opu/odata?$format=json", "/sap/opu/odata"),
    ("/sap/opu/odata/Products?$top=10&$skip=0", "/sap/opu/odata/Products"),
    ("/sap/opu/odata/x?a=../../admin&b=%2f%00", "/sap/opu/odata/x"),
    ("/sap/opu/odata/x?", "/sap/opu/odata/x"),
    ("/sap/opu/odata/%7euser", "/sap/opu/odata/~user"),
    ("/sap/opu/odata/%7Euser", "/sap/opu/odata/~user"),
    ("/%73ap/opu/%6F%64ata/x", "/sap/opu/odata/x"),
    ("/sap/opu/odata/a%2db%5fc%2ed", "/sap/opu/odata/a-b_c.d"),
    ("/sap/opu/odata/a%3ab", "/sap/opu/odata/a%3Ab"),
    ("/sap/opu/odata/a%20b", "/sap/opu/odata/a%20b"),
    ("/sap/opu/odata/caf%c3%a9", "/sap/opu/odata/caf%C3%A9"),
    ("/sap/opu/odata/%e2%82%ac", "/sap/opu/odata/%E2%82%AC"),
    ("/sap/opu/odata/SRV/Set('1')/Nav", "/sap/opu/odata/SRV/Set('1')/Nav"),
    ("/sap/opu/odata/a/b/c/d/e/f/g/h/i/j", "/sap/opu/odata/a/b/c/d/e/f/g/h/i/j"),
    ("/sap/opu/odata/..x/x..", "/sap/opu/odata/..x/x.."),
    ("/sap/opu/odata/.hidden", "/sap/opu/odata/.hidden"),
    ("/sap/opu/odata/user@host:8080", "/sap/opu/odata/user@host:8080"),
    ("/sap/opu/odata/x?q=\\..\\;", "/sap/opu/odata/x"),
    ("/public/index.html", "/public/index.html"),
    ("/public/index.html?v=2", "/public/index.html"),
    ("/public/index%2ehtml", "/public/index.html"),
]


def decide(target: str | bytes, *, websocket: bool = False) -> Decision | AmbiguousPath:
    try:
        path = normalise_request_target(target)
    except AmbiguousPath as exc:
        return exc
    return check_access(RULES, path, websocket=websocket)


def test_the_corpus_is_large_and_has_no_duplicates() -> None:
    assert len(REFUSED) + len(DENIED) >= 60
    corpus = REFUSED + DENIED + [target for target, _ in ALLOWED]
    assert len(corpus) == len(set(corpus))


@pytest.mark.parametrize("target", REFUSED)
def test_hostile_target_is_refused(target: str) -> None:
    with pytest.raises(AmbiguousPath) as info:
        normalise_request_target(target)
    assert info.value.reason == str(info.value)
    # The same bytes arriving from the wire are refused too.
    with pytest.raises(AmbiguousPath):
        normalise_request_target(target.encode("utf-8"))


@pytest.mark.parametrize("target", DENIED)
def test_uncovered_target_is_denied(target: str) -> None:
    decision = decide(target)
    assert isinstance(decision, Denied), decision
    assert decision.reason.startswith("no active resource rule covers /")


@pytest.mark.parametrize(("target", "canonical"), ALLOWED)
def test_covered_target_is_allowed(target: str, canonical: str) -> None:
    assert normalise_request_target(target) == canonical
    assert normalise_request_target(target.encode("ascii")) == canonical
    decision = decide(target)
    assert isinstance(decision, Allowed), decision
    assert decision.rule in RULES


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("/a%2fb", "an encoded slash"),
        ("/a%5Cb", "an encoded backslash"),
        ("/a\\b", "a backslash"),
        ("/a%252e", "possible double encoding"),
        ("/a/..;/b", "';' (path parameters)"),
        ("/a/%2E%2e/b", "a dot segment"),
        ("/a//b", "an empty segment"),
        ("/a%00", "an encoded NUL"),
        ("/a\x00", "a NUL byte"),
        ("/a%0a", "an encoded control character"),
        ("/a\r", "whitespace"),
        ("/a%zz", "an invalid percent-escape '%zz'"),
        ("/a%c0%ae", "not valid UTF-8"),
        ("/a%ef%bc%8f", "U+FF0F"),
        ("/a#b", "a fragment"),
        ("/a\u00e9", "non-ASCII character U+00E9"),
        (b"/a\xff", "non-ASCII character U+00FF"),
        ("http://evil/a", "not origin-form"),
        ("*", "asterisk-form"),
        ("/a<b", "'<', not allowed in a URL path"),
    ],
)
def test_refusal_reason_names_the_problem(target: str | bytes, fragment: str) -> None:
    with pytest.raises(AmbiguousPath) as info:
        normalise_request_target(target)
    assert fragment in info.value.reason


def test_suspended_rule_is_as_if_absent() -> None:
    rules = [ResourceRule("/sap/opu/odata", "prefix", active=False, websocket=True)]
    assert check_access(rules, "/sap/opu/odata/x", websocket=False) == Denied(
        "no active resource rule covers /sap/opu/odata/x"
    )
    # A suspended specific rule does not shadow an active broader one.
    broad = ResourceRule("/sap", "prefix")
    rules.append(broad)
    assert check_access(rules, "/sap/opu/odata/x", websocket=False) == Allowed(broad)
    decision = check_access(rules, "/sap/opu/odata/x", websocket=True)
    assert decision == Denied("WebSocket upgrade not allowed for resource /sap (prefix)")


def test_most_specific_rule_decides() -> None:
    broad = ResourceRule("/sap/opu/odata", "prefix", websocket=False)
    socket = ResourceRule("/sap/opu/odata/ws", "exact", websocket=True)
    narrow = ResourceRule("/sap/opu/odata/ws", "prefix", websocket=False)
    for rules in ([broad, socket, narrow], [narrow, socket, broad]):
        assert check_access(rules, "/sap/opu/odata/ws", websocket=True) == Allowed(socket)
        assert check_access(rules, "/sap/opu/odata/ws/x", websocket=False) == Allowed(narrow)
        assert check_access(rules, "/sap/opu/odata/other", websocket=False) == Allowed(broad)
        denied = check_access(rules, "/sap/opu/odata/other", websocket=True)
        assert isinstance(denied, Denied)
        assert denied.reason.startswith("WebSocket upgrade not allowed for resource /sap/opu/odata")


def test_prefix_boundary_and_trailing_slash() -> None:
    plain = [ResourceRule("/sap/opu", "prefix")]
    slashed = [ResourceRule("/sap/opu/", "prefix")]
    root = [ResourceRule("/", "prefix")]
    for path, plain_ok, slashed_ok in [
        ("/sap/opu", True, False),
        ("/sap/opu/", True, True),
        ("/sap/opu/x", True, True),
        ("/sap/opux", False, False),
        ("/sap", False, False),
    ]:
        assert isinstance(check_access(plain, path, websocket=False), Allowed) is plain_ok
        assert isinstance(check_access(slashed, path, websocket=False), Allowed) is slashed_ok
        assert isinstance(check_access(root, path, websocket=False), Allowed)


def test_check_access_denies_a_raw_or_ambiguous_path() -> None:
    assert check_access(RULES, "/sap/opu/odata/%7e", websocket=False) == Denied(
        "path '/sap/opu/odata/%7e' is not normalised (expected '/sap/opu/odata/~')"
    )
    decision = check_access(RULES, "/sap/opu/odata/../admin", websocket=False)
    assert isinstance(decision, Denied)
    assert "dot segment" in decision.reason
    decision = check_access(RULES, "/sap/opu/odata/x?y", websocket=False)
    assert isinstance(decision, Denied)
    assert "not normalised" in decision.reason


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "must start with '/'"),
        ("sap/opu", "must start with '/'"),
        ("/sap?x=1", "must not contain a query"),
        ("/sap#x", "must not contain a fragment"),
        ("/sap/../admin", "is ambiguous: path '/sap/../admin' contains a dot segment"),
        ("/sap/%2e", "is ambiguous"),
        ("//sap", "contains an empty segment"),
        ("/sap;x", "contains ';'"),
        ("/sap%2fopu", "contains an encoded slash"),
        ("/sap\\opu", "contains a backslash"),
        ("/sap opu", "contains whitespace"),
        ("/a%7e", "is not in canonical form; write '/a~'"),
        ("/a%3a", "is not in canonical form; write '/a%3A'"),
        ("/%73ap", "is not in canonical form; write '/sap'"),
    ],
)
def test_bad_rule_path_is_rejected(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^resource rule path ") as info:
        ResourceRule(path, "prefix")
    assert message in str(info.value)
    with pytest.raises(ValueError, match=r"^resource rule path "):
        validate_rule_path(path)


def test_bad_rule_match_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be 'exact' or 'prefix', not 'regex'"):
        ResourceRule("/sap", "regex")  # type: ignore[arg-type]


# --- property tests ----------------------------------------------------------------------------

#: Pieces that combine into legitimate paths and into near-misses of them.
SAFE_PIECES = [
    "/", "/", "/", "a", "B", "z9", ".", "%2e", "%2E", "%7e", "%7E", "%41", "%3a", "%3A", "%20",
    "%c3%a9", "%C3%A9", "~", "-", "_", ":", "@", "'", "(", "*", "?", "q=1", "&",
]  # fmt: skip
HOSTILE_PIECES = [
    "..", "%c0%ae", "%2f", "%2F", "%5c", "%25", "%252e", "%00", "%zz", "%", ";", "#", "\\",
    " ", "\t", "é", "%ef%bc%8e", "%e2%80%a5", "//", "/./", "/../",
]  # fmt: skip
SEGMENTS = ["a", "b", "ab", "a~", "x%3A", "%C3%A9", "a.b", ".a"]

targets = st.lists(
    st.one_of(st.sampled_from(SAFE_PIECES), st.sampled_from(HOSTILE_PIECES)),
    max_size=12,
).map("".join)
mostly_safe_targets = st.lists(st.sampled_from(SAFE_PIECES), max_size=12).map(
    lambda pieces: "/" + "".join(pieces)
)
rule_paths = st.lists(st.sampled_from(SEGMENTS), max_size=3).map(lambda s: "/" + "/".join(s))
rule_paths_with_slash = st.one_of(rule_paths, rule_paths.map(lambda p: p.rstrip("/") + "/"))
canonical_paths = st.tuples(st.lists(st.sampled_from(SEGMENTS), max_size=5), st.booleans()).map(
    lambda t: "/" + "/".join(t[0]) + ("/" if t[1] and t[0] else "")
)


def accepted(target: str | bytes) -> str:
    try:
        return normalise_request_target(target)
    except AmbiguousPath:
        reject()


@given(st.one_of(mostly_safe_targets, targets, targets.map(lambda t: "/" + t)))
def test_normalisation_is_idempotent_and_leaves_no_hazard(target: str) -> None:
    try:
        path = normalise_request_target(target)
    except AmbiguousPath:
        return
    assert normalise_request_target(path) == path
    assert path.startswith("/")
    for hazard in ("/../", "/./", "//", "\\", "%2F", "%5C", "%25", "?", "#", ";", " "):
        assert hazard not in path
    assert not path.endswith(("/..", "/."))
    assert path == path.encode("ascii").decode("ascii")


@given(st.one_of(st.binary(), st.binary().map(lambda b: b"/" + b), targets.map(str.encode)))
def test_random_bytes_raise_nothing_but_ambiguous_path(target: bytes) -> None:
    try:
        path = normalise_request_target(target)
    except AmbiguousPath:
        return
    assert normalise_request_target(path) == path


@given(st.text())
def test_random_text_raises_nothing_but_ambiguous_path(target: str) -> None:
    with contextlib.suppress(AmbiguousPath):
        normalise_request_target(target)


def reference_covers(rule: ResourceRule, path: str) -> bool:
    """Segment-wise reference: a prefix covers a path whose leading segments are the rule's."""
    rule_segments = rule.path.split("/")[1:]
    path_segments = path.split("/")[1:]
    if rule.match == "exact":
        return rule_segments == path_segments
    if rule_segments[-1] == "":  # "/a/" covers "/a/..." but not "/a"
        rule_segments.pop()
        return len(path_segments) > len(rule_segments) and (
            path_segments[: len(rule_segments)] == rule_segments
        )
    return path_segments[: len(rule_segments)] == rule_segments


@given(rule_paths_with_slash, canonical_paths)
def test_prefix_decision_matches_segment_reference(rule_path: str, path: str) -> None:
    assert accepted(path) == path
    rule = ResourceRule(rule_path, "prefix")
    decision = check_access([rule], path, websocket=False)
    assert isinstance(decision, Allowed) is reference_covers(rule, path)


@given(
    st.lists(
        st.builds(
            ResourceRule,
            rule_paths_with_slash,
            st.sampled_from(["exact", "prefix"]),
            st.booleans(),
            st.booleans(),
        ),
        max_size=6,
    ),
    canonical_paths,
    st.booleans(),
)
def test_decision_is_the_longest_covering_active_rule(
    rules: list[ResourceRule], path: str, websocket: bool
) -> None:
    covering = [r for r in rules if r.active and reference_covers(r, path)]
    decision = check_access(rules, path, websocket=websocket)
    if not covering:
        assert decision == Denied(f"no active resource rule covers {path}")
        return
    longest = max(len(r.path) for r in covering)
    if isinstance(decision, Allowed):
        assert decision.rule in covering
        assert len(decision.rule.path) == longest
        assert decision.rule.websocket or not websocket
    else:
        assert websocket
        assert "WebSocket upgrade not allowed" in decision.reason
        winners = [r for r in covering if len(r.path) == longest]
        assert not all(r.websocket for r in winners)
