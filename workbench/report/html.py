"""``render(results, figures) -> str``: one self-contained HTML page (inline CSS, figures as
base64 PNG data URIs, no scripts, no external ``src`` or ``href``)."""
from __future__ import annotations

import html
import json

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:8px 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:12px}
.grid figure{margin:0;flex:1 1 480px}.grid img{max-width:100%}figcaption{color:#666;font-size:.85em}
pre{background:#f7f7f7;padding:8px;font-size:.8em;overflow-x:auto}.key{font-size:1.1em;background:#eef6ee;
padding:8px 12px;border-left:4px solid #4a4}.warn{color:#a60}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return _e(value)


def _kib(value) -> str:
    return "–" if value is None else f"{value / 1024:,.1f} KiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(figures: dict, name: str, caption: str) -> str:
    if name not in figures:
        return ""
    return f'<figure><img alt="{_e(name)}" src="{figures[name]}"><figcaption>{_e(caption)}</figcaption></figure>'


def _measures_section(results: dict) -> str:
    measures = results.get("measures")
    if not measures:
        return ""
    models = [(name, measures[name]) for name in ("original", "chosen") if name in measures]
    metric = results.get("metric_name", "metric")
    rows_spec = [
        (f"{metric} (test)", lambda m: _num(m["metric"])),
        ("parameters (stored weights)", lambda m: _num(m["params"])),
        ("FLOPs, one sample", lambda m: _num(m["flops"])),
        ("state_dict .pt on disk", lambda m: _kib(m["disk"].get("pt"))),
        ("safetensors on disk", lambda m: _kib(m["disk"].get("safetensors"))),
        ("ONNX on disk", lambda m: _kib(m["disk"].get("onnx"))),
        ("latency batch 1 (median ms)", lambda m: _num(m["latency"]["batch1_ms"], 3)),
        ("latency batch {} (median ms)".format(models[0][1]["latency"]["large_batch"]),
         lambda m: _num(m["latency"]["large_ms"], 3)),
        ("peak extra memory, batch 1", lambda m: _kib(m["peak_memory_bytes"].get("batch1"))),
        ("peak extra memory, large batch", lambda m: _kib(m["peak_memory_bytes"].get("large"))),
    ]
    rows = [[_e(label)] + [fn(m) for _, m in models] for label, fn in rows_spec]
    threads = models[0][1]["latency"]["threads"]
    text = _table(["measure"] + [name for name, _ in models], rows)
    text += (f"<p class='sub'>CPU latency: median of {models[0][1]['latency']['repeats']} runs (batch 1), "
             f"{threads} intra-op thread(s). Peak memory: RSS high-water mark above the resident "
             "baseline during one forward pass (weights excluded; Linux /proc counters).</p>")
    compare = measures.get("compare")
    if compare:
        flop_ratio = "not counted" if compare["flop_ratio"] is None else f"{compare['flop_ratio']:.2f}x"
        text += (f"<p class='key'>Theoretical FLOP ratio <b>{flop_ratio}</b> &nbsp;|&nbsp; "
                 f"measured speed-up <b>{compare['speedup_batch1']:.2f}x</b> at batch 1, "
                 f"<b>{compare['speedup_large']:.2f}x</b> at batch {models[0][1]['latency']['large_batch']} "
                 f"&nbsp;|&nbsp; {compare['param_ratio']:.2f}x fewer parameters, "
                 f"{metric} change {compare['metric_change']:+.4f}</p>")
    return "<h2>Original and chosen model, measured</h2>" + text


def _allocation_section(results: dict) -> str:
    allocation = results.get("allocation")
    if not allocation:
        return ""
    rows = []
    for name, choice in allocation["layers"].items():
        settings = {k: v for k, v in choice.items() if k != "method"}
        rows.append([_e(name), _e(choice["method"]), _e(json.dumps(settings) if settings else "")])
    return (f"<h2>Allocation ({_e(allocation['allocator'])}, budget {allocation['budget']:.0%} of "
            f"{_e(allocation['by'])})</h2><p>Uses {allocation['fraction_used']:.1%} of the original's "
            f"{_e(allocation['by'])}; test {_e(results.get('metric_name', 'metric'))} "
            f"{_num(allocation['metric'])}.</p>" + _table(["layer", "method", "settings"], rows))


def _methods_section(results: dict) -> str:
    methods = results.get("methods")
    if not methods:
        return ""
    front = set(methods["front"])
    rows = [[_e(p["label"]), _num(p["metric"]), _num(p["params"]), _kib(p["bytes"]), _num(p.get("flops")),
             "yes" if p["label"] in front else ""] for p in methods["points"]]
    text = "<h2>Every method, measured</h2>" + _table(
        ["option", results.get("metric_name", "metric"), "params", "saved", "FLOPs", "Pareto"], rows)
    if methods.get("skipped"):
        text += (f"<details><summary class='warn'>{len(methods['skipped'])} option(s) not measured "
                 "(not applicable to this model)</summary><ul>" + "".join(
                     f"<li>{_e(s['label'])}: {_e(s['reason'])}</li>" for s in methods["skipped"]) + "</ul></details>")
    return text


def _exports_section(results: dict) -> str:
    exports = results.get("exports")
    if not exports:
        return ""
    rows = [[_e(f["file"]), _kib(f["bytes"]), _e(f.get("note", ""))] for f in exports["files"]]
    return "<h2>Exported files</h2>" + _table(["file", "size", "check"], rows)


def render(results: dict, figures: dict) -> str:
    """The report page for ``results`` (see `workbench.report.study`) and ``figures`` (data URIs)."""
    recovery = results.get("recovery")
    recovery_text = ""
    if recovery:
        recovery_text = (f"<p>Distillation for {recovery['epochs']} epoch(s): test "
                         f"{_num(recovery['test_metric_before'])} &rarr; {_num(recovery['test_metric_after'])}; "
                         f"{'kept' if recovery['kept'] else 'not kept (no better validation epoch)'}.</p>")
    skipped = results.get("skipped") or []
    skipped_text = ("<h2>Skipped stages</h2><ul>" + "".join(
        f"<li><b>{_e(s['stage'])}</b>: {_e(s['reason'])}</li>" for s in skipped) + "</ul>") if skipped else ""
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in results.get("timings_s", {}).items())
    body = f"""
<h1>Compression report: {_e(results.get('model'))}</h1>
<p class="sub">Budget {results.get('budget', 0):.0%} of {_e(results.get('by'))} &middot; workbench
{_e(results.get('versions', {}).get('workbench', ''))}, torch {_e(results.get('versions', {}).get('torch', ''))}
&middot; stages: {_e(timings)}</p>
{_measures_section(results)}
<div class="grid">{_figure(figures, 'measures', 'Latency at the large batch and file size.')}
{_figure(figures, 'pareto', 'Test metric against saved size; the red square is the chosen model.')}
{_figure(figures, 'pareto_latency', 'Test metric against measured latency per sample.')}</div>
<h2>Spectra and sensitivity</h2>
<div class="grid">{_figure(figures, 'spectra', 'Normalised singular values of each layer.')}
{_figure(figures, 'sensitivity', 'Validation metric with one layer factorized at each kept ratio.')}</div>
{_allocation_section(results)}
<h2>Recovery</h2>{recovery_text or '<p>Not run.</p>'}
<div class="grid">{_figure(figures, 'recovery', 'Validation metric per distillation epoch.')}</div>
{_methods_section(results)}
{_exports_section(results)}
<h2>The chosen plan</h2><pre>{_e(json.dumps(results.get('plan', {}), indent=1))}</pre>
{skipped_text}
"""
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>Compression report: {_e(results.get('model'))}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>\n")
