"""How the CLI's REST client words FastAPI's 422 details (``services.control.client.validation_problem``)."""

from services.control.client import validation_problem


def test_nested_field_path_message_and_value():
    d = {"type": "extra_forbidden", "loc": ["body", "algorithm_params", "beta_typo"],
         "msg": "Extra inputs are not permitted (algorithm 'hg_dagger' takes: lr)", "input": 0.5}
    assert validation_problem(d) == ("algorithm_params.beta_typo: extra inputs are not permitted "
                                     "(algorithm 'hg_dagger' takes: lr) (got 0.5)")


def test_list_index_query_and_whole_body_paths():
    assert validation_problem({"type": "string_pattern_mismatch", "loc": ["body", "tasks", 0], "msg": "String should match",
                               "input": "a b"}).startswith("tasks.0: string should match (got 'a b')")
    assert validation_problem({"type": "value_error", "loc": ["query", "after"], "msg": "Value error, after='9-9' is out",
                               "input": "9-9"}) == "after: after='9-9' is out"  # value already quoted: not repeated
    assert validation_problem({"type": "value_error", "loc": ["body"], "msg": "Value error, bad", "input": {"a": 1}}) == "body: bad"


def test_missing_field_and_invalid_json():
    assert validation_problem({"type": "missing", "loc": ["body", "tasks"], "msg": "Field required", "input": {}}) == \
        "tasks: field required"
    assert validation_problem({"type": "json_invalid", "loc": ["body", 1], "msg": "JSON decode error",
                               "ctx": {"error": "Expecting property name"}}) == \
        "body: invalid JSON at character 1 (Expecting property name)"
