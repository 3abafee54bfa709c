"""The COCO caption toolkit's tokenization, in Python.

The toolkit (``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``) joins the
captions with newlines, runs Stanford CoreNLP 3.4.1's ``PTBTokenizer`` on them
in Java (``-preserveLines -lowerCase``) and drops the tokens of its
``PUNCTUATIONS`` list. :func:`ptb_tokenize` gives the same string without
starting Java: a longest-match lexer whose rules follow CoreNLP 3.4.1's
``PTBLexer.flex`` in its default options (PTB3 escaping, ``tokenizeNLs``,
``splitAssimilations``, untokenizable characters deleted), written here from
that specification. What that means for captions:

- lowercase; the punctuation ``. , ; : ? ! - -- ... `` '' ` '`` and the
  quotes of every kind (normalised to those first) are dropped; ``?!``, ``!!``,
  ``$``, ``%``, ``&``, ``#``, ``/``, ``*`` and ``=`` stay;
- brackets become ``-lrb-``/``-rrb-``, ``-lsb-``... and *stay*: the toolkit
  filters the upper-case ``-LRB-`` after lowercasing it;
- clitics split: ``woman's`` -> ``woman 's``, ``don't`` -> ``do n't``,
  ``can't`` -> ``ca n't``, ``cannot`` -> ``can not``, ``gonna`` -> ``gon na``;
  ``dogs'`` -> ``dogs``;
- numbers keep their inner ``, . :`` (``1,000``, ``3.5``, ``10:30``), ``10%``
  -> ``10 %``, ``$5`` -> ``$ 5``, ``1/2`` and ``3 1/2`` stay one token (the
  latter with a no-break space that the scorers then split on); ``½`` -> ``1/2``;
  ``€`` -> ``$``, ``£`` -> ``#``, ``¢`` -> ``cents``;
- abbreviations keep their period (``u.s.``, ``mr.``, ``etc.``); hyphenated
  words stay whole (``black-and-white``);
- characters outside the Basic Multilingual Plane (emoji) are deleted and
  separate the words around them, as Java sees them as two unknown halves.

A caption's tokens can depend on the caption after it in the toolkit's batch
(its lexer looks across the newline: ``"plan B."`` before ``"The..."`` ends as
``plan b``); :func:`ptb_tokenize_batch` reproduces that for a batch in the
toolkit's order, :func:`ptb_tokenize` tokenizes a caption as if a newline and
nothing followed it. Letters and digits are those of CoreNLP 3.4.1's Unicode
tables (Python's, less the ones added since: ``_UNKNOWN``, checked against the
jar for every character of the Basic Multilingual Plane).

One deliberate difference: line breaks other than ``\\n`` inside a caption
(``\\r``, ``\\u2028``, ``\\u2029``, ``\\v``, ``\\f``) separate words here, whereas
the toolkit, which only replaces ``\\n``, ends the line there and shifts every
later caption of its batch onto the wrong image. :func:`java_tokenize` runs the
toolkit itself, for checking.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

try:  # the regex parser, for the rules' first characters (see _first)
    from re import _constants as _sre, _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: The tokens the toolkit drops after tokenizing (pycocoevalcap's ``PUNCTUATIONS``).
PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"})


# ------------------------------------------------------------------ character classes
def _ranges(chars: Sequence[int]) -> str:
    """A regex character-class body of the code points ``chars`` (ascending)."""
    out: List[List[int]] = []
    for cp in chars:
        if out and out[-1][1] == cp - 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp])
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in out)


def _bmp_classes() -> Tuple[str, str]:
    """Two class bodies: the characters Python's ``\\w`` takes for letters or digits that
    are neither (numerals such as ``²``, ``½``, ``Ⅻ``), and the upper-case letters of the
    Basic Multilingual Plane, the plane PTBLexer reads."""
    numerals: List[int] = []
    upper: List[int] = []
    category = unicodedata.category
    for cp in range(0x10000):
        if 0xD800 <= cp < 0xE000:
            continue
        char = chr(cp)
        cat = category(char)
        if cat == "Lu":
            upper.append(cp)
        elif cat[0] != "L" and cat != "Nd" and char.isalnum():
            numerals.append(cp)
    return _ranges(numerals), _ranges(upper)


def _ci(literal: str) -> str:
    """``literal`` matched regardless of ASCII case (JFlex's ``%caseless`` applies to
    literals only, never to character classes, so classes are written as they are)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isascii() and c.isalpha() else re.escape(c) for c in literal)


def _alt(*words: str) -> str:
    # Longest first, so that backtracking tries the longer of two overlapping words first.
    return "(?:" + "|".join(sorted(words, key=len, reverse=True)) + ")"


def _lits(*literals: str) -> str:
    return _alt(*(_ci(w) for w in literals))


