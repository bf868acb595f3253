"""Validating a cloud user's JWT against the identity providers the connector trusts.

Principal propagation starts here: the cloud application forwards its user's token, and the
connector accepts it only if a trusted identity provider (IdP) signed it for an expected
audience and it is within its lifetime. The claims it returns feed the subject rules
(``_subject_rules.py``) that name the user's short-lived certificate.

The rules, in the order :func:`validate_jwt` applies them (RFC 8725, "JWT Best Current
Practices"):

- The token is parsed without trust first, within a size bound (:data:`MAX_TOKEN_LENGTH`).
- ``alg: none`` or an empty signature is refused (``UNSIGNED_TOKEN``), and so is every
  algorithm outside the asymmetric set :data:`ALLOWED_ALGORITHMS`: a shared-secret algorithm
  (``HS256``...) would let anyone holding the IdP's *public* key sign, so key confusion cannot
  arise here (``UNSUPPORTED_ALGORITHM``).
- The unverified ``iss`` picks the IdP; the IdP must be known and marked trusted.
- The header's ``kid`` picks one of that IdP's keys; nothing else in the header (``jwk``,
  ``jku``, ``x5u``, ``x5c``) is ever used to find a key. The algorithm must suit that key (an
  RSA key verifies RS/PS only, a P-256 key ES256 only, and so on).
- PyJWT then verifies the signature with that one key and that one algorithm, and the issuer.
- ``exp`` is required; ``exp``, ``nbf`` and ``iat`` are checked against the caller's ``now``
  with ``leeway`` seconds of tolerance; ``aud`` must name one of the IdP's audiences (and the
  caller's ``required_audience``, when given).

:class:`TrustList` travels from the gateway to the connector as JSON (:meth:`TrustList.to_wire`,
:meth:`TrustList.from_wire`), keys as public JWKs; what arrives is checked for types and sizes,
and private or symmetric keys are refused.

An IdP may also carry SAML signing certificates (:attr:`TrustedIdp.saml_certificates`, PEM),
which ``_saml_trust.py`` verifies SAML 2.0 assertions with; an IdP needs JWT keys, SAML
certificates, or both.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, TypeAlias

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.types import Options

from ._principal_errors import PrincipalError, PrincipalReason, refuse, shown, when

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
#: One algorithm per curve (RFC 7518 3.4): a P-384 key never verifies an ES256 signature.
EC_ALGORITHMS: Final[Mapping[str, str]] = {
    "secp256r1": "ES256",
    "secp384r1": "ES384",
    "secp521r1": "ES512",
}
EDDSA: Final = "EdDSA"
#: Every algorithm an IdP token may use: asymmetric only, never HS*.
ALLOWED_ALGORITHMS: Final = RSA_ALGORITHMS | frozenset(EC_ALGORITHMS.values()) | {EDDSA}

#: Longest token accepted, in characters. Real IdP tokens are a few KiB.
MAX_TOKEN_LENGTH: Final = 16 * 1024
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192

#: Bounds on what :meth:`TrustList.from_wire` accepts.
MAX_WIRE_IDPS: Final = 64
MAX_WIRE_KEYS: Final = 32
MAX_WIRE_AUDIENCES: Final = 32
MAX_WIRE_TEXT: Final = 1024
MAX_WIRE_JWK_MEMBER: Final = 2048
WIRE_VERSION: Final = 1
#: Bounds on an IdP's SAML signing certificates (two cover a key rollover; PEM text each).
MAX_SAML_CERTIFICATES: Final = 4
MAX_SAML_CERTIFICATE_PEM: Final = 8 * 1024

_JWK_CURVES: Final[Mapping[str, ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PUBLIC_JWK_MEMBERS: Final[Mapping[str, tuple[str, ...]]] = {
    "RSA": ("n", "e"),
    "EC": ("crv", "x", "y"),
    "OKP": ("crv", "x"),
}
#: JWE key-management algorithms: a JWKS may list encryption keys next to signing keys.
_ENCRYPTION_ALGORITHM = re.compile(r"RSA1_5|RSA-OAEP.*|ECDH-ES.*|A\d+(GCM)?KW|dir|PBES2.*")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
#: PyJWT checks signature and issuer; time and audience are checked here against ``now``.
_PYJWT_OPTIONS: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": True,
    "require": ["exp", "iss"],
    "enforce_minimum_key_length": True,
}


def _algorithms_for(key: PublicKey) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset({EC_ALGORITHMS[key.curve.name]})
    return frozenset({EDDSA})


def _describe_key(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}-bit"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return "Ed448"


@dataclass(frozen=True)
class IdpKey:
    """One public key of an identity provider: RSA (2048-8192 bits), EC P-256/384/521, or
    Ed25519/Ed448. ``kid`` is the key id tokens name; ``alg``, when set, pins the one algorithm
    the key verifies (a JWK's ``alg``), else any algorithm of the key's family is accepted."""

    key: PublicKey
    kid: str | None = None
    alg: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(
            self.key,
            rsa.RSAPublicKey
            | ec.EllipticCurvePublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ):
            raise ValueError(
                "an IdP key must be an RSA, EC or EdDSA *public* key, "
                f"not {type(self.key).__name__}"
            )
        if isinstance(self.key, rsa.RSAPublicKey) and not (
            MIN_RSA_BITS <= self.key.key_size <= MAX_RSA_BITS
        ):
            raise ValueError(
                f"RSA key{self._kid_text()} has {self.key.key_size} bits; "
                f"between {MIN_RSA_BITS} and {MAX_RSA_BITS} are accepted"
            )
        if isinstance(self.key, ec.EllipticCurvePublicKey) and self.key.curve.name not in (
            EC_ALGORITHMS
        ):
            raise ValueError(
                f"EC key{self._kid_text()} is on curve {self.key.curve.name}; "
                "only P-256, P-384 and P-521 are accepted"
            )
        if self.kid is not None and (not isinstance(self.kid, str) or not self.kid):
            raise ValueError("a key id (kid) must be a non-empty string")
        if self.alg is not None and self.alg not in _algorithms_for(self.key):
            raise ValueError(
                f"alg {self.alg!r} does not suit the {_describe_key(self.key)} key"
                f"{self._kid_text()}; it accepts {', '.join(sorted(_algorithms_for(self.key)))}"
            )

    def __hash__(self) -> int:
        # cryptography's key objects compare by value but are not hashable.
        der = self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hash((der, self.kid, self.alg))

    def _kid_text(self) -> str:
        return f" {self.kid!r}" if self.kid else ""

    @property
    def algorithms(self) -> frozenset[str]:
        """The algorithms this key verifies."""
        return frozenset({self.alg}) if self.alg else _algorithms_for(self.key)

    @property
    def description(self) -> str:
        """Key type and size, for messages: ``RSA 2048-bit``, ``EC secp256r1``..."""
        return _describe_key(self.key)

    def to_jwk(self) -> dict[str, str]:
        """The public JWK (RFC 7517) of this key, with ``kid`` and ``alg`` when set."""
        key = self.key
        if isinstance(key, rsa.RSAPublicKey):
            full = RSAAlgorithm.to_jwk(key, as_dict=True)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            full = ECAlgorithm.to_jwk(key, as_dict=True)
        else:
            full = OKPAlgorithm.to_jwk(key, as_dict=True)
        jwk = {"kty": str(full["kty"])}
        jwk.update({member: str(full[member]) for member in _PUBLIC_JWK_MEMBERS[jwk["kty"]]})
        if self.kid is not None:
            jwk["kid"] = self.kid
        if self.alg is not None:
            jwk["alg"] = self.alg
        return jwk

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> IdpKey:
        """The key of a public JWK; raises ValueError for private, symmetric or unsupported keys.
        Members this module does not use (``use``, ``x5c``, XSUAA's ``value``...) are ignored."""
        kid = jwk.get("kid")
        label = f"JWK {kid!r}" if isinstance(kid, str) else "JWK"
        kty = jwk.get("kty")
        if kty == "oct":
            raise ValueError(
                f"{label} is a symmetric key (kty 'oct'): IdP tokens must be verified with a "
                "public key only"
            )
        private = sorted(_PRIVATE_JWK_MEMBERS & set(jwk))
        if private:
            raise ValueError(
                f"{label} holds private key material ({', '.join(private)}): give the IdP's "
                "public key only"
            )
        if not isinstance(kty, str) or kty not in _PUBLIC_JWK_MEMBERS:
            raise ValueError(f"{label} has key type {kty!r}; RSA, EC and OKP are supported")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"JWK key id (kid) must be a string, not {type(kid).__name__}")
        alg = jwk.get("alg")
        if alg is not None and (not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS):
            raise ValueError(
                f"{label} names alg {alg!r}; accepted: {', '.join(sorted(ALLOWED_ALGORITHMS))}"
            )
        family = {"RSA": RSA_ALGORITHMS, "EC": frozenset(EC_ALGORITHMS.values())}
        if alg is not None and alg not in family.get(kty, frozenset({EDDSA})):
            raise ValueError(f"{label} names alg {alg!r}, which does not suit a {kty} key")
        public: dict[str, str] = {"kty": kty}
        for member in _PUBLIC_JWK_MEMBERS[kty]:
            value = jwk.get(member)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{label} ({kty}) needs the member {member!r} as a string")
            public[member] = value
        loading_alg = alg or _default_algorithm(public)
        try:
            loaded = jwt.PyJWK(public, algorithm=loading_alg).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{label} is not a valid {kty} public key: {exc}") from None
        return cls(loaded, kid=kid, alg=alg)


def _default_algorithm(public: Mapping[str, str]) -> str:
    """An algorithm PyJWK can load the key with (the key's own ``alg`` pins the real one)."""
    if public["kty"] == "RSA":
        return "RS256"
    if public["kty"] == "OKP":
        if public["crv"] not in ("Ed25519", "Ed448"):
            raise ValueError(f"OKP curve {public['crv']!r} is not supported; Ed25519 and Ed448 are")
        return EDDSA
    curve = _JWK_CURVES.get(public["crv"])
    if curve is None:
        raise ValueError(f"EC curve {public['crv']!r} is not supported; P-256, P-384, P-521 are")
    return EC_ALGORITHMS[curve.name]


def _is_encryption_key(jwk: Mapping[str, Any]) -> bool:
    alg = jwk.get("alg")
    key_ops = jwk.get("key_ops")
    return (
        jwk.get("use") == "enc"
        or (isinstance(alg, str) and _ENCRYPTION_ALGORITHM.fullmatch(alg) is not None)
        or (isinstance(key_ops, list) and "verify" not in key_ops)
    )


@dataclass(frozen=True)
class TrustedIdp:
    """An identity provider whose tokens the connector accepts.

    ``issuer`` is compared exactly with a token's ``iss`` (no normalisation of trailing
    slashes). A token must name one of ``audiences`` in its ``aud``. With ``trusted=False`` the
    IdP stays known (SAP Cloud Connector lists every IdP of the subaccount and lets the operator
    tick the trusted ones) but its tokens are refused with ``IDP_NOT_TRUSTED``.

    ``keys`` verify its JWTs, ``saml_certificates`` (PEM text, one X.509 certificate each, at
    most :data:`MAX_SAML_CERTIFICATES`) its SAML assertions; either may be empty, not both. A
    SAML assertion's ``Issuer`` is matched against ``issuer`` and its ``Audience`` against
    ``audiences`` just as a JWT's ``iss`` and ``aud``.
    """

    name: str
    issuer: str
    keys: tuple[IdpKey, ...]
    audiences: tuple[str, ...]
    trusted: bool = True
    saml_certificates: tuple[str, ...] = ()
    _saml_x509: tuple[x509.Certificate, ...] = field(
        init=False, repr=False, compare=False, default=()
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("an identity provider needs a name")
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ValueError(f"identity provider {self.name!r} needs an issuer")
        object.__setattr__(self, "keys", tuple(self.keys))
        object.__setattr__(self, "audiences", tuple(self.audiences))
        certificates = _saml_certificates(self.name, self.saml_certificates)
        object.__setattr__(self, "_saml_x509", certificates)
        object.__setattr__(
            self,
            "saml_certificates",
            tuple(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certificates),
        )
        if not self.keys and not self.saml_certificates:
            raise ValueError(
                f"identity provider {self.name!r} has no signing keys: give its JWT keys "
                "(JWKS or public key), its SAML signing certificate, or both"
            )
        for key in self.keys:
            if not isinstance(key, IdpKey):
                raise ValueError(f"identity provider {self.name!r}: keys must be IdpKey objects")
        kids = [key.kid for key in self.keys if key.kid is not None]
        duplicates = sorted({kid for kid in kids if kids.count(kid) > 1})
        if duplicates:
            raise ValueError(
                f"identity provider {self.name!r} has several keys with the key id "
                f"{', '.join(map(repr, duplicates))}"
            )
        if not self.audiences or not all(isinstance(a, str) and a for a in self.audiences):
            raise ValueError(
                f"identity provider {self.name!r} needs at least one audience: the 'aud' "
                "value its tokens carry for this connector"
            )
        if not isinstance(self.trusted, bool):
            raise ValueError(f"identity provider {self.name!r}: trusted must be true or false")

    @classmethod
    def from_jwks(
        cls,
        name: str,
        issuer: str,
        jwks_json: str | Mapping[str, Any],
        audiences: Iterable[str],
        *,
        trusted: bool = True,
    ) -> TrustedIdp:
        """An IdP from its JWKS document (``{"keys": [...]}``, RFC 7517 5).

        Encryption keys (``use: enc``, JWE algorithms) are skipped; any other key this module
        cannot use (symmetric, private, unsupported curve) is a ValueError naming its kid.
        """
        if isinstance(jwks_json, str):
            try:
                document: object = json.loads(jwks_json)
            except ValueError as exc:
                raise ValueError(f"JWKS of {name!r} is not JSON: {exc}") from None
        else:
            document = jwks_json
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            raise ValueError(f"JWKS of {name!r} must be an object with a 'keys' list")
        keys: list[IdpKey] = []
        for index, jwk in enumerate(document["keys"]):
            if not isinstance(jwk, Mapping):
                raise ValueError(f"JWKS of {name!r}: keys[{index}] is not an object")
            if _is_encryption_key(jwk):
                continue
            try:
                keys.append(IdpKey.from_jwk(jwk))
            except ValueError as exc:
                raise ValueError(f"JWKS of {name!r}: keys[{index}]: {exc}") from None
        if not keys:
            raise ValueError(f"JWKS of {name!r} has no signing keys")
        return cls(name, issuer, tuple(keys), tuple(audiences), trusted)

    @classmethod
    def from_pem(
        cls,
        name: str,
        issuer: str,
        pem: bytes,
        audiences: Iterable[str],
        kid: str | None = None,
        *,
        alg: str | None = None,
        trusted: bool = True,
    ) -> TrustedIdp:
        """An IdP with one key, from a PEM public key or certificate (the certificate's
        validity dates are not checked: the IdP's signing certificate is a key container)."""
        return cls(
            name, issuer, (IdpKey(_load_pem(name, pem), kid, alg),), tuple(audiences), trusted
        )

    def to_wire(self) -> dict[str, Any]:
        """This IdP as a JSON-safe dict (keys as public JWKs, SAML certificates as PEM)."""
        wire: dict[str, Any] = {
            "name": self.name,
            "issuer": self.issuer,
            "audiences": list(self.audiences),
            "trusted": self.trusted,
            "keys": [key.to_jwk() for key in self.keys],
        }
        if self.saml_certificates:  # only when set: earlier connectors refuse unknown members
            wire["saml_certificates"] = list(self.saml_certificates)
        return wire

    @property
    def saml_signing_certificates(self) -> tuple[x509.Certificate, ...]:
        """The parsed :attr:`saml_certificates`, in order."""
        return self._saml_x509


def load_saml_certificates(name: str, pem: bytes) -> tuple[str, ...]:
    """The certificates of a PEM file (one or more ``CERTIFICATE`` blocks) as PEM texts for
    :attr:`TrustedIdp.saml_certificates`; ValueError for a private key or a file without any."""
    if b"PRIVATE KEY-----" in pem:
        raise ValueError(
            f"the SAML certificate file given for {name!r} holds a private key: give the IdP's "
            "signing certificate only"
        )
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(
            f"the SAML certificate file given for {name!r} holds no usable PEM certificate: {exc}"
        ) from None
    return tuple(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certificates)


def _saml_certificates(name: str, pems: object) -> tuple[x509.Certificate, ...]:
    """Parse and check an IdP's SAML signing certificates: RSA (2048-8192 bits) or EC
    P-256/384/521 keys, the ones the accepted XML signature algorithms use. The validity dates
    are checked when an assertion is verified (against its ``now``), not here."""
    if isinstance(pems, str) or not isinstance(pems, tuple | list):
        raise ValueError(f"identity provider {name!r}: saml_certificates must be a tuple of PEM")
    if len(pems) > MAX_SAML_CERTIFICATES:
        raise ValueError(
            f"identity provider {name!r} has {len(pems)} SAML signing certificates; at most "
            f"{MAX_SAML_CERTIFICATES} are accepted"
        )
    parsed = []
    for index, pem in enumerate(pems):
        where = f"identity provider {name!r}: SAML certificate {index + 1}"
        if not isinstance(pem, str) or not pem.strip():
            raise ValueError(f"{where} is not PEM text")
        if len(pem) > MAX_SAML_CERTIFICATE_PEM:
            raise ValueError(
                f"{where} is {len(pem)} characters long; at most {MAX_SAML_CERTIFICATE_PEM} "
                "are accepted"
            )
        if "PRIVATE KEY-----" in pem or pem.count("-----BEGIN ") != 1:
            raise ValueError(f"{where} must be exactly one PEM CERTIFICATE block")
        try:
            certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
            key = certificate.public_key()
        except (ValueError, UnicodeError) as exc:
            raise ValueError(f"{where} is not an X.509 certificate: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(
                f"{where} holds a {type(key).__name__}; SAML signatures are accepted with RSA "
                "or EC keys only"
            )
        try:
            IdpKey(key)  # the same key size and curve rules as for JWT keys
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        parsed.append(certificate)
    return tuple(parsed)


def _load_pem(name: str, pem: bytes) -> PublicKey:
    if b"PRIVATE KEY-----" in pem:
        raise ValueError(
            f"the PEM given for {name!r} is a private key: give the IdP's public key or "
            "signing certificate"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: object = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"the PEM given for {name!r} is not a public key: {exc}") from None
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise ValueError(f"the PEM given for {name!r} holds an unsupported {type(key).__name__}")
    return key


class TrustList:
    """The identity providers the connector trusts, by issuer; immutable."""

    __slots__ = ("_by_issuer",)

    def __init__(self, idps: Iterable[TrustedIdp] = ()) -> None:
        by_issuer: dict[str, TrustedIdp] = {}
        names: set[str] = set()
        for idp in idps:
            if not isinstance(idp, TrustedIdp):
                raise ValueError(f"a trust list holds TrustedIdp objects, not {type(idp).__name__}")
            if idp.issuer in by_issuer:
                raise ValueError(
                    f"identity providers {by_issuer[idp.issuer].name!r} and {idp.name!r} have "
                    f"the same issuer {idp.issuer!r}"
                )
            if idp.name in names:
                raise ValueError(f"two identity providers are named {idp.name!r}")
            by_issuer[idp.issuer] = idp
            names.add(idp.name)
        self._by_issuer: Mapping[str, TrustedIdp] = by_issuer

    def get(self, issuer: str) -> TrustedIdp | None:
        """The IdP with this exact issuer, if any."""
        return self._by_issuer.get(issuer)

    def __iter__(self) -> Iterator[TrustedIdp]:
        return iter(self._by_issuer.values())

    def __len__(self) -> int:
        return len(self._by_issuer)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustList):
            return NotImplemented
        return list(self) == list(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"TrustList({[idp.name for idp in self]!r})"

    def to_wire(self) -> dict[str, Any]:
        """The list as a JSON-safe dict, for the tunnel from gateway to connector."""
        return {"version": WIRE_VERSION, "idps": [idp.to_wire() for idp in self]}

    @classmethod
    def from_wire(cls, data: object) -> TrustList:
        """Parse :meth:`to_wire`'s output as received from the peer: every type and size is
        checked, unknown members are refused; raises ValueError naming the offending field."""
        if not isinstance(data, Mapping):
            raise ValueError("trust list: expected an object")
        _only(data, {"version", "idps"}, "trust list")
        if data.get("version") != WIRE_VERSION:
            raise ValueError(
                f"trust list: version {data.get('version')!r} is not supported "
                f"(this connector reads version {WIRE_VERSION})"
            )
        idps = _list(data.get("idps"), "trust list: idps", MAX_WIRE_IDPS)
        parsed = [_idp_from_wire(item, f"trust list: idps[{i}]") for i, item in enumerate(idps)]
        try:
            return cls(parsed)
        except ValueError as exc:
            raise ValueError(f"trust list: {exc}") from None


def _only(data: Mapping[Any, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(str(key)[:40] for key in data if key not in allowed)
    if unknown:
        raise ValueError(f"{where}: unknown member(s) {', '.join(map(repr, unknown))}")


def _list(value: object, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list")
    if len(value) > limit:
        raise ValueError(f"{where}: {len(value)} entries, at most {limit} are accepted")
    return value


def _text(value: object, where: str, limit: int = MAX_WIRE_TEXT) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{where}: {len(value)} characters, at most {limit} are accepted")
    return value


def _idp_from_wire(item: object, where: str) -> TrustedIdp:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected an object")
    _only(item, {"name", "issuer", "audiences", "trusted", "keys", "saml_certificates"}, where)
    name = _text(item.get("name"), f"{where}.name")
    issuer = _text(item.get("issuer"), f"{where}.issuer")
    audiences = tuple(
        _text(audience, f"{where}.audiences[{i}]")
        for i, audience in enumerate(
            _list(item.get("audiences"), f"{where}.audiences", MAX_WIRE_AUDIENCES)
        )
    )
    trusted = item.get("trusted")
    if not isinstance(trusted, bool):
        raise ValueError(f"{where}.trusted: expected true or false")
    keys = []
    for i, jwk in enumerate(_list(item.get("keys"), f"{where}.keys", MAX_WIRE_KEYS)):
        key_where = f"{where}.keys[{i}]"
        if not isinstance(jwk, Mapping):
            raise ValueError(f"{key_where}: expected an object")
        private = sorted(_PRIVATE_JWK_MEMBERS & set(jwk))
        if private:
            raise ValueError(f"{key_where}: private key material ({', '.join(private)}) refused")
        _only(jwk, {"kty", "kid", "alg", "n", "e", "crv", "x", "y"}, key_where)
        for member, value in jwk.items():
            _text(value, f"{key_where}.{member}", MAX_WIRE_JWK_MEMBER)
        try:
            keys.append(IdpKey.from_jwk(jwk))
        except ValueError as exc:
            raise ValueError(f"{key_where}: {exc}") from None
    certificates = tuple(
        _text(pem, f"{where}.saml_certificates[{i}]", MAX_SAML_CERTIFICATE_PEM)
        for i, pem in enumerate(
            _list(
                item.get("saml_certificates", []),
                f"{where}.saml_certificates",
                MAX_SAML_CERTIFICATES,
            )
        )
    )
    try:
        return TrustedIdp(name, issuer, tuple(keys), audiences, trusted, certificates)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# --- validation -------------------------------------------------------------------------------


def _no_float_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _segment_json(segment: str, part: str) -> dict[str, Any]:
    malformed = PrincipalReason.MALFORMED_TOKEN
    if not _BASE64URL.fullmatch(segment):
        refuse(malformed, f"the token's {part} is not base64url text")
    stripped = segment.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError):
        refuse(malformed, f"the token's {part} is not valid base64url")
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != stripped:
        refuse(malformed, f"the token's {part} is not canonical base64url")
    try:
        value = json.loads(raw, parse_constant=_no_float_constants)
        # Lone surrogates decode from JSON escapes but are not text; refuse them here.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeError):
        refuse(malformed, f"the token's {part} is not a JSON object in valid UTF-8")
    if not isinstance(value, dict):
        refuse(malformed, f"the token's {part} is JSON but not an object")
    return value


def _select_key(idp: TrustedIdp, kid: str | None, details: dict[str, str]) -> IdpKey:
    if not idp.keys:
        refuse(
            PrincipalReason.UNKNOWN_KEY,
            f"identity provider {idp.name!r} has no JWT signing keys (only SAML signing "
            "certificates): give it a jwks_file or public_key_file to accept its JWTs",
            **details,
        )
    if kid is not None:
        for key in idp.keys:
            if key.kid == kid:
                return key
        if len(idp.keys) == 1 and idp.keys[0].kid is None:
            return idp.keys[0]  # the operator configured one key without pinning its kid
        known = ", ".join(repr(key.kid) for key in idp.keys if key.kid is not None)
        refuse(
            PrincipalReason.UNKNOWN_KEY,
            f"the token's key id {shown(kid)} is not among the keys of identity provider "
            f"{idp.name!r} ({known or 'none with a kid'}): if the IdP rotated its keys, "
            "synchronise the trust list",
            **details,
        )
    if len(idp.keys) == 1:
        return idp.keys[0]
    raise PrincipalError(
        PrincipalReason.UNKNOWN_KEY,
        f"the token has no key id (kid) and identity provider {idp.name!r} has "
        f"{len(idp.keys)} keys: the IdP must name its signing key in the token header",
        details,
    )


def _numeric_date(claims: Mapping[str, Any], claim: str, details: dict[str, str]) -> float | None:
    value = claims.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            f"the token's {claim!r} claim is not a number of seconds since the epoch",
            **details,
        )
    return value


def _check_times(
    claims: Mapping[str, Any], now: float, leeway: float, details: dict[str, str]
) -> None:
    exp = _numeric_date(claims, "exp", details)
    nbf = _numeric_date(claims, "nbf", details)
    iat = _numeric_date(claims, "iat", details)
    clock = f"now is {when(now)}, leeway {leeway:g} s"
    if exp is None:  # PyJWT requires it too; kept so this function stands alone
        refuse(PrincipalReason.MALFORMED_TOKEN, "the token has no 'exp' claim", **details)
    if exp <= now - leeway:
        refuse(
            PrincipalReason.EXPIRED,
            f"the token expired at {when(exp)} ({clock}): the application must send a fresh "
            "token, or the connector's clock is wrong",
            **details,
        )
    if nbf is not None and nbf > now + leeway:
        refuse(
            PrincipalReason.NOT_YET_VALID,
            f"the token is not valid before {when(nbf)} ({clock}): check the clocks of the "
            "connector and the identity provider",
            **details,
        )
    if iat is not None and iat > now + leeway:
        refuse(
            PrincipalReason.NOT_YET_VALID,
            f"the token was issued in the future, at {when(iat)} ({clock}): check the clocks "
            "of the connector and the identity provider",
            **details,
        )


def _check_audience(
    claims: Mapping[str, Any],
    idp: TrustedIdp,
    required_audience: str | None,
    details: dict[str, str],
) -> None:
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        if aud is None:
            refuse(
                PrincipalReason.WRONG_AUDIENCE,
                f"the token has no audience (aud); identity provider {idp.name!r} accepts "
                f"{', '.join(map(repr, idp.audiences))}",
                **details,
            )
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            "the token's 'aud' claim is neither a string nor a list of strings",
            **details,
        )
    named = ", ".join(shown(a, 48) for a in audiences[:5]) + (", …" if len(audiences) > 5 else "")
    if not set(audiences) & set(idp.audiences):
        refuse(
            PrincipalReason.WRONG_AUDIENCE,
            f"the token is for audience {named or '(none)'}, but identity provider "
            f"{idp.name!r} is trusted only for {', '.join(map(repr, idp.audiences))}: the "
            "application must request a token for one of those, or add its audience to the IdP",
            **details,
        )
    if required_audience is not None and required_audience not in audiences:
        refuse(
            PrincipalReason.WRONG_AUDIENCE,
            f"the token is for audience {shown}, but {required_audience!r} is required here",
            **details,
        )


def trusted_idp(trust: TrustList, issuer: str, details: dict[str, str]) -> TrustedIdp:
    """The trusted IdP with this exact issuer (a JWT's ``iss``, a SAML ``Issuer``); refuses
    UNTRUSTED_ISSUER for an unknown one and IDP_NOT_TRUSTED for one marked untrusted."""
    idp = trust.get(issuer)
    if idp is None:
        refuse(
            PrincipalReason.UNTRUSTED_ISSUER,
            f"issuer {shown(issuer, 200)} is not a trusted identity provider "
            f"({len(trust)} configured): add it to the trust list, or synchronise the list",
            **details,
        )
    details["idp"] = idp.name
    if not idp.trusted:
        refuse(
            PrincipalReason.IDP_NOT_TRUSTED,
            f"identity provider {idp.name!r} (issuer {idp.issuer!r}) is known but not marked "
            "trusted for principal propagation on this connector",
            **details,
        )
    return idp


def validate_jwt(
    token: str,
    trust: TrustList,
    *,
    now: float,
    leeway: float = 60,
    required_audience: str | None = None,
) -> dict[str, Any]:
    """The claims of ``token`` if a trusted IdP signed it for us and it is valid at ``now``.

    ``now`` is seconds since the epoch (the caller's clock, so tests never depend on the wall
    clock); ``leeway`` is the clock skew tolerated on ``exp``, ``nbf`` and ``iat``. Raises
    :class:`PrincipalError` with the precise reason (see the module docstring for the order).
    """
    if not math.isfinite(now) or not math.isfinite(leeway) or leeway < 0:
        raise ValueError("now must be finite and leeway finite and not negative")
    if not isinstance(token, str) or not token.strip():
        refuse(
            PrincipalReason.MISSING_TOKEN,
            "no user token was presented: the application must forward its user's JWT",
        )
    token = token.strip()
    if len(token) > MAX_TOKEN_LENGTH:
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            f"the token is {len(token)} characters long; at most {MAX_TOKEN_LENGTH} are accepted",
        )
    if not token.isascii():
        refuse(PrincipalReason.MALFORMED_TOKEN, "the token contains non-ASCII characters")
    segments = token.split(".")
    if len(segments) == 5:
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            "the token is encrypted (JWE, five parts); only signed tokens (JWS) are accepted",
        )
    if len(segments) != 3:
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            f"the token has {len(segments)} dot-separated parts; a signed JWT has 3",
        )
    header_segment, payload_segment, signature_segment = segments
    header = _segment_json(header_segment, "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        refuse(PrincipalReason.MALFORMED_TOKEN, "the token header names no algorithm (alg)")
    details = {"alg": alg[:32]}
    if alg.lower() == "none" or not signature_segment.rstrip("="):
        refuse(
            PrincipalReason.UNSIGNED_TOKEN,
            f"the token is unsigned (alg {shown(alg, 32)}, "
            f"{'empty' if not signature_segment else 'present'} signature): only tokens signed "
            "by a trusted identity provider are accepted",
            **details,
        )
    if alg not in ALLOWED_ALGORITHMS:
        why = (
            "a shared-secret algorithm, never accepted for identity provider tokens"
            if alg.upper().startswith("HS")
            else "not an accepted signature algorithm"
        )
        refuse(
            PrincipalReason.UNSUPPORTED_ALGORITHM,
            f"the token's alg {shown(alg, 32)} is {why}; accepted: "
            f"{', '.join(sorted(ALLOWED_ALGORITHMS))}",
            **details,
        )
    if "crit" in header or "b64" in header:
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            "the token header uses critical extensions (crit, b64), which are not supported",
            **details,
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        refuse(PrincipalReason.MALFORMED_TOKEN, "the token's key id (kid) is not a string")
    if kid is not None:
        details["kid"] = kid[:64]
    claims = _segment_json(payload_segment, "payload")
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer:
        refuse(
            PrincipalReason.UNTRUSTED_ISSUER,
            "the token names no issuer (iss), so no trusted identity provider can vouch for it",
            **details,
        )
    details["issuer"] = issuer[:256]
    idp = trusted_idp(trust, issuer, details)
    key = _select_key(idp, kid, details)
    if alg not in key.algorithms:
        refuse(
            PrincipalReason.UNSUPPORTED_ALGORITHM,
            f"the token's alg {alg} does not suit the {key.description} key "
            f"{key.kid or '(without kid)'} of identity provider {idp.name!r}, which verifies "
            f"{', '.join(sorted(key.algorithms))}",
            **details,
        )
    try:
        verified = jwt.decode(
            token, key.key, algorithms=[alg], issuer=idp.issuer, options=_PYJWT_OPTIONS
        )
    except jwt.InvalidSignatureError:
        refuse(
            PrincipalReason.BAD_SIGNATURE,
            f"the token's signature does not verify with the {key.description} key "
            f"{key.kid or '(without kid)'} of identity provider {idp.name!r}: the token was "
            "forged or altered, or the IdP rotated its keys (synchronise the trust list)",
            **details,
        )
    except jwt.MissingRequiredClaimError as exc:
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            f"the token has no {exc.claim!r} claim; tokens without an expiry are refused",
            **details,
        )
    except jwt.InvalidIssuerError:
        refuse(
            PrincipalReason.UNTRUSTED_ISSUER,
            f"the token's issuer does not match identity provider {idp.name!r}",
            **details,
        )
    except jwt.PyJWTError as exc:
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            f"the token was refused by the JWT library ({type(exc).__name__})",
            **details,
        )
    _check_times(verified, now, leeway, details)
    _check_audience(verified, idp, required_audience, details)
    return verified
