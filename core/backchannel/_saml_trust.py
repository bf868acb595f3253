"""Validating a cloud user's SAML 2.0 assertion against the identity providers the connector trusts.

The SAML counterpart of ``_jwt_trust.py``: the cloud application forwards its user's assertion
(``SAP-Connectivity-Authentication: SAML2.0 <base64 assertion>``), and the connector accepts it
only if a trusted identity provider (IdP) signed it, for an expected audience, within its
lifetime. The claims it returns feed the subject rules (``_subject_rules.py``).

What is accepted: the base64 of one ``saml2:Assertion`` element, signed itself (an enveloped
``ds:Signature`` child whose one reference names the assertion's ``ID``). A ``samlp:Response``
is refused (``MALFORMED_TOKEN``, or ``SAML_SIGNATURE_WRAPPING`` when it holds several
assertions): the header carries the assertion, and a bare assertion leaves one place for the
signature and one signed element, which is the whole defence against signature wrapping.
Encrypted assertions, encrypted or BaseID subjects are not supported.

The rules, in the order :func:`validate_saml` applies them:

- At most :data:`MAX_ASSERTION_TEXT` characters of base64, at most :data:`MAX_ASSERTION_BYTES`
  of UTF-8 XML. A DTD or entity declaration is refused before parsing (XXE, billion laughs);
  the parser loads no DTD, resolves no entity, touches no network, and the tree may be at most
  :data:`MAX_DEPTH` elements deep. Anything else that is not well-formed is ``MALFORMED_TOKEN``.
- The root is a ``saml2:Assertion`` with an ``ID``; it has exactly one ``ds:Signature`` child
  (none at all: ``UNSIGNED_TOKEN``; one elsewhere or several: ``SAML_SIGNATURE_WRAPPING``),
  with exactly one reference, to ``#<the root's ID>``, and no other element carries that ID
  (``SAML_SIGNATURE_WRAPPING``). Signature algorithms: RSA-SHA256/384/512, ECDSA-SHA256/384/512;
  digests SHA-256/384/512; anything else (SHA-1, HMAC, DSA, RSA-PSS) is
  ``UNSUPPORTED_ALGORITHM``.
- The root's ``Issuer`` picks the IdP (``UNTRUSTED_ISSUER``, ``IDP_NOT_TRUSTED`` as for JWTs);
  an IdP without SAML signing certificates is ``UNKNOWN_KEY``.
- signxml verifies the signature with the IdP's configured certificates only (``x509_cert``,
  one after the other; a certificate outside its validity dates at ``now`` is not used, and
  a ``KeyInfo`` in the signature is never trusted). Failure is ``SAML_BAD_SIGNATURE``.
- From here on **only what signxml returns as signed** (``signed_xml``: the canonical form of
  the referenced element, re-parsed, so comments that the signature did not cover are gone
  and ``alice<!---->@evil`` reads as the signed ``alice@evil``) is read, never the received
  tree. It must be the assertion with the root's ID (``SAML_SIGNATURE_WRAPPING``), and only its
  direct children are read, so an assertion nested in ``Advice`` never supplies a value.
- ``Conditions`` is required, with ``NotOnOrAfter``: past it by more than ``leeway`` is
  ``EXPIRED``, before ``NotBefore`` (or an ``IssueInstant`` in the future) by more than
  ``leeway`` is ``NOT_YET_VALID``, the same reasons as for a JWT's ``exp`` / ``nbf`` / ``iat``.
  A missing ``Conditions`` or ``NotOnOrAfter``, an unparsable time, or a condition other than
  ``AudienceRestriction`` (``OneTimeUse``, ``ProxyRestriction``...: the connector keeps no
  replay cache and issues no assertions) is ``SAML_CONDITIONS``.
- At least one ``AudienceRestriction``; each must name one of the IdP's audiences (and the
  caller's ``required_audience``, when given), else ``SAML_AUDIENCE``.
- The ``Subject`` needs a ``bearer`` ``SubjectConfirmation`` whose ``SubjectConfirmationData``
  has a ``NotOnOrAfter`` not passed (and no ``NotBefore`` still ahead), with ``leeway``, else
  ``SAML_SUBJECT_CONFIRMATION``. ``Recipient`` and ``InResponseTo`` are not checked: the
  assertion is forwarded to the connector, not posted to an assertion consumer service.

Claims returned: ``iss`` (Issuer), ``sub`` and ``user_name`` (the NameID, so ``${name}`` is the
NameID as in SAP Cloud Connector), ``name_id_format`` when given, ``aud`` (the audiences of the
first restriction), ``exp`` / ``nbf`` / ``iat`` (seconds since the epoch), and each attribute
under its ``Name``: one value as a string, several as a list. Well-known attribute names also
give the variables the subject rules know (``mail``, ``email``, ``display_name``,
``user_uuid``, ``login_name``), see :data:`ATTRIBUTE_ALIASES`; an attribute never replaces a
claim listed in :data:`RESERVED_CLAIMS`. Messages name issuers, audiences, times and
algorithms, never the assertion or its NameID and attribute values.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type information
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.exceptions import InvalidDigest
from signxml.exceptions import InvalidSignature as SignXMLInvalidSignature
from signxml.verifier import SignatureConfiguration, VerifyResult, XMLVerifier

from ._jwt_trust import TrustedIdp, TrustList, trusted_idp
from ._principal_errors import PrincipalReason, refuse, shown, when

SAML: Final = "urn:oasis:names:tc:SAML:2.0:assertion"
SAMLP: Final = "urn:oasis:names:tc:SAML:2.0:protocol"
DS: Final = "http://www.w3.org/2000/09/xmldsig#"
XSI: Final = "http://www.w3.org/2001/XMLSchema-instance"
BEARER: Final = "urn:oasis:names:tc:SAML:2.0:cm:bearer"

ALLOWED_SIGNATURE_METHODS: Final = frozenset(
    {
        SignatureMethod.RSA_SHA256,
        SignatureMethod.RSA_SHA384,
        SignatureMethod.RSA_SHA512,
        SignatureMethod.ECDSA_SHA256,
        SignatureMethod.ECDSA_SHA384,
        SignatureMethod.ECDSA_SHA512,
    }
)
ALLOWED_DIGEST_ALGORITHMS: Final = frozenset(
    {DigestAlgorithm.SHA256, DigestAlgorithm.SHA384, DigestAlgorithm.SHA512}
)

#: Longest assertion accepted, decoded, and as base64 text (with room for line breaks).
MAX_ASSERTION_BYTES: Final = 48 * 1024
MAX_ASSERTION_TEXT: Final = MAX_ASSERTION_BYTES * 4 // 3 + 2048
#: Deepest element nesting accepted; a signed assertion needs about 7.
MAX_DEPTH: Final = 24
#: Longest attribute name taken into the claims.
MAX_ATTRIBUTE_NAME: Final = 256

#: Claims set from the assertion's structure; an attribute of the same name is dropped (an
#: IdP attribute must not rename the principal or make the user look like an OAuth client).
RESERVED_CLAIMS: Final = frozenset(
    {
        "iss", "sub", "user_name", "name_id_format", "aud", "exp", "nbf", "iat",
        "grant_type", "client_id", "cid", "azp", "xs.user.attributes",
    }
)  # fmt: skip
#: Attribute names (``Name`` or ``FriendlyName``) that also give a subject-rule variable;
#: an attribute that has the variable's own name wins over an alias.
ATTRIBUTE_ALIASES: Final[Mapping[str, str]] = {
    "urn:oid:0.9.2342.19200300.100.1.3": "mail",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/emailaddress": "email",
    "emailAddress": "email",
    "emailaddress": "email",
    "urn:oid:2.16.840.1.113730.3.1.241": "display_name",
    "http://schemas.microsoft.com/identity/claims/displayname": "display_name",
    "displayName": "display_name",
    "userUuid": "user_uuid",
    "loginName": "login_name",
    "urn:oid:0.9.2342.19200300.100.1.1": "login_name",  # LDAP uid
}
_VARIABLES: Final = frozenset({"mail", "email", "display_name", "user_uuid", "login_name"})

_ASSERTION: Final = f"{{{SAML}}}Assertion"
_SIGNATURE: Final = f"{{{DS}}}Signature"
_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:Z|[+-]00:00)?"
)
_FORBIDDEN_MARKUP = (b"<!DOCTYPE", b"<!ENTITY", b"<!ELEMENT", b"<!ATTLIST")
_XML_DECLARATION = re.compile(rb"<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")


def _saml(local: str) -> str:
    return f"{{{SAML}}}{local}"


def _ds(local: str) -> str:
    return f"{{{DS}}}{local}"


# --- reading the document ---------------------------------------------------------------------


def _parser() -> Any:
    """A parser that reads no DTD, resolves no entity and never touches the network; one per
    document (lxml parsers are not safe to share between threads)."""
    return etree.XMLParser(
        encoding="utf-8",
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
        remove_comments=False,
        remove_pis=False,
    )


def _decode(assertion_b64: str) -> bytes:
    malformed = PrincipalReason.MALFORMED_TOKEN
    if len(assertion_b64) > MAX_ASSERTION_TEXT:
        refuse(
            malformed,
            f"the SAML assertion is {len(assertion_b64)} characters of base64; at most "
            f"{MAX_ASSERTION_TEXT} are accepted",
        )
    if not assertion_b64.isascii():
        refuse(malformed, "the SAML assertion's base64 contains non-ASCII characters")
    compact = "".join(assertion_b64.split())  # senders may wrap base64 into lines
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        refuse(malformed, "the SAML assertion is not valid base64 (the standard alphabet)")
    if len(data) > MAX_ASSERTION_BYTES:
        refuse(
            malformed,
            f"the SAML assertion is {len(data)} bytes of XML; at most {MAX_ASSERTION_BYTES} "
            "are accepted",
        )
    return data


def _parse(data: bytes) -> Any:
    malformed = PrincipalReason.MALFORMED_TOKEN
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        refuse(malformed, "the SAML assertion is not UTF-8 text")
    declared = _XML_DECLARATION.match(data)
    if declared and declared.group(1).lower() not in (b"utf-8", b"utf8"):
        refuse(malformed, "the SAML assertion must be encoded in UTF-8")
    if any(markup in data for markup in _FORBIDDEN_MARKUP):
        refuse(
            malformed,
            "the SAML assertion contains a document type or entity declaration, which is "
            "never accepted (XML external entities, entity expansion)",
        )
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        line, column = exc.position if exc.position else (0, 0)
        refuse(
            malformed,
            f"the SAML assertion is not well-formed XML (line {line}, column {column})",
        )
    docinfo = root.getroottree().docinfo
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        refuse(malformed, "the SAML assertion has a document type declaration")
    depth = 0
    for event, element in etree.iterwalk(root, events=("start", "end")):
        if isinstance(element, etree._Entity):
            refuse(malformed, "the SAML assertion contains an entity reference")
        depth += 1 if event == "start" else -1
        if depth > MAX_DEPTH:
            refuse(
                malformed,
                f"the SAML assertion nests elements more than {MAX_DEPTH} deep",
            )
    return root


def _children(element: Any, tag: str) -> list[Any]:
    return [child for child in element if child.tag == tag]


def _plain_text(element: Any) -> str | None:
    """The element's text with any comments or processing instructions left out, or None when
    it has child elements (a complex value)."""
    parts = [element.text or ""]
    for child in element:
        if isinstance(child.tag, str):
            return None
        parts.append(child.tail or "")
    return "".join(parts).strip()


def _time(value: str | None, what: str, reason: PrincipalReason, details: dict[str, str]) -> float:
    match = _TIME.fullmatch(value.strip()) if value is not None else None
    if match is None:
        refuse(reason, f"the SAML assertion's {what} is not a UTC xs:dateTime", **details)
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError:
        refuse(reason, f"the SAML assertion's {what} is not a valid date and time", **details)
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


# --- the signature ----------------------------------------------------------------------------


def _check_signature_shape(root: Any, root_id: str, details: dict[str, str]) -> None:
    """Refuse before verifying what could only be wrapping or a weak algorithm (this reads the
    unverified tree, to refuse only; nothing read here is ever accepted)."""
    wrapping = PrincipalReason.SAML_SIGNATURE_WRAPPING
    signatures = _children(root, _SIGNATURE)
    if not signatures:
        if root.find(f".//{_SIGNATURE}") is not None:
            refuse(
                wrapping,
                "the SAML assertion carries a signature, but not as its own child: only an "
                "assertion that is itself signed is accepted",
                **details,
            )
        refuse(
            PrincipalReason.UNSIGNED_TOKEN,
            "the SAML assertion is unsigned: only assertions signed by a trusted identity "
            "provider are accepted",
            **details,
        )
    if len(signatures) > 1:
        refuse(wrapping, f"the SAML assertion has {len(signatures)} signatures", **details)
    signed_info = signatures[0].find(_ds("SignedInfo"))
    if signed_info is None:
        refuse(
            PrincipalReason.SAML_BAD_SIGNATURE,
            "the SAML assertion's signature has no SignedInfo",
            **details,
        )
    method = signed_info.find(_ds("SignatureMethod"))
    algorithm = method.get("Algorithm", "") if method is not None else ""
    details["alg"] = algorithm.rpartition("#")[2][:32]
    if algorithm not in {m.value for m in ALLOWED_SIGNATURE_METHODS}:
        refuse(
            PrincipalReason.UNSUPPORTED_ALGORITHM,
            f"the SAML assertion is signed with {shown(algorithm, 80)}; accepted: "
            f"{', '.join(sorted(m.name for m in ALLOWED_SIGNATURE_METHODS))}",
            **details,
        )
    references = signed_info.findall(_ds("Reference"))
    if len(references) != 1 or references[0].get("URI") != f"#{root_id}":
        refuse(
            wrapping,
            "the SAML assertion's signature does not reference the assertion itself (exactly "
            "one reference to its ID is required)",
            **details,
        )
    digest = references[0].find(_ds("DigestMethod"))
    digest_algorithm = digest.get("Algorithm", "") if digest is not None else ""
    if digest_algorithm not in {d.value for d in ALLOWED_DIGEST_ALGORITHMS}:
        refuse(
            PrincipalReason.UNSUPPORTED_ALGORITHM,
            f"the SAML assertion's digest algorithm {shown(digest_algorithm, 80)} is not "
            f"accepted; accepted: {', '.join(sorted(d.name for d in ALLOWED_DIGEST_ALGORITHMS))}",
            **details,
        )
    same_id = root.xpath("//*[@*[local-name() = 'ID'] = $id]", id=root_id)
    if len(same_id) != 1:
        refuse(
            wrapping,
            f"{len(same_id)} elements carry the signed assertion's ID: only one may",
            **details,
        )


def _verify(data: bytes, root_id: str, idp: TrustedIdp, now: float, details: dict[str, str]) -> Any:
    """The signed assertion as signxml returns it, verified with one of the IdP's SAML
    signing certificates."""
    certificates = idp.saml_signing_certificates
    if not certificates:
        refuse(
            PrincipalReason.UNKNOWN_KEY,
            f"identity provider {idp.name!r} has no SAML signing certificate: give it a "
            "saml_certificate_file to accept its SAML assertions",
            **details,
        )
    moment = datetime.fromtimestamp(now, UTC)
    key_type = ec.EllipticCurvePublicKey if details["alg"].startswith("ecdsa") else rsa.RSAPublicKey
    suitable = [c for c in certificates if isinstance(c.public_key(), key_type)]
    if not suitable:
        refuse(
            PrincipalReason.SAML_BAD_SIGNATURE,
            f"the SAML assertion is signed with {details['alg']}, but identity provider "
            f"{idp.name!r} has no {'EC' if key_type is ec.EllipticCurvePublicKey else 'RSA'} "
            "signing certificate",
            **details,
        )
    usable = [c for c in suitable if c.not_valid_before_utc <= moment <= c.not_valid_after_utc]
    if not usable:
        refuse(
            PrincipalReason.SAML_BAD_SIGNATURE,
            f"no SAML signing certificate of identity provider {idp.name!r} is valid now "
            f"({_validity(suitable)}; now is {when(now)}): configure the IdP's current "
            "certificate",
            **details,
        )
    config = SignatureConfiguration(
        location="./",
        expect_references=1,
        signature_methods=ALLOWED_SIGNATURE_METHODS,
        digest_algorithms=ALLOWED_DIGEST_ALGORITHMS,
        verification_time=moment,
    )
    result: VerifyResult | list[VerifyResult] | None = None
    for certificate in usable:
        try:
            result = XMLVerifier().verify(
                data,
                x509_cert=certificate,
                parser=_parser(),
                id_attribute="ID",
                expect_config=config,
            )
        except InvalidDigest:
            refuse(
                PrincipalReason.SAML_BAD_SIGNATURE,
                f"the SAML assertion was altered after identity provider {idp.name!r} signed "
                "it (its digest does not match)",
                **details,
            )
        except SignXMLInvalidSignature:
            continue  # another of the IdP's certificates may verify it (a rollover)
        except Exception as exc:  # signxml walks hostile XML: any failure is a refusal
            refuse(
                PrincipalReason.SAML_BAD_SIGNATURE,
                f"the SAML assertion's signature is malformed or unusable ({type(exc).__name__})",
                **details,
            )
        break
    if not isinstance(result, VerifyResult):
        refuse(
            PrincipalReason.SAML_BAD_SIGNATURE,
            f"the SAML assertion's signature does not verify with the {len(usable)} SAML signing "
            f"certificate(s) of identity provider {idp.name!r}: the assertion was forged, or "
            "the IdP changed its certificate (update saml_certificate_file)",
            **details,
        )
    signed = result.signed_xml
    references = result.signature_xml.findall(f"{_ds('SignedInfo')}/{_ds('Reference')}")
    if (
        signed is None
        or signed.tag != _ASSERTION
        or signed.get("ID") != root_id
        or len(references) != 1
        or references[0].get("URI") != f"#{root_id}"
    ):
        refuse(
            PrincipalReason.SAML_SIGNATURE_WRAPPING,
            "what the SAML signature covers is not the assertion that was sent",
            **details,
        )
    return signed


def _validity(certificates: list[x509.Certificate]) -> str:
    return ", ".join(
        f"{when(c.not_valid_before_utc.timestamp())} to {when(c.not_valid_after_utc.timestamp())}"
        for c in certificates
    )


# --- what the signed assertion says -----------------------------------------------------------


def _check_conditions(
    signed: Any,
    idp: TrustedIdp,
    now: float,
    leeway: float,
    required_audience: str | None,
    details: dict[str, str],
) -> dict[str, Any]:
    conditions_reason = PrincipalReason.SAML_CONDITIONS
    clock = f"now is {when(now)}, leeway {leeway:g} s"
    issued = _time(
        signed.get("IssueInstant"), "IssueInstant", PrincipalReason.MALFORMED_TOKEN, details
    )
    if issued > now + leeway:
        refuse(
            PrincipalReason.NOT_YET_VALID,
            f"the SAML assertion was issued in the future, at {when(issued)} ({clock}): check "
            "the clocks of the connector and the identity provider",
            **details,
        )
    all_conditions = _children(signed, _saml("Conditions"))
    if len(all_conditions) != 1:
        refuse(
            conditions_reason,
            f"the SAML assertion has {len(all_conditions)} Conditions elements; exactly one, "
            "with NotOnOrAfter and an AudienceRestriction, is required",
            **details,
        )
    conditions = all_conditions[0]
    if conditions.get("NotOnOrAfter") is None:
        refuse(
            conditions_reason,
            "the SAML assertion's Conditions have no NotOnOrAfter; assertions without an "
            "expiry are refused",
            **details,
        )
    expires = _time(conditions.get("NotOnOrAfter"), "NotOnOrAfter", conditions_reason, details)
    not_before = conditions.get("NotBefore")
    starts = (
        None if not_before is None else _time(not_before, "NotBefore", conditions_reason, details)
    )
    if expires <= now - leeway:
        refuse(
            PrincipalReason.EXPIRED,
            f"the SAML assertion expired at {when(expires)} ({clock}): the application must "
            "send a fresh assertion, or the connector's clock is wrong",
            **details,
        )
    if starts is not None and starts > now + leeway:
        refuse(
            PrincipalReason.NOT_YET_VALID,
            f"the SAML assertion is not valid before {when(starts)} ({clock}): check the "
            "clocks of the connector and the identity provider",
            **details,
        )
    restrictions: list[list[str]] = []
    for condition in conditions:
        if not isinstance(condition.tag, str):
            continue  # a comment the signature covered
        if condition.tag != _saml("AudienceRestriction"):
            name = etree.QName(condition).localname
            refuse(
                conditions_reason,
                f"the SAML assertion has the condition {shown(name, 48)}, which the connector "
                "does not enforce (only AudienceRestriction is understood), so it is refused",
                **details,
            )
        audiences = [_plain_text(a) or "" for a in _children(condition, _saml("Audience"))]
        restrictions.append(audiences)
    _check_audience(restrictions, idp, required_audience, details)
    claims: dict[str, Any] = {"aud": restrictions[0], "exp": expires, "iat": issued}
    if starts is not None:
        claims["nbf"] = starts
    return claims


def _check_audience(
    restrictions: list[list[str]],
    idp: TrustedIdp,
    required_audience: str | None,
    details: dict[str, str],
) -> None:
    reason = PrincipalReason.SAML_AUDIENCE
    accepted = ", ".join(map(repr, idp.audiences))
    if not restrictions:
        refuse(
            reason,
            f"the SAML assertion has no AudienceRestriction; identity provider {idp.name!r} "
            f"accepts {accepted}",
            **details,
        )
    for audiences in restrictions:
        named = ", ".join(shown(a, 48) for a in audiences[:5]) + (
            ", …" if len(audiences) > 5 else ""
        )
        if not set(audiences) & set(idp.audiences):
            refuse(
                reason,
                f"the SAML assertion is for audience {named or '(none)'}, but identity provider "
                f"{idp.name!r} is trusted only for {accepted}: the IdP must issue it for one of "
                "those, or add its audience to the IdP",
                **details,
            )
        if required_audience is not None and required_audience not in audiences:
            refuse(
                reason,
                f"the SAML assertion is for audience {shown}, but {required_audience!r} is "
                "required here",
                **details,
            )


def _check_subject(
    signed: Any, now: float, leeway: float, details: dict[str, str]
) -> dict[str, Any]:
    reason = PrincipalReason.SAML_SUBJECT_CONFIRMATION
    clock = f"now is {when(now)}, leeway {leeway:g} s"
    subjects = _children(signed, _saml("Subject"))
    name_ids = _children(subjects[0], _saml("NameID")) if len(subjects) == 1 else []
    name_id = _plain_text(name_ids[0]) if len(name_ids) == 1 else None
    if not name_id:
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            "the SAML assertion needs exactly one Subject with one plain NameID (encrypted "
            "and BaseID subjects are not supported)",
            **details,
        )
    bearer = [
        c for c in _children(subjects[0], _saml("SubjectConfirmation")) if c.get("Method") == BEARER
    ]
    if not bearer:
        refuse(
            reason,
            "the SAML assertion has no bearer SubjectConfirmation (other methods cannot be "
            "checked by the connector)",
            **details,
        )
    problems = []
    for confirmation in bearer:
        data = _children(confirmation, _saml("SubjectConfirmationData"))
        if len(data) != 1 or data[0].get("NotOnOrAfter") is None:
            problems.append("no SubjectConfirmationData with NotOnOrAfter")
            continue
        what = "SubjectConfirmationData NotOnOrAfter"
        until = _time(data[0].get("NotOnOrAfter"), what, reason, details)
        since = data[0].get("NotBefore")
        starts = None if since is None else _time(since, "NotBefore", reason, details)
        if until <= now - leeway:
            problems.append(f"the confirmation ended at {when(until)}")
        elif starts is not None and starts > now + leeway:
            problems.append(f"the confirmation starts at {when(starts)}")
        else:
            break
    else:
        refuse(
            reason,
            f"no bearer SubjectConfirmation of the SAML assertion holds now ({clock}): "
            f"{'; '.join(problems)}",
            **details,
        )
    claims: dict[str, Any] = {"sub": name_id, "user_name": name_id}
    name_format = name_ids[0].get("Format")
    if name_format:
        claims["name_id_format"] = name_format
    return claims


def _attributes(signed: Any) -> dict[str, Any]:
    """The attribute statements' values by attribute name (and alias), reserved names left out."""
    values: dict[str, list[str]] = {}
    aliases: dict[str, list[str]] = {}
    for statement in _children(signed, _saml("AttributeStatement")):
        for attribute in _children(statement, _saml("Attribute")):
            name = attribute.get("Name") or ""
            if not name or len(name) > MAX_ATTRIBUTE_NAME:
                continue
            found = []
            for value in _children(attribute, _saml("AttributeValue")):
                if value.get(f"{{{XSI}}}nil") in ("true", "1"):
                    continue
                text = _plain_text(value)
                if text is not None:  # complex values are not claims
                    found.append(text)
            values.setdefault(name, []).extend(found)
            labels = (name, attribute.get("FriendlyName") or "")
            for alias in {ATTRIBUTE_ALIASES.get(x, x if x in _VARIABLES else "") for x in labels}:
                if alias and alias != name:
                    aliases.setdefault(alias, []).extend(found)
    claims: dict[str, Any] = {}
    for source in (values, aliases):
        for name, found in source.items():
            if name in RESERVED_CLAIMS or name in claims or not found:
                continue
            claims[name] = found[0] if len(found) == 1 else found
    return claims


