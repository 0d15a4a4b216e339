"""``modular report PATH...``: one self-contained HTML page (PNG plots inlined) for runs and merges.

Each PATH is searched (recursively) for what the other commands write:

* ``metrics.json`` of a ``modular train`` run: loss curves, AdaMoE routing per layer, and the
  LISA schedule (``lisa_schedule`` inside it);
* ``adamerging_coefficients.json`` of an AdaMerging merge: λ per layer × task, entropy curve;
* ``merge.json`` of any merge folder (``modular merge``, ``merging.merge``): method, inputs, parameters;
* ``evaluation.json`` (written by ``modular demo``): accuracy of each model on each task
  (normalised by each task's own task model), the FFN compute its tokens ran and the ACM
  learners-per-token histogram, the λ grids chosen on validation;
* 1-bit Adam's bytes on the wire (``onebit_adam_comm`` in a run's ``metrics.json``).

Every number on the page is read from those files; nothing is recomputed or typed in.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from modular.checkpoint import atomic_write_text

__all__ = ["ReportInputs", "collect", "draw_losses", "write_report"]


@dataclass
class ReportInputs:
    runs: dict[str, dict] = field(default_factory=dict)  # run name -> metrics.json
    merges: dict[str, dict] = field(default_factory=dict)  # merge name -> adamerging_coefficients.json
    merge_records: dict[str, dict] = field(default_factory=dict)  # merge folder -> merge.json
    evaluations: list[dict] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.runs or self.merges or self.merge_records or self.evaluations)


def _name(file: Path, root: Path) -> str:
    """The run's folder relative to the searched path (``runs/pos``), or the folder's own name."""
    if root.is_file() or file.parent == root:
        return file.parent.name
    return str(file.parent.relative_to(root))


def collect(paths: list[str | Path]) -> ReportInputs:
    """Find the report's inputs under ``paths``; a path with none of them is an error."""
    found = ReportInputs()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or folder")
        root = root.resolve()
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        before = (len(found.runs), len(found.merges), len(found.merge_records), len(found.evaluations))
        for file in files:
            kind = {"metrics.json": "run", "adamerging_coefficients.json": "merge", "merge.json": "record",
                    "evaluation.json": "evaluation"}.get(file.name)
            if kind is None or "checkpoint-" in str(file):
                continue
            try:
                doc = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}: not valid JSON ({err})") from None
            if kind == "run":
                found.runs[_name(file, root)] = doc
            elif kind == "merge":
                found.merges[_name(file, root)] = doc
            elif kind == "record":
                found.merge_records[_name(file, root)] = doc
            else:
                found.evaluations.append(doc)
        if (len(found.runs), len(found.merges), len(found.merge_records), len(found.evaluations)) == before:
            raise ValueError(f"{root}: no metrics.json (training run), merge.json or adamerging_coefficients.json (merge) "
                             "or evaluation.json found")
    return found


# ----------------------------------------------------------------------------- plots
def _figure(width: float, height: float, cols: int = 1):
    from modular.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, cols, figsize=(width, height), squeeze=False)
    return plt, fig, axes[0]


def _png(plt, fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def plot_losses(runs: dict[str, dict]) -> str:
    with_history = {n: m["log_history"] for n, m in runs.items() if m.get("log_history")}
    plt, fig, axes = _figure(4.2 * len(with_history), 3.2, len(with_history))
    for ax, (name, history) in zip(axes, with_history.items()):
        draw_losses(ax, history)
        ax.set_title(name)
    return _png(plt, fig)


def draw_losses(ax, history: list[dict]) -> None:
    """Training loss (line) and eval loss (dots) of a Trainer ``log_history`` on ``ax``."""
    for key, style in (("loss", "-"), ("eval_loss", "o")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), style, label=key)
    ax.set(xlabel="step", ylabel="loss")
    ax.legend()


