"""Figures of circuits: which components a circuit keeps, and ROC curves against a reference.

* :func:`circuit_grid` - a layers x heads grid (plus an MLP column) of the components an
  extraction kept, optionally compared with a reference circuit (true/false positives, misses).
* :func:`roc_plot` - ROC curves (FPR vs TPR over an alpha sweep) with their AUCs.
* :func:`circuit_graph` - a compiled model's circuit as a graph of components and edges, optionally
  a found circuit against the true one (hits, misses and extras marked).
* :func:`plot_vs_alpha`, :func:`plot_accuracy_vs_size` - a study's measures against alpha and
  against circuit size, one line per configuration.

No backend is forced: figures are drawn on whatever matplotlib backend is active, and returned.
"""

from __future__ import annotations

import textwrap
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from circuitlib.core.components import parse_component, parse_head
from circuitlib.studies.analysis import config_label, with_intervals

__all__ = ["circuit_grid", "roc_plot", "circuit_graph", "plot_vs_alpha", "plot_accuracy_vs_size"]

# --------------------------------------------------------------------------------------
# small helpers


def _new_figure(ax, figsize):
    """Return (fig, ax): the caller's axes, or a new pyplot figure that is already closed.

    Closing it keeps Jupyter's inline backend from showing it a second time when the
    returned Figure is the cell's value; the Figure itself still displays and saves.
    """
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    plt.close(fig)
    return fig, ax


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------
# circuit grid

# Colours (colour-blind safe: Okabe-Ito palette).
_KEPT = "#0072B2"  # blue: kept (no ground truth given)
_TP = "#009E73"  # green: kept and in the ground truth
_FP = "#E69F00"  # orange: kept, not in the ground truth
_FN = "#D55E00"  # vermillion outline: in the ground truth but pruned
_EMPTY = "#EEEEEE"  # pruned


