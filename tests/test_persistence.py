"""Save / Load of a widget's configuration: sliders restored, bad files refused with a message."""
import json
import os

import ipywidgets as widgets
import pytest
from torch import nn

from workbench.errors import WorkbenchError
from workbench.plan import LayerPlan, Plan
from workbench.widgets.persistence import (CONFIG_FORMAT_VERSION, SaveLoadBar, load_configuration,
                                           save_configuration)


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
    bar = SaveLoadBar(host, tmp_path / "config.json")
    host.sliders["0"].value, host.sliders["2"].value = 5, 2
    host.selected.value = "2"
    assert bar.save() and "saved 2 layer setting(s)" in bar.status.value
    host.sliders["0"].value, host.sliders["2"].value, host.selected.value = 9, 0, "0"
    fresh = RankHost(mlp())  # as after a kernel restart
    fresh_bar = SaveLoadBar(fresh, tmp_path / "config.json")
    assert fresh_bar.load(), fresh_bar.status.value
    assert (fresh.sliders["0"].value, fresh.sliders["2"].value, fresh.selected.value) == (5, 2, "2")
    assert fresh.plan == Plan({"0": LayerPlan("svd", {"rank": 5}), "2": LayerPlan("svd", {"rank": 2})})


def test_buttons_call_save_and_load(tmp_path):
    host = RankHost(mlp())
    bar = SaveLoadBar(host, tmp_path / "c.json")
    host.sliders["0"].value = 3
    bar.save_button.click()
    host.sliders["0"].value = 7
    bar.load_button.click()
    assert host.sliders["0"].value == 3


def test_configuration_from_another_model_is_refused_in_the_status(tmp_path):
    save_configuration(tmp_path / "c.json", Plan({"0": LayerPlan("svd", {"rank": 4})}), mlp(32), "mine")
    other = RankHost(mlp(64))
    other.sliders["0"].value = 1
    bar = SaveLoadBar(other, tmp_path / "c.json")
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
    bar = SaveLoadBar(host, "/proc/config.json" if os.geteuid() == 0 else "/nonexistent-dir/c.json")
    assert not bar.save()
    assert "not saved" in bar.status.value


def test_host_without_the_protocol_is_refused():
    with pytest.raises(WorkbenchError, match="set_plan"):
        SaveLoadBar(widgets.VBox())


def test_hosts_with_a_plan_method_work_too(tmp_path):
    class MethodHost(RankHost):
        plan = property(lambda self: (lambda: RankHost.plan.fget(self)))  # plan() as the explorers define it

    host = MethodHost(mlp())
    bar = SaveLoadBar(host, tmp_path / "c.json")
    host.sliders["2"].value = 3
    assert bar.save()
    host.sliders["2"].value = 0
    assert bar.load() and host.sliders["2"].value == 3


def test_dashboard_saves_and_restores_its_sliders(mlp_task, tmp_path):
    dashboard_module = pytest.importorskip("workbench.widgets.dashboard")
    board = dashboard_module.Dashboard(mlp_task, synchronous=True, reference=False)
    assert board.persistence in board.children
    board.persistence.path.value = str(tmp_path / "board.json")
    board.set_rank("fc2", 12)
    assert board.persistence.save(), board.persistence.status.value
    board.set_rank("fc2", 40)
    assert board.persistence.load(), board.persistence.status.value
    board.coalescer.wait()
    assert board.sliders["fc2"].value == 12
    assert board.plan == Plan({"fc2": LayerPlan("svd", {"rank": 12})})
    assert board.state["plan"] == board.plan  # the readouts were recomputed for the restored plan
