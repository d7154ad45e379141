"""Every explorer saves its configuration and a FRESH explorer (as after a kernel restart) restores
the sliders and the displayed metric from the file; a plan the controls cannot show is refused with
a message in the widget and the controls are left as they were."""
import json

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from workbench.plan import LayerPlan, Plan  # noqa: E402
from workbench.widgets.conv_rnn import GateRankExplorer, TuckerExplorer  # noqa: E402
from workbench.widgets.persistence import save_configuration  # noqa: E402
from workbench.widgets.pruning import PruningExplorer  # noqa: E402
from workbench.widgets.quantization import QuantizationExplorer  # noqa: E402
from workbench.widgets.recovery import RecoveryExplorer  # noqa: E402


def point(bar, path):
    """Aim a save / load bar at ``path``: its folder and the file name typed in its box."""
    bar.folder, bar.path.value = path.parent, path.name


def reload(make, path):
    """A fresh explorer from ``make()`` with its bar loading ``path``; asserts the load succeeded."""
    fresh = make()
    assert fresh.children[-1] is fresh.persistence
    point(fresh.persistence, path)
    assert fresh.persistence.load(), fresh.persistence.status.value
    return fresh


def refuse(explorer, path, plan, controls, match, task=None):
    """Write ``plan`` to ``path``, load it: refused with ``match`` in the status, ``controls`` unchanged."""
    save_configuration(path, plan, task.model if task is not None else None)
    before = [c.value for c in controls]
    point(explorer.persistence, path)
    assert not explorer.persistence.load()
    status = explorer.persistence.status.value
    assert "not loaded" in status and match in status, status
    assert [c.value for c in controls] == before


def test_pruning_explorer_round_trip(mlp_task, tmp_path):
    def make():
        return PruningExplorer(mlp_task, synchronous=True)

    explorer = make()
    explorer.threshold.value = 0.04
    explorer.layer.value = "fc2"
    point(explorer.persistence, tmp_path / "p.json")
    assert explorer.persistence.save(), explorer.persistence.status.value
    saved = json.loads((tmp_path / "p.json").read_text())
    assert LayerPlan.from_dict(saved["plan"]["layers"]["fc1"]) == LayerPlan("prune", {"threshold": 0.04})
    fresh = reload(make, tmp_path / "p.json")
    assert fresh.threshold.value == pytest.approx(0.04) and fresh.layer.value == "fc2"
    assert fresh.state["metric"] == explorer.state["metric"] and fresh.state["bytes"] == explorer.state["bytes"]
    assert fresh.state["metric"] != fresh.base["metric"] or fresh.state["bytes"] < fresh.base["bytes"]
    assert fresh.plan == explorer.plan

    too_far = fresh.max_threshold * 2
    refuse(fresh, tmp_path / "bad.json", Plan({n: LayerPlan("prune", {"threshold": too_far}) for n in fresh.names}),
           [fresh.threshold], "outside the slider's range")
    refuse(fresh, tmp_path / "bad.json", Plan({"fc1": LayerPlan("prune", {"threshold": 0.01})}),
           [fresh.threshold], "one threshold for every layer")
    refuse(fresh, tmp_path / "bad.json", Plan({"fc1": LayerPlan("svd", {"rank": 3})}), [fresh.threshold],
           "method 'svd' is not one")
    (tmp_path / "bad.json").write_text('{"kind": "workbench-configuration", "form')
    fresh.persistence.load()
    assert "not valid JSON" in fresh.persistence.status.value and fresh.threshold.value == pytest.approx(0.04)


