"""``w3s-predict`` (post_training/predict.py): it never destroys data and its status is honest.

Each test calls ``main([...])`` in this process with an untrained tiny segmenter (the labels do
not matter here, only what is written where); the memory test runs in a subprocess of its own.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import save_atomic
from common.cli import INPUT_ERROR
from common.files import longest_replaceable_name
from common.logs import PROJECT_LOGGERS, setup_logging
from common.segmenter import create_segmenter, segmenter_payload
from post_training import predict as predict_module
from post_training.artifacts import read_label_png
from post_training.predict import COMMAND, RECORD, main, output_names
from tests.image_files import write_rgb48_png

REPO = Path(__file__).resolve().parents[2]
TINY = {"arch": "lraspp_mobilenet_v3_large", "input_size": 32}


@pytest.fixture(scope="module")
def segmenter_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_segmenter(TINY, 3)
    folder = tmp_path_factory.mktemp("segmenter")
    return save_atomic(segmenter_payload(model, TINY, ["a", "b"]), folder / "segmenter.pt")


@pytest.fixture(scope="module")
def other_segmenter_file(tmp_path_factory) -> Path:
    """A segmenter of other classes than ``segmenter_file``'s."""
    model = create_segmenter(TINY, 4)
    folder = tmp_path_factory.mktemp("other")
    return save_atomic(segmenter_payload(model, TINY, ["x", "y", "z"]), folder / "segmenter.pt")


@pytest.fixture
def run(segmenter_file, capsys):
    """``run(input, output, *more)`` -> (status, stderr lines), the log included."""
    setup_logging()
    # The handlers keep the stderr of the moment they were made: point them at this test's
    # stderr while it runs (not setStream, which flushes the old, maybe closed, one), then back.
    handlers = [
        handler
        for name in PROJECT_LOGGERS
        for handler in logging.getLogger(name).handlers
        if type(handler) is logging.StreamHandler  # not pytest's capture handlers
    ]
    streams = [handler.stream for handler in handlers]

    def call(source: Path, out: Path, *more: str) -> tuple[int, list[str]]:
        for handler in handlers:
            handler.stream = sys.stderr
        status = main([f"segmenter={segmenter_file}", f"input={source}", f"output={out}", *more])
        return status, capsys.readouterr().err.splitlines()

    yield call
    for handler, stream in zip(handlers, streams, strict=True):
        handler.stream = stream


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (40, 50)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_refused(status: int, err: list[str], *words: str) -> None:
    assert status == INPUT_ERROR, err
    assert len(err) == 1 and err[0].startswith("w3s-predict: "), err
    for word in words:
        assert word in err[0], (word, err)


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_an_output_that_overlaps_the_input_is_refused_before_any_work(where, run, tmp_path):
    source = tmp_path / "images"
    write_images(source, ["x.png", "y.jpg"])
    before = snapshot(tmp_path)
    out = {"same": source, "inside": source / "masks", "contains": tmp_path}[where]
    status, err = run(source, out)
    assert_refused(status, err, f"output={out}", "input")
    assert snapshot(tmp_path) == before  # the input image x.png is not replaced by a mask
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["images", "x.png", "y.jpg"]


def test_an_overlays_folder_linked_into_the_input_is_refused(run, tmp_path):
    source, out = tmp_path / "images", tmp_path / "masks"
    write_images(source, ["x.png"])
    out.mkdir()
    (out / "overlays").symlink_to(source)
    before = snapshot(source)
    assert_refused(*run(source, out), f"output={out}: its overlays folder", "overlaps input")
    assert snapshot(source) == before


def test_every_input_name_gets_its_own_output(run, tmp_path):
    # The old scheme (stem, or stem_ext where stems clash) gave a.png and a_png.jpg one output.
    names = ["a.png", "a.bmp", "a_png.jpg", "a.png.png"]
    write_images(tmp_path / "images", names)
    status, err = run(tmp_path / "images", tmp_path / "masks")
    assert status == 0, err
    expected = sorted(f"{name}.png" for name in names)
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == expected
    assert sorted(p.name for p in (tmp_path / "masks" / "overlays").iterdir()) == expected
    assert read_label_png(tmp_path / "masks" / "a_png.jpg.png").shape == (40, 50)
    assert any("wrote 4 of 4 masks" in line for line in err), err


