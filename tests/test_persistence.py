"""Save / Load of a widget's configuration: sliders restored, bad files refused with a message."""
import json
import os

import ipywidgets as widgets
import pytest
from torch import nn

from workbench.errors import WorkbenchError
from workbench.plan import LayerPlan, Plan
from workbench.widgets.persistence import (CONFIG_FORMAT_VERSION, MAX_CONFIGURATION_BYTES, SaveLoadBar,
                                           load_configuration, save_configuration)


class RankHost(widgets.VBox):
    """A minimal explorer following the protocol: one rank slider per layer (0 = dense)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sliders = {name: widgets.IntSlider(value=0, min=0, max=min(m.weight.shape), description=name)
                        for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.selected = widgets.Dropdown(options=list(self.sliders))
        super().__init__(list(self.sliders.values()) + [self.selected])

    @property
    def plan(self) -> Plan:
        return Plan({n: LayerPlan("svd", {"rank": s.value}) for n, s in self.sliders.items() if s.value})

    def set_plan(self, plan: Plan) -> None:
        for name, slider in self.sliders.items():
            choice = plan.layers.get(name)
            slider.value = choice["rank"] if choice else 0

    def widget_state(self) -> dict:
        return {"selected": self.selected.value}

    def set_widget_state(self, state: dict) -> None:
        self.selected.value = state["selected"]


def mlp(hidden=32):
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


def test_save_then_load_restores_sliders_and_view_state(tmp_path):
    host = RankHost(mlp())
    bar = SaveLoadBar(host, "config.json", folder=tmp_path)
    host.sliders["0"].value, host.sliders["2"].value = 5, 2
    host.selected.value = "2"
    assert bar.save() and "saved 2 layer setting(s)" in bar.status.value
    host.sliders["0"].value, host.sliders["2"].value, host.selected.value = 9, 0, "0"
    fresh = RankHost(mlp())  # as after a kernel restart
    fresh_bar = SaveLoadBar(fresh, "config.json", folder=tmp_path)
    assert fresh_bar.load(), fresh_bar.status.value
    assert (fresh.sliders["0"].value, fresh.sliders["2"].value, fresh.selected.value) == (5, 2, "2")
    assert fresh.plan == Plan({"0": LayerPlan("svd", {"rank": 5}), "2": LayerPlan("svd", {"rank": 2})})


def test_buttons_call_save_and_load(tmp_path):
    host = RankHost(mlp())
    bar = SaveLoadBar(host, "c.json", folder=tmp_path)
    host.sliders["0"].value = 3
    bar.save_button.click()
    host.sliders["0"].value = 7
    bar.load_button.click()
    assert host.sliders["0"].value == 3


def test_configuration_from_another_model_is_refused_in_the_status(tmp_path):
    save_configuration(tmp_path / "c.json", Plan({"0": LayerPlan("svd", {"rank": 4})}), mlp(32), "mine")
    other = RankHost(mlp(64))
    other.sliders["0"].value = 1
    bar = SaveLoadBar(other, "c.json", folder=tmp_path)
    assert not bar.load()
    assert "not loaded" in bar.status.value and "[32, 16]" in bar.status.value and "[64, 16]" in bar.status.value
    assert other.sliders["0"].value == 1  # nothing changed


def test_missing_layer_is_refused(tmp_path):
    save_configuration(tmp_path / "c.json", Plan({"fc9": LayerPlan("svd", {"rank": 4})}))
    with pytest.raises(WorkbenchError, match=r"names layers \['fc9'\]"):
        load_configuration(tmp_path / "c.json", mlp())


def test_corrupted_and_newer_files_are_refused(tmp_path):
    path = tmp_path / "c.json"
    save_configuration(path, Plan({"0": LayerPlan("svd", {"rank": 4})}), mlp(), "mine")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        load_configuration(path)
    data = json.loads(text)
    data["format_version"] = CONFIG_FORMAT_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(WorkbenchError, match="newer than this workbench"):
        load_configuration(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(WorkbenchError, match="not a configuration"):
        load_configuration(path)


def test_bare_plan_files_load_too(tmp_path):
    plan = Plan({"2": LayerPlan("svd", {"rank": 3})})
    (tmp_path / "plan.json").write_text(plan.to_json())
    loaded, state, _ = load_configuration(tmp_path / "plan.json", mlp())
    assert loaded == plan and state == {}


def test_unwritable_folder_is_reported_not_raised(tmp_path):
    host = RankHost(mlp())
    bar = SaveLoadBar(host, "c.json", folder="/proc/wb-configurations" if os.geteuid() == 0 else "/nonexistent-dir/c")
    assert not bar.save()
    assert "not saved" in bar.status.value


def test_host_without_the_protocol_is_refused():
    with pytest.raises(WorkbenchError, match="set_plan"):
        SaveLoadBar(widgets.VBox())


def test_hosts_with_a_plan_method_work_too(tmp_path):
    class MethodHost(RankHost):
        plan = property(lambda self: (lambda: RankHost.plan.fget(self)))  # plan() as the explorers define it

    host = MethodHost(mlp())
    bar = SaveLoadBar(host, "c.json", folder=tmp_path)
    host.sliders["2"].value = 3
    assert bar.save()
    host.sliders["2"].value = 0
    assert bar.load() and host.sliders["2"].value == 3


def test_dashboard_saves_and_restores_its_sliders(mlp_task, tmp_path):
    dashboard_module = pytest.importorskip("workbench.widgets.dashboard")
    board = dashboard_module.Dashboard(mlp_task, synchronous=True, reference=False)
    assert board.persistence in board.children
    board.persistence.folder, board.persistence.path.value = tmp_path, "board.json"
    board.set_rank("fc2", 12)
    assert board.persistence.save(), board.persistence.status.value
    board.set_rank("fc2", 40)
    assert board.persistence.load(), board.persistence.status.value
    board.coalescer.wait()
    assert board.sliders["fc2"].value == 12
    assert board.plan == Plan({"fc2": LayerPlan("svd", {"rank": 12})})
    assert board.state["plan"] == board.plan  # the readouts were recomputed for the restored plan


# ---------------------------------------------------------------- files stay where they belong
def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


@pytest.mark.parametrize("name", ["../x.json", "/tmp/wb-abs-x.json", "sub/x.json", "x.py", "..\\x.json"])
def test_jupyterlab_bar_refuses_paths_and_writes_nothing(name, tmp_path, monkeypatch):
    work = tmp_path / "notebooks"
    work.mkdir()
    monkeypatch.chdir(work)
    host = RankHost(mlp())
    bar = SaveLoadBar(host, mode="folder")
    assert bar.folder == work / "configurations"
    host.sliders["0"].value = 4
    bar.path.value = name
    assert not bar.save() and "not saved" in bar.status.value and "file name" in bar.status.value
    assert not bar.load() and "not loaded" in bar.status.value
    assert files_under(tmp_path) == [] and not os.path.exists("/tmp/wb-abs-x.json")
    assert host.sliders["0"].value == 4


def test_jupyterlab_bar_saves_in_the_configurations_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    host = RankHost(mlp())
    bar = SaveLoadBar(host, "run.json")
    assert bar.mode == "folder"
    host.sliders["2"].value = 3
    assert bar.save() and "configurations/run.json" in bar.status.value
    assert files_under(tmp_path) == ["configurations/run.json"]
    host.sliders["2"].value = 0
    assert bar.load() and host.sliders["2"].value == 3


def test_jupyterlab_bar_refuses_a_link_out_of_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configurations").mkdir()
    outside = tmp_path / "outside.json"
    save_configuration(outside, Plan({"0": LayerPlan("svd", {"rank": 7})}), mlp())
    before = outside.read_text()
    (tmp_path / "configurations" / "link.json").symlink_to(outside)
    host = RankHost(mlp())
    bar = SaveLoadBar(host, "link.json")
    host.sliders["0"].value = 2
    assert not bar.save() and "outside the folder" in bar.status.value
    assert not bar.load() and "outside the folder" in bar.status.value
    assert outside.read_text() == before and host.sliders["0"].value == 2


def test_a_path_given_by_the_notebook_author_is_refused_too():
    with pytest.raises(WorkbenchError, match="is a path"):
        SaveLoadBar(RankHost(mlp()), "../c.json")


def uploaded(content: bytes, name="c.json", size=None):
    import datetime
    return ({"name": name, "type": "application/json", "size": len(content) if size is None else size,
             "content": memoryview(content), "last_modified": datetime.datetime(2024, 1, 1)},)


def downloaded(bar) -> bytes:
    """The bytes behind the bar's download link (a base64 data URI)."""
    import base64
    import re
    href = re.search(r'href="data:application/json;base64,([^"]+)"', bar.download.value).group(1)
    return base64.b64decode(href)