def plot_routing(runs: dict[str, dict], base_top_k: int | None) -> str:
    routed = {n: m["routing_stats"] for n, m in runs.items() if m.get("routing_stats")}
    plt, fig, axes = _figure(7, 3.2)
    ax = axes[0]
    width = 0.8 / len(routed)
    for i, (name, stats) in enumerate(routed.items()):
        ax.bar([layer + i * width for layer in range(len(stats))], [s["experts_per_token"] for s in stats], width, label=name)
    layers = len(next(iter(routed.values())))
    ax.set_xticks([layer + 0.4 - width / 2 for layer in range(layers)], [str(layer) for layer in range(layers)])
    if base_top_k:
        ax.axhline(base_top_k, color="k", linestyle="--", linewidth=1, label=f"base top-{base_top_k}")
    ax.set(xlabel="layer", ylabel="true experts per token", title="AdaMoE routing after fine-tuning")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def plot_lisa(runs: dict[str, dict]) -> str:
    schedules = {n: m["lisa_schedule"] for n, m in runs.items() if m.get("lisa_schedule")}
    plt, fig, axes = _figure(4.2 * len(schedules), 2.8, len(schedules))
    for ax, (name, doc) in zip(axes, schedules.items()):
        periods = [p["layers"] for p in doc["periods"]]
        grid = [[1 if layer in active else 0 for active in periods] for layer in range(doc["num_layers"])]
        ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, origin="lower")
        ax.set_xticks(range(len(periods)))
        ax.set_yticks(range(doc["num_layers"]))
        ax.set(title=f"{name}: γ={doc['num_active_layers']}, K={doc['interval_steps']}", xlabel=f"period ({doc['interval_steps']} steps)", ylabel="layer")
    return _png(plt, fig)


def _layer_of(tensor: str) -> str:
    """The block a tensor belongs to, from the layer-list names the registry's families use
    (llama ``layers.N``, BERT ``layer.N``, GPT-2 ``h.N``)."""
    match = re.search(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.", tensor)
    return f"layer {int(match.group(1)):02d}" if match else ("embeddings" if "embed" in tensor else "head / norm")


def _short_names(names: list[str]) -> list[str]:
    """Task labels without the path parts they all share (``runs/pos/model`` -> ``pos``)."""
    parts = [name.split("/") for name in names]
    if len(parts) < 2:
        return names
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    return ["/".join(p[head : len(p) - tail]) for p in parts]


def plot_coefficients(doc: dict) -> str:
    """λ averaged over each layer's tensors (rows) per task, and the entropy curve."""
    rows: dict[str, list[list[float]]] = {}
    for tensor, values in zip(doc["rows"], doc["coefficients"]):
        rows.setdefault(_layer_of(tensor) if doc["granularity"] == "layer" else "all", []).append(values)
    labels = sorted(rows)
    means = [[sum(col) / len(col) for col in zip(*rows[label])] for label in labels]
    plt, fig, (ax, ax2) = _figure(10, max(3.0, 0.35 * len(labels) + 1.5), 2)
    image = ax.imshow(means, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(doc["tasks"])), _short_names(doc["tasks"]))
    ax.set_yticks(range(len(labels)), labels)
    for r, values in enumerate(means):
        for c, value in enumerate(values):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
    ax.set_title(f"AdaMerging λ ({doc['granularity']}-wise, mean per layer)")
    fig.colorbar(image, ax=ax)
    ax2.plot(doc["entropy"])
    ax2.set(xlabel="step", ylabel="Σ entropy (nats)", title="entropy on unlabelled inputs")
    return _png(plt, fig)


def plot_accuracy(evaluation: dict) -> str:
    models, tasks = list(evaluation["models"]), evaluation["tasks"]
    plt, fig, axes = _figure(max(6.0, 1.3 * len(models)), 3.4)
    ax = axes[0]
    width = 0.8 / (len(tasks) + 1)
    for i, key in enumerate([*tasks, "average"]):
        values = [row["average"] if key == "average" else row["accuracy"][key] for row in evaluation["models"].values()]
        ax.bar([m + i * width for m in range(len(models))], values, width, label=key)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], [m.replace(": ", ":\n").replace(" (", "\n(") for m in models], fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1), title="accuracy of every model on every task")
    ax.legend(fontsize=8)
    return _png(plt, fig)


