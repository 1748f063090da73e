"""``w3s-verify``: check every hospital's data before training and list every problem at once.

Run it on the hospital's own machine: the report names files, and stays there.

    w3s-verify                                   # the embedded synthetic hospitals
    w3s-verify data=wbc_zxaoyou data.root=/path  # real data
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from common.config import compose_config
from common.data.readers import ReadResult, read_hospitals
from common.data.types import format_problems


def main(argv: Sequence[str] | None = None) -> int:
    """Verify all configured hospitals and print a summary and every problem.

    Parameters
    ----------
    argv
        Hydra overrides; ``None`` reads ``sys.argv[1:]`` and exits with the code instead of
        returning it, as a console script must.

    Returns
    -------
    int
        0 when the data is clean, 1 when any problem was found, 2 when the config is invalid.
    """
    code = _run(sys.argv[1:] if argv is None else list(argv))
    if argv is None:
        raise SystemExit(code)
    return code


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
    masks = "yes" if result.has_masks else "no"
    status = "ok" if not result.problems else f"{len(result.problems)} problem(s)"
    lines = [f"{result.hospital}: {len(result.labels)} usable images, masks: {masks}, {status}"]
    if counts:
        classes = ", ".join(
            f"{name} {counts[i]}" for i, name in enumerate(result.classes) if counts[i]
        )
        lines.append(f"  classes: {classes}")
    return lines


def _run(overrides: list[str]) -> int:
    """Compose the config, read every hospital without keeping arrays, and print the report."""
    try:
        cfg = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as error:
        print(f"w3s-verify: invalid configuration: {error}", file=sys.stderr)
        return 2
    results = read_hospitals(cfg.data, keep_arrays=False)
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


if __name__ == "__main__":
    raise SystemExit(main())