_NUMERALS, _UPPER = _bmp_classes()
#: Letters and digits of Python's Unicode that CoreNLP 3.4.1's tables (Unicode 6.x) do not
#: know: PTBLexer deletes them. Found by running the toolkit on "a<c>b" and "1<c>1" for
#: every character of the Basic Multilingual Plane under Python 3.11 (Unicode 14); a
#: newer Python may know a few letters more (tests/test_ptb.py's slow test finds them).
_UNKNOWN = ("\u037f\u0528-\u052f\u0560\u0588\u05ef\u0860-\u086a\u0870-\u0887\u0889-\u088e\u08a1\u08ad-\u08c9"
            "\u0978\u0980\u09fc\u0af9\u0c34\u0c5a\u0c5d\u0c80\u0cdd\u0d04\u0d54-\u0d56\u0d5f\u0de6-\u0def"
            "\u0e86\u0e89\u0e8c\u0e8e-\u0e93\u0e98\u0ea0\u0ea8-\u0ea9\u0eac\u13f5\u13f8-\u13fd\u16f1-\u16f8"
            "\u170d\u171f\u1878\u191d-\u191e\u19b0-\u19c0\u19c8-\u19c9\u1b4c\u1c80-\u1c88\u1c90-\u1cba"
            "\u1cbd-\u1cbf\u1cf2-\u1cf3\u1cfa\u2c2f\u2c5f\u312e-\u312f\u31bb-\u31bf\u4db6-\u4dbf\u9fcd-\u9fff"
            "\ua698-\ua69d\ua78f\ua794-\ua79f\ua7ab-\ua7ca\ua7d0-\ua7d1\ua7d3\ua7d5-\ua7d9\ua7f2-\ua7f7"
            "\ua8fd-\ua8fe\ua9e0-\ua9e4\ua9e6-\ua9fe\uaa7e-\uaa7f\uab30-\uab5a\uab5c-\uab69\uab70-\uabbf")
#: Mongolian letters since turned into marks (U+1885, U+1886): letters to PTBLexer.
_OLD_LETTERS = "\u1885\u1886"
# Python's \w classes are Unicode-aware and cheap to compile, unlike the letter class
# spelled out; "[^\W\d_]" is a letter or a numeral, the look-ahead rules the numerals out.
L = f"(?:(?![{_NUMERALS}{_UNKNOWN}])[^\\W\\d_]|[{_OLD_LETTERS}])"  # [:letter:], Character.isLetter
D = f"(?:(?![{_UNKNOWN}])[\\d\u07c0-\u07c9])"  # {DIGIT}: [:digit:] (decimal digits) and N'Ko's
_LN = f"(?:(?![{_NUMERALS}{_UNKNOWN}])[^\\W_]|[{_OLD_LETTERS}])"  # [:letter:] or [:digit:]
SPLET = "&[aeiouAEIOU]" + _lits("acute", "grave", "uml") + ";"
# {LETTER}: letters plus the marks and modifiers PTBLexer adds by hand.
LETTER = (f"(?:{L}|[\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d"
          "\u0384\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f"
          "\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670"
          "\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa"
          "\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8"
          "\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82"
          "\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48"
          f"\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd]|{SPLET})")
LD = f"(?:{LETTER}|{D})"
WORD = f"{LETTER}{LD}*(?:[.!?]{LETTER}{LD}*)*"
SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
NEWLINE = "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c\u0085])"
SPACENL = f"(?:{SPACE}|{NEWLINE})"
SGML = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?: +(?:[A-Za-z][A-Za-z0-9_:.\-]*"
        r"|[A-Za-z][A-Za-z0-9_:.\-]* *= *(?:'[^']*'|\"[^\"]*\")))* */?|/[A-Za-z][A-Za-z0-9_:.\-]*) *>")
APOS = "(?:['\u0092\u2019]|" + _ci("&apos;") + ")"
APOSETC = "(?:['\u0092\u2019`\u0091\u2018\u201b]|" + _ci("&apos;") + ")"
REDAUX = f"{APOS}(?:[msdMSD]|{_lits('re', 've', 'll')})"
SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
SREDAUX = f"[nN]{APOSETC}[tT]"
NUM_SEP = "[.:,\u00ad\u066b\u066c]"
INSENTP = "[,;:\u3001]"
HYPHEN = "[-_\u058a\u2010\u2011]"
ACRO_SPECIAL = (_alt(*(_ci(w) for w in ("Canada", "Sino", "Korean", "EU", "Japan", "non"))) + _ci("-U.S")
                + "|" + _ci("U.S.-") + _lits("U.K", "U.S.S.R"))
ACRO = rf"(?:[A-Za-z](?:\.[A-Za-z])*|{ACRO_SPECIAL})"
ACRO2 = rf"(?:[A-Za-z](?:\.[A-Za-z])+|{ACRO_SPECIAL})"
# Abbreviations; a bracketed capital ("[A]rk") keeps that letter upper case, as in PTBLexer.
ABMONTH = _lits("Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Sept", "Oct", "Nov", "Dec")
ABDAYS = _lits("Mon", "Tue", "Tues", "Wed", "Thu", "Thurs", "Fri")
ABSTATE = _alt(*(_ci(w) for w in ("Ala", "Ariz", "Calif", "Colo", "Conn", "Ct", "Dak", "Fla", "Ga", "Ind",
                                  "Kan", "Kans", "Ky", "Md", "Mich", "Minn", "Mo", "Mont", "Neb", "Nev",
                                  "Okla", "Penn", "Tenn", "Va", "Vt", "Wis", "Wisc", "Wyo")),
               "A" + _ci("z"), "A" + _ci("rk"), "D" + _ci("el"), "I" + _ci("ll"), "L" + _ci("a"),
               "M" + _ci("ass"), "M" + _ci("iss"), "O" + _ci("re"), "P" + _ci("a"), "T" + _ci("ex"),
               "W" + _ci("ash"))
