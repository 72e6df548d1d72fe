"""Verifiable-reward tasks: every checker on correct / wrong / malformed answers, JSONL datasets with
bad lines and a custom reward module, the registry, and safe_score with a broken verifier."""

import json
import logging
import sys

import numpy as np
import pytest

from fleetloop.errors import InvalidArgument
from fleetloop.llm_tasks import (Prompt, Task, exact_match, extract_answer, make_task, normalise, parse_numbers,
                                 safe_score)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_extract_answer_and_normalise():
    assert extract_answer("blah\nAnswer: 42") == "42"
    assert extract_answer("Answer: 1\nmore text\nanswer :  7. ") == "7"
    assert extract_answer("**Answer:** `olleh`.") == "olleh"
    assert extract_answer("Answer:\n\n  12\n") == "12"
    assert extract_answer('ANSWER: "abc"!') == "abc"
    assert extract_answer("Answer:") == ""
    assert extract_answer("no marker 5") is None
    assert normalise("  The  Cat. ") == "the cat"
    assert parse_numbers("3 + 4 = 7, x-2 and -5, 7.0 and 2.5") == [3, 4, 7, 2, -5, 7.0, 2.5]
    assert parse_numbers("10-3") == [10, 3]


def test_builtins_sample_valid_prompts():
    for name in ("arith", "reverse", "sort", "count"):
        task = make_task(name, {})
        assert isinstance(task, Task) and task.name == name and task.failure_score == 0.0
        seen = set()
        for i in range(50):
            p = task.sample(rng(i))
            assert isinstance(p, Prompt) and p.task == name and "Answer:" in p.text and p.answer
            assert p.messages == [{"role": "user", "content": p.text}]
            assert task.score(p, f"Answer: {p.answer}") == 1.0
            assert task.score(p, f"Let me think.\n**Answer:** {p.answer}.\n") == 1.0
            seen.add(p.id)
        assert len(seen) > 10  # ids are content hashes: varied prompts, stable ids
        assert task.sample(rng(3)).id == task.sample(rng(3)).id


def _prompt(task, **meta_answer):
    t = make_task(task, {})
    for i in range(500):
        p = t.sample(rng(i))
        if all(p.meta.get(k) == v for k, v in meta_answer.items()):
            return t, p
    raise AssertionError("no such prompt")


def test_arith_checker():
    t = make_task("arith", {"digits": 2, "ops": "-"})
    p = Prompt(id="x", task="arith", text="What is 3 - 10?", answer="-7")
    assert t.score(p, "Answer: -7") == 1.0
    assert t.score(p, "3 - 10 = -7\nAnswer: 3 - 10 = -7.") == 1.0  # last number of the segment
    assert t.score(p, "Answer: -7.0") == 1.0
    assert t.score(p, "Answer: 7") == 0.0
    assert t.score(p, "Answer: -7.5") == 0.0
    assert t.score(p, "Answer: minus seven") == 0.0
    assert t.score(p, "The result is -7.") == 1.0          # no marker: last number of the text
    assert t.score(p, "") == 0.0
    assert make_task("arith", {"strict_format": True}).score(p, "The result is -7.") == 0.0
    credit = make_task("arith", {"format_credit": 0.1})
    assert credit.score(p, "Answer: 5") == 0.1 and credit.score(p, "5") == 0.0 and credit.score(p, "Answer: -7") == 1.0
    for i in range(100):
        q = make_task("arith", {"ops": "+-*", "digits": 3}).sample(rng(i))
        a, b, op = q.meta["a"], q.meta["b"], q.meta["op"]
        assert 0 <= a < 1000 and 0 <= b < 1000
        assert int(q.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]


def test_reverse_checker():
    t = make_task("reverse", {"min_len": 5, "max_len": 5})
    p = t.sample(rng(1))
    word = p.meta["word"]
    assert len(word) == 5 and p.answer == word[::-1] and f'"{word}"' in p.text
    assert t.score(p, f"Answer: {word[::-1].upper()}") == 1.0
    assert t.score(p, f"Answer: '{' '.join(word[::-1])}'") == 1.0   # spaces between letters tolerated
    assert t.score(p, f"Answer: {word}") == 0.0 or word == word[::-1]
    assert t.score(p, f"The reversed string is {word[::-1]}.") == 1.0   # fallback: last word of last line
    assert t.score(p, "Answer:") == 0.0
    assert t.score(p, "") == 0.0


