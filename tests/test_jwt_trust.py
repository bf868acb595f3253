"""Validating a user's JWT against trusted identity providers: a forged-token corpus with one
expected reason per token, genuine tokens that must pass next to each refusal, and the trust
list's wire format. Keys are generated here; time is always the ``now`` passed in."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from backchannel._jwt_trust import (
    ALLOWED_ALGORITHMS,
    MAX_TOKEN_LENGTH,
    IdpKey,
    TrustedIdp,
    TrustList,
    validate_jwt,
)
from backchannel._principal_errors import PrincipalError, PrincipalReason

NOW = 1_800_000_000.0  # 2027-01-15, deliberately not the wall clock
ISSUER = "https://tenant.accounts.example.com/oauth/token"
PEM_ISSUER = "https://pem-idp.example.com"
UNTRUSTED_ISSUER = "https://known-but-untrusted.example.com"
AUDIENCE = "backchannel-connector"

RSA_1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_256 = ec.generate_private_key(ec.SECP256R1())
EC_384 = ec.generate_private_key(ec.SECP384R1())
EC_521 = ec.generate_private_key(ec.SECP521R1())
ED_25519 = ed25519.Ed25519PrivateKey.generate()
ED_448 = ed448.Ed448PrivateKey.generate()
PEM_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())
RSA_1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)

SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def public_pem(key: SigningKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk_of(key: SigningKey, kid: str, **extra: str) -> dict[str, Any]:
    return {**IdpKey(key.public_key(), kid).to_jwk(), **extra}


JWKS = {
    "keys": [
        jwk_of(RSA_1, "rsa-1", use="sig"),
        jwk_of(RSA_2, "rsa-2", use="sig", alg="RS256"),
        jwk_of(EC_256, "ec-256"),
        jwk_of(EC_384, "ec-384"),
        jwk_of(EC_521, "ec-521"),
        jwk_of(ED_25519, "ed-25519"),
        jwk_of(ED_448, "ed-448"),
    ]
}


def trust_list() -> TrustList:
    return TrustList(
        [
            TrustedIdp.from_jwks("tenant", ISSUER, JWKS, [AUDIENCE, "other-app"]),
            TrustedIdp.from_pem("pem-idp", PEM_ISSUER, public_pem(PEM_KEY), [AUDIENCE]),
            TrustedIdp.from_pem(
                "untrusted", UNTRUSTED_ISSUER, public_pem(RSA_1), [AUDIENCE], trusted=False
            ),
        ]
    )


TRUST = trust_list()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "8f6e1d2c",
        "user_name": "jdoe",
        "email": "jdoe@example.com",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 300,
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(
    payload: dict[str, Any] | None = None,
    *,
    key: SigningKey = RSA_1,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    **header: Any,
) -> str:
    headers = {**header, **({"kid": kid} if kid is not None else {})}
    # PyJWS, not jwt.encode: the forgeries need claims PyJWT would refuse to encode.
    body = json.dumps(payload or claims()).encode()
    return jwt.PyJWS().encode(body, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: object) -> str:
    return b64(json.dumps(value).encode())


def assemble(header: object, payload: object, signature: bytes = b"\x01" * 64) -> str:
    return f"{b64json(header)}.{b64json(payload)}.{b64(signature)}"


def raw(header: bytes, payload: bytes, signature: bytes = b"sig") -> str:
    return f"{b64(header)}.{b64(payload)}.{b64(signature)}"


RS256_HEADER = json.dumps({"alg": "RS256"}).encode()


def hs256_with_public_key_as_secret(alg: str = "HS256") -> str:
    """The classic key-confusion forgery: HMAC keyed with the IdP's public key PEM."""
    signing_input = f"{b64json({'alg': alg, 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64json(claims())}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    mac = hmac.new(public_pem(RSA_1), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(mac)}"


def with_payload(token: str, payload: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64json(payload)}.{signature}"


def refused(
    token: str,
    reason: PrincipalReason,
    *,
    trust: TrustList = TRUST,
    now: float = NOW,
    leeway: float = 60,
    required_audience: str | None = None,
) -> PrincipalError:
    with pytest.raises(PrincipalError) as caught:
        validate_jwt(token, trust, now=now, leeway=leeway, required_audience=required_audience)
    error = caught.value
    assert error.reason is reason, str(error)
    message = str(error)
    assert message, "a refusal always says what to fix"
    # Neither the token nor any of its parts may reach logs through the message.
    if len(token) >= 16:
        assert token not in message
        for part in token.split("."):
            if len(part) >= 16:
                assert part not in message
    for value in error.details.values():
        assert len(value) <= 256
    return error


