"""Validating a user's SAML 2.0 assertion against trusted identity providers: genuine assertions
signed here with signxml and throwaway keys, a forged corpus (signature wrapping, altered and
comment-injected NameIDs, weak algorithms, XXE and entity expansion, bad times and audiences)
with one expected reason each, and the IdP's SAML certificates in the trust list, its wire
format and the gateway configuration. Time is always the ``now`` passed in."""

from __future__ import annotations

import base64
import copy
import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type information
from signxml.algorithms import SignatureMethod
from signxml.signer import SignatureReference, XMLSigner
from signxml.verifier import XMLVerifier

from backchannel import _saml_trust as saml_trust
from backchannel._configutil import TableReader
from backchannel._exceptions import ConfigError
from backchannel._identity import read_identity_providers
from backchannel._jwt_trust import (
    MAX_SAML_CERTIFICATE_PEM,
    IdpKey,
    TrustedIdp,
    TrustList,
    load_saml_certificates,
    validate_jwt,
)
from backchannel._principal_errors import PrincipalError, PrincipalReason
from backchannel._saml_trust import MAX_ASSERTION_BYTES, MAX_ASSERTION_TEXT, validate_saml
from backchannel._subject_rules import SubjectRule, SubjectRules

NOW = 1_800_000_000.0  # 2027-01-15, deliberately not the wall clock
ISSUER = "https://tenant.accounts.example.com/saml2/idp"
OTHER_ISSUER = "https://other-idp.example.com"
UNTRUSTED_ISSUER = "https://known-but-untrusted.example.com"
JWT_ONLY_ISSUER = "https://jwt-only.example.com"
AUDIENCE = "https://connector.example.com/backchannel"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
DS = "http://www.w3.org/2000/09/xmldsig#"
BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def certificate(
    key: SigningKey,
    common_name: str = "idp signing",
    *,
    not_before: datetime.datetime = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
    not_after: datetime.datetime = datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC),
) -> x509.Certificate:
    """A self-signed certificate, the way IdPs publish their SAML signing keys."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


IDP_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
IDP_RSA_CERT = certificate(IDP_RSA)
IDP_EC = ec.generate_private_key(ec.SECP256R1())
IDP_EC_CERT = certificate(IDP_EC)
ATTACKER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_CERT = certificate(ATTACKER, "idp signing")  # the same subject name, another key
EXPIRED_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EXPIRED_CERT = certificate(
    EXPIRED_KEY, not_after=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
)
JWT_KEY = ec.generate_private_key(ec.SECP256R1())

TRUST = TrustList(
    [
        # Two certificates, as during a key rollover.
        TrustedIdp(
            "tenant",
            ISSUER,
            (),
            (AUDIENCE,),
            saml_certificates=(pem(IDP_RSA_CERT), pem(IDP_EC_CERT)),
        ),
        TrustedIdp(
            "expired-cert", OTHER_ISSUER, (), (AUDIENCE,), saml_certificates=(pem(EXPIRED_CERT),)
        ),
        TrustedIdp(
            "untrusted",
            UNTRUSTED_ISSUER,
            (),
            (AUDIENCE,),
            trusted=False,
            saml_certificates=(pem(IDP_RSA_CERT),),
        ),
        TrustedIdp("jwt-only", JWT_ONLY_ISSUER, (IdpKey(JWT_KEY.public_key()),), (AUDIENCE,)),
    ]
)


def when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def assertion_xml(
    *,
    assertion_id: str = "_a1",
    issuer: str = ISSUER,
    name_id: str = "alice@example.com",
    issued: float = NOW - 10,
    not_before: float | None = NOW - 60,
    not_on_or_after: float | None = NOW + 300,
    audiences: tuple[str, ...] | None = (AUDIENCE,),
    extra_conditions: str = "",
    method: str = BEARER,
    confirmation_until: float = NOW + 300,
    attributes: str | None = None,
    advice: str = "",
) -> str:
    """An assertion as an IdP such as SAP Cloud Identity Services issues it (unsigned, with a
    placeholder where signxml puts the signature: after the Issuer, as the schema wants)."""
    times = f' NotBefore="{when(not_before)}"' if not_before is not None else ""
    times += f' NotOnOrAfter="{when(not_on_or_after)}"' if not_on_or_after is not None else ""
    restriction = (
        "<saml2:AudienceRestriction>"
        + "".join(f"<saml2:Audience>{a}</saml2:Audience>" for a in audiences)
        + "</saml2:AudienceRestriction>"
        if audiences is not None
        else ""
    )
    if attributes is None:
        attributes = (
            '<saml2:Attribute Name="mail"><saml2:AttributeValue>alice@example.com'
            "</saml2:AttributeValue></saml2:Attribute>"
            '<saml2:Attribute Name="urn:oid:2.16.840.1.113730.3.1.241" FriendlyName="displayName">'
            "<saml2:AttributeValue>Alice Example</saml2:AttributeValue></saml2:Attribute>"
            '<saml2:Attribute Name="groups"><saml2:AttributeValue>admins</saml2:AttributeValue>'
            "<saml2:AttributeValue>users</saml2:AttributeValue></saml2:Attribute>"
            '<saml2:Attribute Name="user_name"><saml2:AttributeValue>root'
            "</saml2:AttributeValue></saml2:Attribute>"
        )
    return (
        f'<saml2:Assertion xmlns:saml2="{SAML}" ID="{assertion_id}" Version="2.0" '
        f'IssueInstant="{when(issued)}">'
        f"<saml2:Issuer>{issuer}</saml2:Issuer>"
        f'<ds:Signature xmlns:ds="{DS}" Id="placeholder"/>'
        "<saml2:Subject>"
        '<saml2:NameID Format="urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress">'
        f"{name_id}</saml2:NameID>"
        f'<saml2:SubjectConfirmation Method="{method}">'
        f'<saml2:SubjectConfirmationData NotOnOrAfter="{when(confirmation_until)}"/>'
        "</saml2:SubjectConfirmation>"
        "</saml2:Subject>"
        f"<saml2:Conditions{times}>{restriction}{extra_conditions}</saml2:Conditions>"
        f"{advice}"
        f'<saml2:AuthnStatement AuthnInstant="{when(issued)}"><saml2:AuthnContext>'
        "<saml2:AuthnContextClassRef>urn:oasis:names:tc:SAML:2.0:ac:classes:Password"
        "</saml2:AuthnContextClassRef></saml2:AuthnContext></saml2:AuthnStatement>"
        f"<saml2:AttributeStatement>{attributes}</saml2:AttributeStatement>"
        "</saml2:Assertion>"
    )


class LegacySigner(XMLSigner):
    """signxml refuses to *sign* with SHA-1; an old IdP still does."""

    def check_deprecated_methods(self) -> None:
        pass


def signed(
    xml: str | None = None,
    *,
    key: SigningKey | bytes = IDP_RSA,
    cert: x509.Certificate | None = IDP_RSA_CERT,
    algorithm: str = "rsa-sha256",
    digest: str = "sha256",
    signer: type[XMLSigner] = XMLSigner,
    **reference: Any,
) -> Any:
    """The assertion signed (enveloped, exclusive c14n) as an lxml element."""
    document = etree.fromstring(xml or assertion_xml())
    return signer(
        signature_algorithm=algorithm, digest_algorithm=digest, c14n_algorithm=EXC_C14N
    ).sign(
        document,
        key=key,
        cert=[cert] if cert is not None else None,
        id_attribute="ID",
        **reference,
    )


def b64(document: Any) -> str:
    data = document if isinstance(document, bytes) else etree.tostring(document)
    return base64.b64encode(data).decode("ascii")


def refused(
    assertion: str,
    reason: PrincipalReason,
    *,
    trust: TrustList = TRUST,
    now: float = NOW,
    leeway: float = 60,
    required_audience: str | None = None,
) -> PrincipalError:
    with pytest.raises(PrincipalError) as caught:
        validate_saml(assertion, trust, now=now, leeway=leeway, required_audience=required_audience)
    error = caught.value
    assert error.reason is reason, (error.reason, error.message)
    text = f"{error.message} {error.details}"
    assert assertion[:40] not in text
    assert "alice@example.com" not in text
    assert "PHNhbWwy" not in text  # base64 of "<saml2"
    return error


def accepted(assertion: str, **kwargs: Any) -> dict[str, Any]:
    return validate_saml(assertion, TRUST, now=NOW, leeway=60, **kwargs)


# --- genuine assertions ------------------------------------------------------------------------


def test_a_genuine_assertion_gives_the_claims_for_the_subject_rules() -> None:
    claims = accepted(b64(signed()))
    assert claims == {
        "iss": ISSUER,
        "sub": "alice@example.com",
        "user_name": "alice@example.com",  # the NameID, never the 'user_name' attribute
        "name_id_format": "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress",
        "aud": [AUDIENCE],
        "exp": NOW + 300,
        "nbf": NOW - 60,
        "iat": NOW - 10,
        "mail": "alice@example.com",
        "urn:oid:2.16.840.1.113730.3.1.241": "Alice Example",
        "display_name": "Alice Example",
        "groups": ["admins", "users"],
    }
    rules = SubjectRules((SubjectRule("CN=${name},OU=${display_name},O=Example"),))
    assert rules.subject_for(claims).rfc4514 == "CN=alice@example.com,OU=Alice Example,O=Example"


@pytest.mark.parametrize(
    ("key", "cert", "algorithm", "digest"),
    [
        (IDP_RSA, IDP_RSA_CERT, "rsa-sha256", "sha256"),
        (IDP_RSA, IDP_RSA_CERT, "rsa-sha384", "sha384"),
        (IDP_RSA, IDP_RSA_CERT, "rsa-sha512", "sha512"),
        (IDP_EC, IDP_EC_CERT, "ecdsa-sha256", "sha256"),  # the second certificate of the IdP
        (IDP_EC, IDP_EC_CERT, "ecdsa-sha384", "sha512"),
        (IDP_EC, IDP_EC_CERT, "ecdsa-sha512", "sha384"),
        (IDP_RSA, None, "rsa-sha256", "sha256"),  # KeyValue instead of X509Data
    ],
)
def test_every_allowed_algorithm_is_accepted(
    key: SigningKey, cert: x509.Certificate | None, algorithm: str, digest: str
) -> None:
    claims = accepted(b64(signed(key=key, cert=cert, algorithm=algorithm, digest=digest)))
    assert claims["sub"] == "alice@example.com"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"not_on_or_after": NOW - 59}, PrincipalReason.EXPIRED),
        ({"not_before": NOW + 59}, PrincipalReason.NOT_YET_VALID),
        ({"issued": NOW + 59}, PrincipalReason.NOT_YET_VALID),
        ({"confirmation_until": NOW - 59}, PrincipalReason.SAML_SUBJECT_CONFIRMATION),
    ],
)
def test_leeway_applies_to_every_time(changes: dict[str, float], reason: PrincipalReason) -> None:
    assertion = b64(signed(assertion_xml(**changes)))  # type: ignore[arg-type]
    assert accepted(assertion)["sub"] == "alice@example.com"
    refused(assertion, reason, leeway=0)


def test_base64_may_be_wrapped_into_lines() -> None:
    text = b64(signed())
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert accepted(wrapped)["sub"] == "alice@example.com"


def test_attribute_aliases_never_replace_an_explicit_attribute() -> None:
    attributes = (
        '<saml2:Attribute Name="urn:oid:0.9.2342.19200300.100.1.3">'
        "<saml2:AttributeValue>alias@example.com</saml2:AttributeValue></saml2:Attribute>"
        '<saml2:Attribute Name="mail"><saml2:AttributeValue>own@example.com'
        "</saml2:AttributeValue></saml2:Attribute>"
        '<saml2:Attribute Name="emailaddress"><saml2:AttributeValue>e@example.com'
        "</saml2:AttributeValue></saml2:Attribute>"
        '<saml2:Attribute Name="loginName"><saml2:AttributeValue>alice'
        "</saml2:AttributeValue></saml2:Attribute>"
        '<saml2:Attribute Name="user_uuid"><saml2:AttributeValue>1234'
        "</saml2:AttributeValue></saml2:Attribute>"
        '<saml2:Attribute Name="complex"><saml2:AttributeValue><x/></saml2:AttributeValue>'
        "</saml2:Attribute>"
        '<saml2:Attribute Name="iss"><saml2:AttributeValue>https://evil.example.com'
        "</saml2:AttributeValue></saml2:Attribute>"
        '<saml2:Attribute Name="grant_type"><saml2:AttributeValue>client_credentials'
        "</saml2:AttributeValue></saml2:Attribute>"
    )
    claims = accepted(b64(signed(assertion_xml(attributes=attributes))))
    assert claims["mail"] == "own@example.com"
    assert claims["email"] == "e@example.com"
    assert claims["login_name"] == "alice"
    assert claims["user_uuid"] == "1234"
    assert claims["iss"] == ISSUER
    assert "complex" not in claims
    assert "grant_type" not in claims


# --- the forged corpus -------------------------------------------------------------------------


def _unsigned() -> str:
    document = etree.fromstring(assertion_xml())
    document.remove(document.find(f"{{{DS}}}Signature"))
    return b64(document)


def _altered_name_id() -> str:
    document = signed()
    document.find(f"{{{SAML}}}Subject/{{{SAML}}}NameID").text = "admin@example.com"
    return b64(document)


def _evil_assertion_with_the_signed_one_inside() -> str:
    """XSW: an unsigned assertion for 'admin' at the top, the genuine signed assertion (with
    its signature) moved into the evil one's Advice."""
    genuine = signed()
    evil = etree.fromstring(
        assertion_xml(assertion_id="_evil", name_id="admin@example.com", advice="<saml2:Advice/>")
    )
    evil.remove(evil.find(f"{{{DS}}}Signature"))
    evil.find(f"{{{SAML}}}Advice").append(genuine)
    return b64(evil)


