"""Checks for the exercises of notebooks 01-03. Each check takes the student's answer (and whatever
the notebook computed that the answer must agree with) and:
  * prints a tick and returns True for a right answer,
  * raises AssertionError with a hint for a wrong answer (tests/test_exercises_*.py feed each check
    the plausible wrong answers and expect this),
  * prints "not answered yet" and returns False for the placeholder `...` (so a notebook with
    unanswered exercises still runs top to bottom).
The solutions are in notebooks/solutions/, out of sight of the exercise cells.
"""
from __future__ import annotations


def unanswered(answer) -> bool:
    """True (and a note is printed) while the answer cell still holds the placeholder `...`."""
    if answer is ...:
        print("not answered yet: replace the ... in the answer cell above, then run this cell again")
        return True
    return False


def ok(message: str) -> bool:
    print("\u2713 " + message)
    return True


# === notebook 01 ===


# === notebook 02 ===


# === notebook 03 ===
