"""Optional cleaning steps of `megalm prepare`, each counted: NFC, short documents, exact duplicates, personal data.

Order per document: Unicode NFC normalisation (--nfc) -> redaction of personal data (--redact-pii) -> drop if
fewer than --min-chars non-whitespace-stripped characters remain -> drop if an identical document was kept
before (--dedup; 128-bit BLAKE2b of the cleaned text, the first occurrence wins, in input order).

Redaction replaces, in this order:
  <EMAIL>  local@domain.tld (a dot in the domain and a 2+ letter TLD; "user@localhost" and "@handle" stay);
  <IP>     dotted-quad IPv4 addresses (octets 0-255, no leading zeros). Kept: version numbers, i.e. a quad
           after "v", "version", "ver", "release" or "rev" ("v1.2.3.4", "version 1.2.3.4"), a quad followed by
           "-letters" or letters ("1.2.3.4-beta", "1.2.3.4rc1"), and longer dotted runs ("1.2.3.4.5");
           a bare "1.2.3.4" is a valid address and is redacted. IPv6 is not handled;
  <PHONE>  "+" and a country code followed by 2-5 digit groups (8-15 digits in all: "+44 20 7946 0958",
           "+1 (202) 555-0143"), and North American 3-3-4 numbers ("(202) 555-0143", "202-555-0143",
           "202.555.0143", "202 555-0143"). Kept: "100 200 3000" (spaces only), dates (2024-01-15), years and
           ranges (1999-2004), times, 7-digit local numbers (555-0143), plain digit runs (2025550143: too
           often an id or a count).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

COUNT_NAMES = {
    "nfc_changed": "documents changed by NFC normalisation",
    "emails": "e-mail addresses redacted",
    "ips": "IP addresses redacted",
    "phones": "phone numbers redacted",
    "too_short": "documents dropped as too short",
    "duplicates": "duplicate documents dropped",
}

EMAIL_RE = re.compile(
    r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IP_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d|-[A-Za-z])")
VERSION_CUE_RE = re.compile(r"(?:\bv|\bversion|\bver\.?|\brelease|\brev\.?)\s*$", re.IGNORECASE)
PHONE_INTL_RE = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\w]|[.-]\d)")
PHONE_NANP_RE = re.compile(r"(?<![\w.+-])(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-.]\d{4}(?![\w-]|\.\d)")


@dataclass(frozen=True)
class CleanOptions:
    """Which cleaning steps run (all off by default: prepare then writes the text as it is)."""

    nfc: bool = False
    min_chars: int = 0
    dedup: bool = False
    redact_pii: bool = False

    @property
    def any(self) -> bool:
        """Whether any step is on."""
        return self.nfc or self.min_chars > 0 or self.dedup or self.redact_pii


def _redact_ip(match: re.Match, counts: Counter) -> str:
    before = match.string[max(0, match.start() - 12) : match.start()]
    if VERSION_CUE_RE.search(before):
        return match.group(0)
    counts["ips"] += 1
    return "<IP>"


def _redact_phone(match: re.Match, counts: Counter) -> str:
    digits = sum(c.isdigit() for c in match.group(0))
    if match.group(0).startswith("+") and not 8 <= digits <= 15:
        return match.group(0)
    counts["phones"] += 1
    return "<PHONE>"


def redact_pii(text: str, counts: Counter) -> str:
    """Text with e-mail addresses, IPv4 addresses and phone numbers replaced by <EMAIL>, <IP>, <PHONE>."""
    if "@" in text:
        text, n = EMAIL_RE.subn("<EMAIL>", text)
        counts["emails"] += n
    text = IP_RE.sub(lambda m: _redact_ip(m, counts), text)
    text = PHONE_INTL_RE.sub(lambda m: _redact_phone(m, counts), text)
    return PHONE_NANP_RE.sub(lambda m: _redact_phone(m, counts), text)


def clean_text(text: str, opts: CleanOptions, counts: Counter) -> str | None:
    """The cleaned document, or None when it is dropped as too short (counted in `counts`)."""
    if opts.nfc:
        normal = unicodedata.normalize("NFC", text)
        if normal != text:
            counts["nfc_changed"] += 1
            text = normal
    if opts.redact_pii:
        text = redact_pii(text, counts)
    if opts.min_chars > 0 and len(text.strip()) < opts.min_chars:
        counts["too_short"] += 1
        return None
    return text


def doc_hash(text: str) -> bytes:
    """128-bit BLAKE2b digest of a document's UTF-8 text (exact-duplicate key)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def summary(counts: dict[str, int], opts: CleanOptions) -> str:
    """One line of the counts of the steps that ran."""
    on = {"nfc_changed": opts.nfc, "emails": opts.redact_pii, "ips": opts.redact_pii, "phones": opts.redact_pii,
          "too_short": opts.min_chars > 0, "duplicates": opts.dedup}  # fmt: skip
    return ", ".join(f"{counts.get(k, 0):,} {COUNT_NAMES[k]}" for k in COUNT_NAMES if on[k])
