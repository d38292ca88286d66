"""The "DM Mathematics" component: generated question/answer documents in DeepMind
Mathematics' style (a question line, then its answer line), regular enough for a tiny model
to learn."""

from __future__ import annotations

import random
from collections.abc import Callable
from decimal import Decimal

from stages.demo_corpus.config import DemoCorpusConfig
from stages.demo_corpus.documents import MATH, Doc


def math_documents(config: DemoCorpusConfig) -> list[Doc]:
    """Documents of one question kind each, kinds in turn: question line, answer line."""
    rng = random.Random(f"{config.seed}/math")
    docs = []
    for i in range(config.math_documents):
        question = _QUESTION_KINDS[i % len(_QUESTION_KINDS)]
        pairs = (question(rng) for _ in range(config.questions_per_math_document))
        docs.append(Doc("".join(f"{q}\n{a}\n" for q, a in pairs), MATH))
    return docs


def _fmt(x: Decimal) -> str:
    """A number as DM writes it: no exponent, no trailing zeros, no negative zero."""
    return "0" if x == 0 else format(x.normalize(), "f")


def _operand(rng: random.Random) -> Decimal:
    """Mostly two-digit integers (learnable), some larger ones and some decimals."""
    kind = rng.random()
    if kind < 0.6:
        return Decimal(rng.randint(-99, 99))
    if kind < 0.8:
        return Decimal(rng.randint(-9999, 9999))
    return Decimal(rng.randint(-99999, 99999)).scaleb(-rng.randint(1, 3))


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    template = rng.choice(
        ["What is {a} plus {b}?", "Add {a} and {b}.", "Sum {a} and {b}.", "Calculate {a} + {b}."]
    )
    return template.format(a=_fmt(a), b=_fmt(b)), _fmt(a + b)


def _subtraction(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    template = rng.choice(
        [
            "What is {a} take away {b}?",
            "What is {a} minus {b}?",
            "Subtract {b} from {a}.",
            "Calculate {a} - {b}.",
        ]
    )
    return template.format(a=_fmt(a), b=_fmt(b)), _fmt(a - b)


def _multiplication(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), Decimal(rng.randint(-12, 12))
    if rng.random() < 0.5:
        a, b = b, a
    template = rng.choice(
        [
            "What is {a} times {b}?",
            "Multiply {a} and {b}.",
            "What is the product of {a} and {b}?",
            "Calculate {a}*{b}.",
        ]
    )
    return template.format(a=_fmt(a), b=_fmt(b)), _fmt(a * b)


_EXPRESSIONS: tuple[tuple[str, Callable[[int, int, int], int]], ...] = (
    ("{a} + {b} - {c}", lambda a, b, c: a + b - c),
    ("{a} - ({b} + {c})", lambda a, b, c: a - (b + c)),
    ("({a} - {b})*{c}", lambda a, b, c: (a - b) * c),
    ("{a}*{b} + {c}", lambda a, b, c: a * b + c),
    ("{a} + {b}*{c}", lambda a, b, c: a + b * c),
)


def _evaluation(rng: random.Random) -> tuple[str, str]:
    a, b, c = (rng.randint(-20, 20) for _ in range(3))
    expression, value = rng.choice(_EXPRESSIONS)
    template = rng.choice(["What is the value of {e}?", "Evaluate {e}.", "What is {e}?"])
    return template.format(e=expression.format(a=a, b=b, c=c)), str(value(a, b, c))


def _linear_equation(rng: random.Random) -> tuple[str, str]:
    """``Solve a*x + b = c for x.`` with an integer solution."""
    variable = rng.choice("abcdfghjklmnpqrstuvwxyz")
    a = rng.choice([n for n in range(-9, 10) if n != 0])
    x, b = rng.randint(-10, 10), rng.randint(-20, 20)
    term = {1: variable, -1: f"-{variable}"}.get(a, f"{a}*{variable}")
    side = term if b == 0 else f"{term} {'+' if b > 0 else '-'} {abs(b)}"
    c = a * x + b
    equation = f"{side} = {c}" if rng.random() < 0.5 else f"{c} = {side}"
    return f"Solve {equation} for {variable}.", str(x)


_QUESTION_KINDS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    _addition,
    _subtraction,
    _multiplication,
    _evaluation,
    _linear_equation,
)