def _evil_assertion_holding_the_signature() -> str:
    """XSW: the genuine signature moved to the evil top assertion, still referencing the
    genuine assertion, which sits unsigned in the Advice."""
    genuine = signed()
    signature = genuine.find(f"{{{DS}}}Signature")
    genuine.remove(signature)
    evil = etree.fromstring(
        assertion_xml(assertion_id="_evil", name_id="admin@example.com", advice="<saml2:Advice/>")
    )
    placeholder = evil.find(f"{{{DS}}}Signature")
    placeholder.addprevious(signature)
    evil.remove(placeholder)
    evil.find(f"{{{SAML}}}Advice").append(genuine)
    return b64(evil)


def _evil_assertion_with_the_same_id() -> str:
    """XSW: as above, but the evil assertion takes the genuine one's ID, so the reference
    matches the root too."""
    genuine = signed()
    signature = genuine.find(f"{{{DS}}}Signature")
    genuine.remove(signature)
    genuine.insert(1, signature)
    evil = etree.fromstring(
        assertion_xml(assertion_id="_a1", name_id="admin@example.com", advice="<saml2:Advice/>")
    )
    evil.remove(evil.find(f"{{{DS}}}Signature"))
    evil.insert(1, copy.deepcopy(signature))
    evil.find(f"{{{SAML}}}Advice").append(genuine)
    return b64(evil)