def test_quantization_explorer_round_trip(mlp_task, tmp_path):
    def make():
        return QuantizationExplorer(mlp_task, bits=1, synchronous=True)  # small widths: quick k-means

    explorer = make()
    explorer.bits.value = 2
    explorer.scheme.value = "kmeans"
    point(explorer.persistence, tmp_path / "q.json")
    assert explorer.persistence.save(), explorer.persistence.status.value
    fresh = reload(make, tmp_path / "q.json")
    assert (fresh.bits.value, fresh.scheme.value) == (2, "kmeans")
    assert fresh.state["bits"] == 2 and fresh.summary.value == explorer.summary.value
    assert fresh.state["kmeans"]["metric"] == explorer.state["kmeans"]["metric"]
    assert fresh.plan == explorer.plan

    # a plan from the CLI recipe spells out implicit defaults (seed 0): still accepted
    from workbench.registry import get_recipe
    recipe_plan = get_recipe("quant")(mlp_task.model, bits=1, scheme="kmeans")
    save_configuration(tmp_path / "r.json", recipe_plan, mlp_task.model)
    point(fresh.persistence, tmp_path / "r.json")
    assert fresh.persistence.load(), fresh.persistence.status.value
    assert fresh.bits.value == 1 and fresh.state["bits"] == 1

    controls = [fresh.bits, fresh.scheme]
    everywhere = {n: {"bits": 2, "scheme": "uniform"} for n in fresh.names}
    refuse(fresh, tmp_path / "bad.json", Plan({n: LayerPlan("quant", {**p, "bits": 16}) for n, p in everywhere.items()}),
           controls, "outside the slider's range")
    refuse(fresh, tmp_path / "bad.json", Plan({n: LayerPlan("quant", {**p, "per_channel": True})
                                               for n, p in everywhere.items()}), controls, "per_channel=True")
    refuse(fresh, tmp_path / "bad.json", Plan({"fc9": LayerPlan("quant", {"bits": 2})}), controls, "fc9")


def test_tucker_explorer_round_trip(cnn_task, tmp_path):
    def make():
        return TuckerExplorer(cnn_task, "conv2", rank_out=8, rank_in=8, latency_repeats=1, synchronous=True)

    explorer = make()
    explorer.rank_in.value = 4
    point(explorer.persistence, tmp_path / "t.json")
    assert explorer.persistence.save(), explorer.persistence.status.value
    fresh = reload(make, tmp_path / "t.json")
    assert (fresh.rank_out.value, fresh.rank_in.value) == (8, 4)
    assert fresh.after["metric"] == explorer.after["metric"] and fresh.after["params"] == explorer.after["params"]
    assert fresh.plan == explorer.plan

    controls = [fresh.rank_out, fresh.rank_in]
    refuse(fresh, tmp_path / "bad.json", Plan({"conv2": LayerPlan("tucker", {"rank_out": 999, "rank_in": 4})}),
           controls, "rank_out=999 is outside the slider's range", cnn_task)
    refuse(fresh, tmp_path / "bad.json", Plan({"conv2": LayerPlan("cp", {"rank": 4})}), controls, "method 'cp'")
    refuse(fresh, tmp_path / "bad.json", Plan(), controls, "leaves it dense")


def test_gate_rank_explorer_round_trip(gru_task, tmp_path):
    def make():
        return GateRankExplorer(gru_task, "rnn", latency_repeats=1, synchronous=True)

    explorer = make()
    explorer.rank_ih.value, explorer.rank_hh.value, explorer.per_gate.value = 3, 16, False
    point(explorer.persistence, tmp_path / "g.json")
    assert explorer.persistence.save(), explorer.persistence.status.value
    fresh = reload(make, tmp_path / "g.json")
    assert (fresh.rank_ih.value, fresh.rank_hh.value, fresh.per_gate.value) == (3, 16, False)
    assert fresh.after["metric"] == explorer.after["metric"] and fresh.after["params"] == explorer.after["params"]
    assert list(fresh.markers["hh"].get_xdata()) == [16, 16]

    controls = [fresh.rank_ih, fresh.rank_hh, fresh.per_gate]
    refuse(fresh, tmp_path / "bad.json", Plan({"rnn": LayerPlan("svd_rnn", {"rank_ih": 10_000})}), controls,
           "rank_ih=10000 is outside")
    refuse(fresh, tmp_path / "bad.json", Plan({"rnn": LayerPlan("svd_rnn", {"rank_ih": 2, "per_gate": "yes"})}),
           controls, "must be true or false", gru_task)
    refuse(fresh, tmp_path / "bad.json", Plan({"rnn": LayerPlan("svd_rnn", {"rank_ih": 8})}), controls,
           "is the full rank", gru_task)
    (tmp_path / "empty.json").write_text(Plan().to_json())  # the original model: both sliders at the right end
    point(fresh.persistence, tmp_path / "empty.json")
    assert fresh.persistence.load() and (fresh.rank_ih.value, fresh.rank_hh.value) == (8, 64)
    assert fresh.after["params"] == fresh.before["params"]


