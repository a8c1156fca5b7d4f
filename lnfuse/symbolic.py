"""A tiny exact algebra for recognising normalisations, whatever the op order.

Layer normalization over the normalized axes ``A`` of ``x`` is

    y = (x - mean_A(x)) * (var_A(x) + eps) ** -1/2 * gamma + beta
    var_A(x) = mean_A((x - mean_A(x)) ** 2) = mean_A(x ** 2) - mean_A(x) ** 2

and RMS normalization is ``y = x * (mean_A(x ** 2) + eps) ** -1/2 * gamma``.

Exporters spell these in many ways (Sub/Pow/Div, Mul(d, d), Reciprocal, Pow(-0.5),
Keras' ``x * s + (beta - mean * s)``, gamma on the numerator, commuted operands,
Casts, one-pass variance, ReduceSum / (N - 1), ...). Instead of listing every
chain, the matcher evaluates the candidate subgraph symbolically: every tensor
gets a value that is a *polynomial* over a handful of per-candidate atoms

* ``X``: the input being normalized,
* ``M``: ``mean_A(X)`` (keepdims=1, constant along the normalized axes),
* ``Q``: ``mean_A(X ** 2)``,
* ``E<i>``: a positive per-row quantity ``V + eps`` (``V = Q - M**2`` for layer
  norm, ``V = Q`` for RMS norm), raised to rational powers,

with coefficients that are constant numpy arrays (gamma, beta, scalars). Only
operations whose result stays exactly representable are modelled; anything else
evaluates to ``None`` and ends the walk there. A tensor whose value is exactly
``X*E^-1/2*G - M*E^-1/2*G + B`` *is* a layer norm of ``X`` with scale ``G`` and
bias ``B``, whatever ops produced it, because each modelled op is applied with
its exact real-number meaning. Floating-point rounding differs between forms
(one-pass variance most of all), which is what the per-match numeric proof in
:mod:`lnfuse.verify` is for.

Nothing here touches a graph: :mod:`lnfuse.matcher` feeds values in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

# Monomial: sorted tuple of (atom, exponent) with exponent != 0. Exponents are floats that are
# multiples of 1/64 (the matcher only admits dyadic exponents), so their arithmetic is exact.
Monomial = tuple[tuple[str, float], ...]

MAX_TERMS = 12
Coef = float | np.ndarray  # a Python float for scalar coefficients (fast), else a float64 array


def _nonzero(c: Coef) -> bool:
    return c != 0.0 if isinstance(c, float) else np.count_nonzero(c) > 0


def equal_arrays(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal``, answered from the raw bytes first (the usual case: the very same values)."""
    return a.tobytes() == b.tobytes() or np.array_equal(a, b)


def _coef(arr: np.ndarray) -> Coef:
    """A single-element coefficient becomes a float; its shape is checked on the graph's constants."""
    return float(arr.reshape(-1)[0]) if arr.size == 1 else arr


ONE: Monomial = ()
_Q: Monomial = (("Q", 1.0),)
_M2: Monomial = (("M", 2.0),)


class Flag(str, Enum):
    """How a match was written (``MatchRecord.flags``, ``--explain``); compares and hashes as its
    string value, and prints as it."""

    CAST = "cast"  # a Cast inside the match
    ONE_PASS = "one_pass"  # variance as mean(x**2) - mean(x)**2
    UNBIASED = "unbiased"  # variance / (N - 1)
    REDUCE_SUM = "reduce_sum"  # ReduceSum (times 1/N) instead of ReduceMean
    SQUEEZED = "squeezed"  # a keepdims=0 statistic, not yet unsqueezed (walk-internal)
    FP16_SQUARE = "fp16_square"  # x**2 computed in a 16-bit type
    FP16_OVERFLOW_PRONE = (
        "fp16_overflow_prone"  # ... so the original may overflow where the fused op does not
    )
    SHARED_STATISTICS = "shared_statistics"  # one x_hat, several gammas
    TRANSPOSED = "transposed"  # statistics over non-trailing axes: Transposes around the fused op
    UNFLATTENED = "unflattened"  # a Flatten/Reshape sandwich undone (ONNX function bodies)
    MEAN_INVSTD_REUSED = "mean_invstd_reused"  # Mean / InvStdDev served by the fused op's outputs

    __str__ = str.__str__
    __format__ = str.__format__


