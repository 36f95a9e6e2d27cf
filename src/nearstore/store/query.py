"""Queries over derived datasets: a small filter language and exact nearest-neighbour scoring.

Both run where the derived files are (on the nodes); the client only parses to
refuse a bad expression before anything is sent, and merges the answers.

Filter grammar (keywords are case-insensitive; ``#`` is not special)::

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := value (("==" | "!=" | "<" | "<=" | ">" | ">=") value
                     | ["not"] "in" "{" literal ("," literal)* "}")?
    value   := COLUMN | literal | "(" expr ")"
    literal := NUMBER | STRING ('...' or "...") | "true" | "false"

Columns: ``sample``, ``key``, ``label``, ``class``, ``score`` (see
``store.derived``). Examples: ``class in {3, 7} and score > 0.9``,
``not (label == 2) or key == "n0001"``. A sample without an output (its
``error`` is set) has a null ``class`` and ``score``, and a comparison with
null is false. Errors name the position (a caret under the expression) or list
the columns.

Nearest neighbours: ``topk`` scores every stored output against a query
vector (``cosine``: the cosine similarity, ``dot``: the inner product,
``l2``: minus the Euclidean distance; higher is nearer) in float64 and keeps
the k best, ties broken by the lower sample id, so merging the nodes' top k
gives exactly the global top k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nearstore.core.errors import ConfigError

__all__ = ["QueryError", "parse_filter", "FILTER_COLUMNS", "METRICS", "topk", "merge_topk", "check_k"]

#: the columns a filter may name
FILTER_COLUMNS = ("sample", "key", "label", "class", "score")
METRICS = ("cosine", "dot", "l2")


class QueryError(ConfigError):
    """A query that cannot run: a filter that does not parse, an unknown column, a bad k or vector."""


_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?)
    |(?P<str>'[^']*'|"[^"]*")|(?P<op>==|!=|<=|>=|<|>|\(|\)|\{|\}|,)|(?P<name>[A-Za-z_][A-Za-z0-9_]*))""", re.X)
_KEYWORDS = {"and", "or", "not", "in", "true", "false"}
_COMPARE = {"==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
            ">=": pc.greater_equal}


@dataclass
class _Tok:
    kind: str  # num, str, op, name, kw, end
    text: str
    pos: int