def test_recovery_explorer_round_trip(mlp_task, tmp_path):
    plans = {"fc2 rank 4": Plan({"fc2": LayerPlan("svd", {"rank": 4})}),
             "fc1 rank 8": Plan({"fc1": LayerPlan("svd", {"rank": 8})})}

    def make(compressions=plans):
        return RecoveryExplorer(mlp_task, dict(compressions), epochs=3, background=False)

    explorer = make()
    explorer.choice.value = "fc1 rank 8"
    explorer.epochs.value, explorer.alpha.value = 7, 0.5
    point(explorer.persistence, tmp_path / "r.json")
    assert explorer.persistence.save(), explorer.persistence.status.value
    fresh = reload(make, tmp_path / "r.json")
    assert (fresh.choice.value, fresh.epochs.value, fresh.alpha.value) == ("fc1 rank 8", 7, 0.5)
    assert fresh.plan == plans["fc1 rank 8"]

    # a fresh explorer offering other compressions gets the saved one added, ready to fine-tune
    other = reload(lambda: make({"fc2 rank 4": plans["fc2 rank 4"]}), tmp_path / "r.json")
    assert other.choice.value == "saved configuration" and other.plan == plans["fc1 rank 8"]
    assert other.compressed_model("saved configuration").fc1.rank == 8

    refuse(other, tmp_path / "bad.json", Plan({"fc1": LayerPlan("svd", {"rank": 300})}), [other.choice, other.epochs],
           "rank=300", mlp_task)
    assert list(other.choice.options) == ["fc2 rank 4", "saved configuration"]


def test_recovery_compression_given_as_a_model_is_not_saved(mlp_task, tmp_path):
    from torch import nn
    explorer = RecoveryExplorer(mlp_task, {"ready-made": nn.Linear(64, 10)}, epochs=1, background=False)
    point(explorer.persistence, tmp_path / "m.json")
    assert not explorer.persistence.save()
    assert "not saved" in explorer.persistence.status.value and "not a plan" in explorer.persistence.status.value
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_minilm_explorer_round_trip(tmp_path, stand_in_aware_basis):
    # What is tested is the restore, not the activation-aware math (tests/test_aware.py): a cheap
    # factorisation (rank r keeps the first r rows of W) stands in for the 36 float64 fits per setting.
    real_model = pytest.importorskip("workbench.widgets.real_model")
    import workbench as wb
    task = wb.load("minilm")

    def make():
        return real_model.RealModelExplorer(task, calibration_sequences=8, eval_sentences=8, synchronous=True)

    explorer = make()
    explorer.ratio.value, explorer.mode.value = 0.5, "scale"
    point(explorer.persistence, tmp_path / "m.json")
    assert explorer.persistence.save(), explorer.persistence.status.value
    assert LayerPlan.from_dict(json.loads((tmp_path / "m.json").read_text())["plan"]["layers"][explorer.names[0]]) \
        == LayerPlan("svd_aware", {"rank": explorer.plan.layers[explorer.names[0]]["rank"], "aware": "scale"})
    fresh = reload(make, tmp_path / "m.json")
    assert (fresh.ratio.value, fresh.mode.value) == (0.5, "scale")
    assert fresh.state == explorer.state and fresh.readout.value == explorer.readout.value
    refuse(fresh, tmp_path / "bad.json", Plan({fresh.names[0]: LayerPlan("svd", {"rank": 3})}),
           [fresh.ratio, fresh.mode], "not one of those settings")