ABCOMP = _alt(*(_ci(w) for w in ("Inc", "Co", "Cos", "Corp", "Ltd", "Plc", "Rt", "Bancorp", "Bhd", "Assn",
                                 "Univ", "Intl", "Sys")), _ci("P") + "(?:" + _ci("p") + ")?" + _ci("t")
              + "[ye]" + "(?:[sS])?")
ABNUM = _lits("tel", "est", "ext", "sq")
ABPTIT = _alt(*(_ci(w) for w in ("Jr", "Sr", "Bros", "Ed.D", "Ph.D", "Blvd", "Rd", "Esq")))
ABBREV1 = _alt(ABMONTH, ABDAYS, ABSTATE, ABCOMP, ABNUM, ABPTIT, _lits("etc", "al", "seq", "Bldg")) + r"\."
ABTITLE = _alt(*(_ci(w) for w in (
    "Mr", "Mrs", "Ms", "Dr", "Drs", "Prof", "Profs", "Sen", "Sens", "Rep", "Reps", "Atty", "Attys", "Lt", "Col",
    "Gen", "Messrs", "Gov", "Govs", "Adm", "Rev", "Maj", "Sgt", "Cpl", "Pvt", "Capt", "St", "Ste", "Ave", "Pres",
    "Lieut", "Hon", "Brig", "Cmdr", "Comdr", "Pfc", "Spc", "Supt", "Supts", "Det", "Mt", "Ft", "Adj", "Adv",
    "Asst", "Assoc", "Ens", "Insp", "Mlle", "Mme", "Msgr", "Sfc")), "M" + _ci("iss"))
ABCOMP2 = _lits("Invt", "Elec", "Natl", "Mfg", "Mtg", "Dept")
ABBREV4 = _alt(ABTITLE, _lits("vs", "Alex", "Wm", "Jos", "Cie", "a.k.a", "cf", "TREAS", "Ph"), ACRO, ABCOMP2)
ABBREV3 = _lits("ca", "fig", "figs", "prop", "no", "nos", "art", "bldg", "pp", "op") + r"\."
FILENAME_EXT = _lits("bat", "bmp", "c", "class", "cgi", "cpp", "dll", "doc", "docx", "exe", "gif", "gz", "h",
                     "htm", "html", "jar", "java", "jpeg", "jpg", "mov", "mp3", "pdf", "php", "pl", "png", "ppt",
                     "ps", "py", "sql", "tar", "txt", "wav", "x", "xml", "zip")
HTHING = r"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:" + ACRO2 + r"\.|[A-Za-z0-9\u00ad]+))+"
THING_PART = f"(?:[dDoOlL]{APOSETC}{_LN})?{_LN}+"
THING = f"{THING_PART}(?:{HYPHEN}{THING_PART})*"
THINGA = "[A-Z]+(?:(?:[+&]|" + _ci("&amp;") + ")[A-Z]+)+"
MISCSYMBOL = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0"
              "\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d"
              "\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b"
              "\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb"
              "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
# The ACRONYM rule's following words: case-sensitive first letter, the rest caseless.
_ACRONYM_NEXT = _alt(*(w[0] + _ci(w[1:]) for w in (
    "About", "According", "Additionally", "After", "An", "A", "As", "At", "But", "Earlier", "He", "Her", "Here",
    "However", "If", "In", "It", "Last", "Many", "More", "Mr.", "Ms.", "Now", "Once", "One", "Other", "Our",
    "She", "Since", "So", "Some", "Such", "That", "The", "Their", "Then", "There", "These", "They", "This", "We",
    "When", "While", "What", "Yet", "You")), SGML)
_URL_CHARS = "^ \t\n\f\r\"<>|"
PHONE_A = (r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
           r"[0-9]{3,4}[- \u00a0]?[0-9]{3,5}")
PHONE_B = r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"


# ------------------------------------------------------------------ token normalisations
def _soft(text: str) -> str:
    """Soft hyphens removed (never an empty token: PTBLexer then writes ``-``)."""
    if "\u00ad" not in text:
        return text
    return text.replace("\u00ad", "") or "-"


_QUOTE_MAP = str.maketrans({"\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`",
                            "\u0092": "'", "\u2019": "'", "\u203a": "'"})
_DQUOTE_MAP = {"\u0093": "``", "\u201c": "``", "\u00ab": "``", "\u0094": "''", "\u201d": "''", "\u00bb": "''"}
_APOS_ENTITY = re.compile("&apos;|'", re.I)
_QUOT_ENTITY = re.compile('"|&quot;', re.I)


def _quotes(text: str, left: bool) -> str:
    """PTB3 ("LaTeX") quotes: ' and " become ` and `` when they probably open, else ' and ''."""
    text = _APOS_ENTITY.sub("`" if left else "'", text)
    text = _QUOT_ENTITY.sub("``" if left else "''", text)
    text = text.translate(_QUOTE_MAP)
    return "".join(_DQUOTE_MAP.get(c, c) for c in text)


