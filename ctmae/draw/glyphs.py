"""Text for preview images: a 5x7 pixel bitmap font (ASCII 32..126) stamped into RGB arrays.

No text renderer is among ctmae's dependencies (no Pillow, no matplotlib), and preview titles need only a line or two
of ASCII. Each glyph is the classic 5x7 LCD font: five column bytes, bit 0 the top row.
"""

from __future__ import annotations

import numpy as np

# 95 glyphs, ' ' to '~', 5 column bytes each (hex), bit 0 = top row
_HEX = (
    "0000000000 00005f0000 0007000700 147f147f14 242a7f2a12 2313086462 3649552250 0005030000 001c224100 0041221c00 "
    "082a1c2a08 08083e0808 0050300000 0808080808 0060600000 2010080402 3e5149453e 00427f4000 4261514946 2141454b31 "
    "1814127f10 2745454539 3c4a494930 0171090503 3649494936 064949291e 0036360000 0056360000 0008142241 1414141414 "
    "4122140800 0201510906 324979413e 7e1111117e 7f49494936 3e41414122 7f4141221c 7f49494941 7f09090101 3e41415132 "
    "7f0808087f 00417f4100 2040413f01 7f08142241 7f40404040 7f0204027f 7f0408107f 3e4141413e 7f09090906 3e4151215e "
    "7f09192946 4649494931 01017f0101 3f4040403f 1f2040201f 7f2018207f 6314081463 0304780403 6151494543 00007f4141 "
    "0204081020 41417f0000 0402010204 4040404040 0001020400 2054545478 7f48444438 3844444420 384444487f 3854545418 "
    "087e090102 081454543c 7f08040478 00447d4000 2040443d00 007f102844 00417f4000 7c04180478 7c08040478 3844444438 "
    "7c14141408 081414187c 7c08040408 4854545420 043f444020 3c4040207c 1c2040201c 3c4030403c 4428102844 0c5050503c "
    "4464544c44 0008364100 00007f0000 0041360800 0804081008 "
)
_COLUMNS = np.frombuffer(bytes.fromhex(_HEX), dtype=np.uint8).reshape(95, 5)  # (glyph, column)
GLYPHS = ((_COLUMNS[:, None, :] >> np.arange(7, dtype=np.uint8)[None, :, None]) & 1).astype(bool)  # (95, 7, 5)
ADVANCE = 6  # glyph width plus one column of space, in font pixels
LINE = 9  # glyph height plus two rows of space, in font pixels


def text_width(text: str, scale: int = 1) -> int:
    """Width in pixels of ``text`` drawn at ``scale`` (no trailing space)."""
    return max(0, (len(text) * ADVANCE - 1) * scale)


def fit(text: str, width: int, scale: int = 1) -> str:
    """``text`` shortened from the left with "..." so that it fits ``width`` pixels (paths keep their file name)."""
    room = (width // scale + 1) // ADVANCE
    return text if len(text) <= room else "..." + text[len(text) - max(room - 3, 0) :]


def wrap(text: str, width: int, scale: int = 1) -> list[str]:
    """``text`` broken at spaces into lines that fit ``width`` pixels; a word longer than a line is shortened by
    ``fit`` (a path keeps its file name). Nothing else is dropped, so a title keeps every figure it names."""
    room = (width // scale + 1) // ADVANCE
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= room:
            lines[-1] += " " + word
        else:
            lines.append(fit(word, width, scale))
    return lines


def draw_text(image: np.ndarray, text: str, x: int, y: int, colour: tuple[int, int, int], scale: int = 1) -> None:
    """Stamp ``text`` into ``image`` (H, W, 3) uint8 with its top-left corner at (x, y); clipped at the borders.

    Characters outside ASCII 32..126 are drawn as "?".
    """
    for i, char in enumerate(text):
        code = ord(char) - 32 if 32 <= ord(char) <= 126 else ord("?") - 32
        glyph = GLYPHS[code].repeat(scale, axis=0).repeat(scale, axis=1)  # (7, 5) -> (7s, 5s)
        left = x + i * ADVANCE * scale
        top, bottom = max(y, 0), min(y + glyph.shape[0], image.shape[0])
        lo, hi = max(left, 0), min(left + glyph.shape[1], image.shape[1])
        if top >= bottom or lo >= hi:
            continue
        image[top:bottom, lo:hi][glyph[top - y : bottom - y, lo - left : hi - left]] = colour