def test_sort_checker():
    t = make_task("sort", {"min_n": 4, "max_n": 4, "lo": -5, "hi": 5})
    p = Prompt(id="s", task="sort", text="Sort these numbers in ascending order: 3, -2, 5, 0.", answer="-2, 0, 3, 5")
    assert t.score(p, "Answer: -2, 0, 3, 5") == 1.0
    assert t.score(p, "Answer: [-2,0,3,5].") == 1.0
    assert t.score(p, "Answer: -2 0 3 5") == 1.0
    assert t.score(p, "Answer: 0, -2, 3, 5") == 0.0     # wrong order
    assert t.score(p, "Answer: -2, 0, 3") == 0.0         # missing one
    assert t.score(p, "Answer: -2, 0, 3, 5, 5") == 0.0   # extra one
    assert t.score(p, "Answer: none") == 0.0
    assert t.score(p, "sorted:\n-2, 0, 3, 5\nDone") == 1.0  # fallback: last line with numbers
    q = t.sample(rng(2))
    assert [int(x) for x in q.answer.split(",")] == sorted(q.meta["numbers"]) and len(q.meta["numbers"]) == 4


def test_count_checker():
    t = make_task("count", {})
    for i in range(50):
        p = t.sample(rng(i))
        assert int(p.answer) == p.meta["word"].count(p.meta["letter"])
        assert t.score(p, f"Answer: {p.answer}") == 1.0
        assert t.score(p, f"Answer: {int(p.answer) + 1}") == 0.0
    p = Prompt(id="c", task="count", text="...", answer="3")
    assert t.score(p, "There are three.") == 0.0 and t.score(p, "Answer: 3 times") == 1.0


def test_make_task_errors():
    with pytest.raises(InvalidArgument, match=r"unknown task 'nope'.*arith.*count.*jsonl.*reverse.*sort"):
        make_task("nope", {})
    with pytest.raises(InvalidArgument, match=r"task_params\.digits"):
        make_task("arith", {"digits": 0})
    with pytest.raises(InvalidArgument, match=r"task_params\.ops") as ei:
        make_task("arith", {"ops": "+/"})
    assert "'/'" in str(ei.value)
    with pytest.raises(InvalidArgument, match=r"task_params\.colour"):
        make_task("reverse", {"colour": 1})
    with pytest.raises(InvalidArgument, match=r"task_params\.path"):
        make_task("jsonl", {})


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_jsonl_default_reward_and_chat_prompts(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        {"prompt": "Capital of France?", "answer": "Paris"},
        "",
        {"id": "q2", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
         "answer": 4, "meta": {"src": "x"}},
    ])
    t = make_task("jsonl", {"path": path, "name": "geo"})
    assert len(t) == 2 and t.name == "geo"
    p1, p2 = t.prompts
    assert p1.id == "geo-1" and p1.text == "Capital of France?" and p1.answer == "Paris"
    assert p2.id == "q2" and p2.text == "2+2?" and p2.messages[0]["role"] == "system" and p2.meta == {"src": "x", "line": 3}
    assert t.score(p1, "Answer: paris.") == 1.0
    assert t.score(p1, "I think\nParis") == 1.0          # fallback: last non-empty line
    assert t.score(p1, "Answer: Lyon") == 0.0
    assert t.score(p2, "Answer: 4.0") == 1.0             # numerically equal
    assert t.sample(rng(0)) in t.prompts
    assert exact_match("Paris", "Paris", strict_format=True) == 0.0


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "answer": "b"}', "{not json"], r"line 2"),
    (['{"prompt": "a"}'], r"line 1: answer"),
    (['{"answer": "b"}'], r"line 1: prompt"),
    (['{"prompt": "", "answer": "b"}'], r"line 1: prompt"),
    (['{"prompt": [{"role": "user"}], "answer": "b"}'], r"line 1: prompt"),
    (['{"prompt": "a", "answer": null}'], r"line 1: answer"),
    (['[1, 2]'], r"line 1"),
    ([""], r"no prompts"),
])
def test_jsonl_bad_lines(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgument, match=match):
        make_task("jsonl", {"path": str(path)})


