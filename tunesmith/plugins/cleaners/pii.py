"""PII scrubbing: e-mail, phone, US SSN, credit cards (Luhn-checked), IPv4/IPv6, user patterns.

Matches are replaced with typed placeholders (``[EMAIL]``, ``[PHONE]``, ``[SSN]``,
``[CREDIT_CARD]``, ``[IP_ADDRESS]``, or ``[NAME]`` for a user pattern named NAME).
Rows are rewritten, never dropped; the report counts replacements per type.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunesmith import hookimpl
from tunesmith.core.data import map_texts
from tunesmith.core.data_clean import Verdict

# The boundaries below are "not inside a longer token" (a word character, or a digit
# and its separator), never "not next to punctuation": PII is scrubbed at a sentence
# end, in brackets and quotes, after an ellipsis (tests/data/test_cleaners.py places
# every kind in every such position).
EMAIL = re.compile(
    r"(?<![\w%+-])(?<!\w\.)[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*"  # no empty dot-separated part
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
# US SSN 3-2-4 with dashes or spaces; 000/666/9xx area numbers are never issued
SSN = re.compile(r"(?<!\w)(?<!\d-)(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?!\w|-\d)")
# 13-19 digits, optionally grouped by single spaces or dashes; Luhn decides
CARD = re.compile(r"(?<!\w)(?<!\d-)\d(?:[ -]?\d){12,18}(?!\w|-\d)")
# US/NANP numbers: optional +1, optional parentheses around the area code, 3-3-4
PHONE = re.compile(
    r"(?<![\w+])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"
)
# a trailing "." is sentence punctuation ("questions go to 10.1.2.3."); ".5" would be a fifth part
IPV4 = re.compile(r"(?<!\w)(?<!\d\.)(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")
# candidate IPv6 runs; ipaddress validates them
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


class Pattern(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Placeholder type: matches become [NAME].")
    pattern: str = Field(description="A Python regular expression.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return v


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: bool = Field(True, description="Replace e-mail addresses with [EMAIL].")
    phone: bool = Field(True, description="Replace US phone numbers (3-3-4 digits) with [PHONE].")
    ssn: bool = Field(True, description="Replace US social security numbers (3-2-4) with [SSN].")
    credit_card: bool = Field(True, description="Replace Luhn-valid card numbers with [CREDIT_CARD].")
    ip: bool = Field(True, description="Replace IPv4 and IPv6 addresses with [IP_ADDRESS].")
    patterns: list[Pattern] = Field(default_factory=list, description="Extra patterns: [{name, pattern}].")


class Scrubber:
    """Compiled replacements for one set of options."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.extra = [(p.name.upper(), re.compile(p.pattern)) for p in opts.patterns]

    def scrub(self, text: str, counts: dict[str, int]) -> str:
        o = self.opts
        # cheap guards skip the regexes on text that cannot match
        has_digit = any(c.isdigit() for c in text) if not text.isalpha() else False
        if o.email and "@" in text:
            text = self._sub(EMAIL, "EMAIL", text, counts)
        if has_digit:
            if o.credit_card:
                text = self._sub(CARD, "CREDIT_CARD", text, counts, check=lambda m: luhn_ok(re.sub(r"\D", "", m)))
            if o.ssn:
                text = self._sub(SSN, "SSN", text, counts)
            if o.phone:
                text = self._sub(PHONE, "PHONE", text, counts)
            if o.ip and "." in text:
                text = self._sub(IPV4, "IP_ADDRESS", text, counts)
        if o.ip and "::" in text or (o.ip and text.count(":") >= 2):
            text = self._sub(IPV6, "IP_ADDRESS", text, counts, check=_is_ipv6)
        for name, rx in self.extra:
            text = self._sub(rx, name, text, counts)
        return text

    @staticmethod
    def _sub(rx: re.Pattern, kind: str, text: str, counts: dict[str, int], check: Any = None) -> str:
        placeholder = f"[{kind}]"

        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return placeholder

        return rx.sub(repl, text)


def _is_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s.split("%")[0])
    except ValueError:
        return False
    return True


class PII:
    name = "pii"
    default_order = 50  # in the default chain (normalize, length, exact_dedupe, near_dedupe, pii, quality)
    description = "Scrub PII (e-mail, phone, SSN, Luhn-valid cards, IP addresses, own patterns) to typed placeholders."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Verdict]:
        scrubber = Scrubber(options or Options())
        for r in records:
            counts: dict[str, int] = {}
            new = map_texts(r, lambda t: scrubber.scrub(t, counts))
            yield Verdict.keep(new, modified=new is not r, tags=counts or None)


@hookimpl
def register_cleaners(register):
    register(PII())
