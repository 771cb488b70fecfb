"""The one grading API (sample.py, "Grading"): where a reply's answer is, which \\boxed{} is the
answer, when two answers agree, word-F1 and ROUGE-L. The LongCoT filter (data.py), the evaluation
(sample.py) and the RL rewards (rl.py) all grade with it.

References: math-verify 0.9.0 as a test-only oracle (its box rule and its answer equivalence),
hand-computed F1 / LCS values, and SQuAD's compute_f1 convention for empty answers.
"""
import json
import time

import pytest

import curate
import data
import sample

# ----------------------------------------------------------------------------------------------
# where the answer is, and which box

@pytest.mark.parametrize("text,want", [
    (r"<think>t</think> so \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),     # nested braces
    (r"<think>t</think> \boxed{a{b}}", "a{b}"),                                        # a brace pair inside
    (r"<think>t</think> \boxed{1} or rather \boxed{2}", "2"),                        # several boxes
    (r"<think>\boxed{3}</think> the answer is 3", None),                              # box only in thinking
    (r"<think>\boxed{3}</think> \boxed{4}", "4"),
    (r"<think>a \boxed{3} b</think> so \boxed{4} and more thought", "4"),
    (r"<think>t</think> \boxed{}", ""),                                                # empty box
    (r"<think>t</think> \boxed{12", None),                                             # unclosed
    (r"<think>t</think> \boxed{1} and \boxed{2", "1"),                                 # unclosed last: ignored
    (r"<think>t</think> \boxed{\boxed{1}+1}", "1"),                                    # the box opened last
    (r"<think>t</think> \boxed{1} then \boxed{\boxed{2}+1}", "2"),
    (r"<think>t</think> \boxed{\{1,2\}}", r"\{1,2\}"),                                 # escaped braces
    ("<think>想一想</think> 答案是 \\boxed{五}", "五"),                                 # unicode
    (r"<think>t</think> \boxed 5", None),                                              # \boxed without braces
    (r"<think>t</think> \boxed {5}", None),                                            # nor with a space
    (r"The answer is \boxed{7}.", "7"),                                                # direct mode, no think
    (r"reasoning</think> \boxed{7}", "7"),                                             # <think> in the prompt
    (r"<think> unfinished \boxed{7}", None),                                           # think never closed
    ("<think>t</think> \\boxed{" + "1" * 1000 + "}", "1" * 1000),                      # at the length cap
    ("<think>t</think> \\boxed{" + "1" * 1001 + "}", None),                            # over it
    ("<think>t</think> \\boxed{" + "1" * 1001 + "} \\boxed{2}", "2"),
    ("<think>t</think> \\boxed{2} \\boxed{" + "1" * 1001 + "}", "2"),
])
def test_final_answer(text, want):
    assert sample.final_answer(text) == want


# math-verify's own box rule where it has one (the last \boxed opened whose braces balance, raw
# brace counting, `\boxed{` written together): ours must read the same answer, or none where it
# reads none. (Where it joins several boxes into a set, or reads an unclosed or brace-less box,
# ours differs on purpose: sample.py, "Grading".)
MV_BOX_CASES = [r"\boxed{\frac{1}{\sqrt{2}}}", r"\boxed{a{b}}", r"\boxed{\boxed{1}+1}", r"\boxed{1} and \boxed{2",
                r"\boxed{1} then \boxed{\boxed{2}+1}", r"\boxed{\{1,2\}}", r"\boxed{x \}}", r"\boxed{{5}}",
                r"so \boxed{3}. The answer is \boxed{3}", r"\boxed{}", r"\boxed {5}", r"\boxed{12"]


def test_the_box_rule_is_math_verifys():
    math_verify = pytest.importorskip("math_verify")
    for text in MV_BOX_CASES:
        theirs = math_verify.parse(text)
        ours = sample.last_boxed(text)
        assert (theirs[-1] if theirs else None) == (ours or None), (text, theirs, ours)


def test_split_think_and_the_answer_region():
    assert data.split_think("<think>a</think>b") == ("a", "b")
    assert data.split_think("x <think>a</think> b </think> c") == ("a</think> b ", " c")       # the last close
    assert data.split_think("no tags") is None and data.split_think("<think>open") is None
    assert data.split_think("a</think>b") is None                                              # no thinking to judge
    assert sample.answer_region("<think>a</think>b") == "b" and sample.answer_region("a</think>b") == "b"
    assert sample.answer_region("plain") == "plain" and sample.answer_region("<think>cut off") is None


def test_last_boxed_is_bounded_and_takes_the_last():
    assert sample.last_boxed(r"so \boxed{3} no, \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert sample.last_boxed("no box here") is None
    assert sample.last_boxed(r"\boxed{unclosed {x}") is None
    hostile = "\\boxed{" + "{" * 200_000 + "a" * 200_000
    t0 = time.perf_counter()
    assert sample.last_boxed(hostile) is None
    assert sample.last_boxed(("\\boxed{" * 50_000) + "7}") == "7"
    assert sample.last_boxed("\\boxed{1}" + "}" * 100_000 + "\\boxed{2}") == "2"
    assert time.perf_counter() - t0 < 1.0


def test_last_number():
    assert sample.last_number("3 + 4 = 7, so") == "7" and sample.last_number("7 - 12 = -5") == "-5"
    assert sample.last_number("10 * 100 = 1,000") == "1,000" and sample.last_number("half is 0.50") == "0.50"
    assert sample.last_number("none") is None


# ----------------------------------------------------------------------------------------------
# free-text spelling, word-F1 and ROUGE-L

def test_normalize_answer():
    assert sample.normalize_answer("  The  Top Left. ") == "the top left"
    assert sample.normalize_answer("4.0") == "4" and sample.normalize_answer("$1,000$") == "1000"
    assert sample.normalize_answer(r"\text{Red}") == "red" and sample.normalize_answer("1/2") == "1/2"
    assert sample.answers_match(sample.normalize_answer("4.0"), sample.normalize_answer("4"))
    assert not sample.answers_match(sample.normalize_answer("top left"), sample.normalize_answer("top"))


def close(a, b, tol=1e-9):
    return abs(a - b) < tol


def test_rouge_l_and_word_f1_by_hand():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = the cat on the mat = 5
    assert close(sample.rouge_l("the cat sat on the mat", "The cat is on the mat."), 5 / 6)
    assert close(sample.word_f1("the cat sat on the mat", "The cat is on the mat."), 5 / 6)
    # order matters for ROUGE-L (LCS 1 of 4), not for bag-of-words F1
    assert close(sample.rouge_l("a b c d", "d c b a"), 0.25) and close(sample.word_f1("a b c d", "d c b a"), 1.0)
    # P = 2/2, R = 2/4 -> F = 2/3; punctuation is no word
    assert close(sample.rouge_l("a c", "a b c d"), 2 / 3) and close(sample.word_f1("a c.", "a, b, c, d"), 2 / 3)
    assert sample.rouge_l("", "a") == 0.0 and sample.word_f1("a", "") == 0.0 and sample.rouge_l("x", "y") == 0.0
    assert sample.word_f1("", "") == 1.0 and sample.word_f1("...", "") == 1.0        # SQuAD: both empty = 1
    long = " ".join(f"w{i}" for i in range(1000))                            # capped at 256 words
    assert close(sample.rouge_l(long, long), 1.0)
    assert close(sample.rouge_l(long, " ".join(f"w{i}" for i in range(256))), 1.0)


# ----------------------------------------------------------------------------------------------
# when two answers agree, with math-verify 0.9.0 as the oracle
#
# MV_CASES are (gold, prediction) pairs from huggingface/Math-Verify's own tests (repository at
# 5d148cf): tests/test_all.py (test_number_extraction, test_simple_fraction_notation,
# test_sets_handling, test_latex_notation, test_percent_notation, test_latex_notation_math,
# test_relations_math, test_complex_math_expressions, test_math_extraction_additional_cases,
# test_sqrt_precision, test_symbols), tests/test_strict.py, tests/test_boxed.py and README.md,
# reduced to the contents of the final box. OURS_EQUAL / OURS_DIFFERENT are what our normaliser
# claims to handle (and where it is deliberately stricter than math-verify).

MV_CASES = [
    ("-5", "-5"), ("7425000", "7,425,000"), ("1000", "1 000"), ("1000", "1000.0"), ("1000.0", "1,000.0"),
    ("1000.99", "1000,99"), ("1,22", "1.22"), ("0.4", ".4"), ("1000.99", "1,000.99"), ("1000.99", "$1,000.99"),
    ("0,111", "0.111"), ("2", "AZYUK2A"), ("10/9", r"\frac{10}{9}"), ("-10/9", r"-\frac{10}{9}"),
    ("[0,1)", "[0,1)"), ("[0,9)", "[0,1)"), ("(0,9)", "[0,9)"), ("1", "-[0,1)"),
    ("1/3", r"\frac13"), ("1", r"\frac3{3}"), (r"\sqrt{3}", r"\sqrt3"), ("1/3", r"\cfrac{1}{3}"),
    ("1/3", r"\dfrac{1}{3}"), ("1/3", r"\tfrac{1}{3}"), ("1/3", " 1/3 "),
    ("1/3", r"\left( \frac{1}{3} \right)"),
    ("1/3", r"\boxed{\frac{1}{3}}"), ("1/3", r"\frac{1}{3} \text{meters}"), ("1/3", r"k = \frac{1}{3}"),
    (r"28\%", "28 %"), (r"28\%", "28"), ("0.28", "28"), ("28/100", "28"), ("28", "28/100"),
    (r"\frac{28}{100}", "28"), (r"28*\frac{1}{100}", "28"), ("2-2p", "2-2p"), (r"28\%", r"28\%"),
    (r"14{,}916", "14916"), (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\frac{14}{3}", r"\frac{14}{3}"),
    (r"\text{Evelyn}", r"\text{Evelyn}"), (r"90^\circ", r"90^\circ"), (r"3\sqrt{13}", r"3\sqrt{13}"),
    ("2", "2"),
    (r"15\mbox{ cm}^2", r"15\text{ cm}^2"), ("-2,1", "-2, 1"), ("(6,31,-1)", "(6,31,-1)"),
    (r"1 \pm \sqrt{19}", r"1 \pm \sqrt{19}"),
    (r"\{1\pm\sqrt{5},-2\}", r"\{1\pm\sqrt{5},-2\}"), ("125", r"125\textnormal{ miles}"),
    (r"\sqrt{2}+\sqrt{5}", r"\sqrt 2+\sqrt 5"),
    (r"\frac{9}{4}\pi", r"\frac94\pi"),
    (r"[-1, -\frac{1}{2}) \cup (-\frac{1}{2}, 0)", r"[-1, -\tfrac12) \cup (-\tfrac12, 0)"),
    ("x >= 5", r"x \geq 5"), ("x > 5", "x < 5"), (r"x \leq 5", r"5 \geq x"), ("x = 11", "x = 5+5+1 = 7 =11"),
    ("11", "x=11"), ("k=1", "1"), ("1", "k=1"), ("2x + z = 1", "1"), (r"\frac{1}{12}", "0.0833333333333333"),
    (r"(1,\frac{9}{2})", "(1,4.5)"), (r"\frac{x+2}{7}", r"\frac{x}{7}+\frac{2}{7}"),
    ("(a+5)(b+2)", "(+5)(b+2)"),
    ("2", r"\frac{1+\sqrt{5}}{2}"), (r"1\sqrt{19}", "1"), ("x+2n+1", "x+1"),
    (r"(\frac{3}{5},\frac{8}{3}]", "(0.6,2.6667]"),
    ("(3,1)", "{1,3}"), ("(1,3)", "{1,3}"), ("[-4,0]", "[-4, 0]"), (r"\text{C}", r"\text{(C)}"),
    ("11111111100", r"11,\! 111,\! 111,\! 100"), ("32349", r"32,\! 349"), ("32349", "32, 349"),
    (r"(2, 12) \cup (12, 102)", r"(2,12) \cup (12,102)"), (r"\text{E}", "E"), ("1112112_3", "1112112_3"),
    ("4", r"4\sqrt{2}"), (r"\text{13}", "13"), ("f(x)", "f(y)"), ("004", "004"), ("840", "840"),
    (r"{1,3} \cup {2,4}", "{1,2,3,4}"), ("(-6, 10)", "(-6,10)"),
]
OURS_EQUAL = [
    ("5", "x = 5"), ("x=5", "x = 5.0"), ("1/2", r"\frac{1}{2}"), ("0.5", r"\dfrac{1}{2}"),
    (r"\frac{1}{2}", r"\tfrac12"),
    ("2.5", "2.50"), ("1000", "1,000"), ("1000", "1{,}000"), ("11111111100", r"11,\! 111,\! 111,\! 100"),
    ("28", r"28\%"), (r"28\%", "28%"), ("12.5%", r"12.5\%"), ("90", r"90^\circ"), (r"90^{\circ}", "90"),
    ("C", "(C)"), ("C", r"\text{C}"), (r"\text{(C)}", "C"), (r"\textbf{(B)}", "B"),
    ("(1,2)", r"\left(1, 2\right)"), (r"\{1,2\}", r"\{2,1\}"), ("[0,1)", "[0, 1)"), ("-5", "\u22125"),
    ("-0.5", r"-\frac{1}{2}"), ("-0.5", r"\frac{-1}{2}"), ("5", "$5$"), ("5", r"\$5"),
    (r"\text{Evelyn}", "Evelyn"),
    ("10/9", r"\frac{10}{9}"), ("-10/9", r"-\frac{10}{9}"), ("1/3", r"\frac13"), ("1/3", r"k = \frac{1}{3}"),
    (r"\text{E}", "E"), (r"\text{C}", r"\text{(C)}"), (r"(1,\frac{9}{2})", "(1,4.5)"), ("+5", "5"),
    ("1000", "1000.0"),
    ("0.4", ".4"), ("(5)", "5"), ("32349", r"32,\! 349"), (r"14{,}916", "14916"), ("(-6, 10)", "(-6,10)"),
    (r"\{(1,2),(3,4)\}", r"\{(3,4),(1,2)\}"), ("1/2", r"\frac{2}{4}"), ("-5", "- 5"),
    (r"\sqrt{2}", r"\sqrt{2}"),
    (r"\frac{\pi}{2}", r"\dfrac{\pi}{2}"), ("125 miles", r"125\text{ miles}"),
]
OURS_DIFFERENT = [
    ("(1,2)", r"\{1,2\}"), ("(1,2)", "(2,1)"), ("[0,1]", "(0,1)"), ("32349", "32, 349"), ("1000", "1 000"),
    ("x=1", "y=1"), ("12.5%", "12.5"), ("-3%", "-3"), ("90", "90°"), ("5", "5."), ("4", r"4\sqrt{2}"),
    ("1/3", "0.333"), ("A", "B"), ("C", "c"), ("0.28", r"28\%"), ("1", "-[0,1)"), ("2", "AZYUK2A"),
    ("", ""), ("1", r"1\sqrt{19}"), ("1,2", "2,1"), ("1e3", "1000"), ("1", "x=1=1"),
    # math-verify calls these equal, but not transitively (5.0 != \text{5}, 5.0 != 5%): kept apart
    (r"\mathrm{12}", "12"), (r"\text{5}", "5.0"), ("5%", "5.0"), (r"\text{(5)}", "5"), ("(50%,20%)", "(50,20)"),
]

# A pool of renderings of the same few values: every pair our normaliser calls equal must be
# equal for math-verify, in both orders (this is what found its non-transitive cases above).
POOL = [
    "5", "05", "5.0", "+5", "-5", "\u22125", "x=5", "y=5", "x = 5", r"\text{5}", r"\mathrm{5}", r"\$5", r"5\%", "5%",
    "(5)", "[5]", r"\{5\}", r"\frac{10}{2}", "10/2", r"5^\circ", r"\boxed{5}", r"\left(5\right)", r"5\text{ cm}",
    "1/2", "0.5", ".5", r"\frac12", r"\frac{1}{2}", r"-\frac{1}{2}", r"\frac{-1}{2}", "-0.5", "0.50",
    "(1,2)", "(1, 2)", "[1,2]", "[1,2)", r"\{1,2\}", r"\{2,1\}", "1,2", "2,1", r"\left[1,2\right]",
    "1,000", "1000", "1{,}000", r"1,\!000", r"1\,000", "1 000", "1000.0", "A", "(A)", r"\text{A}", r"\text{(A)}",
    r"\textbf{A}", "a", "(a)", "B", r"\sqrt{2}", r"\frac{\pi}{2}", r"\dfrac{\pi}{2}", r"12.5\%", "12.5",
    r"x=\frac{1}{2}", "k=0.5", r"\{(1,2),(3,4)\}", r"\{(3,4),(1,2)\}", "(1,(2,3))", "(1,(3,2))",
    "1,234", "1, 234", "(1,234)", "1234", r"\text{Evelyn}", "Evelyn", "evelyn", "3.14", "157/50", "-0", "0",
    "(50%, 20%)", "(50,20)", r"\text{(5)}", "5.0%", "x=A", r"\{1,1,2\}", "1,-2", "30^\\circ", "30.0", "30%",
    "5,000", "5, 000", "1.", "1.0", "((1))", r"\text{yes}", "yes", "Yes",
    r"\text{x=5}", r"\text{x = A}", r"\text{a+b}", "a+b", r"\text{A, B}", "A, B", r"\text{Bob, Alice}", "Bob,Alice",
    r"\text{red.}", "red.", "red",                                    # text around structure stays text there
]


@pytest.fixture(scope="module")
def mv_equal():
    math_verify = pytest.importorskip("math_verify")
    cache = {}

    def parsed(s):
        if s not in cache:
            cache[s] = math_verify.parse("\\boxed{" + s + "}")
        return cache[s]
    return lambda gold, pred: bool(math_verify.verify(parsed(gold), parsed(pred)))


def test_normaliser_never_equal_where_math_verify_differs(mv_equal):
    checked = 0
    for gold, pred in MV_CASES + OURS_EQUAL + OURS_DIFFERENT:
        ours = sample.answers_match(pred, gold)
        assert ours == sample.answers_match(gold, pred)                          # symmetric
        if ours:
            assert mv_equal(gold, pred) and mv_equal(pred, gold), (gold, pred)
            checked += 1
    assert checked >= 50


def test_normaliser_classes_are_cliques_for_math_verify(mv_equal):
    equal = [(a, b) for i, a in enumerate(POOL) for b in POOL[i + 1:] if sample.answers_match(a, b)]
    assert len(equal) > 100
    bad = [(a, b) for a, b in equal if not (mv_equal(a, b) and mv_equal(b, a))]
    assert not bad


def test_normaliser_gets_the_cases_it_claims(mv_equal):
    for gold, pred in OURS_EQUAL:
        assert sample.answers_match(pred, gold), (gold, pred)
    for gold, pred in OURS_DIFFERENT:
        assert not sample.answers_match(pred, gold), (gold, pred)
    # the math-verify suite's pairs it calls different stay different for us
    assert not any(sample.answers_match(p, g) for g, p in MV_CASES if not mv_equal(g, p))


# ----------------------------------------------------------------------------------------------
# hostile replies: every function here is linear

HOSTILE = {
    "boxed_open_x100k": "\\boxed{" * 100000,
    "open_brace_1M": "{" * 10 ** 6,
    "close_brace_1M": "}" * 10 ** 6,
    "think_x100k": "<think>" * 10 ** 5,
    "box_then_1M_braces": "\\boxed{" + "{" * 10 ** 6,
    "box_escaped_braces": "<think>t</think>\\boxed{" + "\\{" * 500000,
    "boxes_1M": "<think>t</think>" + "\\boxed{1}" * 110000,
    "long_thinking_numbers": "<think>" + " 1" * 500000 + "</think>\\boxed{1}",
    "nested_wrappers": "<think>t</think>\\boxed{" + "\\text{" * 140 + "(" * 100 + "1" + ")" * 100 + "}" * 140 + "}",
    # Python refuses int <-> text past 4,300 digits: these raised ValueError, not scored 0
    "digits_5000_thinking": "<think>" + "1" * 5000 + "</think>\\boxed{red}",
    "thousands_8000_thinking": "<think>1" + ",111" * 2000 + "</think>\\boxed{red}",
    "digits_5000_box": "<think>t</think>\\boxed{" + "1" * 5000 + "}",
    "percent_5000_box": "<think>t</think>\\boxed{" + "1" * 5000 + "\\%}",
    "ratio_8000_digits_box": "<think>t</think>\\boxed{" + "1" * 4000 + "/." + "0" * 4000 + "1}",
}
API = {"final_answer": sample.final_answer, "split_think": data.split_think, "last_number": sample.last_number,
       "match": lambda s: sample.answers_match(sample.final_answer(s) or "", "1"), "word_f1": lambda s: sample.word_f1(s, s),
       "rouge_l": lambda s: sample.rouge_l(s, s), "normalize": lambda s: sample.normalize_answer(s[:2000])}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs_are_fast(name):
    for kind, fn in API.items():
        t = min(timed(fn, HOSTILE[name]) for _ in range(2))
        assert t < 0.5, (name, kind, t)


def timed(fn, text):
    t = time.perf_counter()
    fn(text)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# the LongCoT filter grades with the same API (its old cases: tests/test_data.py::test_clean_longcot)

def test_longcot_filter_reads_boxes_and_answers_with_the_api(tmp_path):
    conv = lambda a, **kw: {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}], **kw}  # noqa: E731
    rows = [conv("<think>two plus two</think>\\boxed{4.0}", answer="4"),           # agrees: kept as written
            conv("<think>two plus two</think>\\boxed{5}", answer="4"),             # disagrees: wrong_answer
            conv("<think>two plus two</think>It is \\boxed{4", answer="4"),        # unclosed: the box is added
            conv("<think>two plus two</think>It is \\boxed{4")]                    # unclosed, no answer: format
    got = []
    for i, row in enumerate(rows):
        try:
            got.append(curate.format_longcot(row, f"m.jsonl:{i + 1}")["conversations"][1]["value"])
        except data.DataError as e:
            got.append(e.reason)
    assert got == ["<think>\ntwo plus two\n</think>\n\\boxed{4.0}", "wrong_answer",
                   "<think>\ntwo plus two\n</think>\nIt is \\boxed{4 The answer is \\boxed{4}.", "format"]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({**r, "conversations": [
        {"from": "human", "value": f"q{i}"}, r["conversations"][1]]}) + "\n" for i, r in enumerate(rows)))
    stats = curate.clean_longcot(tmp_path / "m.jsonl", tmp_path / "out.jsonl", balance=False, progress=False)
    assert stats["kept"] == 2 and stats["bad:wrong_answer"] == 1 and stats["bad:format"] == 1