_AMP = re.compile("&amp;", re.I)
_FRACTIONS = str.maketrans({"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"})
_CURRENCY = str.maketrans({"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$",
                           "\u20ac": "$"})


def _parens(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


# ------------------------------------------------------------------ the rules
#: What a rule does with its match: ``("tok", f)`` emits ``f(text)``; ``("push", n)``
#: emits the first ``n`` characters and lexes on from there; ``("dot", keep)`` emits
#: the text (without its final period when ``keep`` says so) and lexes that period
#: again; ``("skip",)`` emits nothing.
Action = Tuple
_SAME: Callable[[str], str] = lambda t: t  # noqa: E731

#: PTBLexer's rules in its order (the earlier wins a tie), each as (main, trailing
#: context or None, action). Trailing context counts towards the match length, as in JFlex.
_RULE_SPECS: List[Tuple[Any, Optional[str], Action]] = [
    (_ci("c") + r"\+\+", None, ("tok", _SAME)),
    (_ci("c") + "#|" + _ci("f") + "#", None, ("tok", _SAME)),
    (_ci("cannot"), None, ("push", 3)),
    (_ci("'twas"), None, ("push", 2)),
    (_ci("'tis"), None, ("push", 2)),
    (_lits("gonna", "gotta", "lemme", "gimme", "wanna"), None, ("push", 3)),
    (SGML, None, ("tok", _nbsp)),
    ("&" + _lits("MD", "mdash", "ndash") + ";|[\u0096\u0097\u2013\u2014\u2015]", None, ("tok", lambda t: "--")),
    (_ci("&amp;"), None, ("tok", lambda t: "&")),
    ("&(?:" + _lits("HT", "TL", "UR", "LR", "QC", "QL", "QR", "odq", "cdq") + "|#[0-9]+);", None,
     ("tok", _SAME)),
    (WORD, REDAUX, ("tok", _soft)),
    (SWORD, SREDAUX, ("tok", _soft)),
    (WORD, None, ("tok", _soft)),
    ("|".join([f"{APOS}{_ci('n')}{APOS}?", f"[lLdDjJ]{APOS}", _ci("Dunkin") + APOS, _ci("somethin") + APOS,
               _ci("ol") + APOS, APOS + _ci("em"), f"{APOS}[2-9]0{_ci('s')}", APOS + _ci("til") + f"(?:{_ci('l')})?",
               APOS + _ci("cause"), _ci("cont'd") + r"\.?",
               _lits("'twas", "nor'easter", "c'mon", "e'er", "s'mores", "ev'ry", "li'l", "nat'l"),
               f"{_ci('O')}{APOSETC}{_ci('o')}"]), None, ("tok", _SAME)),
    # The two open-ended APOWORD forms, apart so that the longest of all is taken.
    (f"[A-HJ-XZn]{APOSETC}(?:{L}){{2}}(?:{L})*", None, ("tok", _SAME)),
    (f"(?:{L})+[aeiouyAEIOUY]{APOSETC}[aeiouA-Z](?:{L})*", None, ("tok", _SAME)),
    (_ci("y") + APOS, L, ("tok", _SAME)),
    (_ci("http") + f"(?:{_ci('s')})?://[{_URL_CHARS}(){{}}]+[{_URL_CHARS}.!?(){{}},-]", None, ("tok", _SAME)),
    ("(?:(?:" + _ci("www.") + f"(?:[{_URL_CHARS}.!?(){{}},]+\\.)+[a-zA-Z]{{2,4}})"
     f"|(?:(?:[{_URL_CHARS}`'.!?(){{}}\\x2c-\\x5f$]+\\.)+" + _lits("com", "net", "org", "edu") + "))"
     f"(?:/[{_URL_CHARS}()]+[{_URL_CHARS}.!?(){{}},-])?", None, ("tok", _SAME)),
    ("(?:" + _ci("&lt;") + "|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00a0]+\\.)*"
     "[^ \t\n\f\r\"<>|(){}.\u00a0]+(?:" + _ci("&gt;") + "|>)?", None, ("tok", _SAME)),
    (f"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+", None, ("tok", _SAME)),
    (REDAUX, "[^A-Za-z]", ("tok", lambda t: _quotes(t, False))),
    (SREDAUX, "[^A-Za-z]", ("tok", lambda t: _quotes(t, False))),
    (f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}", None, ("tok", _SAME)),
    ((f"[-+]?{D}*(?:{NUM_SEP}{D}+)+", f"[-+]?{D}+"), None, ("tok", _soft)),
    ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", None,
     ("tok", _SAME)),
    (f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}", None, ("tok", _nbsp)),
    ("[\u00bc\u00bd\u00be\u2153-\u215e]", None, ("tok", lambda t: t.translate(_FRACTIONS))),
    ("-" + _lits("RRB", "LRB", "RCB", "LCB", "RSB", "LSB") + "-|" + _ci("C.D.s") + "|" + _ci("pro-") + "|"
     + _ci("anti-") + "|" + _ci("S") + "(?:&|" + _ci("&amp;") + ")" + _ci("P-500") + "|" + _ci("S") + "(?:&|"
     + _ci("&amp;") + ")" + _ci("Ls") + "|" + _ci("Cap") + APOS + _ci("n") + "|" + _ci("c") + APOS + _ci("est"),
     None, ("tok", lambda t: _AMP.sub("&", t))),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None, ("tok", _SAME)),
    (r"[A-Z]*\$|#", None, ("tok", _SAME)),
    ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", None,
     ("tok", lambda t: t.translate(_CURRENCY))),
    (ACRO + r"\.", f"{SPACENL}+{_ACRONYM_NEXT}{SPACENL}", ("acronym",)),
    (ABBREV3, f"{SPACENL}?(?![{_UNKNOWN}])\\d", ("tok", _SAME)),
    ("(?:" + _ci("pt") + "[eyEY]|" + _ci("co") + r")\.", SPACE + _lits("ltd", "lim"), ("tok", _SAME)),
    (ABBREV1, f"{SPACENL}(?:{SPACENL}|(?![{_UNKNOWN}])[{_UPPER}]|{SGML})", ("dot", False)),
    (ABBREV1, "(?s:..)", ("tok", _SAME)),
    (ABBREV1, None, ("dot", False)),
    (ABBREV4 + r"\.", None, ("tok", _SAME)),
    (ABBREV4, SPACE, ("tok", _SAME)),
    (ACRO, SPACENL, ("tok", _SAME)),
    (APOS + "[0-9][0-9]", SPACENL, ("tok", _SAME)),
    (f"{LD}+(?:\\.{LD}+)*\\.{FILENAME_EXT}", f"(?:{SPACENL}|[.?!,])", ("tok", _SAME)),
    (WORD + r"\.", INSENTP, ("tok", _soft)),
    (PHONE_A, None, ("tok", lambda t: _parens(_nbsp(t)))),
    (PHONE_B, None, ("tok", lambda t: _parens(_nbsp(t)))),
    ('"|' + _ci("&quot;"), "[A-Za-z0-9$]", ("tok", lambda t: _quotes(t, True))),
    ('"|' + _ci("&quot;"), None, ("tok", lambda t: _quotes(t, False))),
    ("\x7f", None, ("skip",)),
    ("<|" + _ci("&lt;"), None, ("tok", lambda t: "<")),
    (">|" + _ci("&gt;"), None, ("tok", lambda t: ">")),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", "[^A-Za-z0-9]", ("tok", _parens)),
    (r"[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
     r"|\([\^x=~<>']-[\^x=~<>'`]\)", None, ("tok", _parens)),
    (r"\{", None, ("tok", lambda t: "-LCB-")),
    (r"\}", None, ("tok", lambda t: "-RCB-")),
    (r"\[", None, ("tok", lambda t: "-LSB-")),
    (r"\]", None, ("tok", lambda t: "-RSB-")),
    (r"\(", None, ("tok", lambda t: "-LRB-")),
    (r"\)", None, ("tok", lambda t: "-RRB-")),
    ("-+", None, ("tok", lambda t: "--" if 3 <= len(t) <= 4 else t)),
    ((r"\.{3,5}", r"(?:\.[ \u00a0]){2,4}\.", "[\u0085\u2026]"), None, ("tok", lambda t: "...")),
    ("@+|#+|_+", None, ("tok", _SAME)),
    ((r"\*+", r"(?:\\\*){1,3}"), None, ("tok", _SAME)),
    (INSENTP, None, ("tok", _SAME)),
    ("[?!]+", None, ("tok", _SAME)),
    ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None, ("tok", _SAME)),
    ("=", None, ("tok", _SAME)),
    ("/", None, ("tok", _SAME)),
    (HTHING + r"\.", INSENTP, ("tok", _soft)),
    (HTHING, None, ("tok", _soft)),
    (THING + r"\.", INSENTP, ("tok", _SAME)),
    (THING, None, ("tok", _SAME)),
    (THINGA + r"\.", INSENTP, ("tok", lambda t: _AMP.sub("&", t))),
    (THINGA, None, ("tok", lambda t: _AMP.sub("&", t))),
    ("'", "[A-Za-z][^ \t\n\r\u00a0]", ("tok", lambda t: _quotes(t, True))),
    (REDAUX, None, ("tok", lambda t: _quotes(t, False))),
    (SREDAUX, None, ("tok", lambda t: _quotes(t, False))),
    ((APOS, "''", "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a"
      "\u00ab\u00bb]{1,2}"), None, ("tok", lambda t: _quotes(t, False))),
    ("<<|>>", None, ("tok", _SAME)),
    (MISCSYMBOL, None, ("tok", _SAME)),
    # Spaces, newlines (the wrapper's line breaks are between captions, never inside one),
    # zero-width and unknown characters: nothing, but they end a token.
    (f"\x00|{SPACE}+|[\u200b\u200e\u200f\ufeff]|{NEWLINE}|" + _ci("&nbsp;"), None, ("skip",)),
]