# ----------------------------------------------------------------------------- html
_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}h2{border-bottom:1px solid #ddd;margin-top:2em}
.best{font-weight:bold}.note{color:#555;font-size:90%}"""


def _img(png: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


_COMPUTE_COLUMNS = (  # (key in an evaluation row, column title, format)
    ("normalized_average", "normalized", "{:.3f}"),
    ("compute_fraction", "FFN compute / dense", "{:.2f}"),
    ("true_experts_per_token", "true experts / token", "{:.2f}"),
    ("mean_experts_per_token", "true experts / token", "{:.2f}"),
)


def _evaluation_section(evaluation: dict) -> list[str]:
    tasks, rows = evaluation["tasks"], evaluation["models"]
    best = max(row["average"] for row in rows.values())
    extra = [(key, title, fmt) for key, title, fmt in _COMPUTE_COLUMNS if any(row.get(key) is not None for row in rows.values())]
    head = ("<tr><th>model</th>" + "".join(f"<th>{html.escape(t)}</th>" for t in tasks) + "<th>average</th>"
            + "".join(f"<th>{title}</th>" for _, title, _ in extra) + "</tr>")
    body = [
        f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{row['accuracy'][t]:.3f}</td>" for t in tasks)
        + f"<td class=\"{'best' if row['average'] == best else ''}\">{row['average']:.3f}</td>"
        + "".join(f"<td>{'' if row.get(key) is None else fmt.format(row[key])}</td>" for key, _, fmt in extra) + "</tr>"
        for label, row in rows.items()
    ]
    notes = {"normalized_average": "normalized: accuracy divided by the task's own task model's, averaged over tasks",
             "compute_fraction": "FFN compute: FFN FLOPs per real token (ACM learners and gates, true experts and routers; "
                                 "AdaMoE null picks and skipped learners cost nothing) over the dense model's",
             "mean_experts_per_token": f"the base MoE routes every token to top-{evaluation.get('base_top_k')} experts"}
    note = "; ".join(text for key, text in notes.items() if any(key == k for k, _, _ in extra))
    parts = ["<h2>Accuracy per task</h2>", f"<table>{head}{''.join(body)}</table>", f'<p class="note">{html.escape(note)}</p>',
             _img(plot_accuracy(evaluation), "accuracy per task")]
    if evaluation.get("lambda_grids"):
        parts += _grid_section(evaluation["lambda_grids"])
    if any(row.get("acm_histogram") for row in rows.values()):
        parts += ["<h2>ACM: learners per token</h2>", _img(plot_acm_histograms(rows), "ACM learners per token")]
    return parts


def _grid_section(grids: dict) -> list[str]:
    """Mean validation accuracy at each λ of the static merges' grids; the chosen λ in bold."""
    lambdas = sorted({float(lam) for scores in grids.values() for lam in scores})
    head = "<tr><th>method</th>" + "".join(f"<th>λ {lam:g}</th>" for lam in lambdas) + "</tr>"
    body = []
    for method, scores in grids.items():
        scores = {float(k): v for k, v in scores.items()}
        best = max(sorted(scores), key=lambda lam: scores[lam])
        cells = "".join(f"<td class=\"{'best' if lam == best else ''}\">{scores[lam]:.3f}</td>" if lam in scores else "<td></td>"
                        for lam in lambdas)
        body.append(f"<tr><td>{html.escape(method)}</td>{cells}</tr>")
    return ["<h2>λ chosen on the validation split</h2>", f"<table>{head}{''.join(body)}</table>",
            '<p class="note">mean validation accuracy over the tasks; the test split is scored once, at the chosen λ</p>']


def plot_acm_histograms(rows: dict[str, dict]) -> str:
    """Share of tokens that ran j = 0..N learners, over every ACM, per model."""
    with_hist = {label: row["acm_histogram"] for label, row in rows.items() if row.get("acm_histogram")}
    plt, fig, axes = _figure(max(6.0, 0.9 * len(with_hist) + 3), 3.2)
    ax = axes[0]
    width = 0.8 / len(with_hist)
    for i, (label, hist) in enumerate(with_hist.items()):
        total = sum(hist) or 1
        ax.bar([j + i * width for j in range(len(hist))], [c / total for c in hist], width, label=label)
    learners = len(next(iter(with_hist.values())))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(learners)], [str(j) for j in range(learners)])
    ax.set(xlabel="learners run (j)", ylabel="share of tokens", title="ACM learners per token (test inputs)")
    ax.legend(fontsize=7)
    return _png(plt, fig)


def _comm_section(runs: dict[str, dict]) -> list[str]:
    """1-bit Adam's bytes on the wire per run: full-precision warm-up, then compressed."""
    rows = []
    for name, metrics in runs.items():
        comm = metrics.get("onebit_adam_comm")
        if not comm:
            continue
        fp32, packed = comm["bytes_sent"]["fp32"], comm["bytes_sent"]["compressed"]
        warm, steps = min(comm["freeze_step"], comm["steps"]), comm["steps"]
        per_fp32 = fp32 / warm if warm else float("nan")
        per_packed = packed / (steps - warm) if steps > warm else float("nan")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{steps}</td><td>{fp32 / 2**20:.1f} MiB ({warm} steps)</td>"
                    f"<td>{packed / 2**20:.2f} MiB ({steps - warm} steps)</td><td>{per_packed / per_fp32:.3f}</td></tr>")
    head = ("<tr><th>run</th><th>steps</th><th>fp32 warm-up</th><th>1-bit compressed</th>"
            "<th>bytes per step, compressed / fp32</th></tr>")
    return ["<h2>1-bit Adam: bytes on the wire (per rank)</h2>", f"<table>{head}{''.join(rows)}</table>",
            '<p class="note">bytes this rank handed to collectives; LISA changes the trained layers every period, '
            "so the per-step figures are averages</p>"]


