"""Answer equivalence as the math_verify reward judges it: a table of (predicted, gold, verdict).

Each verdict is the mathematically right one for a grader of final answers; the cases follow
the answer forms of GSM8K and MATH500 (see ../shared/data).
"""
import pytest

from rewards.math import answers_match, final_answer, math_verify_reward

T, F = True, False

NUMBERS = [
    ("42", "42", T), ("42.0", "42", T), ("42", "43", F), ("-7", "-7", T), ("7", "-7", F), ("-3", "3", F),
    ("1,000", "1000", T), ("1,080", "1080", T), ("10080", "10,\\!080", T),
    ("11,111,111,100", "11,\\! 111,\\! 111,\\! 100", T), ("18.00", "18", T), ("0", "0.0", T), ("-0", "0", T),
    ("5.", "5", T), ("3.21", "3.210", T), ("3.21", "3.2", F), ("2^{10}", "1024", T), ("10^{-2}", "0.01", T),
    ("6.72 \\times 10^{-5}", ".0000672", T),
]
FRACTIONS_AND_DECIMALS = [
    ("0.5", "\\frac{1}{2}", T), ("\\frac{1}{2}", "0.5", T), ("1/2", "\\frac{1}{2}", T), ("\\frac12", "\\frac{1}{2}", T),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", T), ("\\tfrac{1}{2}", "1/2", T), ("2/4", "\\frac{1}{2}", T),
    ("\\frac{1}{2}.", "\\frac{1}{2}", T), ("0.33", "\\frac{1}{3}", F), ("0.333333", "\\frac{1}{3}", T),
    ("\\frac{2}{3}", "\\frac{3}{2}", F), (".35625", "0.35625", T), ("1.25", "\\frac{5}{4}", T),
    ("1\\frac{4}{5}", "\\frac{9}{5}", T), ("137 \\frac{1}{2}", "137.5", T), ("3.5", "7/2", T), ("7/2", "3.5", T),
]
PERCENTAGES = [
    ("50\\%", "50", T), ("50\\%", "0.5", T), ("50%", "50", T), ("25\\%", "50", F),
]
UNITS = [
    ("10 \\text{ cm}", "10", T), ("15\\mbox{ cm}^2", "15", T), ("864 \\mbox{ inches}^2", "864", T),
    ("5.4 \\text{ cents}", "5.4", T), ("\\$32,\\!348", "32348", T), ("\\$18.90", "18.9", T), ("\\$36", "36", T),
    ("$18", "18", T), ("90^\\circ", "90", T), ("90", "90^\\circ", T), ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", T),
    ("12 dollars", "12", T), ("12 apples", "12", T), ("\\frac{1}{2} \\text{ cup}", "0.5", T),
    ("52_8", "52_8", T), ("4210_{5}", "4210_5", T),
]
LATEX_FORMS = [
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", T), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", T),
    ("3\\sqrt{13}", "3 \\sqrt{13}", T), ("\\sqrt{52}", "2\\sqrt{13}", T), ("\\sqrt{51}", "\\sqrt{52}", F),
    ("2\\sqrt{2}", "\\sqrt{8}", T), ("\\sqrt[3]{8}", "2", T), ("\\log_2 8", "3", T),
    ("2\\pi", "2 \\pi", T), ("\\pi", "3.14159", F), ("6.28", "2\\pi", F), ("18+2\\pi", "2\\pi + 18", T),
    ("6-5i", "6 - 5i", T), ("-5i+6", "6-5i", T), ("6+5i", "6-5i", F),
    ("x^3+3x-6", "x^3 + 3x - 6", T), ("3x - 6 + x^3", "x^3+3x-6", T), ("x^2", "x^3", F),
    ("(a+5)(b+2)", "ab+2a+5b+10", T), ("\\cot x", "\\frac{\\cos x}{\\sin x}", T), ("p - q", "-q + p", T),
    ("p + q", "p - q", F), ("\\infty", "\\infty", T), ("-\\infty", "\\infty", F),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}", T),
    ("\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", F),
    ("x=5", "5", T), ("5", "x=5", T), ("y = 2x + 3", "y=2x+3", T), ("y = 2x + 3", "y = 3x + 2", F),
]
INTERVALS = [
    ("(2,\\infty)", "(2, \\infty)", T), ("(2,\\infty)", "[2,\\infty)", F), ("(3,4]", "(3, 4]", T), ("(3,4]", "(3,4)", F),
    ("(-\\infty, 0]", "(-\\infty,0]", T), ("(0,9) \\cup (9,36)", "(0,9)\\cup(9,36)", T),
    ("(9,36) \\cup (0,9)", "(0,9) \\cup (9,36)", T), ("x \\in [-2,7]", "[-2,7]", T), ("[-2,7]", "x \\in [-2,7]", T),
    ("\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]", "[\\pi^2/8, 5\\pi^2/4]", T),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty, 2] \\cup (3, \\infty)", F),
]
TUPLES_AND_SETS = [
    ("(6,31,-1)", "(6, 31, -1)", T), ("(6,31,-1)", "(6,-1,31)", F), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", T),
    ("(15,-29)", "(-29,15)", F), ("(1,-16,-4,43)", "(1, -16, -4, 43)", T), ("((1,2)", "(1,2)", F),
    # A gold list of solutions is unordered; an ordered gold tuple is not.
    ("1,-2", "-2, 1", T), ("3, 5, 7", "7, 5, 3", T), ("3, 5", "3, 5, 7", F), ("2, 1", "1,2", T),
    ("(3,2,1)", "1,2,3", T), ("3,2,1", "(1,2,3)", F), ("1,2,3", "(1,2,3)", T), ("\\{1,2\\}", "\\{2,1\\}", T),
    ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1+\\sqrt{5}, 1-\\sqrt{5}\\}", T), ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", T),
]
TEXT = [
    ("\\text{Evelyn}", "Evelyn", T), ("Evelyn", "\\text{Evelyn}", T), ("evelyn", "\\text{Evelyn}", T),
    ("\\text{Navin}", "\\text{Evelyn}", F), ("\\text{(C)}", "C", T), ("(C)", "\\text{(C)}", T), ("C", "\\text{(E)}", F),
    ("\\text{east}", "east", T), ("\\text{even}", "\\text{odd}", F), ("\\text{ellipse}", "ellipse", T),
    ("Monday", "Tuesday", F), ("\\text{5}", "5", T),
]
MALFORMED_AND_EMPTY = [
    ("", "5", F), ("   ", "5", F), ("\\frac{1}{", "\\frac{1}{2}", F), ("}{", "5", F), ("no answer", "5", F),
    ("\\boxed{}", "5", F), ("NaN", "5", F), ("\\frac{1}{0}", "5", F), ("x", "5", F), ("2+", "2", F),
]
CASES = (NUMBERS + FRACTIONS_AND_DECIMALS + PERCENTAGES + UNITS + LATEX_FORMS + INTERVALS + TUPLES_AND_SETS
         + TEXT + MALFORMED_AND_EMPTY)


