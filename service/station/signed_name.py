"""A name a person signs with, printed as typed where others read it: a verified report's
`verified_by` (cmd/verify_run), and who accepted the typed cells the WBC head contradicts in a
station means file (`adapt-wbc --by`). A right-to-left override makes 'AB<U+202E>CD' read as
'ABDC', so such a name must hold no character a reader cannot see for what it is."""

from __future__ import annotations

import unicodedata

#: Longest name a person may sign with.
MAX_SIGNED_NAME = 64

#: Unicode categories of characters that show nothing, or not what they are, in a printed name:
#: control (C0, DEL, C1), format (bidi embeddings, overrides and isolates, U+200E/F, U+061C, the
#: zero-width ones, U+FEFF), surrogate, private use, unassigned, and the line and paragraph separators.
_UNSEEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_JOINERS = "\u200c\u200d"  # zero-width non-joiner, joiner


def unseen_character(text: str, *, spaces: bool = True) -> str | None:
    """The first character of `text` that a reader of the printed text cannot see for what it is
    (a right-to-left override makes 'AB<U+202E>CD' read as 'ABDC'), named with its position
    counted from 1: 'U+202E (RIGHT-TO-LEFT OVERRIDE) at character 3'; None where there is none.
    `spaces=False` refuses every space but U+0020 as well (str.isprintable: an identifier). In a
    name (`spaces=True`) the zero-width non-joiner and joiner (U+200C, U+200D) pass between two
    letters or marks: Persian and Indic names are spelled with them (they choose a letter's form)."""
    for k, ch in enumerate(text, 1):
        if spaces and ch in _JOINERS and 1 < k < len(text) and all(
                unicodedata.category(c)[0] in "LM" for c in (text[k - 2], text[k])):
            continue
        if unicodedata.category(ch) in _UNSEEN or (not spaces and not ch.isprintable()):
            name = unicodedata.name(ch, "")
            return f"U+{ord(ch):04X}{f' ({name})' if name else ''} at character {k}"
    return None


def signed_name_error(value: object, what: str) -> str | None:
    """Why `value` cannot be signed as a person's name, worded for `what` (the argument or option
    that gave it); None where it can: text of 1 to MAX_SIGNED_NAME characters once the spaces at
    either end are dropped (the name is kept without them), none that unseen_character finds."""
    if not isinstance(value, str) or not 0 < len(value.strip()) <= MAX_SIGNED_NAME:
        return f"{what} must be a name or initials: 1 to {MAX_SIGNED_NAME} characters, all printable"
    if (found := unseen_character(value)) is not None:
        return (f"{what} holds {found}: a signed name is printed as it is typed and takes no control, bidi or "
                "other invisible character")
    return None