def test_output_names_are_distinct_for_any_distinct_file_names():
    names = ["a", "a.png", "a_png", "a.png.png", "a_png.png", "A.PNG", ".png", "a b.tif"]
    outputs = output_names([Path("/in") / name for name in names])
    assert len(set(outputs)) == len(names)
    assert outputs[1] == "a.png.png"


def test_earlier_outputs_are_kept_unless_overwrite_is_true(run, tmp_path):
    source, out = tmp_path / "images", tmp_path / "masks"
    write_images(source, ["a.png", "b.png"])
    assert run(source, out)[0] == 0
    (out / "b.png.png").write_bytes(b"an earlier result")
    status, err = run(source, out)
    assert_refused(status, err, f"output={out}", "overwrite=true")
    assert (out / "b.png.png").read_bytes() == b"an earlier result"
    status, err = run(source, out, "overwrite=true")
    assert status == 0, err
    assert read_label_png(out / "b.png.png").shape == (40, 50)


def test_a_rerun_with_overwrite_leaves_no_earlier_file_that_passes_for_its_own(run, tmp_path):
    source, out = tmp_path / "images", tmp_path / "masks"
    write_images(source, ["a.png", "b.png", "c.png"])
    assert run(source, out)[0] == 0
    (source / "b.png").write_bytes(b"replaced by a file that is not an image")
    status, err = run(source, out, "overwrite=true", "overlays=false")
    assert status == 1, err
    # b's mask and overlay were made from the image it no longer is; a's and c's overlays
    # show the earlier masks, not the ones written now.
    assert sorted(snapshot(out)) == [RECORD, "a.png.png", "c.png.png", "classes.json"]
    assert "removed " + str(out / "b.png.png") in "\n".join(err)


@pytest.mark.parametrize("failing", ["save_label_png", "save_overlay"])
def test_a_rerun_whose_write_fails_leaves_no_earlier_file_of_that_image(
    failing, run, tmp_path, monkeypatch
):
    source, out = tmp_path / "images", tmp_path / "masks"
    write_images(source, ["a.png", "b.png"])
    assert run(source, out)[0] == 0
    write = getattr(predict_module, failing)

    def disk_full_for_b(path, *args):
        if path.name == "b.png.png":
            raise OSError(28, "No space left on device")
        return write(path, *args)

    monkeypatch.setattr(predict_module, failing, disk_full_for_b)
    assert run(source, out, "overwrite=true")[0] == 1
    assert sorted(snapshot(out)) == [RECORD, "a.png.png", "classes.json", "overlays/a.png.png"]


def test_a_rerun_with_overwrite_removes_earlier_outputs_it_does_not_replace_and_nothing_else(
    run, other_segmenter_file, tmp_path, capsys
):
    # The first run's mask of b.png holds its class numbers, which the new classes.json would
    # name wrongly.
    source, out = tmp_path / "images", tmp_path / "masks"
    write_images(source, ["a.png", "b.png"])
    assert run(source, out)[0] == 0
    (out / "notes.png").write_bytes(b"the user's own")
    (out / "overlays" / "b.png.jpg.png").write_bytes(b"the user's own")
    (source / "b.png").unlink()
    arguments = [f"input={source}", f"output={out}", "overwrite=true"]
    assert main([f"segmenter={other_segmenter_file}", *arguments]) == 0, capsys.readouterr().err
    assert sorted(snapshot(out)) == [
        RECORD,
        "a.png.png",
        "classes.json",
        "notes.png",
        "overlays/a.png.png",
        "overlays/b.png.jpg.png",
    ]
    assert json.loads((out / "classes.json").read_text())["mask values"]["3"] == "z"