def test_table_is_large_and_has_both_verdicts():
    assert len(CASES) >= 100 and len({(p, g) for p, g, _ in CASES}) == len(CASES)
    assert sum(e for *_, e in CASES) > 30 and sum(not e for *_, e in CASES) > 30


@pytest.mark.parametrize("predicted,gold,expected", CASES, ids=[f"{p!r}~{g!r}" for p, g, _ in CASES])
def test_answer_equivalence(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


COMPLETIONS = [
    # (completion, gold, answer_fallback, expected reward)
    ("so the total is \\boxed{\\frac{1}{2}}.", "0.5", "none", 1.0),
    ("first \\boxed{3}, on reflection \\boxed{4}", "4", "none", 1.0),  # the last box counts
    ("first \\boxed{3}, on reflection \\boxed{4}", "3", "none", 0.0),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", "none", 1.0),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", "none", 1.0),  # GSM8K-style final line
    ("She pays 1,200 dollars in all.\n#### 1,200", "1200", "none", 1.0),
    ("The answer is 72.", "72", "none", 0.0),  # no box, strict format
    ("The answer is 72.", "72", "last_number", 1.0),
    ("We get 3 then 72 apples", "72", "last_number", 1.0),
    ("We get 72 then 3 apples", "72", "last_number", 0.0),
    ("The final answer is $\\frac{3}{4}$", "0.75", "math_verify", 1.0),
    ("The final answer is $\\frac{3}{4}$", "0.75", "last_number", 0.0),  # last number is 4
    ("", "5", "last_number", 0.0),
    ("\\boxed{", "5", "last_number", 0.0),  # unclosed box: its content is not an answer
    ("I cannot solve this.", "5", "last_number", 0.0),
    ("\\boxed{}", "5", "math_verify", 0.0),
]


@pytest.mark.parametrize("completion,gold,fallback,expected", COMPLETIONS)
def test_math_verify_reward_on_completions(completion, gold, fallback, expected):
    assert math_verify_reward(completion, gold, answer_fallback=fallback) == expected


def test_unknown_fallback_is_refused():
    with pytest.raises(ValueError, match="last_number"):
        final_answer("\\boxed{1}", "first_number")