def accepted(token: str, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("now", NOW)
    return validate_jwt(token, TRUST, **kwargs)


# --- genuine tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [
        (RSA_1, "RS256", "rsa-1"),
        (RSA_1, "RS384", "rsa-1"),
        (RSA_1, "RS512", "rsa-1"),
        (RSA_1, "PS256", "rsa-1"),
        (RSA_1, "PS384", "rsa-1"),
        (RSA_1, "PS512", "rsa-1"),
        (RSA_2, "RS256", "rsa-2"),
        (EC_256, "ES256", "ec-256"),
        (EC_384, "ES384", "ec-384"),
        (EC_521, "ES512", "ec-521"),
        (ED_25519, "EdDSA", "ed-25519"),
        (ED_448, "EdDSA", "ed-448"),
    ],
)
def test_genuine_tokens_of_every_allowed_algorithm_are_accepted(
    key: SigningKey, alg: str, kid: str
) -> None:
    result = accepted(sign(key=key, alg=alg, kid=kid))
    assert result == claims()


def test_the_allowed_algorithms_are_asymmetric_only() -> None:
    assert {
        *(f"{family}{bits}" for family in ("RS", "PS", "ES") for bits in (256, 384, 512)),
        "EdDSA",
    } == ALLOWED_ALGORITHMS


def test_one_key_without_kid_verifies_tokens_with_or_without_kid() -> None:
    payload = claims(iss=PEM_ISSUER)
    assert accepted(sign(payload, key=PEM_KEY, kid=None)) == payload
    assert accepted(sign(payload, key=PEM_KEY, kid="whatever-the-idp-calls-it")) == payload


def test_time_comes_from_now_not_the_wall_clock() -> None:
    long_ago = 1_000_000_000.0  # 2001: by the wall clock this token expired long ago
    old = sign(claims(iat=int(long_ago), exp=int(long_ago) + 300))
    assert accepted(old, now=long_ago)["exp"] == int(long_ago) + 300
    refused(old, PrincipalReason.EXPIRED)
    future = 2_000_000_000.0  # 2033: by the wall clock this token is still valid
    refused(sign(claims(exp=int(future) - 3600)), PrincipalReason.EXPIRED, now=future)


# --- the forged-token corpus -------------------------------------------------------------------


def longest_token(length: int) -> str:
    """The longest genuine token of at most ``length`` characters (padded with a claim)."""
    padding = (length - len(sign(claims(padding="")))) * 3 // 4 + 8
    while len(token := sign(claims(padding="x" * padding))) > length:
        padding -= 1
    return token


