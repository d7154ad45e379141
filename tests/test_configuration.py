"""The compute half of "Save this configuration": file names kept inside their folder, strict
parsing of configuration JSON (size, syntax, schema, model), and the web-app switch."""
import json

import pytest
from torch import nn

from workbench.errors import WorkbenchError
from workbench.plan import LayerPlan, Plan
from workbench.widgets.configuration import (CONFIG_FOLDER, MAX_CONFIGURATION_BYTES, check_name,
                                             configuration_file, configuration_text, in_app,
                                             parse_configuration)


def mlp(hidden=32):
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


PLAN = Plan({"0": LayerPlan("svd", {"rank": 5}), "2": LayerPlan("svd", {"rank": 2})})


@pytest.mark.parametrize("name", ["config.json", "my run 3.json", "a-b_c.v2.json", "X" * 123 + ".json"])
def test_plain_json_names_are_accepted(name, tmp_path):
    assert check_name(name) == name
    assert configuration_file(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize("name, match", [
    ("../x.json", "is a path"), ("..", "is a path"), ("/etc/x.json", "is a path"), ("sub/x.json", "is a path"),
    ("sub\\x.json", "is a path"), ("C:x.json", "is a path"), ("x.txt", "must end with '.json'"),
    ("x.json.py", "must end with '.json'"), (".hidden.json", "must not start with '.'"),
    ("a\x00b.json", "letters, digits"), ("$(rm).json", "letters, digits"), ("X" * 124 + ".json", "128 characters"),
    ("", "empty"), (None, "empty"),
])
def test_paths_and_odd_names_are_refused(name, match, tmp_path):
    with pytest.raises(WorkbenchError, match=match.replace("(", r"\(").replace(")", r"\)")):
        configuration_file(tmp_path / CONFIG_FOLDER, name)


def test_a_link_out_of_the_folder_is_refused_one_inside_is_not(tmp_path):
    folder = tmp_path / CONFIG_FOLDER
    folder.mkdir()
    (tmp_path / "secret.json").write_text("{}")
    (folder / "out.json").symlink_to(tmp_path / "secret.json")
    (folder / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (folder / "real.json").write_text("{}")
    (folder / "in.json").symlink_to(folder / "real.json")
    with pytest.raises(WorkbenchError, match="outside the folder"):
        configuration_file(folder, "out.json")
    with pytest.raises(WorkbenchError, match="outside the folder"):
        configuration_file(folder, "dangling.json")
    assert configuration_file(folder, "in.json") == folder / "in.json"


def test_text_round_trips_through_the_strict_parser():
    text = configuration_text(PLAN, mlp(), "mine", {"layer": "2"})
    plan, state, data = parse_configuration(text.encode(), mlp())
    assert plan == PLAN and state == {"layer": "2"}
    assert data["layer_shapes"] == {"0": [32, 16], "2": [4, 32]} and data["model"] == "mine"


def good() -> dict:
    return json.loads(configuration_text(PLAN, mlp(), "mine"))


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"kind": "workbench-configuration", "form', "not valid JSON"),
    (b"__import__('os').system('touch pwned')", "not valid JSON"),
    (b"[1, 2]", "holds a list"),
    (b'{"kind": "workbench-configuration", "kind": "x"}', "more than once"),
    (b'{"kind": "something-else"}', "not a workbench configuration"),
])
def test_malformed_content_is_refused(content, match):
    with pytest.raises(WorkbenchError, match=match):
        parse_configuration(content, source="c.json")


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda d: d.update(format_version=2), "newer than this workbench"),
    (lambda d: d.update(format_version=True), "format_version=True"),
    (lambda d: d.update(format_version="1"), "format_version='1'"),
    (lambda d: d.update(model=["x"]), "'model' must be a name"),
    (lambda d: d.update(layer_shapes={"0": "32x16"}), "'layer_shapes' must map"),
    (lambda d: d.update(state={"layer": {"nested": 1}}), "'state' must map"),
    (lambda d: d.update(plan=[1]), "'plan' must be an object"),
    (lambda d: d["plan"].update(code="print(1)"), r"unknown keys \['code'\]"),
    (lambda d: d["plan"].update(layers=[]), "'layers' must be an object"),
    (lambda d: d["plan"]["layers"].update({"0": "svd"}), "must be an object with a 'method'"),
    (lambda d: d["plan"]["layers"].update({"0": {"method": "svd", "rank": {"a": 1}}}), r"settings \['rank'\]"),
])
def test_schema_violations_are_refused(change, match):
    data = good()
    change(data)
    with pytest.raises(WorkbenchError, match=match):
        parse_configuration(json.dumps(data), mlp())


def test_nan_and_infinity_are_refused():
    text = json.dumps(good()).replace('"rank": 5', '"rank": NaN')
    with pytest.raises(WorkbenchError, match="NaN is not allowed"):
        parse_configuration(text)


def test_oversized_content_is_refused_before_parsing():
    padding = " " * MAX_CONFIGURATION_BYTES
    with pytest.raises(WorkbenchError, match="at most 1,048,576 bytes"):
        parse_configuration(json.dumps(good()) + padding)
    parse_configuration(json.dumps(good()) + " " * 100)  # whitespace alone is fine below the limit


def test_a_configuration_for_another_model_is_refused():
    with pytest.raises(WorkbenchError, match=r"\[32, 16\].*\[64, 16\]|\[64, 16\].*\[32, 16\]"):
        parse_configuration(json.dumps(good()), mlp(64))


def test_app_detection_follows_the_environment():
    assert in_app({"WORKBENCH_APP": "1"}) and in_app({"VOILA_REQUEST_URL": "http://127.0.0.1:8866/"})
    assert not in_app({}) and not in_app({"WORKBENCH_APP": "0", "VOILA_SERVER_URL": ""})
