"""The figures a learner draws of their own runs: training curves, reward against KL, the loss, a batch.

    python plot.py curves dpo=out/demo/dpo --out out/dpo-curves.png       # one or more LABEL=OUT_DIR
    python plot.py frontier out/demo/samples.json --out out/frontier.png   # sample.py's results files
    python plot.py losses --out results/losses.png     # the loss of one pair against beta h, and its pull
    python plot.py batch --out results/batch.png       # one HH pair as dpo_batch and packed_dpo_batch lay it out

`curves` reads OUT_DIR/log.jsonl (train records as thin lines, test evaluations as markers). `frontier`
reads sample.py's JSON files: one point per model at (mean KL to the reference, mean oracle reward),
with error bars of one standard error over the samples and its mean reply length beside it, the analogue
of the DPO paper's Figure 2. Models labelled FAMILY@STEP (say beta0.1@40: beta 0.1 after 40 DPO steps) are
joined in step order. The experiments' own figures are drawn by their modules (experiments/).
"""
import json
import math
import os

import matplotlib
matplotlib.use("Agg")  # files only, no window: works on a server and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import EOS, dpo_batch, get_tokenizer, load_preferences, tokenize_pairs  # noqa: E402
from dpo import METRICS, dpo_loss  # noqa: E402
from machinery import UserError  # noqa: E402
from machinery.cli import ArgumentParser, HelpFormatter, description, user_errors  # noqa: E402
from machinery.fast import packed_dpo_batch  # noqa: E402
from machinery.files import atomic_write  # noqa: E402
from machinery.results import labelled, mean_and_sem  # noqa: E402
from machinery.run import read_records  # noqa: E402
from model import IGNORE_INDEX  # noqa: E402
PANEL_TITLES = {"loss": "loss (ln 2 = 0.693 at step 0; IPO: 1/(4 beta^2))", "rewards/chosen": "rewards/chosen (nats)",
                "rewards/rejected": "rewards/rejected (nats)", "rewards/margin": "rewards/margin (nats)",
                "rewards/accuracy": "rewards/accuracy", "logps/chosen": "logps/chosen (nats)",
                "logps/rejected": "logps/rejected (nats)"}
DPO_NOTE = ("rewards: beta log(pi/pi_ref), logps: log pi, both summed over response tokens; "
            "thin lines: training batches, dots: held-out evaluations")
FIGSIZE, DPI = (10, 6), 100  # 1000 x 600 pixels: readable at README width


# ----------------------------------------------------------------------------------------------------
# Numbers (kept apart from drawing so the tests can check them)

def read_log(out_dir):
    """The records of OUT_DIR/log.jsonl (or of a .jsonl path given directly). A line that is not a whole
    record (the last one, torn by a crash, say) is dropped with a notice, as --resume does."""
    path = out_dir if out_dir.endswith(".jsonl") else os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"cannot read {path}: no such file; give a run's out_dir (LABEL=OUT_DIR)")
    try:
        records = read_records(path, notice=True)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not any(r["split"] in ("train", "test") for r in records):
        raise UserError(f"{path} has no train or test records: is it a log.jsonl of sft.py or dpo.py?")
    return records


def series(records, split, key):
    """(steps, values) of one metric, in step order, from the records of one split. A value that is not a number
    (a string, a list: a log written by something else) is one line naming it."""
    points = sorted((r["iter"], r[key]) for r in records if r.get("split") == split and key in r)
    for step, value in points:
        if not is_number(value):
            raise UserError(f"the {split} record of step {step} has {key} = {str(value)[:40]!r}, not a number: is "
                            "this a log.jsonl that sft.py or dpo.py wrote?")
    steps = np.array([p[0] for p in points], dtype=float)
    return steps, np.array([p[1] for p in points], dtype=float)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_label(label):
    """'beta0.1@40' -> ('beta0.1', 40); a label without @STEP is a family of its own at step None."""
    family, at, step = label.rpartition("@")
    if not at:
        return label, None
    try:
        return family, int(step)
    except ValueError:
        raise UserError(f"label {label!r}: what follows @ must be a step number, e.g. beta0.1@40") from None


