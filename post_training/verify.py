"""``w3s-verify``: check every hospital's data before training and list every problem at once.

Run it on the hospital's own machine: the report names files, and stays there. Exit status 0:
clean data; 1: problems found (all listed); 2: an invalid command line.
"""

from __future__ import annotations

from collections import Counter

from omegaconf import DictConfig

from common.cli import Command
from common.data.readers import ReadResult, read_hospitals, split_problems
from common.data.splits import check_split
from common.data.types import format_problems


def summarize(result: ReadResult) -> list[str]:
    """Describe one hospital's usable data without naming any file.

    Parameters
    ----------
    result
        The hospital as read by :func:`common.data.readers.read_hospitals`.

    Returns
    -------
    list[str]
        Lines with the image count, masks yes/no and the class counts.
    """
    counts = Counter(result.labels)
    masks = "none read" if not result.labels else "yes" if result.has_masks else "no"
    status = "ok" if not result.problems else f"{len(result.problems)} problem(s)"
    lines = [f"{result.hospital}: {len(result.labels)} usable images, masks: {masks}, {status}"]
    if counts:
        classes = ", ".join(
            f"{name} {counts[i]}" for i, name in enumerate(result.classes) if counts[i]
        )
        lines.append(f"  classes: {classes}")
    return lines


def check_verify_config(cfg: DictConfig) -> None:
    """The split must be one training would take: verified data under it must be trainable."""
    check_split(cfg.data)


def verify_hospitals(cfg: DictConfig, _: list[str] | None = None) -> int:
    """Read every hospital without keeping arrays and print the report; 1 if any problem.

    A hospital that reads cleanly also has its splits drawn as training draws them: one left
    without an image (too few images per class) would fail that hospital every round.
    """
    results = read_hospitals(cfg.data, keep_arrays=False)
    for result in results:
        if not result.problems:
            result.problems = split_problems(cfg.data, result)
    print(f"data: {cfg.data.get('name', '?')}, {len(results)} hospital(s)")
    for result in results:
        print("\n".join(summarize(result)))
    problems = [problem for result in results for problem in result.problems]
    if not problems:
        print("all data verified: no problems")
        return 0
    print(f"\n{len(problems)} problem(s):")
    print(format_problems(problems))
    return 1


COMMAND = Command(
    name="w3s-verify",
    summary=__doc__,
    config="config",
    job=verify_hospitals,
    check=check_verify_config,
    keys={
        "data": "synthetic (default), wbc_zxaoyou, raabin, matek19, or your own conf/data/*.yaml",
        "data.root": "where the real data set lies",
    },
    examples=["w3s-verify", "w3s-verify data=wbc_zxaoyou data.root=/path/to/segmentation_WBC"],
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-verify``: 0 clean data, 1 problems found, 2 invalid command line."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
