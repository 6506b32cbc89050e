"""curves.png: the right panels and lines from metrics.jsonl, the last record of a resumed step, bad lines skipped."""

import json
import math

import pytest
from PIL import Image, ImageColor

from miniproclip.training import curves


def write_metrics(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def stage2_records(steps, val_every=5, shift=0.0):
    records = []
    for step in steps:
        record = {"step": step, "epoch": 0, "loss": 3.0 - 0.1 * step + shift, "contrastive": 2.5 - 0.1 * step,
                  "reg": 0.5, "reg_ins": 0.3, "reg_struct": 0.2, "scale": 50.0, "lr": 1e-4 * step,
                  "grad_norm": 1.0, "samples_per_s": 100.0, "teacher_truncated": 0, "bad_images": 0}
        if step % val_every == 0:
            record |= {"val/image_retrieval_recall@1": 0.05 * step, "val/text_retrieval_recall@1": 0.04 * step}
        records.append(record)
    return records


def colour_pixels(image, colour, top, bottom):
    """How many pixels of the rows [top, bottom) have exactly `colour`."""
    rgb = ImageColor.getrgb(colour)
    band = image.crop((0, top, image.width, bottom))
    return sum(count for count, pixel in band.getcolors(band.width * band.height) if pixel == rgb)


def test_panels_lines_and_resumed_steps(tmp_path):
    # steps 1-10, then a resume from step 7 logs 8-10 again (with other losses), then a line torn by a kill
    records = stage2_records(range(1, 11)) + stage2_records(range(8, 11), shift=100.0)
    write_metrics(tmp_path / "metrics.jsonl", records, tail='{"step": 11, "loss": 1.')
    parsed, malformed = curves.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in parsed] == list(range(1, 11)) and malformed == 1
    panels = curves.curve_panels(parsed)
    assert [(title, list(series)) for title, series in panels] == [
        ("loss and its parts", ["loss", "contrastive", "reg", "reg_ins", "reg_struct"]),
        ("validation (--val-data)", ["val/image_retrieval_recall@1", "val/text_retrieval_recall@1"]),
        ("learning rate", ["lr"])]
    loss = panels[0][1]["loss"]
    assert loss[6] == (7, 3.0 - 0.7) and loss[7] == (8, 3.0 - 0.8 + 100.0)  # the resumed record wins
    assert panels[1][1]["val/text_retrieval_recall@1"] == [(5, 0.2), (10, 0.4)]

    path = curves.write_curves(str(tmp_path))
    assert path == str(tmp_path / "curves.png")
    image = Image.open(path).convert("RGB")
    assert image.size == (curves.WIDTH, 3 * curves.PANEL_HEIGHT)
    # each panel shows as many colours (lines + legend swatches) as it has series, and no more
    for index, (_, series) in enumerate(panels):
        top, bottom = index * curves.PANEL_HEIGHT, (index + 1) * curves.PANEL_HEIGHT
        shown = [c for c in curves.COLOURS if colour_pixels(image, c, top, bottom) > 20]
        assert shown == curves.COLOURS[:len(series)], index


def test_stage1_without_validation_and_non_finite_steps(tmp_path):
    records = [{"step": s, "loss": 10.0 / s, "ins": 6.0 / s, "struct": 4.0 / s, "lr": 1e-3} for s in range(1, 6)]
    records[2]["loss"] = math.nan  # a skipped step: logged, not drawn
    write_metrics(tmp_path / "metrics.jsonl", records)
    panels = curves.curve_panels(curves.read_metrics(str(tmp_path / "metrics.jsonl"))[0])
    assert [title for title, _ in panels] == ["loss and its parts", "learning rate"]
    assert [step for step, _ in panels[0][1]["loss"]] == [1, 2, 4, 5] and len(panels[0][1]) == 3
    image = Image.open(curves.write_curves(str(tmp_path)))
    assert image.size == (curves.WIDTH, 2 * curves.PANEL_HEIGHT)


def test_empty_or_missing_metrics_give_a_note(tmp_path):
    image = Image.open(curves.write_curves(str(tmp_path))).convert("RGB")  # no metrics.jsonl at all
    assert image.size == (curves.WIDTH, curves.PANEL_HEIGHT)
    assert len(image.getcolors(curves.WIDTH * curves.PANEL_HEIGHT)) > 1  # the note is written on the white
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert curves.read_metrics(str(tmp_path / "metrics.jsonl")) == ([], 0)
    assert Image.open(curves.write_curves(str(tmp_path))).size == (curves.WIDTH, curves.PANEL_HEIGHT)


def test_nice_ticks_and_log_axis():
    assert curves.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert curves.nice_ticks(0.013, 0.087) == [0.02, 0.04, 0.06, 0.08]
    assert curves.nice_ticks(1, 300) == [100, 200, 300]
    to_axis, ticks, low, high = curves._y_axis([0.01, 4.0], loss_panel=True)  # a 400x span: log scale
    assert to_axis is math.log10 and [label for _, label in ticks] == ["0.01", "0.02", "0.05", "0.1", "0.2",
                                                                       "0.5", "1", "2"]
    assert curves._y_axis([0.01, 4.0], loss_panel=False)[0] is float


def test_the_command_line_draws_runs_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    run, empty = tmp_path / "run", tmp_path / "empty"
    run.mkdir(), empty.mkdir()
    write_metrics(run / "metrics.jsonl", stage2_records(range(1, 4)))
    curves.main([str(run)])
    assert capsys.readouterr().out.strip() == str(run / "curves.png") and (run / "curves.png").is_file()
    with pytest.raises(SystemExit, match=f"error: {empty} has no metrics.jsonl"):
        curves.main([str(empty)])
    assert not (empty / "curves.png").exists()