def circuit_grid(
    kept_heads: Sequence[str],
    n_layers: int,
    n_heads: int,
    kept_mlps: Sequence[int] | None = None,
    ground_truth: Sequence[str] | None = None,
    ax=None,
    title: str | None = None,
):
    """Draw which components a circuit keeps, as a layers x heads grid.

    Rows are layers (0 at the top), columns are heads; a filled cell is a kept head. When
    ``kept_mlps`` is given (a list of layer indices, possibly empty) an extra ``MLP``
    column shows which MLPs were kept. When ``ground_truth`` (heads as ``"L.H"``) is given,
    cells are coloured by agreement: true positive (kept and in the ground truth), false
    positive (kept, not in it), false negative (in it but pruned, outlined only), with a
    legend giving each count.

    Every cell is a ``matplotlib.patches.Rectangle`` whose ``gid`` reads
    ``"head L.H kept|pruned [tp|fp|fn|tn]"`` or ``"mlp L kept|pruned"`` (handy in tests).
    Returns the Figure (a new one unless ``ax`` is given).
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    kept = {parse_head(h) for h in kept_heads}
    gt = None if ground_truth is None else {parse_head(h) for h in ground_truth}
    for layer, head in kept | (gt or set()):
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head {layer}.{head} is outside a {n_layers} x {n_heads} model")
    mlps = None if kept_mlps is None else {int(m) for m in kept_mlps}
    if mlps and not all(0 <= m < n_layers for m in mlps):
        raise ValueError(f"MLP layers {sorted(mlps)} outside 0..{n_layers - 1}")

    n_cols = n_heads + (2 if mlps is not None else 0)  # a blank gap column before the MLPs
    fig, ax = _new_figure(ax, (max(0.3 * n_cols + 0.8, 6.0), 0.27 * n_layers + 1.9))

    for layer in range(n_layers):
        for head in range(n_heads):
            is_kept = (layer, head) in kept
            face, edge, width, tag = (_KEPT if is_kept else _EMPTY), "white", 1.0, ""
            if gt is not None:  # colour by agreement with the ground truth
                tag = {(True, True): "tp", (True, False): "fp", (False, True): "fn", (False, False): "tn"}[
                    (is_kept, (layer, head) in gt)
                ]
                face, edge, width = {
                    "tp": (_TP, "white", 1.0),
                    "fp": (_FP, "white", 1.0),
                    "fn": (_EMPTY, _FN, 2.0),
                    "tn": (_EMPTY, "white", 1.0),
                }[tag]
                tag = " " + tag
            ax.add_patch(
                Rectangle(
                    (head + 0.06, layer + 0.06),
                    0.88,
                    0.88,
                    facecolor=face,
                    edgecolor=edge,
                    linewidth=width,
                    gid=f"head {layer}.{head} {'kept' if is_kept else 'pruned'}{tag}",
                )
            )
        if mlps is not None:
            is_kept = layer in mlps
            ax.add_patch(
                Rectangle(
                    (n_heads + 1 + 0.06, layer + 0.06),
                    0.88,
                    0.88,
                    facecolor="#555555" if is_kept else _EMPTY,
                    edgecolor="white",
                    gid=f"mlp {layer} {'kept' if is_kept else 'pruned'}",
                )
            )

    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_layers, 0)  # layer 0 at the top
    ax.set_aspect("equal")
    ticks = list(range(n_heads)) + ([n_heads + 1] if mlps is not None else [])
    ax.set_xticks([t + 0.5 for t in ticks])
    ax.set_xticklabels([str(h) for h in range(n_heads)] + (["MLP"] if mlps is not None else []))
    ax.set_yticks([l + 0.5 for l in range(n_layers)])
    ax.set_yticklabels([str(l) for l in range(n_layers)])
    ax.tick_params(length=0, labelsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    for side in ax.spines.values():
        side.set_visible(False)

    n_kept = len(kept)
    if title is None:
        title = f"{n_kept} of {n_layers * n_heads} heads kept"
        if mlps is not None:
            title += f", {len(mlps)} of {n_layers} MLPs"
    ax.set_title(title, fontsize=10)

    if gt is not None:
        tp, fp, fn = len(kept & gt), len(kept - gt), len(gt - kept)
        handles = [
            Patch(facecolor=_TP, label=f"kept, in ground truth (TP: {tp})"),
            Patch(facecolor=_FP, label=f"kept, not in ground truth (FP: {fp})"),
            Patch(facecolor=_EMPTY, edgecolor=_FN, linewidth=2, label=f"ground truth, pruned (FN: {fn})"),
        ]
    else:
        handles = [Patch(facecolor=_KEPT, label=f"kept head ({n_kept})")]
    if mlps is not None:
        handles.append(Patch(facecolor="#555555", label=f"kept MLP ({len(mlps)})"))
    handles.append(Line2D([], [], linestyle="none", marker="s", color=_EMPTY, label="pruned"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=8, frameon=False)
    return fig


# --------------------------------------------------------------------------------------
# ROC curves


def roc_plot(curves: Mapping[str, tuple[Iterable[float], Iterable[float], float | None]], ax=None):
    """Plot ROC curves: ``{label: (fprs, tprs, auc)}``, one point per alpha.

    The points of each curve are drawn in order of increasing FPR (ties by TPR), with a
    marker per alpha; ``auc`` (or ``None``) goes into the legend, as computed by the caller
    (``circuitlib.core.metrics.roc_auc``), so the figure shows the number the text reports.
    The dashed diagonal is a random classifier. Returns the Figure.
    """
    fig, ax = _new_figure(ax, (4.6, 4.2))
    for label, (fprs, tprs, auc) in curves.items():
        fprs, tprs = np.asarray(list(fprs), float), np.asarray(list(tprs), float)
        if fprs.shape != tprs.shape:
            raise ValueError(f"{label}: {fprs.size} FPRs but {tprs.size} TPRs")
        order = np.lexsort((tprs, fprs))
        text = label if auc is None else f"{label} (AUC = {float(auc):.2f})"
        ax.plot(fprs[order], tprs[order], marker="o", markersize=3, linewidth=1.5, label=text)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (FPR)")
    ax.set_ylabel("true positive rate (TPR)")
    ax.grid(alpha=0.3)
    # below the axes: labels with references and AUCs are long, and inside they hid curves and ticks
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    return fig


# --------------------------------------------------------------------------------------
# a circuit as a graph (compiled models: components and edges)

_PORTS = {"q": 0.2, "k": 0.0, "v": -0.2}  # where a head's query, key and value inputs enter its box
_GRAPH_STYLE = {  # status -> (colour, line style, line width)
    "truth": ("#555555", "-", 1.2),
    "hit": (_TP, "-", 1.4),
    "miss": (_FN, "--", 1.4),
    "extra": (_FP, "-", 1.4),
}


def _graph_layout(components: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Node centres: embeddings in column 0, then per layer a column of heads and one for its MLP, logits last."""
    parsed = {c: parse_component(c) for c in components}  # (layer, head or None)
    n_layers = 1 + max(layer for layer, _ in parsed.values())
    n_heads = 1 + max((head for _, head in parsed.values() if head is not None), default=0)
    where = {"embed": (0.0, 0.6), "pos": (0.0, -0.6), "logits": (2.0 * n_layers + 1, 0.0)}
    for c, (layer, head) in parsed.items():
        where[c] = (2.0 * layer + 2, 0.0) if head is None else (2.0 * layer + 1, (n_heads - 1) / 2 - head)
    return where