def test_jsonl_missing_file_and_custom_fields(tmp_path):
    with pytest.raises(InvalidArgument, match="path"):
        make_task("jsonl", {"path": str(tmp_path / "none.jsonl")})
    path = _write(tmp_path / "c.jsonl", [{"q": "x?", "a": "y"}])
    t = make_task("jsonl", {"path": path, "prompt_field": "q", "answer_field": "a"})
    assert t.prompts[0].text == "x?" and t.score(t.prompts[0], "Answer: Y") == 1.0
    with pytest.raises(InvalidArgument, match=r"line 1: prompt"):
        make_task("jsonl", {"path": path})


def test_jsonl_custom_reward_module(tmp_path, monkeypatch):
    mod = tmp_path / "my_reward_mod.py"
    mod.write_text("def contains(prompt_text, completion_text, answer):\n"
                   "    return 1.0 if answer in completion_text else 0.25\n"
                   "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write(tmp_path / "d.jsonl", [{"prompt": "say hi", "answer": "hi"}])
    t = make_task("jsonl", {"path": path, "reward": "my_reward_mod:contains"})
    p = t.prompts[0]
    assert t.score(p, "well hi there") == 1.0 and t.score(p, "nope") == 0.25
    with pytest.raises(InvalidArgument, match="reward"):
        make_task("jsonl", {"path": path, "reward": "my_reward_mod:missing"})
    with pytest.raises(InvalidArgument, match="reward"):
        make_task("jsonl", {"path": path, "reward": "my_reward_mod:NOT_CALLABLE"})
    with pytest.raises(InvalidArgument, match="reward"):
        make_task("jsonl", {"path": path, "reward": "no_such_module_xyz:f"})
    with pytest.raises(InvalidArgument, match="reward"):
        make_task("jsonl", {"path": path, "reward": "nocolon"})
    sys.modules.pop("my_reward_mod", None)


class Broken:
    name = "broken"
    failure_score = 0.0

    def __init__(self, value=None, exc=None):
        self.value, self.exc = value, exc

    def sample(self, rng):
        return Prompt(id="b1", task="broken", text="t", answer="a")

    def score(self, prompt, completion_text):
        if self.exc is not None:
            raise self.exc
        return self.value


def test_safe_score_never_raises(caplog):
    p = Broken().sample(None)
    caplog.set_level(logging.WARNING, logger="fleetloop")
    logger = logging.getLogger("fleetloop")
    logger.addHandler(caplog.handler)
    try:
        assert safe_score(Broken(exc=RuntimeError("boom")), p, "x", {"job": "j", "actor": "a1", "name": "n", "level": 3}) == (0.0, False)
        assert "event=verifier_error" in caplog.text and "boom" in caplog.text and "actor=a1" in caplog.text
        assert "prompt_id=b1" in caplog.text
        assert safe_score(Broken(value=float("nan")), p, "x") == (0.0, False)
        assert safe_score(Broken(value=float("inf")), p, "x") == (0.0, False)
        assert safe_score(Broken(value="abc"), p, "x") == (0.0, False)
        assert safe_score(Broken(value=None), p, "x") == (0.0, False)
        assert safe_score(Broken(value=0.5), p, "x") == (0.5, True)
        assert safe_score(Broken(value=True), p, "x") == (1.0, True)
        b = Broken(exc=ValueError("bad"))
        b.failure_score = -1.0
        assert safe_score(b, p, "x") == (-1.0, False)
    finally:
        logger.removeHandler(caplog.handler)
    t = make_task("arith", {})
    q = t.sample(rng(0))
    assert safe_score(t, q, f"Answer: {q.answer}") == (1.0, True)


def test_range_params_name_the_field():
    with pytest.raises(InvalidArgument, match=r"task_params\.max_len.*min_len"):
        make_task("reverse", {"min_len": 5, "max_len": 3})
    with pytest.raises(InvalidArgument, match=r"task_params\.max_len"):
        make_task("count", {"min_len": 5, "max_len": 3})
    with pytest.raises(InvalidArgument, match=r"task_params\.max_n"):
        make_task("sort", {"min_n": 5, "max_n": 3})
    with pytest.raises(InvalidArgument, match=r"task_params\.hi"):
        make_task("sort", {"lo": 5, "hi": 3})