def test_app_bar_goes_through_the_browser_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_APP", "1")
    host = RankHost(mlp())
    bar = SaveLoadBar(host, "mine.json")
    assert bar.mode == "browser" and bar.upload in bar.children[0].children and bar.download in bar.children
    host.sliders["0"].value, host.sliders["2"].value, host.selected.value = 5, 2, "2"
    assert bar.save() and "nothing is kept on the server" in bar.status.value
    assert 'download="mine.json"' in bar.download.value
    content = downloaded(bar)
    assert json.loads(content)["plan"] == host.plan.to_dict()

    fresh = RankHost(mlp())  # another visitor's kernel, or this one after a restart
    fresh_bar = SaveLoadBar(fresh, mode="browser")
    fresh_bar.upload.value = uploaded(content)  # what the browser's upload does: load() runs
    assert "loaded 2 layer setting(s) from c.json" in fresh_bar.status.value
    assert (fresh.sliders["0"].value, fresh.sliders["2"].value, fresh.selected.value) == (5, 2, "2")
    assert fresh_bar.upload.value == ()  # the content is dropped
    bar.path.value = "../x.json"
    assert not bar.save() and "is a path" in bar.status.value
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("content, size, match", [
    (b"{}", MAX_CONFIGURATION_BYTES + 1, "at most 1,048,576 bytes"),
    (b" " * (MAX_CONFIGURATION_BYTES + 1), None, "at most 1,048,576 bytes"),
    (b'{"kind": "workbench-configuration", "form', None, "not valid JSON"),
    (b"<script>alert(1)</script>", None, "not valid JSON"),
    (json.dumps({"kind": "workbench-configuration", "format_version": 1, "layer_shapes": {"0": [64, 16]},
                 "plan": {"layers": {"0": {"method": "svd", "rank": 4}}}}).encode(), None, "[64, 16]"),
])
def test_bad_uploads_leave_the_sliders_and_disk_alone(content, size, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    host = RankHost(mlp())
    host.sliders["0"].value = 3
    bar = SaveLoadBar(host, mode="browser")
    bar.upload.value = uploaded(content, "<b>bad</b>.json", size)
    status = bar.status.value
    assert "not loaded" in status and match in status, status
    assert "<b>" not in status and "<script>" not in status  # the visitor's text is shown, not rendered
    assert host.sliders["0"].value == 3 and files_under(tmp_path) == [] and bar.upload.value == ()
    assert not bar.load() and "choose a configuration file" in bar.status.value