class NormKind(str, Enum):
    """Which normalization a tensor computes: a layer norm (centred) or an RMS norm."""

    LN = "ln"
    RMS = "rms"


@dataclass(frozen=True)
class EDef:
    """Definition of an ``E`` atom: ``E = V + eps`` with ``V`` the biased variance (``ln``) or ``Q`` (``rms``).

    The tensor that was atomized equals ``k * E``; ``k`` is 1 for a plain mean and
    ``N / (N - 1)`` for an unbiased variance.
    """

    kind: NormKind
    eps: float
    k: float
    flags: frozenset[str] = frozenset()


@dataclass
class Context:
    """Per-candidate state: the normalized axes and the ``E`` atoms seen so far."""

    n_norm: int | None  # number of elements per row (product of normalized dims), None if unknown
    edefs: list[EDef] = field(default_factory=list)

    def atom_for(self, edef: EDef) -> str:
        for i, known in enumerate(self.edefs):
            if known.kind == edef.kind and known.eps == edef.eps and known.k == edef.k:
                return f"E{i}"
        self.edefs.append(edef)
        return f"E{len(self.edefs) - 1}"

    def edef(self, atom: str) -> EDef:
        return self.edefs[int(atom[1:])]


class Sym:
    """Symbolic value of a tensor: ``terms`` maps monomials to float64 coefficient arrays.

    Treated as immutable (a plain slotted class rather than a frozen dataclass: the walk
    builds one per evaluated node, and a frozen dataclass's ``__init__`` costs ~1 us more).
    """

    __slots__ = ("flags", "terms")

    def __init__(self, terms: dict[Monomial, Coef], flags: frozenset[str] = frozenset()) -> None:
        self.terms = terms
        self.flags = flags

    def __repr__(self) -> str:
        return f"Sym({self.terms!r}, {set(self.flags) or ''})"

    # -- construction -----------------------------------------------------
    @staticmethod
    def atom(name: str) -> Sym:
        return Sym({((name, 1.0),): 1.0})

    @staticmethod
    def const(value: np.ndarray) -> Sym:
        arr = np.asarray(value, dtype=np.float64)
        if not np.count_nonzero(arr):
            return Sym({})
        return Sym({ONE: _coef(arr)})

    def with_flags(self, *flags: str) -> Sym:
        return Sym(self.terms, self.flags | frozenset(flags))

    # -- queries ----------------------------------------------------------
    def is_const(self) -> bool:
        return all(m == ONE for m in self.terms)

    def single(self) -> tuple[Monomial, np.ndarray] | None:
        if len(self.terms) != 1:
            return None
        ((mono, coef),) = self.terms.items()
        return mono, coef


def _exp(mono: Monomial, atom: str) -> float:
    for a, e in mono:
        if a == atom:
            return e
    return 0.0


def _mono_mul(a: Monomial, b: Monomial) -> Monomial:
    if not b:
        return a
    if not a:
        return b
    out: dict[str, float] = dict(a)
    for atom, e in b:
        out[atom] = out.get(atom, 0.0) + e
    return tuple(sorted((k, v) for k, v in out.items() if v != 0))


def _mono_pow(a: Monomial, p: float) -> Monomial:
    return tuple(sorted((k, v * p) for k, v in a if v * p != 0))


def _merge_flags(a: Sym, b: Sym) -> frozenset[str]:
    if not b.flags:
        return a.flags
    if not a.flags:
        return b.flags
    return a.flags | b.flags


def _clean(terms: dict[Monomial, np.ndarray], flags: frozenset[str]) -> Sym | None:
    """``Sym(terms)`` without its zero terms (``terms`` is the caller's fresh dict)."""
    zero = [m for m, c in terms.items() if not _nonzero(c)]
    for m in zero:
        del terms[m]
    if len(terms) > MAX_TERMS:
        return None
    return Sym(terms, flags)