def _compile(main: str, trail: Optional[str]) -> "re.Pattern[str]":
    return re.compile(main if trail is None else f"(?:{main})(?=({trail}))")


# A rule's top-level alternatives are tried one by one: JFlex takes the longest of
# them, Python's regex the first that matches.
_RULES = [(_compile(alt, trail), trail is not None, action)
          for main, trail, action in _RULE_SPECS for alt in (main if isinstance(main, tuple) else (main,))]

def _first(items: Any) -> Tuple[List[Any], bool]:
    """The items of a parsed regex (``re._parser``) that may match its first character,
    and whether it may match the empty string. A superset: look-aheads are ignored."""
    c = _sre
    out: List[Any] = []
    for op, av in items:
        if op in (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN):
            out.append((op, av))
            return out, False
        if op is c.SUBPATTERN:
            first, empty = _first(av[3])
        elif op is c.BRANCH:
            parts = [_first(branch) for branch in av[1]]
            first, empty = [x for f, _ in parts for x in f], any(e for _, e in parts)
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)):
            first, empty = _first(av[2])
            empty = empty or av[0] == 0
        elif op in (c.AT, c.ASSERT, c.ASSERT_NOT):
            continue
        else:  # anything else: any character may start it
            return [(c.ANY, None)], True
        out.extend(first)
        if not empty:
            return out, False
    return out, True