# ----------------------------------------------------------------------------------------------
# edges of the answer region and of the number parser

def test_the_answer_region_follows_the_last_think_close():
    """A reply whose thinking itself writes `</think>` (or that closes twice): the answer is after
    the LAST close, so a box between the two closes is thinking, not the answer."""
    reply = r"<think>a</think> maybe \boxed{3} </think> so \boxed{4}"
    assert sample.answer_region(reply) == r" so \boxed{4}"
    assert sample.final_answer(reply) == "4"
    assert sample.final_answer(r"<think>a</think> \boxed{3} </think> no box") is None
    assert sample.extract_answer("count", "<think>x</think> 3 </think> there are 5", "5") == "5"


def test_a_zero_denominator_is_text_not_a_crash():
    """`1/0` and `\\frac{1}{0}` are no numbers: compared as text (equal only to the same text),
    never a ZeroDivisionError out of the grader."""
    assert sample.parse_number("1/0") is None and sample.parse_number(r"\frac{1}{0}") is None
    assert sample.answers_match("1/0", "1/0")
    assert not sample.answers_match("1/0", "2/0") and not sample.answers_match(r"\frac{1}{0}", "1")
    assert sample.normalize_answer("1/0") == "1/0"
    assert sample.score("math", r"\boxed{1/0}", "", "1") == (False, "1/0")