def add(a: Sym, b: Sym, sign: float = 1.0) -> Sym | None:
    terms = dict(a.terms)
    for mono, coef in b.terms.items():
        if sign != 1.0:
            coef = sign * coef
        if mono in terms:
            terms[mono] = terms[mono] + coef
        else:
            terms[mono] = coef
    return _clean(terms, _merge_flags(a, b))


def neg(a: Sym) -> Sym:
    return Sym({m: -c for m, c in a.terms.items()}, a.flags)


def mul(a: Sym, b: Sym) -> Sym | None:
    if len(a.terms) * len(b.terms) > 4 * MAX_TERMS:
        return None
    terms: dict[Monomial, np.ndarray] = {}
    for ma, ca in a.terms.items():
        for mb, cb in b.terms.items():
            mono = _mono_mul(ma, mb)
            coef = ca * cb
            terms[mono] = terms[mono] + coef if mono in terms else coef
    return _clean(terms, _merge_flags(a, b))


def scalar_of(coef: Coef) -> float | None:
    """The single value of a coefficient whose elements are all equal, else None."""
    if isinstance(coef, float):
        return coef
    arr = np.asarray(coef)
    if arr.size == 0:
        return None
    first = float(arr.reshape(-1)[0])
    if arr.size > 1 and np.count_nonzero(arr != first):
        return None
    return first


def _as_e_power(s: Sym, ctx: Context) -> tuple[float, Monomial] | None:
    """``s`` as ``k * prod(E_i ** p_i)`` with a positive scalar ``k``, else None.

    A sum is first turned into an ``E`` atom when it has the shape of ``c*V + e``; so is a lone
    ``c*Q``: a mean square with no eps (an RMS norm's eps of 0, or one that underflowed in fp16).
    """
    single = s.single()
    if single is not None and single[0] != _Q:
        mono, coef = single
        k = scalar_of(coef)
        if k is None or k <= 0 or not all(a.startswith("E") for a, _ in mono):
            return None
        return k, mono
    atomized = atomize(s, ctx)
    if atomized is None:
        return None
    k, atom = atomized
    return k, ((atom, 1.0),)


def atomize(s: Sym, ctx: Context) -> tuple[float, str] | None:
    """Recognise ``s == c * (V + eps)`` and return ``(c, atom name)``.

    ``V`` is ``Q - M**2`` (layer norm) or ``Q`` (RMS norm). ``c`` must be a
    positive scalar and ``eps`` a non-negative scalar.
    """
    q = s.terms.get(_Q)
    if q is None:
        return None
    c = scalar_of(q)
    if c is None or c <= 0:
        return None
    m2 = s.terms.get(_M2)
    e_coef = s.terms.get(ONE)
    if any(m not in (_Q, _M2, ONE) for m in s.terms):
        return None
    if m2 is not None:
        m2s = scalar_of(m2)
        if m2s is None or m2s != -c:
            return None
        kind = NormKind.LN
    else:
        kind = NormKind.RMS
    e_total = 0.0
    if e_coef is not None:
        es = scalar_of(e_coef)
        if es is None or es < 0:
            return None
        e_total = es
    flags = frozenset(f for f in s.flags if f == Flag.ONE_PASS)
    edef = EDef(kind=kind, eps=e_total / c, k=c, flags=flags)
    return c, ctx.atom_for(edef)


def power(s: Sym, p: float, ctx: Context) -> Sym | None:
    """``s ** p`` for ``p == 2`` (any polynomial) or any ``p`` on a positive E-power."""
    if p == 2:
        return mul(s, s)
    if p == 1:
        return s
    base = _as_e_power(s, ctx)
    if base is None:
        return None
    k, mono = base
    return Sym({_mono_pow(mono, p): float(k ** float(p))}, s.flags)


def reciprocal(s: Sym, ctx: Context) -> Sym | None:
    """``1 / s`` when ``s`` is a non-zero constant or a positive E-power."""
    if s.is_const() and s.terms:
        coef = s.terms[ONE]
        if np.any(np.asarray(coef) == 0):
            return None
        return Sym({ONE: 1.0 / coef}, s.flags)
    return power(s, -1.0, ctx)


