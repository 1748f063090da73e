"""Files and a job's outputs (common/files.py): replaced whole, untouched when a write fails."""

from pathlib import Path

import pytest

from common import files
from common.files import (
    longest_replaceable_name,
    read_json,
    staged_outputs,
    write_text_atomically,
)

OWNED = ("metrics.json", "masks", "personalized_model.pt")


def _earlier_run(out):
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "gone_from_the_split.png").write_text("old mask")
    (out / "metrics.json").write_text("old metrics")
    (out / "personalized_model.pt").write_text("old fine-tune")
    (out / "final_model.pt").write_text("the user's own file")


def test_a_finished_job_replaces_every_owned_entry_and_leaves_the_others(tmp_path):
    out = tmp_path / "out"
    _earlier_run(out)
    with staged_outputs(out, OWNED) as staging:
        (staging / "masks").mkdir()
        (staging / "masks" / "a.png").write_text("new mask")
        (staging / "metrics.json").write_text("new metrics")
        assert (out / "metrics.json").read_text() == "old metrics"  # not yet
    assert sorted(p.name for p in out.iterdir()) == ["final_model.pt", "masks", "metrics.json"]
    assert [p.name for p in (out / "masks").iterdir()] == ["a.png"]
    assert (out / "metrics.json").read_text() == "new metrics"
    assert (out / "final_model.pt").read_text() == "the user's own file"


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_a_job_that_fails_leaves_the_earlier_outputs_as_they_were(tmp_path, stop):
    out = tmp_path / "out"
    _earlier_run(out)
    before = {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(stop), staged_outputs(out, OWNED) as staging:
        (staging / "metrics.json").write_text("half a run")
        raise stop
    assert {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()} == before


def test_the_first_run_creates_the_folder(tmp_path):
    out = tmp_path / "new" / "out"
    with staged_outputs(out, OWNED) as staging:
        (staging / "metrics.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["metrics.json"]


def test_a_file_written_whole_keeps_its_old_text_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "privacy.json"
    write_text_atomically(path, '{"rounds": [1, 2]}\n')

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomically(path, '{"rounds": [1, 2, 3]}\n')
    monkeypatch.undo()
    assert read_json(path) == {"rounds": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["privacy.json"]


def test_a_file_written_whole_reaches_the_disk_before_it_replaces_the_old(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    steps = []
    real_fsync, real_replace = files.os.fsync, files.os.replace

    def fsync(descriptor):
        steps.append(("fsync", Path(f"/proc/self/fd/{descriptor}").read_text(encoding="utf-8")))
        real_fsync(descriptor)

    def replace(source, target):
        steps.append(("replace", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    write_text_atomically(path, '{"round": 1}\n')
    assert steps == [("fsync", '{"round": 1}\n'), ("replace", "metrics.jsonl")]


def test_the_longest_replaceable_name_is_written_and_one_byte_more_is_not(tmp_path):
    # The file system takes the longer name; only the temporary file's name is too long.
    folder = tmp_path / "not made yet"
    longest = longest_replaceable_name(folder)
    write_text_atomically(folder / ("a" * longest), "fits\n")
    assert (folder / ("a" * longest)).read_text() == "fits\n"
    (folder / ("b" * (longest + 1))).write_text("a plain write fits\n")
    with pytest.raises(OSError, match="File name too long"):
        write_text_atomically(folder / ("c" * (longest + 1)), "does not fit\n")


def test_a_json_file_that_does_not_parse_is_named(tmp_path):
    path = tmp_path / "declared_examples.json"
    path.write_text('{"hospital_a": 9')
    with pytest.raises(ValueError, match=r"declared_examples.json is not valid JSON"):
        read_json(path)