CORPUS: list[tuple[str, Callable[[], str], PrincipalReason]] = [
    ("empty", lambda: "", PrincipalReason.MISSING_TOKEN),
    ("blank", lambda: "  \t ", PrincipalReason.MISSING_TOKEN),
    ("one-part", lambda: "abcdef", PrincipalReason.MALFORMED_TOKEN),
    ("two-parts", lambda: "abc.def", PrincipalReason.MALFORMED_TOKEN),
    ("four-parts", lambda: sign() + ".x", PrincipalReason.MALFORMED_TOKEN),
    ("jwe-five-parts", lambda: "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", PrincipalReason.MALFORMED_TOKEN),
    ("garbage-base64", lambda: "!!!!.@@@@.####", PrincipalReason.MALFORMED_TOKEN),
    ("non-ascii", lambda: sign().replace(".", ".é", 1), PrincipalReason.MALFORMED_TOKEN),
    (
        "header-not-json",
        lambda: raw(b"not json", json.dumps(claims()).encode()),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "header-json-array",
        lambda: assemble(["RS256"], claims()),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "header-not-utf8",
        lambda: raw(b'{"alg": "RS256", "typ": "\xff"}', json.dumps(claims()).encode()),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "header-without-alg",
        lambda: assemble({"typ": "JWT"}, claims()),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "non-canonical-base64",  # the last character carries bits that decoding drops
        lambda: f"{b64(RS256_HEADER)[:-1]}B.{b64json(claims())}.{b64(b'sig')}",
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "payload-not-json",
        lambda: raw(RS256_HEADER, b"{nope"),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "payload-json-string",
        lambda: assemble({"alg": "RS256"}, "iss"),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "payload-nan-expiry",
        lambda: raw(RS256_HEADER, b'{"iss": "x", "exp": NaN}'),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "payload-lone-surrogate",
        lambda: raw(RS256_HEADER, b'{"iss": "x", "sub": "\\ud800"}'),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "payload-deeply-nested",
        lambda: raw(RS256_HEADER, b"[" * 5000 + b"]" * 5000),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    ("huge-token", lambda: longest_token(MAX_TOKEN_LENGTH + 8), PrincipalReason.MALFORMED_TOKEN),
    (
        "kid-not-a-string",
        lambda: assemble({"alg": "RS256", "kid": 7}, claims()),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    (
        "critical-extension",
        lambda: sign(crit=["exp"]),
        PrincipalReason.MALFORMED_TOKEN,
    ),
    ("missing-exp", lambda: sign(claims(exp=None)), PrincipalReason.MALFORMED_TOKEN),
    ("exp-as-text", lambda: sign(claims(exp=str(int(NOW) + 300))), PrincipalReason.MALFORMED_TOKEN),
    ("exp-as-boolean", lambda: sign(claims(exp=True)), PrincipalReason.MALFORMED_TOKEN),
    ("aud-as-number", lambda: sign(claims(aud=42)), PrincipalReason.MALFORMED_TOKEN),
    ("alg-none", lambda: assemble({"alg": "none"}, claims(), b""), PrincipalReason.UNSIGNED_TOKEN),
    ("alg-None", lambda: assemble({"alg": "None"}, claims(), b""), PrincipalReason.UNSIGNED_TOKEN),
    (
        "alg-none-with-signature",
        lambda: assemble({"alg": "NONE", "kid": "rsa-1"}, claims()),
        PrincipalReason.UNSIGNED_TOKEN,
    ),
    (
        "rs256-with-empty-signature",
        lambda: sign().rsplit(".", 1)[0] + ".",
        PrincipalReason.UNSIGNED_TOKEN,
    ),
    (
        "hs256-public-key-as-secret",
        hs256_with_public_key_as_secret,
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    (
        "hs512-public-key-as-secret",
        lambda: hs256_with_public_key_as_secret("HS512"),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    (
        "es256k",
        lambda: assemble({"alg": "ES256K", "kid": "ec-256"}, claims()),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    (
        "rsa1_5",
        lambda: assemble({"alg": "RSA1_5", "kid": "rsa-1"}, claims()),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    (
        "ec-alg-on-rsa-kid",
        lambda: sign(key=EC_256, alg="ES256", kid="rsa-1"),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    (
        "es384-on-p256-kid",
        lambda: sign(key=EC_384, alg="ES384", kid="ec-256"),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    (
        "rsa-alg-on-eddsa-kid",
        lambda: sign(alg="RS256", kid="ed-25519"),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    (
        "ps256-on-key-pinned-to-rs256",
        lambda: sign(key=RSA_2, alg="PS256", kid="rsa-2"),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
    ),
    ("no-issuer", lambda: sign(claims(iss=None)), PrincipalReason.UNTRUSTED_ISSUER),
    ("issuer-not-text", lambda: sign(claims(iss=["x"])), PrincipalReason.UNTRUSTED_ISSUER),
    (
        "unknown-issuer",
        lambda: sign(claims(iss="https://evil.example.com")),
        PrincipalReason.UNTRUSTED_ISSUER,
    ),
    (
        "issuer-with-trailing-slash",
        lambda: sign(claims(iss=ISSUER + "/")),
        PrincipalReason.UNTRUSTED_ISSUER,
    ),
    (
        "issuer-other-case",
        lambda: sign(claims(iss=ISSUER.upper())),
        PrincipalReason.UNTRUSTED_ISSUER,
    ),
    (
        "idp-marked-untrusted",
        lambda: sign(claims(iss=UNTRUSTED_ISSUER), kid=None),
        PrincipalReason.IDP_NOT_TRUSTED,
    ),
    ("unknown-kid", lambda: sign(kid="rsa-9"), PrincipalReason.UNKNOWN_KEY),
    ("no-kid-several-keys", lambda: sign(kid=None), PrincipalReason.UNKNOWN_KEY),
    (
        "embedded-jwk-without-kid",
        lambda: sign(key=ATTACKER_RSA, kid=None, jwk=jwk_of(ATTACKER_RSA, "rsa-1")),
        PrincipalReason.UNKNOWN_KEY,
    ),
    (
        "attacker-rsa-key-with-trusted-kid",
        lambda: sign(key=ATTACKER_RSA, kid="rsa-1"),
        PrincipalReason.BAD_SIGNATURE,
    ),
    (
        "attacker-ec-key-with-trusted-kid",
        lambda: sign(key=ATTACKER_EC, alg="ES256", kid="ec-256"),
        PrincipalReason.BAD_SIGNATURE,
    ),
    (
        "attacker-key-advertised-in-header",
        lambda: sign(
            key=ATTACKER_RSA,
            kid="rsa-1",
            jwk=jwk_of(ATTACKER_RSA, "rsa-1"),
            jku="https://evil.example.com/jwks",
            x5u="https://evil.example.com/cert.pem",
        ),
        PrincipalReason.BAD_SIGNATURE,
    ),
    (
        "attacker-key-on-single-key-idp",
        lambda: sign(claims(iss=PEM_ISSUER), key=ATTACKER_RSA, kid=None),
        PrincipalReason.BAD_SIGNATURE,
    ),
    (
        "other-trusted-key-named-by-kid",
        lambda: sign(key=RSA_2, kid="rsa-1"),
        PrincipalReason.BAD_SIGNATURE,
    ),
    (
        "payload-edited-after-signing",
        lambda: with_payload(sign(), claims(user_name="admin")),
        PrincipalReason.BAD_SIGNATURE,
    ),
    (
        "expired-and-forged",  # the signature is checked before the lifetime
        lambda: sign(claims(exp=int(NOW) - 3600), key=ATTACKER_RSA),
        PrincipalReason.BAD_SIGNATURE,
    ),
    ("other-audience", lambda: sign(claims(aud="someone-else")), PrincipalReason.WRONG_AUDIENCE),
    ("no-audience", lambda: sign(claims(aud=None)), PrincipalReason.WRONG_AUDIENCE),
    ("empty-audience-list", lambda: sign(claims(aud=[])), PrincipalReason.WRONG_AUDIENCE),
    (
        "expired-beyond-leeway",
        lambda: sign(claims(exp=int(NOW) - 61)),
        PrincipalReason.EXPIRED,
    ),
    (
        "expired-exactly-at-leeway",
        lambda: sign(claims(exp=int(NOW) - 60)),
        PrincipalReason.EXPIRED,
    ),
    (
        "not-before-in-the-future",
        lambda: sign(claims(nbf=int(NOW) + 61)),
        PrincipalReason.NOT_YET_VALID,
    ),
    (
        "issued-in-the-future",
        lambda: sign(claims(iat=int(NOW) + 3600)),
        PrincipalReason.NOT_YET_VALID,
    ),
]

JWT_REASONS = {
    PrincipalReason.MISSING_TOKEN,
    PrincipalReason.MALFORMED_TOKEN,
    PrincipalReason.UNSIGNED_TOKEN,
    PrincipalReason.UNSUPPORTED_ALGORITHM,
    PrincipalReason.UNKNOWN_KEY,
    PrincipalReason.BAD_SIGNATURE,
    PrincipalReason.UNTRUSTED_ISSUER,
    PrincipalReason.IDP_NOT_TRUSTED,
    PrincipalReason.WRONG_AUDIENCE,
    PrincipalReason.EXPIRED,
    PrincipalReason.NOT_YET_VALID,
}


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_forged_and_broken_tokens_are_refused_for_the_right_reason(
    make: Callable[[], str], reason: PrincipalReason
) -> None:
    refused(make(), reason)


def test_the_corpus_covers_every_jwt_reason() -> None:
    assert {reason for _, _, reason in CORPUS} == JWT_REASONS


def test_key_confusion_message_explains_the_refusal() -> None:
    error = refused(hs256_with_public_key_as_secret(), PrincipalReason.UNSUPPORTED_ALGORITHM)
    assert "shared-secret" in str(error)
    assert error.details == {"alg": "HS256"}


def test_genuine_tokens_next_to_the_refusals() -> None:
    # Each refusal above has a genuine twin that passes, so no refusal is a broken set-up.
    accepted(sign(key=RSA_2, kid="rsa-2"))
    accepted(sign(key=EC_256, alg="ES256", kid="ec-256"))
    accepted(sign(claims(iss=PEM_ISSUER), key=PEM_KEY, kid=None))
    accepted(sign(claims(aud=["someone-else", "other-app"])))
    accepted(sign(claims(exp=int(NOW) - 59)))
    accepted(sign(claims(nbf=int(NOW) + 59)))
    accepted(sign(claims(iat=int(NOW) + 59)))
    at_limit = longest_token(MAX_TOKEN_LENGTH)
    assert len(at_limit) > MAX_TOKEN_LENGTH - 4
    accepted(at_limit)


def test_untrusted_idp_is_refused_even_with_a_genuine_signature() -> None:
    token = sign(claims(iss=UNTRUSTED_ISSUER), key=RSA_1, kid=None)
    error = refused(token, PrincipalReason.IDP_NOT_TRUSTED)
    assert "'untrusted'" in str(error)
    trusted = TrustList(
        [TrustedIdp.from_pem("now-trusted", UNTRUSTED_ISSUER, public_pem(RSA_1), [AUDIENCE])]
    )
    assert validate_jwt(token, trusted, now=NOW)["iss"] == UNTRUSTED_ISSUER


def test_messages_name_what_to_fix() -> None:
    unknown = refused(
        sign(claims(iss="https://evil.example.com")), PrincipalReason.UNTRUSTED_ISSUER
    )
    assert "https://evil.example.com" in str(unknown)
    assert unknown.details["issuer"] == "https://evil.example.com"
    kid = refused(sign(kid="rsa-9"), PrincipalReason.UNKNOWN_KEY)
    assert "'rsa-9'" in str(kid)
    assert "'rsa-1'" in str(kid)
    assert "synchronise" in str(kid)
    assert kid.details == {"alg": "RS256", "kid": "rsa-9", "issuer": ISSUER, "idp": "tenant"}
    audience = refused(sign(claims(aud="someone-else")), PrincipalReason.WRONG_AUDIENCE)
    assert "'someone-else'" in str(audience)
    assert repr(AUDIENCE) in str(audience)
    expired = refused(sign(claims(exp=int(NOW) - 3600)), PrincipalReason.EXPIRED)
    assert "2027-01-15T07:00:00Z" in str(expired)
    assert "leeway 60 s" in str(expired)
    signature = refused(sign(key=ATTACKER_RSA), PrincipalReason.BAD_SIGNATURE)
    assert "'tenant'" in str(signature)
    assert "rsa-1" in str(signature)


def test_long_token_supplied_values_are_cut_short_in_messages() -> None:
    kid = "k" * 5000
    error = refused(sign(kid=kid), PrincipalReason.UNKNOWN_KEY)
    assert kid not in str(error)
    assert len(error.details["kid"]) <= 64
    issuer = "https://" + "i" * 3000
    error = refused(sign(claims(iss=issuer)), PrincipalReason.UNTRUSTED_ISSUER)
    assert issuer not in str(error)


def test_huge_token_is_refused_by_size() -> None:
    huge = longest_token(MAX_TOKEN_LENGTH + 8)
    assert len(huge) > MAX_TOKEN_LENGTH
    error = refused(huge, PrincipalReason.MALFORMED_TOKEN)
    assert str(MAX_TOKEN_LENGTH) in str(error)
    refused("a" * 10_000_000, PrincipalReason.MALFORMED_TOKEN)


def test_leeway_is_the_callers() -> None:
    token = sign(claims(exp=int(NOW) - 30))
    accepted(token)
    refused(token, PrincipalReason.EXPIRED, leeway=0)
    refused(sign(claims(exp=int(NOW))), PrincipalReason.EXPIRED, leeway=0)
    accepted(sign(claims(exp=int(NOW) + 1)), leeway=0)
    accepted(sign(claims(exp=int(NOW) - 500)), leeway=600)


@settings(max_examples=60, deadline=None)
@given(
    exp_offset=st.integers(min_value=-10_000, max_value=10_000),
    nbf_offset=st.none() | st.integers(min_value=-10_000, max_value=10_000),
    leeway=st.integers(min_value=0, max_value=3600),
)
def test_lifetime_decision_matches_the_rule(
    exp_offset: int, nbf_offset: int | None, leeway: int
) -> None:
    payload = claims(
        iat=None,
        exp=int(NOW) + exp_offset,
        nbf=None if nbf_offset is None else int(NOW) + nbf_offset,
    )
    token = sign(payload)
    if exp_offset <= -leeway:
        refused(token, PrincipalReason.EXPIRED, leeway=leeway)
    elif nbf_offset is not None and nbf_offset > leeway:
        refused(token, PrincipalReason.NOT_YET_VALID, leeway=leeway)
    else:
        assert accepted(token, leeway=leeway) == payload


def test_required_audience() -> None:
    token = sign(claims(aud=[AUDIENCE, "other-app"]))
    assert accepted(token, required_audience="other-app")["aud"] == [AUDIENCE, "other-app"]
    error = refused(token, PrincipalReason.WRONG_AUDIENCE, required_audience="third-app")
    assert "'third-app'" in str(error)
    # The required audience alone is not enough: the IdP must be trusted for the token's aud.
    refused(
        sign(claims(aud="third-app")),
        PrincipalReason.WRONG_AUDIENCE,
        required_audience="third-app",
    )


def test_now_and_leeway_must_be_sane() -> None:
    with pytest.raises(ValueError, match="leeway"):
        validate_jwt(sign(), TRUST, now=NOW, leeway=-1)
    with pytest.raises(ValueError, match="now"):
        validate_jwt(sign(), TRUST, now=float("nan"))


def test_an_empty_trust_list_trusts_nobody() -> None:
    refused(sign(), PrincipalReason.UNTRUSTED_ISSUER, trust=TrustList())


GENUINE = sign()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    position=st.integers(min_value=0, max_value=len(GENUINE) - 1),
    replacement=st.characters(codec="ascii"),
)
@example(position=len(GENUINE) - 1, replacement="A")
@example(position=GENUINE.index(".") + 5, replacement="A")
def test_no_single_character_change_of_a_genuine_token_is_accepted(
    position: int, replacement: str
) -> None:
    if GENUINE[position] == replacement:
        replacement = "B" if replacement != "B" else "C"
    token = GENUINE[:position] + replacement + GENUINE[position + 1 :]
    with pytest.raises(PrincipalError) as caught:
        validate_jwt(token, TRUST, now=NOW)
    assert token not in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.text(alphabet="ABCxyz019-_=.", max_size=40), max_size=6).map(".".join),
        st.tuples(
            st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit"]), st.text(max_size=8)),
            st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)),
            st.binary(max_size=80),
        ).map(lambda parts: assemble(*parts)),
    )
)
def test_arbitrary_input_raises_only_principal_errors(token: str) -> None:
    with pytest.raises(PrincipalError):
        validate_jwt(token, TRUST, now=NOW)


# --- identity providers and keys ---------------------------------------------------------------


def test_jwks_selects_keys_by_kid_and_skips_encryption_keys() -> None:
    document = {
        "keys": [
            {**jwk_of(RSA_1, "enc-1"), "use": "enc", "alg": "RSA-OAEP-256"},
            {**jwk_of(RSA_2, "enc-2"), "alg": "RSA-OAEP"},
            # XSUAA publishes the PEM next to the JWK members; extra members are ignored.
            {**jwk_of(RSA_1, "sig-1"), "use": "sig", "value": public_pem(RSA_1).decode()},
            {**jwk_of(EC_256, "sig-2"), "key_ops": ["verify"], "x5t": "abc"},
        ]
    }
    idp = TrustedIdp.from_jwks("xsuaa", ISSUER, json.dumps(document), [AUDIENCE])
    assert [key.kid for key in idp.keys] == ["sig-1", "sig-2"]
    trust = TrustList([idp])
    assert validate_jwt(sign(kid="sig-1"), trust, now=NOW)["sub"] == "8f6e1d2c"
    assert validate_jwt(sign(key=EC_256, alg="ES256", kid="sig-2"), trust, now=NOW)
    refused(sign(kid="enc-1"), PrincipalReason.UNKNOWN_KEY, trust=trust)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("{not json", "not JSON"),
        ({"keys": "x"}, "'keys' list"),
        ([], "'keys' list"),
        ({"keys": []}, "no signing keys"),
        ({"keys": ["x"]}, r"keys\[0\] is not an object"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}, "symmetric"),
        ({"keys": [{**jwk_of(RSA_1, "p"), "d": "AQAB"}]}, "private key material"),
        ({"keys": [{"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}]}, "secp256k1"),
        ({"keys": [{"kty": "RSA", "n": "AQAB"}]}, "'e'"),
        ({"keys": [{"kty": "XYZ"}]}, "key type"),
        ({"keys": [{**jwk_of(RSA_1, "h"), "alg": "HS256"}]}, "alg 'HS256'"),
        ({"keys": [{**jwk_of(RSA_1, "e"), "alg": "ES256"}]}, "does not suit"),
        ({"keys": [jwk_of(RSA_1, "same"), jwk_of(RSA_2, "same")]}, "same"),
        ({"keys": [{**RSAAlgorithm.to_jwk(RSA_1024.public_key(), as_dict=True)}]}, "1024 bits"),
        ({"keys": [{**jwk_of(RSA_1, "x"), "n": "AQAB"}]}, "not a valid RSA public key"),
    ],
)
def test_unusable_jwks_are_refused(document: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TrustedIdp.from_jwks("idp", ISSUER, document, [AUDIENCE])


def test_pem_accepts_a_public_key_or_a_certificate() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "IdP signing")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(EC_256.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2021, 1, 1))  # expired: only the key counts
        .sign(EC_256, hashes.SHA256())
    )
    idp = TrustedIdp.from_pem(
        "cert", ISSUER, certificate.public_bytes(serialization.Encoding.PEM), [AUDIENCE], "c1"
    )
    assert validate_jwt(sign(key=EC_256, alg="ES256", kid="c1"), TrustList([idp]), now=NOW)


@pytest.mark.parametrize(
    ("pem", "problem"),
    [
        (
            RSA_1.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            "private key",
        ),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a public key"),
        (
            public_pem(RSA_1024),
            "1024 bits",
        ),
        (public_pem(ec.generate_private_key(ec.SECP256K1())), "secp256k1"),
    ],
)
def test_unusable_pem_is_refused(pem: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TrustedIdp.from_pem("idp", ISSUER, pem, [AUDIENCE])


def test_an_idp_needs_name_issuer_keys_and_audiences() -> None:
    key = IdpKey(RSA_1.public_key())
    with pytest.raises(ValueError, match="audience"):
        TrustedIdp("idp", ISSUER, (key,), ())
    with pytest.raises(ValueError, match="issuer"):
        TrustedIdp("idp", "", (key,), (AUDIENCE,))
    with pytest.raises(ValueError, match="no signing keys"):
        TrustedIdp("idp", ISSUER, (), (AUDIENCE,))
    with pytest.raises(ValueError, match="public"):
        IdpKey(RSA_1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not suit"):
        IdpKey(EC_256.public_key(), alg="ES384")


def test_a_trust_list_has_one_idp_per_issuer_and_name() -> None:
    key = (IdpKey(RSA_1.public_key()),)
    with pytest.raises(ValueError, match="same issuer"):
        TrustList([TrustedIdp("a", ISSUER, key, ("x",)), TrustedIdp("b", ISSUER, key, ("x",))])
    with pytest.raises(ValueError, match="named 'a'"):
        TrustList([TrustedIdp("a", ISSUER, key, ("x",)), TrustedIdp("a", "other", key, ("x",))])


# --- the wire format ---------------------------------------------------------------------------


def test_trust_list_round_trips_through_json() -> None:
    wire = json.loads(json.dumps(TRUST.to_wire()))
    again = TrustList.from_wire(wire)
    assert again == TRUST
    assert hash(again) == hash(TRUST)
    assert again != TrustList(list(TRUST)[:2])
    assert [idp.name for idp in again] == ["tenant", "pem-idp", "untrusted"]
    untrusted = again.get(UNTRUSTED_ISSUER)
    assert untrusted is not None
    assert untrusted.trusted is False
    token = sign(key=RSA_2, kid="rsa-2")
    assert validate_jwt(token, again, now=NOW) == validate_jwt(token, TRUST, now=NOW)
    refused(
        sign(key=RSA_2, alg="PS256", kid="rsa-2"),
        PrincipalReason.UNSUPPORTED_ALGORITHM,
        trust=again,
    )
    for idp in wire["idps"]:
        for jwk in idp["keys"]:
            assert set(jwk) <= {"kty", "kid", "alg", "n", "e", "crv", "x", "y"}


def _wire(**idp_changes: Any) -> dict[str, Any]:
    idp = {
        "name": "tenant",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "trusted": True,
        "keys": [jwk_of(RSA_1, "rsa-1")],
    }
    idp.update(idp_changes)
    return {"version": 1, "idps": [idp]}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([], "expected an object"),
        ({"idps": []}, "version None"),
        ({"version": 2, "idps": []}, "version 2"),
        ({"version": 1, "idps": {}}, r"idps: expected a list"),
        ({"version": 1, "idps": [], "extra": 1}, "unknown member.*'extra'"),
        ({"version": 1, "idps": [_wire()["idps"][0]] * 65}, "at most 64"),
        ({"version": 1, "idps": ["x"]}, r"idps\[0\]: expected an object"),
        (_wire(name=""), r"idps\[0\]\.name: expected a non-empty string"),
        (_wire(issuer=7), r"idps\[0\]\.issuer"),
        (_wire(issuer="x" * 1025), "at most 1024"),
        (_wire(audiences="aud"), r"audiences: expected a list"),
        (_wire(audiences=[]), "at least one audience"),
        (_wire(audiences=[None]), r"audiences\[0\]"),
        (_wire(trusted="yes"), "trusted: expected true or false"),
        (_wire(keys=[]), "no signing keys"),
        (_wire(keys=[jwk_of(RSA_1, "k")] * 33), "at most 32"),
        (_wire(keys=["k"]), r"keys\[0\]: expected an object"),
        (_wire(keys=[{**jwk_of(RSA_1, "k"), "d": "AQAB"}]), "private key material"),
        (_wire(keys=[{"kty": "oct", "k": "c2VjcmV0"}]), "private key material"),
        (_wire(keys=[{"kty": "oct", "kid": "x"}]), "symmetric"),
        (_wire(keys=[{**jwk_of(RSA_1, "k"), "use": "sig"}]), "unknown member.*'use'"),
        (_wire(keys=[{**jwk_of(RSA_1, "k"), "n": "A" * 2049}]), r"keys\[0\]\.n: .*at most 2048"),
        (_wire(keys=[{**jwk_of(RSA_1, "k"), "kid": 5}]), r"keys\[0\]\.kid"),
        (_wire(keys=[{**jwk_of(RSA_1, "k"), "alg": "HS256"}]), "alg 'HS256'"),
        (_wire(extra=True), "unknown member"),
        (
            {"version": 1, "idps": [_wire()["idps"][0], _wire(name="b")["idps"][0]]},
            "same issuer",
        ),
    ],
)
def test_wire_input_is_validated(data: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        TrustList.from_wire(data)
    assert str(caught.value).startswith("trust list")


def test_wire_keys_are_public_jwks() -> None:
    reference = RSAAlgorithm.to_jwk(RSA_1.public_key(), as_dict=True)
    jwk = IdpKey(RSA_1.public_key(), "k", "PS256").to_jwk()
    assert jwk == {
        "kty": "RSA",
        "n": reference["n"],
        "e": reference["e"],
        "kid": "k",
        "alg": "PS256",
    }
    ec_jwk = IdpKey(EC_384.public_key()).to_jwk()
    assert ec_jwk == ECAlgorithm.to_jwk(EC_384.public_key(), as_dict=True)
    assert IdpKey.from_jwk(ec_jwk) == IdpKey(EC_384.public_key())


# --- reasons -----------------------------------------------------------------------------------


def test_every_reason_has_a_distinct_snake_case_code() -> None:
    codes = [reason.code for reason in PrincipalReason]
    assert len(codes) == len(set(codes))
    for reason in PrincipalReason:
        assert re.fullmatch(r"[a-z]+(_[a-z0-9]+)*", reason.code)
        assert reason.code == reason.name.lower()
    expected = {
        "MISSING_TOKEN", "MALFORMED_TOKEN", "UNSIGNED_TOKEN", "UNSUPPORTED_ALGORITHM",
        "UNKNOWN_KEY", "BAD_SIGNATURE", "UNTRUSTED_ISSUER", "IDP_NOT_TRUSTED", "WRONG_AUDIENCE",
        "EXPIRED", "NOT_YET_VALID", "NO_SUBJECT", "SAML_SIGNATURE_WRAPPING", "SAML_BAD_SIGNATURE",
        "SAML_CONDITIONS", "SAML_AUDIENCE", "SAML_SUBJECT_CONFIRMATION", "CA_UNUSABLE",
        "BACKEND_NOT_MUTUAL", "BACKEND_REJECTED_CERTIFICATE",
    }  # fmt: skip
    assert {reason.name for reason in PrincipalReason} == expected


def test_principal_error_is_a_backchannel_error() -> None:
    from backchannel._exceptions import BackchannelError

    error = PrincipalError(PrincipalReason.EXPIRED, "the token expired", {"issuer": "x"})
    assert isinstance(error, BackchannelError)
    assert (error.code, str(error), error.details) == (
        "expired",
        "the token expired",
        {"issuer": "x"},
    )
