"""Training curves: RUN/curves.png drawn from RUN/metrics.jsonl with PIL only (no matplotlib).

    python -m miniproclip.training.curves runs/s2   # train.py also calls write_curves(run) when a run ends

Panels, stacked top to bottom, each drawn only when the run logged something for it:
    loss     the total loss and its parts (stage 1: ins, struct; stage 2: contrastive, reg, reg_ins, reg_struct)
    val      the validation metrics of --eval-every (val/...: retrieval recall@K both ways)
    lr       the learning rate (of the first parameter group)
x is the step; y is linear between the panel's lowest and highest value, or logarithmic for a loss panel whose
values span more than LOG_RATIO (the first steps' loss would flatten the rest). A resumed run logs again the steps
after its last checkpoint: the last record of a step wins. A malformed line (a run killed mid-write) and non-finite
values (skipped steps) are left out.
"""

import argparse
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

from ..data import json_lines
from ..files import atomic_path

LOSS_KEYS = ("loss", "ins", "struct", "contrastive", "reg", "reg_ins", "reg_struct")  # stages.py's parts
WIDTH, PANEL_HEIGHT = 960, 280  # pixels: the image's width, each panel's height
LEFT, RIGHT, TOP, BOTTOM = 80, 230, 30, 40  # plot margins: y tick labels, legend, title, x tick labels + "step"
LOG_RATIO = 30.0  # a loss panel whose max / min exceeds this gets a log-scale y axis
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]  # matplotlib's tab10, so the curves look as people expect


def read_metrics(path: str) -> tuple[list[dict], int]:
    """(records sorted by step, the last one of each step; number of malformed lines left out)."""
    by_step, malformed = {}, 0
    if os.path.isfile(path):
        for _, record in json_lines(path):
            try:
                by_step[int(record["step"])] = record  # a line that is not JSON (a ValueError) has no step either
            except (KeyError, TypeError, ValueError):
                malformed += 1
    return [by_step[step] for step in sorted(by_step)], malformed


def _panel_of(key: str) -> str | None:
    if key in LOSS_KEYS or key.startswith("loss"):
        return "loss"
    if key.startswith("val/"):
        return "val"
    return "lr" if key == "lr" else None


