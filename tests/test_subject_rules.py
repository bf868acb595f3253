"""Subject pattern rules: SAP Cloud Connector's ``${name}`` semantics, ordered rules with
conditions, and RFC 4514 values that can never add or change an RDN."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from backchannel._principal_errors import PrincipalError, PrincipalReason
from backchannel._subject_rules import (
    BUSINESS,
    MAX_VALUE_LENGTH,
    TECHNICAL,
    Condition,
    Operator,
    SubjectRule,
    SubjectRules,
    resolve_variable,
    rfc4514_string,
    user_type,
)

XSUAA_USER = {
    "sub": "2a9e6b1c-user-id",
    "user_name": "jdoe",
    "user_id": "2a9e6b1c-user-id",
    "email": "john.doe@example.com",
    "given_name": "John",
    "family_name": "Doe",
    "origin": "corporate-idp",
    "client_id": "sb-app!t1",
    "cid": "sb-app!t1",
    "azp": "sb-app!t1",
    "grant_type": "authorization_code",
    "xs.user.attributes": {"department": ["Sales"], "costcenter": ["4711", "4712"]},
}
XSUAA_CLIENT = {
    "sub": "sb-batch!t1",
    "client_id": "sb-batch!t1",
    "cid": "sb-batch!t1",
    "azp": "sb-batch!t1",
    "grant_type": "client_credentials",
}
IAS_USER = {
    "sub": "P000123",
    "user_uuid": "5f3c0a9e-uuid",
    "email": "erika@example.com",
    "login_name": "emustermann",
    "display_name": "Erika Mustermann",
    "azp": "ias-client-id",
}
IAS_CLIENT = {"sub": "ias-client-id", "azp": "ias-client-id"}

MAIL_RULE = SubjectRule("CN=${mail},O=Example,C=DE")
NAME_RULE = SubjectRule("CN=${name},O=Example,C=DE")


def subject(rules: list[SubjectRule], claims: dict[str, Any]) -> str:
    return SubjectRules(tuple(rules)).subject_for(claims).rfc4514


def no_subject(rules: list[SubjectRule], claims: dict[str, Any]) -> PrincipalError:
    with pytest.raises(PrincipalError) as caught:
        SubjectRules(tuple(rules)).subject_for(claims)
    assert caught.value.reason is PrincipalReason.NO_SUBJECT
    return caught.value


# --- what the variables stand for --------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        (
            {"user_name": "u", "email": "e", "mail": "m", "user_uuid": "id", "sub": "s"},
            "u",
        ),
        ({"email": "e", "mail": "m", "user_uuid": "id", "sub": "s"}, "e"),
        ({"mail": "m", "user_uuid": "id", "sub": "s"}, "m"),
        ({"user_uuid": "id", "sub": "s"}, "id"),
        ({"sub": "s"}, "s"),
        ({"sub": "s", "azp": "client"}, "s"),
        (XSUAA_USER, "jdoe"),
        (IAS_USER, "erika@example.com"),
    ],
)
def test_name_of_a_business_user_follows_scc_order(claims: dict[str, Any], expected: str) -> None:
    # SCC: "Business: user_name, email, mail, user_uuid, sub"; the first available wins.
    assert user_type(claims) == BUSINESS
    assert resolve_variable(claims, "name") == expected


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        (XSUAA_CLIENT, "sb-batch!t1"),
        ({"grant_type": "client_credentials", "cid": "c", "sub": "s", "azp": "a"}, "c"),
        ({"grant_type": "client_credentials", "sub": "s", "azp": "a"}, "s"),
        ({"grant_type": "client_credentials", "azp": "a"}, "a"),
        (IAS_CLIENT, "ias-client-id"),
    ],
)
def test_name_of_a_technical_user_follows_scc_order(claims: dict[str, Any], expected: str) -> None:
    # SCC: "Technical: client_id, cid, sub, azp".
    assert user_type(claims) == TECHNICAL
    assert resolve_variable(claims, "name") == expected
    assert resolve_variable(claims, "user_type") == TECHNICAL


def test_a_user_token_of_an_app_is_business_even_if_sub_names_a_client() -> None:
    # A user claim wins over "sub equals the client": such a token has a person behind it.
    claims = {"sub": "c", "client_id": "c", "user_name": "jdoe"}
    assert user_type(claims) == BUSINESS
    assert resolve_variable(claims, "name") == "jdoe"
    assert user_type({}) == BUSINESS


def test_virtual_variables() -> None:
    assert resolve_variable(XSUAA_USER, "mail") == "john.doe@example.com"  # falls back to email
    assert resolve_variable({"mail": "m", "email": "e"}, "mail") == "m"
    assert resolve_variable({"mail": "m", "email": "e"}, "email") == "e"
    assert resolve_variable({"mail": "m"}, "email") == "m"
    assert resolve_variable(XSUAA_USER, "login_name") == "jdoe"  # XSUAA's user_name
    assert resolve_variable(IAS_USER, "login_name") == "emustermann"
    assert resolve_variable(IAS_USER, "user_uuid") == "5f3c0a9e-uuid"
    assert resolve_variable(IAS_USER, "display_name") == "Erika Mustermann"
    assert resolve_variable(XSUAA_USER, "display_name") is None
    assert resolve_variable(XSUAA_USER, "user_uuid") is None
    assert resolve_variable(XSUAA_USER, "user_type") == BUSINESS


def test_custom_claims_and_xs_user_attributes() -> None:
    assert resolve_variable(XSUAA_USER, "given_name") == "John"
    assert resolve_variable(XSUAA_USER, "department") == "Sales"  # a one-value list
    assert resolve_variable(XSUAA_USER, "costcenter") is None  # two values: ambiguous
    assert resolve_variable(XSUAA_USER, "nonexistent") is None
    # An xs.user.attributes entry wins over the root claim; cp. reaches the root claim.
    claims = {"userId": "root-value", "xs.user.attributes": {"userId": ["idp-value"]}}
    assert resolve_variable(claims, "userId") == "idp-value"
    assert resolve_variable(claims, "cp.userId") == "root-value"


def test_xs_user_attributes_cannot_replace_the_virtual_variables() -> None:
    claims = {
        "user_name": "jdoe",
        "email": "jdoe@example.com",
        "xs.user.attributes": {"name": ["admin"], "mail": ["admin@example.com"]},
    }
    assert resolve_variable(claims, "name") == "jdoe"
    assert resolve_variable(claims, "mail") == "jdoe@example.com"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("jdoe", "jdoe"),
        (12345, "12345"),
        (["only"], "only"),
        ([7], "7"),
        ("Jürgen Groß", "Jürgen Groß"),
        ("क्षि", "क्षि"),  # Devanagari with a virama, no format characters
        ("ശ്\u200dര", "ശ്\u200dര"),  # Malayalam spelt with a zero-width joiner
        ("x" * MAX_VALUE_LENGTH, "x" * MAX_VALUE_LENGTH),
        ("", None),
        ([], None),
        (["a", "b"], None),
        ([["nested"]], None),
        (True, None),
        (1.5, None),
        ({"a": "b"}, None),
        ("x" * (MAX_VALUE_LENGTH + 1), None),
        ("line\nbreak", None),
        ("nul\x00", None),
        ("\u202eeman-lanigiro", None),  # right-to-left override
        ("in\u2063visible", None),  # invisible separator
    ],
)
def test_only_clean_text_values_resolve(value: object, expected: str | None) -> None:
    assert resolve_variable({"user_name": value}, "login_name") == expected


def test_the_first_present_claim_decides_even_when_unusable() -> None:
    # user_name is present but unusable: ${name} does not quietly become the email address.
    claims = {"user_name": "bad\nname", "email": "someone@example.com", "sub": "s"}
    assert resolve_variable(claims, "name") is None
    error = no_subject([NAME_RULE], claims)
    assert "control or formatting" in str(error)


# --- rules and conditions ----------------------------------------------------------------------


def test_rules_apply_in_order_and_the_first_that_applies_wins() -> None:
    rules = SubjectRules(
        (
            SubjectRule(
                "CN=${name},OU=Technical,O=Example",
                Condition("user_type", Operator.EQUALS, TECHNICAL),
            ),
            SubjectRule("CN=${user_uuid},O=Example", Condition("user_uuid", Operator.EXISTS)),
            SubjectRule("CN=${login_name},O=Example"),
            SubjectRule("CN=${sub},O=Fallback"),
        )
    )
    client = rules.subject_for(XSUAA_CLIENT)
    assert (client.rfc4514, client.rule_index) == ("CN=sb-batch!t1,OU=Technical,O=Example", 0)
    ias = rules.subject_for(IAS_USER)
    assert (ias.rfc4514, ias.rule_index) == ("CN=5f3c0a9e-uuid,O=Example", 1)
    xsuaa = rules.subject_for(XSUAA_USER)
    assert (xsuaa.rfc4514, xsuaa.rule_index) == ("CN=jdoe,O=Example", 2)
    assert xsuaa.rule is rules.rules[2]
    bare = rules.subject_for({"sub": "only-sub"})
    assert (bare.rfc4514, bare.rule_index) == ("CN=only-sub,O=Fallback", 3)


def test_a_rule_with_a_missing_claim_is_skipped() -> None:
    rules = [MAIL_RULE, NAME_RULE]
    assert (
        subject(rules, {"mail": "m@example.com", "sub": "s"}) == "CN=m@example.com,O=Example,C=DE"
    )
    assert subject(rules, {"sub": "s"}) == "CN=s,O=Example,C=DE"


def test_the_subject_is_an_x509_name_with_the_leaf_last() -> None:
    result = SubjectRules((SubjectRule("CN=${name}+UID=${sub},OU=Sales,O=Example,C=DE"),))
    found = result.subject_for({"user_name": "jdoe", "sub": "s-1"})
    assert isinstance(found.name, x509.Name)
    assert [rdn.rfc4514_string() for rdn in found.name.rdns] == [
        "C=DE",
        "O=Example",
        "OU=Sales",
        "CN=jdoe+UID=s-1",
    ]
    assert found.rfc4514 == found.name.rfc4514_string() == "CN=jdoe+UID=s-1,OU=Sales,O=Example,C=DE"
    assert x509.Name.from_rfc4514_string(found.rfc4514) == found.name


@pytest.mark.parametrize(
    ("condition", "claims", "holds"),
    [
        (Condition("mail", Operator.EXISTS), {"email": "e"}, True),
        (Condition("mail", Operator.EXISTS), {"sub": "s"}, False),
        (Condition("mail", Operator.EXISTS), {"mail": ""}, False),
        (Condition("mail", Operator.NOT_EXISTS), {"sub": "s"}, True),
        (Condition("mail", Operator.NOT_EXISTS), {"mail": "m"}, False),
        # Present but unusable is neither "exists" nor "does not exist": fail closed.
        (Condition("mail", Operator.NOT_EXISTS), {"mail": ""}, False),
        (Condition("origin", Operator.EQUALS, "corporate-idp"), XSUAA_USER, True),
        (Condition("origin", Operator.EQUALS, "Corporate-IdP"), XSUAA_USER, False),
        (Condition("origin", Operator.EQUALS, "corporate-idp"), {}, False),
        (Condition("origin", Operator.NOT_EQUALS, "sap.default"), XSUAA_USER, True),
        (Condition("origin", Operator.NOT_EQUALS, "corporate-idp"), XSUAA_USER, False),
        # SCC's "is not": the attribute must be present.
        (Condition("origin", Operator.NOT_EQUALS, "sap.default"), {}, False),
        (Condition("mail", Operator.MATCHES, r".*@example\.com"), XSUAA_USER, True),
        (Condition("mail", Operator.MATCHES, r"example\.com"), XSUAA_USER, False),  # full match
        (Condition("mail", Operator.MATCHES, r"(?i).*@EXAMPLE\.COM"), XSUAA_USER, True),
        (Condition("mail", Operator.MATCHES, ".*"), {}, False),
        (Condition("user_type", Operator.EQUALS, TECHNICAL), XSUAA_CLIENT, True),
        (Condition("user_type", Operator.EQUALS, TECHNICAL), XSUAA_USER, False),
        (Condition("user_type", Operator.NOT_EQUALS, TECHNICAL), XSUAA_USER, True),
        (Condition("name", Operator.EQUALS, "jdoe"), XSUAA_USER, True),
        (Condition("department", Operator.EQUALS, "Sales"), XSUAA_USER, True),
    ],
)
def test_conditions(condition: Condition, claims: dict[str, Any], holds: bool) -> None:
    assert condition.holds(claims) is holds
    rules = [SubjectRule("CN=matched", condition), SubjectRule("CN=fallback")]
    assert subject(rules, claims) == ("CN=matched" if holds else "CN=fallback")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: Condition("mail", Operator.EQUALS), "needs a value"),
        (lambda: Condition("mail", Operator.MATCHES), "needs a value"),
        (lambda: Condition("mail", Operator.EXISTS, "x"), "takes no value"),
        (lambda: Condition("mail", Operator.MATCHES, "(unclosed"), "not a regular expression"),
        (lambda: Condition("user_type", Operator.EQUALS, "technical"), "'Business' or"),
        (lambda: Condition("${mail}", Operator.EXISTS), "claim name"),
        (lambda: Condition("", Operator.EXISTS), "claim name"),
        (lambda: Condition("mail", "is"), "is"),  # type: ignore[arg-type]
    ],
)
def test_bad_conditions_are_refused(make: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        make()


def test_operators_may_be_given_by_name() -> None:
    condition = Condition("mail", "exists")  # type: ignore[arg-type]
    assert condition.operator is Operator.EXISTS
    assert condition.describe() == "mail exists"
    assert Condition("a", Operator.EQUALS, "b").describe() == "a equals 'b'"


def test_no_subject_names_each_rule_tried_and_why() -> None:
    rules = [
        SubjectRule(
            "CN=${login_name},O=Tech",
            Condition("user_type", Operator.EQUALS, TECHNICAL),
            description="technical users",
        ),
        SubjectRule("CN=${mail},O=Example"),
        SubjectRule("CN=${user_uuid}", Condition("origin", Operator.EQUALS, "ias")),
    ]
    claims = {"sub": "secret-subject-value", "user_name": "secret-user-name", "origin": "x"}
    error = no_subject(rules, claims)
    message = str(error)
    assert (
        "rule 1 'technical users' (if user_type equals 'Technical'): condition not met" in message
    )
    assert (
        "rule 2 'CN=${mail},O=Example': ${mail} is not in the token (looked for mail, email)"
        in message
    )
    assert "rule 3 'CN=${user_uuid}' (if origin equals 'ias'): condition not met" in message
    assert error.details == {"rules_tried": "3"}
    # The claim values are the user's data: they stay out of the message.
    assert "secret" not in message


def test_rules_are_required() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SubjectRules(())


# --- RFC 4514: patterns and injection ----------------------------------------------------------


INJECTIONS = [
    "x,O=Admin",
    "x, O=Admin",
    "x+UID=root",
    "x\\,O=Admin",
    "x\\",
    "\\2C O=Admin",
    "#04024869",
    " leading and trailing ",
    'quote"d',
    "semi;colon",
    "<angle>",
    "=x",
    "CN=root,O=Example,C=DE",
    "${mail}",
    "x\u00a0,\u00a0O=Admin",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_claim_values_cannot_inject_rdns(value: str) -> None:
    rules = SubjectRules((SubjectRule("CN=${name},O=Example,C=DE"),))
    found = rules.subject_for({"user_name": value, "mail": "must-not-appear"})
    assert [rdn.rfc4514_string() for rdn in found.name.rdns[:2]] == ["C=DE", "O=Example"]
    assert len(found.name.rdns) == 3
    (common_name,) = found.name.rdns[2]
    assert (common_name.oid, common_name.value) == (NameOID.COMMON_NAME, value)
    assert x509.Name.from_rfc4514_string(found.rfc4514) == found.name
    assert found.rfc4514.endswith(",O=Example,C=DE")
    assert "must-not-appear" not in found.rfc4514


def test_the_escaping_is_rfc_4514() -> None:
    found = SubjectRules((SubjectRule("CN=${name},O=Example"),)).subject_for(
        {"user_name": "x,O=Admin+UID=0"}
    )
    assert found.rfc4514 == "CN=x\\,O=Admin\\+UID=0,O=Example"


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        st.characters(exclude_categories=("Cc", "Cs", "Cf")),
        min_size=1,
        max_size=64,
    ).filter(lambda value: len(value.encode()) <= 64)
)
def test_any_clean_value_stays_one_attribute_value(value: str) -> None:
    rules = SubjectRules((SubjectRule("CN=${name}+UID=${sub},OU=Users,O=Example"),))
    found = rules.subject_for({"user_name": value, "sub": value})
    leaf = found.name.rdns[-1]
    assert {(a.oid, a.value) for a in leaf} == {
        (NameOID.COMMON_NAME, value),
        (NameOID.USER_ID, value),
    }
    assert [rdn.rfc4514_string() for rdn in found.name.rdns[:-1]] == ["O=Example", "OU=Users"]
    assert x509.Name.from_rfc4514_string(found.rfc4514) == found.name


@pytest.mark.parametrize(
    "value",
    ["Jürgen Groß", "山田太郎", "Ελένη Παπαδοπούλου", "Zoë 🙂", "O'Brien-Smith", "ß" * 32],
)
def test_unicode_subjects_encode_in_a_certificate(value: str) -> None:
    found = SubjectRules((SubjectRule("CN=${name},O=Bäckerei Müller,C=DE"),)).subject_for(
        {"user_name": value}
    )
    assert found.rfc4514 == f"CN={value},O=Bäckerei Müller,C=DE"
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(found.name)
        .issuer_name(found.name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2027, 1, 1))
        .not_valid_after(datetime.datetime(2027, 1, 2))
        .sign(key, hashes.SHA256())
    )
    assert certificate.subject == found.name
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == value


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({"user_name": "x" * 65}, "CN would be 65 bytes of UTF-8; at most 64 fit"),
        ({"user_name": "ß" * 33}, "CN would be 66 bytes of UTF-8"),
        ({"user_name": "jdoe", "email": "jürgen@example.com"}, "EMAIL must be ASCII"),
        ({"user_name": "jdoe", "country": "DEU"}, "C: Attribute's length"),
        ({"user_name": "jdoe", "country": "Ü1"}, "C allows only"),
    ],
)
def test_values_that_do_not_fit_the_attribute_skip_the_rule(
    claims: dict[str, Any], problem: str
) -> None:
    rules = [
        SubjectRule("CN=${name},EMAIL=${email},C=${country}"),
        SubjectRule("CN=${sub}"),
    ]
    claims = {"sub": "fallback", "email": "jdoe@example.com", "country": "DE", **claims}
    found = SubjectRules(tuple(rules)).subject_for(claims)
    assert (found.rule_index, found.rfc4514) == (1, "CN=fallback")
    error = no_subject(rules[:1], claims)
    assert problem in str(error)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("CN=jdoe,O=Example,C=DE", "CN=jdoe,O=Example,C=DE"),
        (" cn = jdoe ,  o = Example ", "CN=jdoe,O=Example"),
        ("CN=a\\,b+UID=x,O=Ex,C=DE", "CN=a\\,b+UID=x,O=Ex,C=DE"),
        ("CN=\\#hash\\ ,O=x", "CN=\\#hash\\ ,O=x"),
        ("CN=\\C3\\BCber,O=x", "CN=über,O=x"),
        ("CN=a=b", "CN=a=b"),
        ("CN=cost \\$5", "CN=cost $5"),
        ("CN=\\${name}", "CN=${name}"),
        ("E=a@example.com,CN=x", "EMAIL=a@example.com,CN=x"),
        ("emailAddress=a@example.com", "EMAIL=a@example.com"),
        ("SN=Doe+GN=John,SERIALNUMBER=42,TITLE=Dr", "SN=Doe+GN=John,SERIALNUMBER=42,TITLE=Dr"),
        ("2.5.4.3=by-oid,DC=example,DC=com", "CN=by-oid,DC=example,DC=com"),
        ("STREET=Main St 1,L=Walldorf,ST=BW", "STREET=Main St 1,L=Walldorf,ST=BW"),
    ],
)
def test_patterns_parse_as_rfc_4514(pattern: str, expected: str) -> None:
    assert subject([SubjectRule(pattern)], {}) == expected


def test_constant_patterns_agree_with_cryptographys_parser() -> None:
    for text in ("CN=a\\,b+UID=x,O=Ex,C=DE", "CN=\\#x\\ ,O=Ex", "2.5.4.3=x,DC=example"):
        assert SubjectRule(text).apply({}) == x509.Name.from_rfc4514_string(text)


def test_placeholders_are_listed_in_order() -> None:
    rule = SubjectRule("CN=${name} (${mail})+UID=${sub},O=${name}")
    assert rule.placeholders == ("name", "mail", "sub")
    found = SubjectRules((rule,)).subject_for({"user_name": "jdoe", "email": "j@x", "sub": "1"})
    assert found.rfc4514 == "CN=jdoe (j@x)+UID=1,O=jdoe"


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("jdoe", "expected TYPE=value"),
        ("CN=", "has no value"),
        ("CN= ,O=x", "has no value"),
        ("CN=x,", "expected TYPE=value"),
        ("XX=a", "unknown attribute type 'XX'"),
        ("CN=a,,O=b", "unknown attribute type"),
        ("CN=a;O=b", "';' at position 4 must be escaped"),
        ('CN="quoted"', "must be escaped"),
        ("CN=<x>", "must be escaped"),
        ("CN=#0403616263", "escape it as \\\\#"),
        ("CN=\\q", "bad escape"),
        ("CN=\\C3", "UTF-8"),
        ("CN=${", "must look like"),
        ("CN=${}", "must look like"),
        ("CN=${two words}", "must look like"),
        ("CN=${name", "must look like"),
        ("CN=a\nb", "must be escaped"),
        ("CN=a+CN=b", "repeats a type"),
        ("C=DEU", "C: Attribute's length"),
        ("C=Ü1", "C allows only"),
        ("CN=" + "x" * 65, "CN would be 65 bytes"),
        ("EMAIL=jürgen@example.com", "EMAIL must be ASCII"),
    ],
)
def test_bad_patterns_are_refused_when_configured(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        SubjectRule(pattern)


def test_rfc4514_string_uses_the_pattern_names() -> None:
    name = SubjectRule("EMAIL=a@b,SN=Doe,GN=John,CN=x").apply({})
    assert rfc4514_string(name) == "EMAIL=a@b,SN=Doe,GN=John,CN=x"
    assert SubjectRule(rfc4514_string(name)).apply({}) == name