_CATEGORY_REGEX = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
                   "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W"}


def _starts(char: str, items: List[Any]) -> bool:
    """Whether ``char`` is one of the first-character ``items`` (from :func:`_first`)."""
    c = _sre
    code = ord(char)
    for op, av in items:
        if op is c.ANY or (op is c.LITERAL and av == code) or (op is c.NOT_LITERAL and av != code):
            return True
        if op is c.IN:
            negate = bool(av) and av[0][0] is c.NEGATE
            hit = False
            for kind, value in av[negate:]:
                if kind is c.LITERAL:
                    hit = value == code
                elif kind is c.RANGE:
                    hit = value[0] <= code <= value[1]
                elif kind is c.CATEGORY:
                    hit = re.match(_CATEGORY_REGEX[str(value)], char) is not None
                else:
                    hit = True
                if hit:
                    break
            if hit != negate:
                return True
    return False


#: Each rule's possible first characters, so that a position tries only the rules that
#: can start there (most characters start a handful of the 90 rules).
_FIRSTS = [_first(_sre_parse.parse(regex.pattern))[0] for regex, _, _ in _RULES]
_CANDIDATES: Dict[str, List[Tuple["re.Pattern[str]", bool, Action]]] = {}


def _candidates(char: str) -> List[Tuple["re.Pattern[str]", bool, Action]]:
    rules = _CANDIDATES.get(char)
    if rules is None:
        rules = [rule for rule, first in zip(_RULES, _FIRSTS) if _starts(char, first)]
        if len(_CANDIDATES) < 100_000:
            _CANDIDATES[char] = rules
    return rules


#: Captions of plain ASCII letters and spaces, most of them: the lexer's result is their
#: words, but for the assimilations it splits (checked in tests/test_ptb.py).
_PLAIN = re.compile(r"[A-Za-z ]*")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "lemme": ("lem", "me"), "gimme": ("gim", "me"), "wanna": ("wan", "na")}


#: An ASCII word followed by a space or a newline: most tokens. No rule but the
#: assimilations ("cannot") makes another token of it: those that match longer need
#: a character other than a letter before the space ("Mr." "e-mail" "don't" "a@b"),
#: and the two that count the space ("Mr " as a title, "A " as an acronym) give the word.
#: The same before ", " and before ". " (unless it is an abbreviation: "Mr." "etc."
#: "no." "A."): a comma or a period and a space end every rule that starts with letters.
_SPACED_WORD = re.compile(r"([A-Za-z]+)(?:(?=[ \n])|(?=,[ \n])|(\.)(?=[ \n]))")
_SPACES = re.compile(f"{SPACE}+")
_ABBREVIATION = re.compile(f"{ABBREV1}|{ABBREV4}\\.|{ABBREV3}|" + "(?:" + _ci("pt") + "[eyEY]|" + _ci("co") + r")\.")


def _lex(text: str, end: Optional[int] = None) -> List[str]:
    """PTBLexer's tokens of ``text`` (before lowercasing and the punctuation filter),
    those starting before ``end`` (default: all); what follows is context only."""
    out: List[str] = []
    pos, end = 0, len(text) if end is None else end
    while pos < end:
        if text[pos] == " ":  # only the spaces rule starts with a space; it takes the whole run
            pos = _SPACES.match(text, pos).end()  # type: ignore[union-attr]
            continue
        word = _SPACED_WORD.match(text, pos)
        if word is not None and word.group(1).lower() not in _SPLIT_WORDS and (
                not word.group(2) or not _ABBREVIATION.fullmatch(word.group())):
            out.append(word.group(1))
            pos = word.end(1)
            continue
        best, best_len, best_main = None, 0, 0
        for regex, trailing, action in _candidates(text[pos]):
            m = regex.match(text, pos)
            if m is None:
                continue
            size = m.end() - pos + (len(m.group(m.lastindex)) if trailing else 0)
            if size > best_len:
                best, best_len, best_main = action, size, m.end()
        if best is None:
            # Any other character (JFlex's "."), an emoji's surrogate halves included:
            # deleted, as PTBLexer's default "untokenizable" option does.
            pos += 1
            continue
        piece = text[pos:best_main]
        kind = best[0]
        if kind == "tok":
            out.append(best[1](piece))
            pos = best_main
        elif kind == "push":
            out.append(piece[:best[1]])
            pos += best[1]
        elif kind == "acronym":  # "I." gives "I"; longer ones keep their period; both lex the period again
            out.append(piece[:-1] if len(piece) == 2 else piece)
            pos = best_main - 1
        elif kind == "dot":  # an abbreviation ending a sentence: it keeps its period, which comes again
            out.append(piece)
            pos = best_main - 1
        else:
            pos = best_main
    return out