def curve_panels(records: list[dict]) -> list[tuple[str, dict[str, list[tuple[int, float]]]]]:
    """[(panel title, {series name: [(step, value), ...]})] in drawing order, empty panels left out."""
    panels = {"loss": {}, "val": {}, "lr": {}}
    for record in records:
        for key, value in record.items():
            panel = _panel_of(key)
            if panel and isinstance(value, (int, float)) and math.isfinite(value):
                panels[panel].setdefault(key, []).append((int(record["step"]), float(value)))
    titles = {"loss": "loss and its parts", "val": "validation (--val-data)", "lr": "learning rate"}
    return [(titles[name], series) for name, series in panels.items() if series]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)  # tick indices, so the values are exact multiples of `step`
    return [round(i * step, 12) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def font(size: int):
    """DejaVu Sans where the system has it; else Pillow's own scalable font (>= 10.1 with FreeType), whose spaces
    are 2 px wide at this size, so that labels read as run together; else its fixed bitmap font."""
    for load in (lambda: ImageFont.truetype("DejaVuSans.ttf", size), lambda: ImageFont.load_default(size=size)):
        try:
            return load()
        except (TypeError, OSError, ImportError):
            continue
    return ImageFont.load_default()


def _label(value: float) -> str:
    return f"{value:.3g}" if value != 0 else "0"


def _y_axis(values: list[float], loss_panel: bool):
    """(to_axis: value -> axis units, ticks as (axis position, label), axis low, axis high); the axis reaches 4%
    past the extreme values, so no curve runs along the frame."""
    low, high = min(values), max(values)
    if loss_panel and low > 0 and high / low > LOG_RATIO:  # log scale: ticks at 1, 2, 5 × 10^k
        ticks = [m * 10 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                 for m in (1, 2, 5) if low <= m * 10 ** e <= high]
        pad = 0.04 * math.log10(high / low)
        return math.log10, [(math.log10(t), _label(t)) for t in ticks], math.log10(low) - pad, math.log10(high) + pad
    if high == low:  # a flat line: give it a band around its value
        low, high = low - (abs(low) or 1) * 0.1, high + (abs(high) or 1) * 0.1
    pad = 0.04 * (high - low)
    return float, [(t, _label(t)) for t in nice_ticks(low, high)], low - pad, high + pad


def draw_panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: dict, font, small) -> None:
    """One panel whose top edge is at y=`top`: frame, grid, ticks, one coloured line per series, legend."""
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, top + TOP, top + PANEL_HEIGHT - BOTTOM  # the plot area
    steps = [s for points in series.values() for s, _ in points]
    to_axis, y_ticks, y_low, y_high = _y_axis([v for points in series.values() for _, v in points],
                                              title.startswith("loss"))
    s_low, s_high = min(steps), max(max(steps), min(steps) + 1)  # one step alone still gets an axis

    def px(step):  # step -> pixel column
        return x0 + (step - s_low) / (s_high - s_low) * (x1 - x0)

    def py(axis):  # axis units -> pixel row (up is larger)
        return y1 - (axis - y_low) / ((y_high - y_low) or 1) * (y1 - y0)
    draw.text((x0, top + 6), title + (" (log scale)" if to_axis is math.log10 else ""), fill="black", font=font)
    for axis, label in y_ticks:  # horizontal grid lines with their values on the left
        draw.line([(x0, py(axis)), (x1, py(axis))], fill="#e5e5e5")
        draw.text((x0 - 6, py(axis)), label, fill="black", font=small, anchor="rm")
    for step in nice_ticks(s_low, s_high):
        if step == int(step):  # steps are whole numbers
            draw.line([(px(step), y1), (px(step), y1 + 4)], fill="black")
            draw.text((px(step), y1 + 6), str(int(step)), fill="black", font=small, anchor="mt")
    draw.text(((x0 + x1) // 2, y1 + 22), "step", fill="black", font=small, anchor="mt")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for index, (name, points) in reversed(list(enumerate(series.items()))):  # the first (the total loss) on top
        colour = COLOURS[index % len(COLOURS)]
        xy = [(px(step), py(to_axis(value))) for step, value in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2, joint="curve")
        if len(xy) <= 50:  # sparse series (validation): a dot on each point
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = y0 + 4 + 18 * index  # legend: a colour swatch and the name, right of the plot
        draw.rectangle([x1 + 12, legend_y + 3, x1 + 32, legend_y + 7], fill=colour)
        draw.text((x1 + 38, legend_y), name.removeprefix("val/"), fill="black", font=small)


def write_curves(run_dir: str) -> str:
    """Draw RUN/curves.png from RUN/metrics.jsonl (a note in place of panels when it has no records yet)."""
    records, malformed = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    panels = curve_panels(records)
    title_font, small = font(15), font(12)
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * max(1, len(panels))), "white")
    draw = ImageDraw.Draw(image)
    if not panels:
        draw.text((LEFT, PANEL_HEIGHT // 2), f"no metrics in {run_dir}/metrics.jsonl yet", fill="black", font=title_font)
    for index, (title, series) in enumerate(panels):
        draw_panel(draw, index * PANEL_HEIGHT, title, series, title_font, small)
    if malformed:  # said in the picture, so a torn line is not mistaken for a gap in training
        draw.text((WIDTH - 8, 8), f"{malformed} malformed line(s) left out", fill="#d62728", font=small, anchor="rt")
    path = os.path.join(run_dir, "curves.png")
    with atomic_path(path) as tmp:  # a reader never sees half a PNG
        image.save(tmp, format="PNG")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Draw RUN/curves.png from RUN/metrics.jsonl.")
    parser.add_argument("runs", nargs="*", default=["."], help="run folders (default: the current one)")
    for run in parser.parse_args(argv).runs:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            sys.exit(f"error: {run} has no metrics.jsonl: pass a train.py run folder")
        print(write_curves(run))


if __name__ == "__main__":
    main()
