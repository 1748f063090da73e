"""A job's outputs (common/files.py): replaced whole at the end, untouched when the job fails."""

import pytest

from common.files import staged_outputs

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