def reduce_mean(s: Sym) -> Sym | None:
    """``mean_A(s)`` over the candidate's normalized axes (keepdims=1).

    Linear; X -> M, X**2 -> Q; M, Q and E are constant along the normalized axes.
    Coefficients must be constant along those axes too (checked by the caller,
    who knows the axes; here only scalars are let through).
    """
    terms: dict[Monomial, np.ndarray] = {}
    flags = set(s.flags)
    pure_square = len(s.terms) == 1 and ((("X", 2.0),) in s.terms)
    for mono, coef in s.terms.items():
        if scalar_of(coef) is None:
            return None
        d = _exp(mono, "X")
        rest = tuple((a, e) for a, e in mono if a != "X")
        if d == 0:
            new = rest
        elif d == 1:
            new = _mono_mul(rest, (("M", 1.0),))
        elif d == 2:
            if any(a == "Q" for a, _ in rest):
                return None
            new = _mono_mul(rest, (("Q", 1.0),))
        else:
            return None
        terms[new] = terms[new] + coef if new in terms else coef
    if pure_square:
        flags.add(Flag.ONE_PASS)
    return _clean(terms, frozenset(flags))


@dataclass(frozen=True)
class NormForm:
    """A tensor recognised as a complete normalization of ``X``."""

    kind: NormKind
    edef: EDef
    scale: np.ndarray  # float64, broadcastable against X
    bias: np.ndarray | None  # float64, or None when there is no additive term


def maybe_norm(s: Sym) -> bool:
    """Cheap necessary condition for :func:`as_norm`: an ``X * E**-1/2`` term and at most 3 terms."""
    if not 1 <= len(s.terms) <= 3:
        return False
    for mono in s.terms:
        if len(mono) == 2 and mono[0][0] == "E" and mono[1][0] == "X":
            return True
        if len(mono) == 2 and mono[0][0].startswith("E") and mono[1] == ("X", 1.0):
            return True
    return False


def as_norm(s: Sym, ctx: Context) -> NormForm | None:
    """Return the normalization ``s`` is, if it is one exactly; else None."""
    atom = ""
    for m in s.terms:
        for a, _ in m:
            if a[0] == "E":
                if atom and a != atom:
                    return None
                atom = a
    if not atom:
        return None
    edef = ctx.edef(atom)
    # Monomials are sorted by atom name, and "E<i>" < "M" < "X".
    x_mono: Monomial = ((atom, -0.5), ("X", 1.0))
    m_mono: Monomial = ((atom, -0.5), ("M", 1.0))
    g = s.terms.get(x_mono)
    if g is None:
        return None
    bias = s.terms.get(ONE)
    if edef.kind is NormKind.LN:
        gm = s.terms.get(m_mono)
        if gm is None or len(s.terms) != 2 + (bias is not None):
            return None
        if isinstance(g, float) and isinstance(gm, float):
            if gm != -g and abs(gm + g) > 1e-12 * abs(g):
                return None
            g_b = gm_b = None
        elif np.shape(g) == np.shape(gm):
            g_b, gm_b = np.asarray(g), np.asarray(gm)
        else:
            g_b, gm_b = np.broadcast_arrays(g, gm)
        # Equal up to products of constants evaluated in another order.
        if g_b is not None:
            neg = -g_b
            if not equal_arrays(gm_b, neg) and not np.allclose(gm_b, neg, rtol=1e-12, atol=0.0):
                return None
    else:
        if bias is not None or len(s.terms) != 1:
            return None
    if not _nonzero(g):
        return None
    return NormForm(
        kind=edef.kind,
        edef=edef,
        scale=np.asarray(g, dtype=np.float64),
        bias=None if bias is None else np.asarray(bias, dtype=np.float64),
    )


def is_negated_centering(s: Sym) -> bool:
    """True for ``c*(M - X)`` with c > 0: the centred value written as ``mean - x``."""
    if len(s.terms) != 2:
        return False
    cx = s.terms.get((("X", 1.0),))
    cm = s.terms.get((("M", 1.0),))
    if cx is None or cm is None:
        return False
    sx, sm = scalar_of(cx), scalar_of(cm)
    return sx is not None and sm is not None and sx < 0 and sm == -sx