def test_an_edited_record_of_earlier_outputs_removes_no_other_file(run, tmp_path):
    source, out = tmp_path / "images", tmp_path / "masks"
    write_images(source, ["a.png"])
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "notes.txt").write_text("the user's own")
    (out / "old.png.png").write_bytes(b"an earlier mask")
    others = ["../images/a.png", str(source / "a.png"), "overlays/notes.txt"]
    (out / RECORD).write_text(json.dumps(["old.png.png", *others]))
    assert run(source, out, "overwrite=true")[0] == 0
    assert sorted(snapshot(tmp_path)) == [
        "images/a.png",
        f"masks/{RECORD}",
        "masks/a.png.png",
        "masks/classes.json",
        "masks/overlays/a.png.png",
        "masks/overlays/notes.txt",
    ]


def test_an_existing_overlay_alone_blocks_the_run(run, tmp_path):
    source, out = tmp_path / "images", tmp_path / "masks"
    write_images(source, ["a.png"])
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "a.png.png").write_bytes(b"kept")
    assert_refused(*run(source, out), "overlays/a.png.png")
    assert run(source, out, "overlays=false")[0] == 0  # no overlay is written then
    assert (out / "overlays" / "a.png.png").read_bytes() == b"kept"


def no_image_read(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an image was read before the output folder was checked")

    monkeypatch.setattr(predict_module, "read_input", refuse)


def test_an_output_below_a_file_is_one_line_before_any_image_is_read(run, tmp_path, monkeypatch):
    write_images(tmp_path / "images", ["a.png"])
    (tmp_path / "file").write_text("a file, not a folder")
    no_image_read(monkeypatch)
    status, err = run(tmp_path / "images", tmp_path / "file" / "masks")
    assert_refused(status, err, "is not writable")
    status, err = run(tmp_path / "images", tmp_path / "file")
    assert_refused(status, err, "not a folder")


def test_an_output_that_refuses_writes_is_one_line_before_any_image_is_read(
    run, tmp_path, monkeypatch
):
    write_images(tmp_path / "images", ["a.png"])
    no_image_read(monkeypatch)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(predict_module.tempfile, "mkstemp", read_only)
    status, err = run(tmp_path / "images", tmp_path / "masks")
    assert_refused(status, err, f"output={tmp_path / 'masks'} is not writable", "Read-only")


def test_an_input_name_too_long_for_its_outputs_is_refused_before_any_work(
    run, tmp_path, monkeypatch
):
    # Legal input names: the longest whose outputs' temporary names fit, one byte more, and the
    # longest of all, whose output name alone is too long (Path.exists raises on it).
    source, out = tmp_path / "images", tmp_path / "masks"
    longest = longest_replaceable_name(out)
    fits = "f" * (longest - 8) + ".png"
    too_long = [
        "t" * (longest - 7) + ".png",
        "u" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".png",
    ]
    write_images(source, ["a.png", fits])
    assert run(source, out)[0] == 0
    assert read_label_png(out / f"{fits}.png").shape == (40, 50)
    write_images(source, too_long)
    before = snapshot(out)
    no_image_read(monkeypatch)
    for more in ([], ["overwrite=true"]):
        status, err = run(source, out, *more)
        assert_refused(status, err, f"input={source}", "2 file(s)", *too_long)
        assert fits not in err[0]
        assert snapshot(out) == before
    assert_refused(*run(source, tmp_path / "new"), *too_long)
    assert not (tmp_path / "new").exists()


def test_a_link_to_nothing_is_named_and_the_status_is_1(run, tmp_path):
    # An image on a share that is not mounted: passing over it would report every file written.
    source = tmp_path / "images"
    write_images(source, ["a.png"])
    (source / "cell.png").symlink_to(tmp_path / "unmounted" / "cell.png")
    (source / "folder").symlink_to(source)  # a link to a folder is no file to segment
    status, err = run(source, tmp_path / "masks")
    assert status == 1, err
    log = "\n".join(err)
    assert f"skipping {source / 'cell.png'}" in log
    assert "1 file(s) skipped: cell.png" in log
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == ["a.png.png"]


def test_skipped_files_are_named_and_the_status_is_1(run, tmp_path):
    source = tmp_path / "images"
    write_images(source, ["good.png", "wide.png"])
    write_images(source, ["huge.png"], size=(20, 90))
    (source / "empty.bmp").write_bytes(b"")
    data = (source / "wide.png").read_bytes()
    (source / "broken.png").write_bytes(data[: len(data) // 2])
    status, err = run(source, tmp_path / "masks", "max_side=60")
    assert status == 1, err
    log = "\n".join(err)
    assert "huge.png: 90 x 20 px is larger than max_side=60" in log
    assert "empty.bmp: cannot decode" in log and "broken.png: cannot decode" in log
    assert "3 file(s) skipped: broken.png, empty.bmp, huge.png" in log
    written = sorted(p.name for p in (tmp_path / "masks").glob("*.png"))
    assert written == ["good.png.png", "wide.png.png"]


def test_the_masks_come_with_their_classes_and_colours(run, other_segmenter_file, tmp_path, capsys):
    write_images(tmp_path / "first", ["a.png"])
    assert run(tmp_path / "first", tmp_path / "masks")[0] == 0
    legend = json.loads((tmp_path / "masks" / "classes.json").read_text())
    assert legend["mask values"] == {"0": "background", "1": "a", "2": "b"}
    assert set(legend["overlay colours"]) == {"a", "b"}
    write_images(tmp_path / "second", ["b.png"])  # more masks of the same classes may join
    assert run(tmp_path / "second", tmp_path / "masks")[0] == 0
    write_images(tmp_path / "third", ["c.png"])
    capsys.readouterr()
    arguments = [f"input={tmp_path / 'third'}", f"output={tmp_path / 'masks'}"]
    assert main([f"segmenter={other_segmenter_file}", *arguments]) == INPUT_ERROR
    assert "another class list (classes.json differs)" in capsys.readouterr().err
    assert not (tmp_path / "masks" / "c.png.png").exists()


def test_a_colour_image_of_a_narrow_camera_in_16_bits_is_skipped_not_read_dark(run, tmp_path):
    source = tmp_path / "images"
    write_images(source, ["good.png"])
    camera = np.random.default_rng(0).integers(0, 4096, (40, 50, 3))
    write_rgb48_png(source / "cam12.png", camera)
    status, err = run(source, tmp_path / "masks")
    assert status == 1, err
    assert "cam12.png: cannot decode it as an image (ValueError: 16 bits per colour" in "\n".join(
        err
    )


def test_a_multi_page_tiff_is_skipped_naming_its_pages_not_read_as_its_first(run, tmp_path):
    source = tmp_path / "images"
    write_images(source, ["good.png", "stack.tif"])
    with Image.open(source / "stack.tif") as page:
        page.save(source / "stack.tif", save_all=True, append_images=[page.copy()])
    status, err = run(source, tmp_path / "masks")
    assert status == 1, err
    assert "stack.tif: cannot decode it as an image (ValueError: 2 frames in one file" in "\n".join(
        err
    )


@pytest.mark.parametrize(
    "override", ["batch_size=0", "max_side=big", "overwrite=maybe", "overlays=2", "max_side=-1"]
)
def test_a_bad_value_is_one_line_and_status_2(override, run, tmp_path):
    write_images(tmp_path / "images", ["a.png"])
    status, err = run(tmp_path / "images", tmp_path / "masks", override)
    assert_refused(status, err, override.split("=")[0])
    assert not (tmp_path / "masks").exists()


@pytest.mark.parametrize(
    ("device", "reason"),
    [("gpu", "expected auto, cpu, cuda or cuda:<index>"), ("cuda:64", "this machine has")],
)
def test_a_device_the_machine_lacks_is_one_line_before_any_work(device, reason, run, tmp_path):
    write_images(tmp_path / "images", ["a.png"])
    status, err = run(tmp_path / "images", tmp_path / "masks", f"device={device}")
    assert_refused(status, err, f"device={device}: {reason}")
    assert not (tmp_path / "masks").exists()


def test_a_mask_lies_on_the_image_as_viewers_show_it(run, tmp_path):
    source, out = tmp_path / "images", tmp_path / "masks"
    source.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored unturned, shown turned a quarter clockwise
    Image.new("RGB", (50, 30), "white").save(source / "sideways.jpg", exif=exif)
    assert run(source, out)[0] == 0
    assert read_label_png(out / "sideways.jpg.png").shape == (50, 30)
    with Image.open(out / "overlays" / "sideways.jpg.png") as overlay:
        assert overlay.size == (30, 50)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_a_turned_tiff_is_read_as_viewers_show_it(mode, tmp_path):
    # Pillow turned an uncompressed grey, palette or RGBA TIFF mapped from its file into
    # scrambled pixels of the unturned size.
    stored = np.zeros((30, 36), np.uint8)
    stored[:8, :6] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).convert(mode).save(tmp_path / "cell.tif", exif=exif)
    image = predict_module.read_input(tmp_path / "cell.tif", max_side=4096)
    np.testing.assert_array_equal(image[..., 0] > 128, np.rot90(stored, -1) > 128)


def test_help_documents_the_exit_statuses_and_the_new_keys():
    text = COMMAND.help_text()
    assert "Exit status: 0 every file was segmented and written" in " ".join(text.split())
    for status in ("1 some input files were skipped", "2 nothing ran"):
        assert status in " ".join(text.split()), text
    assert "overwrite" in COMMAND.keys and "max_side" in COMMAND.keys


def test_images_are_decoded_and_written_a_batch_at_a_time(run, tmp_path, monkeypatch):
    write_images(tmp_path / "images", [f"{i}.png" for i in range(5)])
    events: list[str] = []
    read_input, predict = predict_module.read_input, predict_module.predict

    def reading(*args, **kwargs):
        events.append("read")
        return read_input(*args, **kwargs)

    def predicting(model, images, *args, **kwargs):
        events.append(f"predict {len(images)}")
        return predict(model, images, *args, **kwargs)

    monkeypatch.setattr(predict_module, "read_input", reading)
    monkeypatch.setattr(predict_module, "predict", predicting)
    status, err = run(tmp_path / "images", tmp_path / "masks", "batch_size=2")
    assert status == 0, err
    assert events == ["read", "read", "predict 2", "read", "read", "predict 2", "read", "predict 1"]


# Runs in a fresh interpreter: the peak resident memory of w3s-predict on one large image,
# over what the process held before (Linux /proc; the high-water mark is reset first).
MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path
    from post_training.predict import main

    def status(field):
        text = Path("/proc/self/status").read_text()
        return int(re.search(field + r":\\s+(\\d+) kB", text)[1]) * 1024

    segmenter, small, large, out = sys.argv[1:5]
    assert main([f"segmenter={segmenter}", f"input={small}", f"output={out}/warm-up"]) == 0
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    code = main([f"segmenter={segmenter}", f"input={large}", f"output={out}/large"])
    print(json.dumps({"status": code, "growth": status("VmHWM") - before}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_stays_bounded_on_a_large_image(tmp_path):
    side, outputs = 3000, 11  # ten classes: full-size float logits would take 396 MB
    torch.manual_seed(0)
    model = create_segmenter(TINY, outputs)
    classes = [f"class {i}" for i in range(1, outputs)]
    segmenter = save_atomic(segmenter_payload(model, TINY, classes), tmp_path / "segmenter.pt")
    write_images(tmp_path / "small", ["cell.png"])
    (tmp_path / "large").mkdir()
    ramp = np.linspace(0, 255, side, dtype=np.uint8)  # compresses well, decodes to 27 MB
    grey = np.full((side, side), 128, dtype=np.uint8)
    picture = np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), grey], -1)
    Image.fromarray(picture).save(tmp_path / "large" / "slide.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_PROBE,
            str(segmenter),
            *(str(tmp_path / d) for d in ("small", "large")),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    if "clear_refs" in result.stderr and "PermissionError" in result.stderr:
        pytest.skip("cannot reset the memory high-water mark here")
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["status"] == 0
    pixels = side * side
    full_logits = outputs * 4 * pixels
    # Decoding (PIL's 4 B/px copy beside the 3 B/px array), the label map (1 B/px), the
    # overlay's PNG picture (4 B/px): about 12 B/px measured; the full-size float logits
    # alone are 44 B/px.
    assert measured["growth"] < 16 * pixels, (measured, full_logits)
    assert measured["growth"] < full_logits / 2
    assert read_label_png(tmp_path / "out" / "large" / "slide.png.png").shape == (side, side)
