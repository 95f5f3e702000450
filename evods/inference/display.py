"""Model output shown to a person: control characters escaped, so that a reply can neither wipe what is on the screen
(backspace, carriage return, SentencePiece byte-fallback pieces that decode to such bytes) nor send escape sequences
to the terminal (ESC, CSI). The chat CLI, the web demo and generate show replies through `escape_controls`; what the
model said is kept as it is (history, returned text), only its display is escaped."""

# C0 controls but tab and newline, DEL, and the C1 controls (U+0080-U+009F; U+009B is a one-character CSI).
_CONTROLS = [*(code for code in range(0x20) if chr(code) not in "\t\n"), 0x7F, *range(0x80, 0xA0)]
_ESCAPES = {code: f"\\x{code:02x}" for code in _CONTROLS}


def escape_controls(text: str) -> str:
    r"""`text` with each control character written as a visible \xNN escape ("\x1b[2J" stays on one line, shown,
    instead of clearing the screen). Escaping works character by character, so the pieces of a streamed reply can be
    escaped one at a time."""
    return text.translate(_ESCAPES)