# --- the whole check --------------------------------------------------------------------------


def validate_saml(
    assertion_b64: str,
    trust: TrustList,
    *,
    now: float,
    leeway: float = 60,
    required_audience: str | None = None,
) -> dict[str, Any]:
    """The claims of the base64 SAML 2.0 assertion if a trusted IdP signed it for us and it is
    valid at ``now``.

    ``now`` is seconds since the epoch (the caller's clock); ``leeway`` the clock skew tolerated
    on every time in the assertion. Raises :class:`PrincipalError` with the precise reason (see
    the module docstring for the order).
    """
    if not math.isfinite(now) or not math.isfinite(leeway) or leeway < 0:
        raise ValueError("now must be finite and leeway finite and not negative")
    if not isinstance(assertion_b64, str) or not assertion_b64.strip():
        refuse(
            PrincipalReason.MISSING_TOKEN,
            "no SAML assertion was presented: the application must forward its user's assertion",
        )
    data = _decode(assertion_b64.strip())
    root = _parse(data)
    details: dict[str, str] = {"token_format": "saml2"}
    if root.tag != _ASSERTION:
        nested = root.findall(f".//{_ASSERTION}")
        if len(nested) > 1:
            refuse(
                PrincipalReason.SAML_SIGNATURE_WRAPPING,
                f"the document holds {len(nested)} SAML assertions; one signed assertion is "
                "accepted, on its own",
                **details,
            )
        what = "a samlp:Response" if root.tag == f"{{{SAMLP}}}Response" else "not an assertion"
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            f"the document is {what}: send the signed saml2:Assertion element itself, base64 "
            "encoded (encrypted assertions are not supported)",
            **details,
        )
    root_id = root.get("ID")
    if not root_id or root.get("Version") != "2.0":
        refuse(
            PrincipalReason.MALFORMED_TOKEN,
            "the SAML assertion needs an ID and Version 2.0",
            **details,
        )
    _check_signature_shape(root, root_id, details)
    issuers = _children(root, _saml("Issuer"))
    issuer = _plain_text(issuers[0]) if len(issuers) == 1 else None
    if not issuer:
        refuse(
            PrincipalReason.UNTRUSTED_ISSUER,
            "the SAML assertion names no Issuer (exactly one is required), so no trusted "
            "identity provider can vouch for it",
            **details,
        )
    details["issuer"] = issuer[:256]
    idp = trusted_idp(trust, issuer, details)
    signed = _verify(data, root_id, idp, now, details)
    # Only the signed assertion from here on.
    signed_issuers = _children(signed, _saml("Issuer"))
    if len(signed_issuers) != 1 or _plain_text(signed_issuers[0]) != issuer:
        refuse(
            PrincipalReason.SAML_SIGNATURE_WRAPPING,
            "the signed SAML assertion names another issuer than the one it was checked for",
            **details,
        )
    if signed.get("Version") != "2.0":
        refuse(PrincipalReason.MALFORMED_TOKEN, "the SAML assertion is not Version 2.0", **details)
    claims = _attributes(signed)
    claims.update(_check_conditions(signed, idp, now, leeway, required_audience, details))
    claims.update(_check_subject(signed, now, leeway, details))
    claims["iss"] = issuer
    return claims