def _second_assertion_next_to_the_signed_one() -> str:
    response = etree.fromstring(
        f'<samlp:Response xmlns:samlp="{SAMLP}" ID="_r" Version="2.0" IssueInstant="{when(NOW)}"/>'
    )
    evil = etree.fromstring(assertion_xml(assertion_id="_evil", name_id="admin@example.com"))
    evil.remove(evil.find(f"{{{DS}}}Signature"))
    response.append(evil)
    response.append(signed())
    return b64(response)


def _second_assertion_inside_the_signed_one() -> str:
    document = signed(assertion_xml(advice="<saml2:Advice/>"))
    evil = etree.fromstring(assertion_xml(assertion_id="_evil", name_id="admin@example.com"))
    evil.remove(evil.find(f"{{{DS}}}Signature"))
    document.find(f"{{{SAML}}}Advice").append(evil)
    return b64(document)


class WholeDocumentSigner(XMLSigner):
    """Signs the whole document (``URI=""``) although the assertion has an ID."""

    def _unpack(self, data: Any, references: Any) -> Any:
        sig_root, doc_root, c14n_inputs, _ = super()._unpack(data, None)  # type: ignore[arg-type]
        return sig_root, doc_root, c14n_inputs, [SignatureReference(URI="")]


def _signature_over_the_whole_document() -> str:
    document = signed(signer=WholeDocumentSigner)
    assert document.find(f".//{{{DS}}}Reference").get("URI") == ""
    XMLVerifier().verify(document, x509_cert=IDP_RSA_CERT)  # a genuine signature
    return b64(document)