def read_json_field(path, field, what):
    """One top-level field of a JSON results file, or one line saying what is wrong with the file."""
    try:
        with open(path) as f:
            return json.load(f)[field]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not {what} (no '{field}')") from None


def frontier_points(paths):
    """{label: dict(kl, kl_sem, reward, reward_sem, n)} over the samples of sample.py JSON files."""
    points = {}
    for path in paths:
        samples = read_json_field(path, "samples", "a sample.py results file")
        if not isinstance(samples, dict):
            raise UserError(f"{path}: 'samples' is a {type(samples).__name__}, not {{model: [samples]}}: is it a "
                            "sample.py results file?")
        for label, rows in samples.items():
            if label in points:
                raise UserError(f"model label {label!r} appears twice ({path}); labels must be unique")
            if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) and "reward" in row for row in rows):
                raise UserError(f"{path}: model {label!r} has no oracle rewards (sample.py --data toy writes them)")
            bad = next((row for row in rows if not (is_number(row.get("kl")) and is_number(row["reward"]))), None)
            if bad is not None:
                raise UserError(f"{path}: model {label!r} has a sample whose kl or reward is not a number "
                                f"({str(bad)[:60]}); write it again with sample.py")
            kl, kl_sem = mean_and_sem([row["kl"] for row in rows])
            reward, reward_sem = mean_and_sem([row["reward"] for row in rows])
            length = sum(row.get("tokens", math.nan) for row in rows) / len(rows)
            points[label] = dict(kl=kl, kl_sem=kl_sem, reward=reward, reward_sem=reward_sem, n=len(rows), length=length)
    return points


# ----------------------------------------------------------------------------------------------------
# Figures