#: Tokenizations kept: enough for the captions a run repeats (references such as "a red circle",
#: a model's stock phrases), not one per caption of a large run (that grew a run's memory
#: with its rows: about 0.3 KB per distinct caption, 17 MiB at 62,500).
CACHE_SIZE = 8192


@lru_cache(maxsize=CACHE_SIZE)
def _tokenize_cached(text: str, following: str = "") -> str:
    if _PLAIN.fullmatch(text):
        words: List[str] = []
        for w in text.lower().split():
            words.extend(_SPLIT_WORDS.get(w, (w,)))
        return " ".join(words)
    return _tokenize_lexed(text, following)


def clear_cache() -> None:
    """Forget the tokenizations cached so far (a benchmark of the cold path calls it)."""
    _tokenize_cached.cache_clear()


def _tokenize_lexed(text: str, following: Optional[str] = "") -> str:
    """:func:`ptb_tokenize` of one caption without newlines, through the lexer;
    ``following``: the captions after it in the toolkit's batch, for context
    (``None``: it is the batch's last, at the end of the file)."""
    # In the toolkit's batch every caption but the last is followed by a newline, which
    # rules with a trailing context ("=D", "I'll", "etc.") look at.
    context = "" if following is None else "\n" + following
    if any(ord(c) > 0xFFFF for c in text + context):
        text, context = _utf16_units(text), _utf16_units(context)
    line = " ".join(_lex(text + context, len(text))).lower()
    # The wrapper's own steps: strip the line's end (any Unicode space, even inside a
    # token such as an e-mail address), split on spaces, drop the punctuation.
    joined = " ".join(t for t in line.rstrip().split(" ") if t not in PUNCTUATIONS)
    # Surrogate halves a token kept (inside a URL, say) paired again.
    return joined.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") if _HALF.search(joined) \
        else joined


_HALF = re.compile("[\ud800-\udfff]")


def _utf16_units(text: str) -> str:
    """``text`` with each character beyond U+FFFF as its two UTF-16 halves, the units
    Java's lexer sees (neither is a letter: each alone is deleted, and separates words)."""
    data = text.encode("utf-16-le", "surrogatepass")
    return "".join(chr(int.from_bytes(data[i:i + 2], "little")) for i in range(0, len(data), 2))


def ptb_tokenize(text: Optional[str]) -> str:
    """``text`` as the COCO caption toolkit tokenizes it: lowercase PTB tokens,
    punctuation dropped, joined by single spaces (``""`` for ``None`` or nothing left).

    ``"A woman's hat (red)."`` -> ``"a woman 's hat -lrb- red -rrb-"``. The
    scorers split this string on any whitespace, so a token holding a no-break
    space (``3\\u00a01/2``) counts as two words there, as with the toolkit.
    """
    if not text:
        return ""
    # The wrapper turns "\n" into a space before joining captions with newlines.
    return _tokenize_cached(text.replace("\n", " "))


#: Captions whose tokens may depend on the caption after them in a batch: those ending
#: in a period (and spaces), where an acronym ("B."), an abbreviation used before
#: numbers ("no.") or any abbreviation ("etc.") looks past the caption's end.
_PERIOD_END = re.compile(f"\\.{SPACE}*$")
#: After an acronym, the words that make it end a sentence ("B." before "The").
_ACRONYM_CONTEXT = re.compile(f"{SPACENL}+{_ACRONYM_NEXT}{SPACENL}")
#: Characters of the following captions that any trailing context can reach (an
#: acronym's: spaces and newlines, a word of up to 12 letters or an SGML tag, a space).
_CONTEXT_CHARS = 400


def _context(text: str, following: str) -> str:
    """What of ``following`` (the next captions, joined by newlines) can change the
    tokens of ``text``, as a short stand-in with the same effect: ``"The "`` when an
    acronym at its end would end a sentence, ``"5"`` when a number follows an
    abbreviation such as "no." directly, else ``""`` (the abbreviations' other
    trailing contexts give the same tokens either way)."""
    if _ACRONYM_CONTEXT.match("\n" + following):
        return "The "
    if text.endswith(".") and following[:1].isdecimal() and not re.match(f"[{_UNKNOWN}]", following[:1]):
        return "5"
    return ""


def ptb_tokenize_batch(texts: Sequence[Optional[str]]) -> List[str]:
    """:func:`ptb_tokenize` of each of ``texts`` as the toolkit tokenizes them in one
    batch, in this order (``COCOEvalCap`` tokenizes all references in one batch and
    all candidates in another): its lexer looks across a caption's end into the next
    one, so a caption ending in a one-letter acronym before one starting with "The",
    "A", "He"... loses that period (``"plan B."`` -> ``plan b``, not ``plan b.``), and
    one ending in ``no.``/``fig.``/``ca.`` before one starting with a digit keeps it.
    The batch fed text by text: :class:`PTBBatch`.
    """
    batch = PTBBatch()
    out = [tokens for text in texts for tokens in batch.push(text)]
    return out + batch.finish()