def _two_signatures() -> str:
    document = signed()
    document.insert(1, copy.deepcopy(document.find(f"{{{DS}}}Signature")))
    return b64(document)


def _response_with_one_signed_assertion() -> str:
    response = etree.fromstring(
        f'<samlp:Response xmlns:samlp="{SAMLP}" ID="_r" Version="2.0" IssueInstant="{when(NOW)}"/>'
    )
    response.append(signed())
    return b64(response)


XXE = (
    f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    f'<saml2:Assertion xmlns:saml2="{SAML}" ID="_a1" Version="2.0">&xxe;</saml2:Assertion>'
)
BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
        for i in range(1, 10)
    )
    + f']><saml2:Assertion xmlns:saml2="{SAML}" ID="_a1">&lol9;</saml2:Assertion>'
)


CORPUS: list[tuple[str, Callable[[], str], PrincipalReason]] = [
    ("empty", lambda: "  ", PrincipalReason.MISSING_TOKEN),
    ("not base64", lambda: "not*base64!", PrincipalReason.MALFORMED_TOKEN),
    ("not XML", lambda: b64(b"<saml2:Assertion"), PrincipalReason.MALFORMED_TOKEN),
    ("unsigned", _unsigned, PrincipalReason.UNSIGNED_TOKEN),
    ("signed by another key", lambda: b64(signed(key=ATTACKER, cert=ATTACKER_CERT)),
     PrincipalReason.SAML_BAD_SIGNATURE),
    ("another key, the IdP's certificate in KeyInfo",
     lambda: b64(signed(key=ATTACKER, cert=IDP_RSA_CERT)), PrincipalReason.SAML_BAD_SIGNATURE),
    ("altered NameID", _altered_name_id, PrincipalReason.SAML_BAD_SIGNATURE),
    ("wrapping: signed assertion inside an evil one", _evil_assertion_with_the_signed_one_inside,
     PrincipalReason.SAML_SIGNATURE_WRAPPING),
    ("wrapping: signature moved to the evil assertion", _evil_assertion_holding_the_signature,
     PrincipalReason.SAML_SIGNATURE_WRAPPING),
    ("wrapping: evil assertion with the signed ID", _evil_assertion_with_the_same_id,
     PrincipalReason.SAML_SIGNATURE_WRAPPING),
    ("second assertion next to the signed one", _second_assertion_next_to_the_signed_one,
     PrincipalReason.SAML_SIGNATURE_WRAPPING),
    ("second assertion inside the signed one", _second_assertion_inside_the_signed_one,
     PrincipalReason.SAML_BAD_SIGNATURE),
    ("signature over the whole document", _signature_over_the_whole_document,
     PrincipalReason.SAML_SIGNATURE_WRAPPING),
    ("two signatures", _two_signatures, PrincipalReason.SAML_SIGNATURE_WRAPPING),
    ("a Response, not an Assertion", _response_with_one_signed_assertion,
     PrincipalReason.MALFORMED_TOKEN),
    ("expired", lambda: b64(signed(assertion_xml(not_on_or_after=NOW - 61))),
     PrincipalReason.EXPIRED),
    ("not yet valid", lambda: b64(signed(assertion_xml(not_before=NOW + 61))),
     PrincipalReason.NOT_YET_VALID),
    ("issued in the future", lambda: b64(signed(assertion_xml(issued=NOW + 61))),
     PrincipalReason.NOT_YET_VALID),
    ("no expiry", lambda: b64(signed(assertion_xml(not_on_or_after=None))),
     PrincipalReason.SAML_CONDITIONS),
    ("one-time use", lambda: b64(signed(assertion_xml(extra_conditions="<saml2:OneTimeUse/>"))),
     PrincipalReason.SAML_CONDITIONS),
    ("wrong audience", lambda: b64(signed(assertion_xml(audiences=("https://other.example",)))),
     PrincipalReason.SAML_AUDIENCE),
    ("no audience restriction", lambda: b64(signed(assertion_xml(audiences=None))),
     PrincipalReason.SAML_AUDIENCE),
    ("second audience restriction not for us", lambda: b64(signed(assertion_xml(
        extra_conditions="<saml2:AudienceRestriction><saml2:Audience>https://other.example"
        "</saml2:Audience></saml2:AudienceRestriction>"))),
     PrincipalReason.SAML_AUDIENCE),
    ("subject confirmation expired",
     lambda: b64(signed(assertion_xml(confirmation_until=NOW - 61))),
     PrincipalReason.SAML_SUBJECT_CONFIRMATION),
    ("holder-of-key confirmation only", lambda: b64(signed(assertion_xml(
        method="urn:oasis:names:tc:SAML:2.0:cm:holder-of-key"))),
     PrincipalReason.SAML_SUBJECT_CONFIRMATION),
    ("RSA-SHA1", lambda: b64(signed(algorithm="rsa-sha1", digest="sha1", signer=LegacySigner)),
     PrincipalReason.UNSUPPORTED_ALGORITHM),
    ("SHA-1 digest", lambda: b64(signed(digest="sha1", signer=LegacySigner)),
     PrincipalReason.UNSUPPORTED_ALGORITHM),
    ("HMAC", lambda: b64(signed(key=b"a shared secret!", cert=None, algorithm="hmac-sha256")),
     PrincipalReason.UNSUPPORTED_ALGORITHM),
    ("RSA-PSS", lambda: b64(signed(algorithm=SignatureMethod.SHA256_RSA_MGF1.value)),
     PrincipalReason.UNSUPPORTED_ALGORITHM),
    ("XXE", lambda: b64(XXE.encode()), PrincipalReason.MALFORMED_TOKEN),
    ("billion laughs", lambda: b64(BILLION_LAUGHS.encode()), PrincipalReason.MALFORMED_TOKEN),
    ("DTD in UTF-16", lambda: b64(XXE.replace('"1.0"?', '"1.0" encoding="UTF-16"?')
                                  .encode("utf-16")), PrincipalReason.MALFORMED_TOKEN),
    ("too deep", lambda: b64(("<a>" * 30 + "</a>" * 30).encode()),
     PrincipalReason.MALFORMED_TOKEN),
    ("oversized", lambda: b64(b"<a>" + b"x" * MAX_ASSERTION_BYTES + b"</a>"),
     PrincipalReason.MALFORMED_TOKEN),
    ("oversized base64 text", lambda: "A" * (MAX_ASSERTION_TEXT + 4),
     PrincipalReason.MALFORMED_TOKEN),
    ("untrusted issuer", lambda: b64(signed(assertion_xml(issuer="https://evil.example.com"))),
     PrincipalReason.UNTRUSTED_ISSUER),
    ("IdP marked untrusted", lambda: b64(signed(assertion_xml(issuer=UNTRUSTED_ISSUER))),
     PrincipalReason.IDP_NOT_TRUSTED),
    ("IdP without SAML certificate", lambda: b64(signed(assertion_xml(issuer=JWT_ONLY_ISSUER))),
     PrincipalReason.UNKNOWN_KEY),
    ("IdP certificate expired", lambda: b64(signed(assertion_xml(issuer=OTHER_ISSUER),
                                                   key=EXPIRED_KEY, cert=EXPIRED_CERT)),
     PrincipalReason.SAML_BAD_SIGNATURE),
]  # fmt: skip


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_forged_and_broken_assertions_are_refused_for_the_right_reason(
    make: Callable[[], str], reason: PrincipalReason
) -> None:
    refused(make(), reason)


