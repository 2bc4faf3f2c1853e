"""The pre-training QA answer table (``data/lxmert/all_ans.json``, 9500 answers in the release).

Answers are normalised as the released code does (lower case, strip a trailing '.', leading
articles, number words -> digits, 'grey' -> 'gray', ...) before lookup; answers that are not in
the table are pruned (counted by the caller, not silently).
"""

from __future__ import annotations

from .formats import read_all_ans

ANS_CONVERT = {
    "a man": "man", "the man": "man", "a woman": "woman", "the woman": "woman",
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10", "grey": "gray",
}


def convert_ans(ans: str) -> str:
    """Normalise an answer string the way the released pre-training code does."""
    if len(ans) == 0:
        return ""
    ans = ans.lower()
    if ans[-1] == ".":
        ans = ans[:-1].strip()
    for article in ("a ", "an ", "the "):
        if ans.startswith(article):
            ans = ans[len(article):].strip()
    return ANS_CONVERT.get(ans, ans)


class AnswerTable:
    """``all_ans.json`` restricted to answers of ``qa_sets`` (e.g. {"vqa", "gqa"}) if given."""

    def __init__(self, path: str, qa_sets=None):
        self.path = path
        entries = read_all_ans(path)
        if qa_sets is not None:
            qa_sets = {s.strip().lower() for s in qa_sets}
            entries = [e for e in entries if set(e["dsets"]) & qa_sets]
        self.qa_sets = None if qa_sets is None else sorted(qa_sets)
        self.answers: list[str] = [e["ans"] for e in entries]
        self.ans2id: dict[str, int] = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def used(self, ans: str) -> bool:
        return ans in self.ans2id

    def id_of(self, raw_ans: str) -> int | None:
        """Table index of a raw answer after normalisation, or None if pruned."""
        return self.ans2id.get(convert_ans(raw_ans))