class PTBBatch:
    """:func:`ptb_tokenize_batch` of a batch given one text at a time, holding only the
    texts whose tokens still depend on what follows: a text that ends in a period
    waits for the next captions (up to :data:`_CONTEXT_CHARS` characters of them),
    and every text waits for the next one, as the batch's last is tokenized
    without a newline after it. So a run's captions stream through in constant
    memory and come out as the whole batch would give them.
    """

    def __init__(self) -> None:
        #: Texts pushed and not yet tokenized (newlines already spaces), in order.
        self._waiting: List[str] = []
        #: Characters after the first waiting text, each text counting its newline.
        self._after = 0

    def push(self, text: Optional[str]) -> List[str]:
        """Add the batch's next text; returns the tokens of the texts now decided, in order."""
        clean = text.replace("\n", " ") if text else ""
        if self._waiting:
            self._after += len(clean) + 1
        self._waiting.append(clean)
        out = []
        while len(self._waiting) > 1:
            head = self._waiting[0]
            if _PERIOD_END.search(head):
                if self._after < _CONTEXT_CHARS:
                    break  # texts still to come may reach into its context: it waits
                out.append(self._tokens(head, self._following()))
            else:
                out.append(_tokenize_cached(head) if head else "")
            self._drop_head()
        return out

    def finish(self) -> List[str]:
        """The tokens of the texts still waiting: the batch ends here."""
        out = []
        while self._waiting:
            head = self._waiting[0]
            if len(self._waiting) == 1:  # nothing after it, not even a newline
                out.append(_tokenize_lexed(head, None) if head else "")
            elif _PERIOD_END.search(head):
                out.append(self._tokens(head, self._following()))
            else:
                out.append(_tokenize_cached(head) if head else "")
            self._drop_head()
        return out

    def _following(self) -> str:
        """The texts after the first, as much of them as :func:`ptb_tokenize_batch` reads."""
        following, size = [], 0
        for text in self._waiting[1:]:
            if size >= _CONTEXT_CHARS:
                break
            following.append(text)
            size += len(text) + 1
        return "\n".join(following)

    @staticmethod
    def _tokens(text: str, following: str) -> str:
        return _tokenize_cached(text, _context(text, following))

    def _drop_head(self) -> None:
        self._waiting.pop(0)
        if self._waiting:
            self._after -= len(self._waiting[0]) + 1


def ptb_tokens(text: Optional[str]) -> List[str]:
    """The tokens of :func:`ptb_tokenize` (split on single spaces, as the wrapper does)."""
    joined = ptb_tokenize(text)
    return joined.split(" ") if joined else []


def java_tokenize(texts: Sequence[str], *, isolate: bool = True, timeout_s: float = 300.0) -> List[str]:
    """``texts`` tokenized by the COCO caption toolkit itself (pycocoevalcap's
    ``PTBTokenizer``, one Java process for the whole batch); for checking
    :func:`ptb_tokenize`. Needs Java on PATH and pycocoevalcap. ``isolate``: each
    text alone, as :func:`ptb_tokenize` sees it; ``False``: one batch exactly as the
    toolkit runs it, as :func:`ptb_tokenize_batch` sees it.

    Raises ``RuntimeError`` when a text holds a line break other than ``\\n``
    (the toolkit would shift the later captions onto the wrong lines) or when
    Java fails.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: F401 - fails early without it
    import pycocoevalcap.tokenizer.ptbtokenizer as mod
    import os
    import subprocess
    import tempfile

    for i, text in enumerate(texts):
        if _BREAKS.search(text.replace("\n", " ")):
            raise RuntimeError(f"text {i} holds a line break other than \\n, which the toolkit "
                               f"tokenizes onto a line of its own: {text!r}")
    # The wrapper's own steps (its temporary file next to the jar, its command), without
    # its stdout pipe reading a huge batch into one string twice.
    folder = os.path.dirname(os.path.abspath(mod.__file__))
    # A line of one deleted character after each caption: the toolkit's lexer looks past a
    # caption's end into the next one ("A." before "The..." ends as "a"), which a caption
    # alone (ptb_tokenize) cannot; this way every caption is followed by a newline and nothing.
    sep = "\n\u0001\n" if isolate else "\n"
    joined = "".join(t.replace("\n", " ") + sep for t in texts)
    if not isolate:
        joined = joined[:-1]
    with tempfile.NamedTemporaryFile("wb", delete=False, suffix=".txt") as tmp:
        tmp.write(joined.encode())
    try:
        proc = subprocess.run(["java", "-cp", mod.STANFORD_CORENLP_3_4_1_JAR, "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", tmp.name], cwd=folder, capture_output=True,
                              timeout=timeout_s)
    finally:
        os.unlink(tmp.name)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode().split("\n")[0::2 if isolate else 1]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in mod.PUNCTUATIONS)
            for _, line in zip(texts, lines + [""] * (len(texts) - len(lines)))]


_BREAKS = re.compile("[\r\u2028\u2029\u000b\u000c]")