def _merge_section(name: str, record: dict) -> list[str]:
    """What a merge folder's ``merge.json`` says: method, base, parameters, each model's own."""
    params, defaults = record.get("parameters", {}), record.get("defaults", {})
    rows = [("method", record["method"]), ("base model", record.get("base_model") or "—"),
            *((k, json.dumps(v)) for k, v in params.items()),
            *((f"{k} (default)", json.dumps(v)) for k, v in defaults.items() if k not in params),
            ("computed in", record.get("compute_dtype")), ("written as", record.get("dtype") or "the base's dtype")]
    models = "".join(f"<tr><td>{html.escape(m['model'])}</td><td>{html.escape(json.dumps(m['parameters']))}</td></tr>"
                     for m in record["models"])
    return [f"<h2>Merge: {html.escape(name)}</h2>",
            "<table>" + "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows) + "</table>",
            f"<table><tr><th>model</th><th>its parameters</th></tr>{models}</table>"]


def render(found: ReportInputs, title: str = "modular-llm report") -> str:
    top_k = next((e.get("base_top_k") for e in found.evaluations if e.get("base_top_k")), None)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for evaluation in found.evaluations:
        parts += _evaluation_section(evaluation)
    if any(m.get("log_history") for m in found.runs.values()):
        parts += ["<h2>Training loss</h2>", _img(plot_losses(found.runs), "loss curves")]
    if any(m.get("routing_stats") for m in found.runs.values()):
        means = "".join(f"<li>{html.escape(n)}: {m['mean_experts_per_token']:.2f} true experts per token</li>"
                        for n, m in found.runs.items() if "mean_experts_per_token" in m)
        parts += ["<h2>AdaMoE routing per layer</h2>", f"<ul>{means}</ul>", _img(plot_routing(found.runs, top_k), "routing per layer")]
    if any(m.get("lisa_schedule") for m in found.runs.values()):
        parts += ["<h2>LISA schedule (active layers per period)</h2>", _img(plot_lisa(found.runs), "LISA schedule")]
    for name, record in found.merge_records.items():
        parts += _merge_section(name, record)
    if any(m.get("onebit_adam_comm") for m in found.runs.values()):
        parts += _comm_section(found.runs)
    for name, doc in found.merges.items():
        parts += [f"<h2>AdaMerging coefficients: {html.escape(name)}</h2>", _img(plot_coefficients(doc), "AdaMerging coefficients")]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(paths: list[str | Path], out: str | Path, *, force: bool = True) -> Path:
    """Render the report of ``paths`` into ``out`` (written to a temporary file, then renamed)."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    return atomic_write_text(out, render(collect(paths)))


def run(args: argparse.Namespace) -> int:
    out = write_report(args.paths, args.out, force=args.force)
    print(f"report written to {out}")
    return 0