def _edge_ends(edge: str) -> tuple[str, str, str | None]:
    """ "W -> L.H.q" -> ("W", "L.H", "q"); "W -> MLP 1" -> ("W", "MLP 1", None)."""
    writer, reader = edge.split(" -> ")
    if reader.count(".") == 2:
        node, kind = reader.rsplit(".", 1)
        return writer, node, kind
    return writer, reader, None


def _draw_graph(ax, where, true_nodes, true_edges, found_nodes, found_edges, title, columns: int) -> None:
    """One panel of `circuit_graph`: the truth alone (found_* None) or a found circuit against it."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    compare = found_nodes is not None

    def status(item, truth: set, got: set | None) -> str:
        if not compare:
            return "truth" if item in truth else "off"
        return {(True, True): "hit", (True, False): "miss", (False, True): "extra"}.get(
            (item in truth, item in got), "off"
        )

    edges = sorted(true_edges | (found_edges if compare else set()))
    for edge in edges:
        writer, node, kind = _edge_ends(edge)
        (x0, y0), (x1, y1) = where[writer], where[node]
        s = status(edge, true_edges, found_edges)
        colour, style, width = _GRAPH_STYLE[s]
        ax.add_patch(
            FancyArrowPatch(
                (x0 + 0.35, y0),
                (x1 - 0.35, y1 + (_PORTS[kind] if kind else 0.0)),
                connectionstyle=f"arc3,rad={-0.25 if x1 - x0 > 1.5 else 0.0}",  # long edges arc over the boxes
                arrowstyle="-|>",
                mutation_scale=8,
                color=colour,
                linestyle=style,
                linewidth=width,
                zorder=1,
                gid=f"edge {edge} {s}",
            )
        )
    components = [n for n in where if n not in ("embed", "pos", "logits")]
    for name, (x, y) in where.items():
        ends = name not in components
        s = ("hit" if compare else "truth") if ends else status(name, true_nodes, found_nodes)
        colour = _GRAPH_STYLE[s][0] if s != "off" else "#BBBBBB"
        hollow = s in ("off", "miss")
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.35, y - 0.3),
                0.7,
                0.6,
                boxstyle="round,pad=0.02",
                facecolor="white" if hollow else colour,
                edgecolor=colour,
                linestyle="--" if s == "miss" else "-",
                linewidth=1.5,
                zorder=2,
                gid=f"node {name} {s}",
            )
        )
        label = name.replace("MLP ", "MLP\n")
        ax.text(x, y, label, ha="center", va="center", fontsize=6, color="#333333" if hollow else "white", zorder=3)
        if not ends and not name.startswith("MLP") and s != "off":
            for kind, dy in _PORTS.items():
                ax.text(x - 0.4, y + dy, kind, ha="right", va="center", fontsize=5, color="#333333", zorder=3)
    xs, ys = [x for x, _ in where.values()], [y for _, y in where.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.5, max(ys) + 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(textwrap.fill(title, int(13 * ax.figure.get_figwidth())), fontsize=8)
    if compare:
        n = {
            k: (
                sum(status(c, true_nodes, found_nodes) == k for c in components),
                sum(status(e, true_edges, found_edges) == k for e in edges),
            )
            for k in ("hit", "miss", "extra")
        }
        labels = {
            "hit": f"in both ({n['hit'][0]} components, {n['hit'][1]} edges)",
            "miss": f"missed ({n['miss'][0]}, {n['miss'][1]})",
            "extra": f"extra ({n['extra'][0]}, {n['extra'][1]})",
        }
    else:
        labels = {"truth": f"true circuit ({len(true_nodes)} components, {len(true_edges)} edges)"}
    handles = [
        Line2D([], [], color=_GRAPH_STYLE[k][0], linestyle=_GRAPH_STYLE[k][1], linewidth=2, label=text)
        for k, text in labels.items()
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=columns, fontsize=7, frameon=False)


def circuit_graph(
    components: Sequence[str],
    truth_components: Sequence[str],
    truth_edges: Sequence[str],
    found_components: Sequence[str] | None = None,
    found_edges: Sequence[str] | None = None,
    title: str | None = None,
    truth_title: str = "true circuit (from the compiler)",
):
    """Draw a compiled model's true circuit as a graph and, when a found circuit is given, that one under it.

    components: every head ``"L.H"`` and MLP ``"MLP L"`` of the model (those in no circuit are drawn
    pale). Edges are ``"WRITER -> READER"``: writers ``"embed"``, ``"pos"``, heads and MLPs; readers
    a head's query, key or value (``"L.H.q"``, ``".k"``, ``".v"``, entering its box at three ports,
    top to bottom), an MLP or ``"logits"`` (``circuitlib.models.compiled.truth``'s names). Columns
    follow the computation: embeddings, then per layer its heads and its MLP, then the logits.

    The top panel is the truth (grey). With ``found_components`` and ``found_edges``, the second
    panel marks what is in both (green), what only the truth has (missed: vermillion, dashed) and
    what only the found circuit has (extra: orange). Every box and arrow carries a ``gid``:
    ``"node NAME STATUS"`` and ``"edge W -> R STATUS"``, STATUS one of truth, hit, miss, extra or off
    (a component in neither). Returns the Figure.
    """
    import matplotlib.pyplot as plt

    where = _graph_layout(list(components))
    true_nodes, true_edges = set(truth_components), set(truth_edges)
    compare = found_components is not None
    if compare != (found_edges is not None):
        raise ValueError("give both found_components and found_edges, or neither")
    named = (
        true_nodes
        | set(found_components or [])
        | {n for e in true_edges | set(found_edges or []) for n in _edge_ends(e)[:2]}
    )
    unknown = sorted(named - set(where))
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not among the model's components ({len(components)} given)")
    width = max(x for x, _ in where.values()) + 1.2
    height = max(y for _, y in where.values()) - min(y for _, y in where.values()) + 1.5
    panels = 2 if compare else 1
    scale = min(0.42, 7.6 / width)  # inches per unit: at most the page's width
    size = max(3.8, scale * width + 0.4)
    fig, axes = plt.subplots(panels, 1, figsize=(size, panels * (scale * height + 0.9)), layout="constrained")
    plt.close(fig)
    axes = [axes] if panels == 1 else list(axes)
    columns = 3 if size >= 5.5 else 1  # the legend's entries side by side when they fit
    _draw_graph(axes[0], where, true_nodes, true_edges, None, None, truth_title if compare else title, columns)
    if compare:
        _draw_graph(axes[1], where, true_nodes, true_edges, set(found_components), set(found_edges), title, columns)
    return fig


# ------------------------------------------------------------------------------------------
# a study's measures against alpha and against size

_COLORS = {"mean": "#0072B2", "zero": "#D55E00"}  # Okabe-Ito, as the grid
_STYLES = {False: "-", True: "--"}


def plot_vs_alpha(
    table, columns: Sequence[tuple[str, str]], title: str | None = None, per_prompt: dict[str, str] | None = None
):
    """One panel per (column, axis label) against alpha (log scale); one line per configuration.

    Colours are the ablation, solid/dashed lines heads only / heads and MLPs (as in the
    paper's figures). The line is the mean over seeds (batches). The band: for a column named in
    `per_prompt` (column -> its per-prompt list column, e.g. "test_accuracy" -> "test_correct"),
    the 95 % bootstrap interval over prompts (`with_intervals`); otherwise, with several seeds,
    min to max over the seeds. Returns the Figure.
    """
    per_prompt = per_prompt or {}
    import matplotlib.pyplot as plt

    # At most two panels per row, 7.2 inches wide in all: the book's text column shows the figure at
    # about its own size, so its labels stay readable (three panels in a row were shrunk to ~55 %).
    n_cols = 1 if len(columns) == 1 else 2
    n_rows = -(-len(columns) // n_cols)
    fig, grid = plt.subplots(
        n_rows, n_cols, figsize=(3.6 * n_cols, 2.9 * n_rows + 0.4), layout="constrained", squeeze=False
    )
    plt.close(fig)
    axes, spare = grid.ravel()[: len(columns)], grid.ravel()[len(columns) :]
    n_seeds = table["seed"].nunique()
    for ax, (column, label) in zip(axes, columns):
        for (ablation, mlps), g in table.groupby(["ablation", "include_mlps"], sort=True):
            s = g.groupby("alpha")[column].agg(["mean", "min", "max"])
            ax.plot(
                s.index,
                s["mean"],
                color=_COLORS.get(ablation),
                linestyle=_STYLES[bool(mlps)],
                marker="o",
                markersize=3,
                label=config_label(ablation, bool(mlps)),
            )
            if column in per_prompt:
                ci = with_intervals(g, per_prompt[column], ["alpha"])
                ax.fill_between(
                    ci["alpha"], ci["low"], ci["high"], color=_COLORS.get(ablation), alpha=0.15, linewidth=0
                )
            elif n_seeds > 1:
                ax.fill_between(s.index, s["min"], s["max"], color=_COLORS.get(ablation), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in spare:  # an empty slot of the grid holds the legend
        ax.axis("off")
    if len(spare):
        spare[0].legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=9, frameon=False)
    else:
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_accuracy_vs_size(table, accuracy: str = "val_accuracy", title: str | None = None):
    """Accuracy against parameter reduction (the paper's Figure 3), one line per configuration."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8), layout="constrained")
    plt.close(fig)
    for (ablation, mlps), g in table.groupby(["ablation", "include_mlps"], sort=True):
        s = g.groupby("alpha")[["parameter_reduction", accuracy]].mean().sort_values("parameter_reduction")
        ax.plot(
            100 * s["parameter_reduction"],
            s[accuracy],
            color=_COLORS.get(ablation),
            linestyle=_STYLES[bool(mlps)],
            marker="o",
            markersize=3,
            label=config_label(ablation, bool(mlps)),
        )
    if "full_val_accuracy" in table and accuracy == "val_accuracy":
        ax.axhline(table["full_val_accuracy"].mean(), color="grey", linewidth=1, linestyle=":", label="full model")
    ax.set_xlabel("parameter reduction (%)")
    ax.set_ylabel("accuracy" + (" (validation)" if accuracy == "val_accuracy" else ""))
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