def plot_curves(runs, out, title, hlines=()):
    """runs: [(label, records)]. DPO logs get seven panels; SFT logs (no rewards) get the loss alone.
    hlines: [(y, label)], dashed reference lines on the loss panel (say, the loss's floor)."""
    is_dpo = ["rewards/margin" in r for _, records in runs for r in records[:3]]
    if any(is_dpo) and not all(is_dpo):
        raise UserError("these logs mix SFT and DPO runs; their losses are different quantities, plot them apart")
    panels = METRICS if all(is_dpo) else ("loss",)
    fig, axes = plt.subplots(2, 4, figsize=FIGSIZE) if len(panels) > 1 else plt.subplots(figsize=FIGSIZE)
    axes = np.atleast_1d(axes).ravel()
    for (label, records), color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        for ax, key in zip(axes, panels):
            steps, values = series(records, "train", key)
            ax.plot(steps, values, color=color, lw=0.8, alpha=0.5, label=f"{label} train")
            steps, values = series(records, "test", key)
            ax.plot(steps, values, "o-", color=color, lw=2, ms=4, label=f"{label} test")
    for (y, label), style in zip(hlines, ["--", ":", "-."] * 10):
        axes[0].axhline(y, color="gray", ls=style, lw=1.2, label=label)
    for ax, key in zip(axes, panels):
        ax.set_title(PANEL_TITLES[key] if len(panels) > 1 else "SFT loss per response token (nats)", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if len(panels) == 1:
        axes[0].set_yscale("log")  # SFT loss falls from ~11 to ~0.2: a log axis shows the tail
        axes[0].legend()
    else:
        axes[-1].axis("off")  # the eighth cell holds the legend
        axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center")
    fig.suptitle(f"{title}\n{DPO_NOTE}" if len(panels) > 1 else title, fontsize=10 if len(panels) > 1 else 12)
    save(fig, out)


def plot_frontier(points, out, title, log_kl=False):
    """Oracle reward against KL, one family per colour, joined in training order (log_kl: a log KL axis,
    so that runs that move little are not squashed against it)."""
    families = {}
    for label, point in points.items():
        family, step = parse_label(label)
        families.setdefault(family, []).append((step if step is not None else 0, label, point))
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for family, members in families.items():
        members.sort(key=lambda m: m[0])
        kl = [m[2]["kl"] for m in members]
        reward = [m[2]["reward"] for m in members]
        ax.errorbar(kl, reward, xerr=[m[2]["kl_sem"] for m in members],
                    yerr=[m[2]["reward_sem"] for m in members], fmt="o-", capsize=3, label=family)
        for step, label, point in members:
            ax.annotate((f"{step}: " if "@" in label else "") + f"{point['length']:.0f} tok", (point["kl"], point["reward"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    n = sorted({p["n"] for p in points.values()})
    if log_kl:
        ax.set_xscale("symlog", linthresh=0.1)  # linear below 0.1 nats: the reference's 0 stays on the axis
    ax.set_xlabel("KL(policy || reference) on the policy's own samples (nats, mean over samples)")
    ax.set_ylabel("oracle reward (mean over samples)")
    ax.set_title(f"{title}\nerror bars: one standard error over {'/'.join(map(str, n))} samples; "
                 "labels: DPO step and mean reply length", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, out)


def plot_batch(pair_index, out, title):
    """One real HH-RLHF pair (the shipped excerpt's test split), as the two layouts lay it out: dpo_batch's
    stacked rows (input ids above the shifted labels, -100 where nothing is trained), packed_dpo_batch's
    single row with its two label planes and its attention mask, and how the log-probs become the loss."""
    from matplotlib.patches import FancyArrowPatch, Rectangle
    excerpt = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "hh-rlhf-harmless-base")
    tokenizer = get_tokenizer()
    pairs = load_preferences(excerpt, "test", verbose=False)
    if not 0 <= pair_index < len(pairs):
        raise UserError(f"--pair {pair_index}: the excerpt's test split has pairs 0 to {len(pairs) - 1}")
    pair = tokenize_pairs(pairs[pair_index:pair_index + 1], 512, 256, tokenizer, verbose=False)[0]
    stacked_ids, stacked_labels = dpo_batch([pair])
    packed_ids, packed_labels, positions, attn_mask = packed_dpo_batch([pair])
    p, c, r = len(pair["prompt"]), len(pair["chosen"]), len(pair["rejected"])
    colors = {"prompt": "#d9d9d9", "chosen": "#9ecae1", "rejected": "#fdae6b", "eos": "#636363", "pad": "white"}

    def text_of(token):
        return tokenizer.decode([token]).replace("\n", "⏎").strip() or "␣"

    def strip(ax, y, tokens, kinds, label, labels=False):
        """One row of cells: the tokens (or labels), coloured by what they are."""
        ax.text(-0.6, y + 0.4, label, ha="right", va="center", fontsize=7)
        for x, (token, kind) in enumerate(zip(tokens, kinds)):
            ax.add_patch(Rectangle((x, y), 0.95, 0.8, facecolor=colors[kind], edgecolor="gray", lw=0.4,
                                   hatch="//" if kind == "pad" else None))
            word = "-100" if token == IGNORE_INDEX else "pad" if kind == "pad" else "EOS" if token == EOS else text_of(token)
            ax.text(x + 0.47, y + 0.4, word, ha="center", va="center", fontsize=5.5 if labels else 6,
                    rotation=90, color="white" if kind == "eos" else "black")

    def kinds_of(ids, labels, response):
        kinds = []
        for t, (token, label) in enumerate(zip(ids.tolist(), labels.tolist())):
            if t >= p - 1 + len(pair[response]):
                kinds.append("pad")
            elif t < p:
                kinds.append("prompt")
            else:
                kinds.append(response)
        return kinds

    fig = plt.figure(figsize=(FIGSIZE[0] * 1.3, FIGSIZE[1] * 1.35))
    top = fig.add_axes([0.09, 0.6, 0.89, 0.3])
    rows = [("chosen", stacked_ids[0], stacked_labels[0]), ("rejected", stacked_ids[1], stacked_labels[1])]
    for i, (response, ids, labels) in enumerate(rows):
        y = 5.6 - 2.9 * i
        kinds = kinds_of(ids, labels, response)
        strip(top, y + 1, ids.tolist(), kinds, f"{response} row: input_ids")
        label_kinds = ["eos" if lab == EOS else ("pad" if lab == IGNORE_INDEX else response) for lab in labels.tolist()]
        strip(top, y, labels.tolist(), label_kinds, "labels (shifted by one)", labels=True)
    top.set_xlim(-0.5, stacked_ids.size(1) + 0.5)
    top.set_ylim(2.6, 7.5)
    top.axis("off")
    top.set_title(f"dpo_batch: chosen and rejected stacked, 2 rows of {stacked_ids.size(1)} tokens; the prompt "
                  f"({p} tokens) runs twice, the shorter row is padded", fontsize=9, loc="left")

    bottom = fig.add_axes([0.09, 0.06, 0.62, 0.48])
    segment_kind = ["prompt"] * p + ["chosen"] * (c - 1) + ["rejected"] * (r - 1)
    strip(bottom, 4.4, packed_ids[0].tolist(), segment_kind, "packed row: input_ids")
    for x, position in enumerate(positions[0].tolist()):
        bottom.text(x + 0.47, 4.15, str(position), ha="center", va="center", fontsize=5)
    bottom.text(-0.6, 4.15, "positions", ha="right", va="center", fontsize=7)
    for plane, (response, y) in enumerate((("chosen", 2.4), ("rejected", 1.2))):
        labels = packed_labels[plane, 0].tolist()
        kinds = ["eos" if lab == EOS else ("pad" if lab == IGNORE_INDEX else response) for lab in labels]
        strip(bottom, y, labels, kinds, f"{response} plane: labels", labels=True)
    bottom.set_xlim(-0.5, packed_ids.size(1) + 0.5)
    bottom.set_ylim(0, 5.4)
    bottom.axis("off")
    bottom.set_title(f"packed_dpo_batch (--share_prompt): one row of {packed_ids.size(1)} tokens, the prompt once; "
                     "each reply continues the prompt's positions", fontsize=9, loc="left")
    flow = ("sum of the chosen plane's log-probs = log pi(y_w|x);  the same under pi_ref\n"
            "h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]   ->   "
            "loss = -log sigmoid(beta h)")
    bottom.text(-0.5, 0.25, flow, fontsize=8, va="center", family="monospace")
    bottom.add_patch(FancyArrowPatch((packed_ids.size(1) * 0.5, 1.05), (packed_ids.size(1) * 0.5, 0.6),
                                     arrowstyle="->", mutation_scale=10, color="black"))

    mask_ax = fig.add_axes([0.76, 0.1, 0.22, 0.4])
    mask_ax.imshow(attn_mask[0, 0].numpy(), cmap="Greys", interpolation="nearest")
    for edge in (p - 0.5, p + c - 1.5):
        mask_ax.axhline(edge, color="tab:red", lw=0.6)
        mask_ax.axvline(edge, color="tab:red", lw=0.6)
    mask_ax.set_title("its attention mask (black: query sees key):\nthe prompt, then each reply sees itself",
                      fontsize=7)
    mask_ax.set_xlabel("key", fontsize=7)
    mask_ax.set_ylabel("query", fontsize=7)
    mask_ax.tick_params(labelsize=5)
    fig.suptitle(title or f"One HH-RLHF pair (harmless-base test, pair {pair_index}) as a DPO batch: grey prompt, "
                 "blue chosen, orange rejected, dark EOS, hatched nothing (a curly quote is two byte tokens, �)",
                 fontsize=10)
    _save_without_layout(fig, out)


def _save_without_layout(fig, out):
    """save() without tight_layout, for a figure whose axes are placed by hand."""
    fig.tight_layout = lambda *args, **kwargs: None
    save(fig, out)


def loss_curves(beta_h, smoothing=(0.0, 0.1, 0.25)):
    """dpo_loss itself, on one pair per value of beta h (beta 1, reference log-probs 0): the loss, and
    its pull, -dL/d(beta h), for DPO (eps 0) and conservative DPO (eps > 0). Returns {eps: (loss, pull)}."""
    curves = {}
    for eps in smoothing:
        h = torch.tensor(beta_h, dtype=torch.float64, requires_grad=True)
        zero = torch.zeros_like(h)
        losses = dpo_loss(h, zero, zero, zero, beta=1.0, label_smoothing=eps)[0]
        losses.sum().backward()  # each pair's loss depends on its own h only: the sum's gradient is each slope
        curves[eps] = (losses.detach().numpy(), -h.grad.numpy())
    return curves


def plot_losses(out, title):
    """Two panels: the loss of one pair against beta h, and the pull on it (the gradient's weight)."""
    beta_h = np.linspace(-6, 8, 281)
    fig, (left, right) = plt.subplots(1, 2, figsize=(FIGSIZE[0], FIGSIZE[1] * 0.7))
    for (eps, (loss, pull)), color in zip(loss_curves(beta_h).items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        label = "DPO (eq. 7)" if eps == 0 else f"conservative DPO, eps {eps}: minimum at ln((1-eps)/eps) = " \
            f"{math.log((1 - eps) / eps):.2f}"
        left.plot(beta_h, loss, color=color, label=label)
        right.plot(beta_h, pull, color=color, label=label)
        if eps:  # the finite minimiser: the pull changes sign there
            for ax in (left, right):
                ax.axvline(math.log((1 - eps) / eps), color=color, ls=":", lw=1)
    left.set_title("loss of one pair: -log sigmoid(beta h) (nats)", fontsize=10)
    right.set_title("its pull, -dL/d(beta h) = sigmoid(-beta h) for DPO", fontsize=10)
    for ax in (left, right):
        ax.axvline(0, color="black", lw=0.6)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("beta h (h: the log-ratio margin, nats)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=11)
    save(fig, out)


def save(fig, out):
    """The figure as a PNG, written whole or not at all."""
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    except OSError as e:
        raise UserError(f"cannot write --out {out} ({e.strerror}); give a path in a directory you can write to") from None
    finally:
        plt.close(fig)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(description=description(__doc__), formatter_class=HelpFormatter,
                            epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    curves = commands.add_parser("curves", help="training curves of one or more runs, overlaid")
    curves.add_argument("runs", nargs="+", metavar="LABEL=OUT_DIR")
    curves.add_argument("--hline", action="append", default=[], metavar="Y[:LABEL]",
                        help="a dashed horizontal line on the loss panel; repeat for more")
    frontier = commands.add_parser("frontier", help="oracle reward against KL from sample.py results")
    frontier.add_argument("results", nargs="+", metavar="RESULTS.json")
    frontier.add_argument("--log_kl", action="store_true", help="a log KL axis")
    batch = commands.add_parser("batch", help="one real HH pair as dpo_batch and packed_dpo_batch lay it out")
    batch.add_argument("--pair", type=int, default=1, help="which pair of the shipped HH excerpt's test split")
    losses = commands.add_parser("losses", help="dpo_loss and its pull against beta h (no input needed)")
    for sub in (curves, frontier, losses, batch):
        sub.add_argument("--out", required=True, help="the PNG to write")
        sub.add_argument("--title", default="", help="the figure's title: say what was run")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with user_errors():
        if args.command == "curves":
            runs = [(label, read_log(out_dir)) for label, out_dir in map(labelled, args.runs)]
            hlines = []
            for spec in args.hline:
                y, _, label = spec.partition(":")
                try:
                    hlines.append((float(y), label or None))
                except ValueError:
                    raise UserError(f"--hline {spec!r}: give a number, optionally :LABEL, e.g. 0.155:floor") from None
            plot_curves(runs, args.out, args.title, hlines)
        elif args.command == "frontier":
            plot_frontier(frontier_points(args.results), args.out, args.title, args.log_kl)
        elif args.command == "batch":
            plot_batch(args.pair, args.out, args.title)
        else:
            plot_losses(args.out, args.title)


if __name__ == "__main__":
    main()