def _tokens(text: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            at = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise _error(text, at, f"unexpected character {text[at]!r}")
        kind = m.lastgroup or "op"
        start = m.start(kind)
        word = m.group(kind)
        if kind == "name" and word.lower() in _KEYWORDS:
            kind, word = "kw", word.lower()
        out.append(_Tok(kind, word, start))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


def _error(text: str, pos: int, msg: str) -> QueryError:
    return QueryError(f"filter does not parse at position {pos}: {msg}\n  {text}\n  {' ' * pos}^\n"
                      "(grammar: comparisons ==, !=, <, <=, >, >=; 'in {a, b}'; and, or, not; parentheses; columns "
                      f"{', '.join(FILTER_COLUMNS)})")


class _Parser:
    def __init__(self, text: str, columns: tuple[str, ...]) -> None:
        self.text, self.columns = text, columns
        self.toks = _tokens(text)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, text: str) -> None:
        if self.tok.text != text or self.tok.kind not in ("op", "kw"):
            raise _error(self.text, self.tok.pos, f"expected {text!r}, found {self._found()}")
        self.take()

    def _found(self) -> str:
        return "the end of the expression" if self.tok.kind == "end" else repr(self.tok.text)

    def parse(self) -> pc.Expression:
        if self.tok.kind == "end":
            raise _error(self.text, 0, "the expression is empty")
        e = self.or_()
        if self.tok.kind != "end":
            raise _error(self.text, self.tok.pos, f"unexpected {self._found()} after a complete expression")
        return e

    def or_(self) -> pc.Expression:
        e = self.and_()
        while self.tok.kind == "kw" and self.tok.text == "or":
            self.take()
            e = e | self.and_()
        return e

    def and_(self) -> pc.Expression:
        e = self.not_()
        while self.tok.kind == "kw" and self.tok.text == "and":
            self.take()
            e = e & self.not_()
        return e

    def not_(self) -> pc.Expression:
        if self.tok.kind == "kw" and self.tok.text == "not":
            self.take()
            return ~self.not_()
        return self.compare()

    def compare(self) -> pc.Expression:
        left = self.value()
        t = self.tok
        if t.kind == "op" and t.text in _COMPARE:
            self.take()
            return _COMPARE[t.text](left, self.value())
        negate = False
        if t.kind == "kw" and t.text == "not" and self.toks[self.i + 1].text == "in":
            self.take()
            negate = True
        if self.tok.kind == "kw" and self.tok.text == "in":
            self.take()
            items = self.literal_set()
            e = pc.is_in(left, value_set=pa.array(items))
            return ~e if negate else e
        return left

    def literal_set(self) -> list:
        self.expect("{")
        items = [self.literal()]
        while self.tok.text == ",":
            self.take()
            items.append(self.literal())
        self.expect("}")
        kinds = {type(v) for v in items}
        if len(kinds) > 1 and kinds != {int, float}:
            raise _error(self.text, self.tok.pos, "a set mixes numbers and strings")
        return [float(v) for v in items] if kinds == {int, float} else items

    def literal(self) -> object:
        t = self.take()
        if t.kind == "num":
            return float(t.text) if any(c in t.text for c in ".eE") else int(t.text)
        if t.kind == "str":
            return t.text[1:-1]
        if t.kind == "kw" and t.text in ("true", "false"):
            return t.text == "true"
        raise _error(self.text, t.pos, f"expected a number or a string, found "
                     f"{'the end of the expression' if t.kind == 'end' else repr(t.text)}")

    def value(self) -> pc.Expression:
        t = self.tok
        if t.kind == "op" and t.text == "(":
            self.take()
            e = self.or_()
            self.expect(")")
            return e
        if t.kind == "name":
            self.take()
            if t.text not in self.columns:
                raise QueryError(f"unknown column {t.text!r} at position {t.pos} of the filter; columns: "
                                 f"{', '.join(self.columns)}")
            return pc.field(t.text)
        if t.kind in ("num", "str") or (t.kind == "kw" and t.text in ("true", "false")):
            return pc.scalar(self.literal())
        raise _error(self.text, t.pos, f"expected a column, a literal or '(', found {self._found()}")


def parse_filter(text: str, columns: tuple[str, ...] = FILTER_COLUMNS) -> pc.Expression:
    """The Arrow expression of a filter (see the module doc); ``QueryError`` points at what is wrong."""
    if not isinstance(text, str):
        raise QueryError(f"a filter is a string, got {type(text).__name__}")
    return _Parser(text, columns).parse()


def check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise QueryError(f"k must be a positive integer (the number of neighbours to return), got {k!r}")
    return k


def _scores(outputs: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    x = outputs.astype(np.float64)
    q = query.astype(np.float64)
    if metric == "dot":
        return x @ q
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1) * (np.linalg.norm(q) or 1.0)
        return np.divide(x @ q, norms, out=np.zeros(len(x)), where=norms > 0)
    if metric == "l2":
        return -np.sqrt(((x - q) ** 2).sum(axis=1))
    raise QueryError(f"metric must be one of {', '.join(METRICS)} (got {metric!r})")


def topk(samples: np.ndarray, outputs: np.ndarray, valid: np.ndarray, query: np.ndarray, k: int,
         metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of the k best rows of ``outputs`` (N, D) among ``valid`` ones, best first, ties to
    the lower sample id."""
    check_k(k)
    if outputs.ndim != 2 or query.shape != (outputs.shape[1],):
        raise QueryError(f"the query embedding has {query.size} values but the stored embeddings have "
                         f"{outputs.shape[1] if outputs.ndim == 2 else outputs.shape}; give a vector of that length")
    pos = np.flatnonzero(valid)
    s = _scores(outputs[pos], query, metric)
    order = np.lexsort((samples[pos], -s))[:k]
    return pos[order], s[order]


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-node (samples, scores) lists into the global top k (same order as ``topk``)."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0)
    samples = np.concatenate([p[0] for p in parts]).astype(np.int64)
    scores = np.concatenate([p[1] for p in parts]).astype(np.float64)
    order = np.lexsort((samples, -scores))[:k]
    return samples[order], scores[order]
