"""What a safetensors header will cost to parse, bounded before it is parsed.

A JSON header is bounded in bytes, but the work and memory of parsing it are not proportional
to its bytes: 16 MiB of tiny keys (``"a":0,``) become millions of Python objects (~22 bytes of
broker memory per header byte), and an integer literal costs time quadratic in its digits
(Python reads up to 4300 of them). So, before ``json`` sees the header, a few linear scans in C
(``bytes.count`` and one regular expression, nothing allocated) bound the work: the number of
``,`` and ``:`` (one per list element or object member beyond the first, and one per member:
an upper bound on the values the parser builds, since a string may hold some too) against
``max_safetensors_header_values``, and no number literal longer than u64's 20 digits. Nesting
needs no scan: the strict parser refuses what exhausts its recursion limit after ~1000 levels,
which costs microseconds.
"""

from __future__ import annotations

import re

from airlock_broker.errors import Reason, error
from airlock_broker.validation.limits import OutputLimits

#: A number of more than 20 digits where JSON puts a value (after ``:``, ``[`` or ``,``).
#: u64 has 20 digits: a longer literal is no dim or offset. Inside a string the same bytes
#: would be refused too, a price a header pays for holding such text.
_LONG_NUMBER = re.compile(rb"[:\[,][ \t\r\n]*-?[0-9]{21}")


def check_header_work(raw: bytes, limits: OutputLimits) -> None:
    """Refuse ``raw`` (a header's bytes) if parsing it could cost more than the caps allow."""
    values = raw.count(b",") + raw.count(b":") + 1
    if values > limits.max_safetensors_header_values:
        raise error(Reason.OUTPUT_TOO_LARGE,
                    f"header holds up to {values} JSON values (commas and colons), over the "
                    f"{limits.max_safetensors_header_values} cap "
                    "(max_safetensors_header_values in [output])")
    if _LONG_NUMBER.search(raw):
        raise error(Reason.OUTPUT_INVALID,
                    "header holds a number longer than 20 digits (no dim or offset is)")