def test_the_corpus_covers_every_saml_reason() -> None:
    saml = {reason for reason in PrincipalReason if reason.name.startswith("SAML_")}
    assert saml <= {reason for _, _, reason in CORPUS}


def test_comments_injected_into_the_name_id_do_not_shorten_it() -> None:
    """The IdP signed 'alice@example.com.evil.test'; an attacker splits it with a comment,
    which exclusive c14n does not sign. A reader of the received tree would see
    'alice@example.com'; the claims come from what was signed."""
    document = signed(assertion_xml(name_id="alice@example.com.evil.test"))
    name_id = document.find(f"{{{SAML}}}Subject/{{{SAML}}}NameID")
    name_id.text = "alice@example.com"
    comment = etree.Comment("")
    comment.tail = ".evil.test"
    name_id.append(comment)
    assert name_id.text == "alice@example.com"  # the naive reading the attack relies on
    claims = accepted(b64(document))
    assert claims["sub"] == claims["user_name"] == "alice@example.com.evil.test"


def test_the_signed_xml_alone_stops_signature_wrapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the shape checks before verification, what signxml returns as signed (and the
    checks on it) still refuses every wrapping variant: the second line of defence."""

    def only_the_algorithm(root: Any, root_id: str, details: dict[str, str]) -> None:
        details["alg"] = "rsa-sha256"

    monkeypatch.setattr(saml_trust, "_check_signature_shape", only_the_algorithm)
    wrapping = [make for name, make, _ in CORPUS if "wrapping" in name or "signature" in name]
    assert len(wrapping) == 5
    reasons = set()
    for make in wrapping:
        with pytest.raises(PrincipalError) as caught:
            validate_saml(make(), TRUST, now=NOW, leeway=60, required_audience=None)
        reasons.add(caught.value.reason)
    assert reasons == {PrincipalReason.SAML_SIGNATURE_WRAPPING, PrincipalReason.SAML_BAD_SIGNATURE}


def test_entity_payloads_are_refused_quickly() -> None:
    for payload in (XXE, BILLION_LAUGHS):
        started = time.perf_counter()
        refused(b64(payload.encode()), PrincipalReason.MALFORMED_TOKEN)
        assert time.perf_counter() - started < 0.5


def test_required_audience() -> None:
    claims = accepted(b64(signed()), required_audience=AUDIENCE)
    assert claims["aud"] == [AUDIENCE]
    refused(
        b64(signed()), PrincipalReason.SAML_AUDIENCE, required_audience="https://elsewhere.test"
    )


def test_messages_name_what_to_fix() -> None:
    error = refused(b64(signed(assertion_xml(not_on_or_after=NOW - 3600))), PrincipalReason.EXPIRED)
    assert "2027-01-15T07:00:00Z" in error.message
    assert error.details == {
        "token_format": "saml2",
        "alg": "rsa-sha256",
        "issuer": ISSUER,
        "idp": "tenant",
    }
    error = refused(
        b64(signed(assertion_xml(audiences=("https://other.example",)))),
        PrincipalReason.SAML_AUDIENCE,
    )
    assert "'https://other.example'" in error.message
    assert AUDIENCE in error.message
    error = refused(
        b64(signed(assertion_xml(issuer=OTHER_ISSUER), key=EXPIRED_KEY, cert=EXPIRED_CERT)),
        PrincipalReason.SAML_BAD_SIGNATURE,
    )
    assert "2026-01-01T00:00:00Z" in error.message


def test_an_empty_trust_list_trusts_nobody() -> None:
    refused(b64(signed()), PrincipalReason.UNTRUSTED_ISSUER, trust=TrustList())


def test_now_and_leeway_must_be_sane() -> None:
    with pytest.raises(ValueError, match="leeway"):
        validate_saml(b64(signed()), TRUST, now=NOW, leeway=-1, required_audience=None)
    with pytest.raises(ValueError, match="finite"):
        validate_saml(b64(signed()), TRUST, now=float("nan"), leeway=0, required_audience=None)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_documents_raise_only_principal_errors(data: bytes) -> None:
    with pytest.raises(PrincipalError):
        validate_saml(b64(data), TRUST, now=NOW, leeway=60, required_audience=None)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_no_single_byte_change_of_a_genuine_assertion_changes_the_claims(
    data: st.DataObject,
) -> None:
    original = etree.tostring(GENUINE)
    index = data.draw(st.integers(0, len(original) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[index]))
    changed = original[:index] + bytes([byte]) + original[index + 1 :]
    try:
        claims = validate_saml(b64(changed), TRUST, now=NOW, leeway=60, required_audience=None)
    except PrincipalError:
        return
    # Some bytes are not signed content (whitespace in base64 of the signature, the
    # certificate in KeyInfo...): then the claims must be exactly the genuine ones.
    assert claims == GENUINE_CLAIMS


GENUINE = signed()
GENUINE_CLAIMS = validate_saml(b64(GENUINE), TRUST, now=NOW, leeway=60, required_audience=None)


# --- the trust list ----------------------------------------------------------------------------


def test_an_idp_needs_jwt_keys_or_saml_certificates() -> None:
    with pytest.raises(ValueError, match="no signing keys"):
        TrustedIdp("idp", ISSUER, (), (AUDIENCE,))
    idp = TrustedIdp("idp", ISSUER, (), (AUDIENCE,), saml_certificates=(pem(IDP_RSA_CERT),))
    assert idp.saml_signing_certificates == (IDP_RSA_CERT,)


def test_a_saml_only_idp_refuses_jwts_with_unknown_key() -> None:
    token = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 60, "sub": "x"}, JWT_KEY, algorithm="ES256"
    )
    with pytest.raises(PrincipalError) as caught:
        validate_jwt(token, TRUST, now=NOW)
    assert caught.value.reason is PrincipalReason.UNKNOWN_KEY
    assert "SAML" in caught.value.message


@pytest.mark.parametrize(
    ("certificates", "problem"),
    [
        ((pem(IDP_RSA_CERT),) * 5, "at most 4"),
        (("x" * (MAX_SAML_CERTIFICATE_PEM + 1),), "at most 8192"),
        (("not a certificate",), "exactly one PEM CERTIFICATE"),
        ((pem(IDP_RSA_CERT) + pem(IDP_EC_CERT),), "exactly one PEM CERTIFICATE"),
        (
            (
                IDP_RSA.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode(),
            ),
            "exactly one PEM CERTIFICATE",
        ),
        (("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",), "not an X.509"),
        ((pem(certificate(rsa.generate_private_key(65537, 1024))),), "1024 bits"),
        (pem(IDP_RSA_CERT), "tuple of PEM"),
    ],
)
def test_saml_certificates_are_checked(certificates: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TrustedIdp("idp", ISSUER, (), (AUDIENCE,), saml_certificates=certificates)


def test_saml_certificates_travel_on_the_wire() -> None:
    wire = json.loads(json.dumps(TRUST.to_wire()))
    assert wire["idps"][0]["saml_certificates"] == [pem(IDP_RSA_CERT), pem(IDP_EC_CERT)]
    assert "saml_certificates" not in wire["idps"][3]  # JWT-only: as earlier releases sent it
    again = TrustList.from_wire(wire)
    assert again == TRUST
    assert accepted(b64(signed())) == validate_saml(
        b64(signed()), again, now=NOW, leeway=60, required_audience=None
    )


def _wire(**changes: Any) -> dict[str, Any]:
    idp = {
        "name": "tenant",
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "trusted": True,
        "keys": [],
        "saml_certificates": [pem(IDP_RSA_CERT)],
    }
    idp.update(changes)
    return {"version": 1, "idps": [idp]}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_wire(saml_certificates=[]), "no signing keys"),
        (_wire(saml_certificates=pem(IDP_RSA_CERT)), r"saml_certificates: expected a list"),
        (_wire(saml_certificates=[pem(IDP_RSA_CERT)] * 5), "at most 4"),
        (_wire(saml_certificates=[7]), r"saml_certificates\[0\]: expected a non-empty string"),
        (_wire(saml_certificates=["x" * 8193]), r"saml_certificates\[0\]: .*at most 8192"),
        (_wire(saml_certificates=["junk"]), "exactly one PEM CERTIFICATE"),
    ],
)
def test_wire_saml_certificates_are_validated(data: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        TrustList.from_wire(data)
    assert str(caught.value).startswith("trust list")


# --- the gateway's configuration ---------------------------------------------------------------


def _idps(tmp_path: Path, **entry: Any) -> TrustList:
    table = {
        "identity_providers": [{"name": "ias", "issuer": ISSUER, "audiences": [AUDIENCE], **entry}]
    }
    return read_identity_providers(TableReader("gateway.toml", "subaccounts.acme", table, tmp_path))


def test_saml_certificate_file_alone_or_next_to_jwt_keys(tmp_path: Path) -> None:
    (tmp_path / "saml.pem").write_text(pem(IDP_RSA_CERT) + pem(IDP_EC_CERT))
    (tmp_path / "jwt.pem").write_bytes(
        JWT_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    saml_only = _idps(tmp_path, saml_certificate_file="saml.pem").get(ISSUER)
    assert saml_only is not None
    assert saml_only.keys == ()
    assert saml_only.saml_certificates == (pem(IDP_RSA_CERT), pem(IDP_EC_CERT))
    both = _idps(tmp_path, saml_certificate_file="saml.pem", public_key_file="jwt.pem")
    idp = both.get(ISSUER)
    assert idp is not None
    assert idp.keys == (IdpKey(JWT_KEY.public_key()),)
    assert len(idp.saml_certificates) == 2
    assert validate_saml(b64(signed()), both, now=NOW, leeway=0, required_audience=None)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({}, "saml_certificate_file"),
        ({"saml_certificate_file": "missing.pem"}, "missing.pem"),
        ({"saml_certificate_file": "key.pem"}, "private key"),
        ({"saml_certificate_file": "empty.pem"}, "no usable PEM certificate"),
        ({"jwks_file": "a.json", "public_key_file": "b.pem"}, "only one of"),
    ],
)
def test_unusable_saml_certificate_files_are_config_errors(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    (tmp_path / "key.pem").write_bytes(
        IDP_RSA.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + pem(IDP_RSA_CERT).encode()
    )
    (tmp_path / "empty.pem").write_text("nothing here\n")
    (tmp_path / "a.json").write_text('{"keys": []}')
    (tmp_path / "b.pem").write_text(pem(IDP_RSA_CERT))
    with pytest.raises(ConfigError, match=problem):
        _idps(tmp_path, **entry)


def test_load_saml_certificates_reads_every_certificate() -> None:
    both = (pem(IDP_RSA_CERT) + "\n" + pem(IDP_EC_CERT)).encode()
    assert load_saml_certificates("ias", both) == (pem(IDP_RSA_CERT), pem(IDP_EC_CERT))
