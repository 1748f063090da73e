"""One command-line style for every console script: ``w3s-<name> key=value ...``.

Each command composes ``conf/<config>.yaml`` with the Hydra overrides it is given (Hydra's
compose API, so no command owns the working directory or writes ``.hydra/`` folders), checks
the values it can check before any work starts, and runs its job. What a user can fix, a
mistyped key, an unknown config option, a bad value, a missing file, is one line on stderr
and exit status 2; anything else is a bug, printed with its traceback, and exits with status 70
(Python's own 1 is what ``w3s-predict`` and ``w3s-verify`` answer when some files were
skipped). A job stopped by Ctrl-C, SIGTERM or SIGHUP runs its clean-up and exits with status
130.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.config import CONF_DIR, compose_config
from common.errors import JobError
from common.logs import setup_logging

HELP_FLAGS = frozenset({"-h", "--help"})
# Hydra's grammar takes a folder name such as "Scans (2024)" or "Müller" only quoted.
QUOTING_HINT = (
    "a value with spaces, brackets, # or letters beyond ASCII goes in quotes: "
    "\"input='/data/Scans (2024)'\""
)
# The mappings whose keys are the user's own (hospital names, options to tune): the only places
# a ``+key=value`` override adds a key that something reads.
OPEN_MAPPINGS = (
    "data.hospitals",
    "train.per_hospital",
    "model.per_hospital",
    "personalize.train",
    "pseudo.tune",
)
# Hydra's answer to a key the config lacks, which suggests adding it with "+".
UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'.*To append to your config use", re.DOTALL)
INPUT_ERROR = 2
UNEXPECTED_ERROR = 70  # sysexits.h's EX_SOFTWARE
INTERRUPTED = 130  # the shell's status for a job ended by Ctrl-C
# What a batch scheduler's time limit, ``docker stop``, ``kill`` or a closed terminal send.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# A job gets the composed config and the overrides as given; an int it returns is the exit
# status, anything else (a metrics dict, None) means success.
Job = Callable[[DictConfig, list[str]], object]


@dataclass(frozen=True)
class Command:
    """A console script: its name, what it does, the keys a user sets most, and its job.

    Attributes
    ----------
    name
        The console script, e.g. ``w3s-postprocess``.
    summary
        What the command does and what it writes, for ``--help``.
    config
        The primary config in ``conf/`` that the overrides apply to.
    job
        Called with the composed config and the overrides as given.
    keys
        The main keys and what they mean, for ``--help``.
    examples
        Command lines shown by ``--help``.
    own_store
        The config is a node of Hydra's config store, composed without ``conf/`` (its keys
        would clash with the config groups there).
    check
        Raises :class:`common.errors.JobError` for values the config cannot express as types
        (a method option, a path that must exist), before the job starts.
    """

    name: str
    summary: str
    config: str
    job: Job
    keys: Mapping[str, str] = field(default_factory=dict)
    examples: Sequence[str] = ()
    check: Callable[[DictConfig], None] | None = None
    own_store: bool = False

    def help_text(self) -> str:
        """The text ``--help`` prints."""
        summary = self.summary.strip().replace("``", "")
        lines = [f"usage: {self.name} [key=value ...]", "", summary, ""]
        if self.keys:
            lines.append("main keys:")
            width = max(map(len, self.keys))
            lines += [f"  {key.ljust(width)}  {text}" for key, text in self.keys.items()]
            lines.append("")
        if self.examples:
            lines.append("examples:")
            lines += [f"  {example}" for example in self.examples]
            lines.append("")
        source = "the keys above" if self.own_store else f"every key of conf/{self.config}.yaml"
        lines.append(f"Overrides: {source} (Hydra syntax: key=value, group=option).")
        return "\n".join(lines)

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        """The composed, checked config; a :class:`JobError` names what is wrong."""
        conf_dir = None if self.own_store else CONF_DIR
        return compose_checked(overrides, self.config, self.check, conf_dir)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Run the command; returns the exit status (console scripts pass it to ``sys.exit``).

        Stopped by Ctrl-C or a stop signal, it raises ``SystemExit(130)`` after the job's
        clean-up.
        """
        args = list(sys.argv[1:] if argv is None else argv)
        if HELP_FLAGS & set(args):
            print(self.help_text())
            return 0
        setup_logging()
        try:
            with stop_signals_interrupt():
                return self._run(args)
        except KeyboardInterrupt as stop:
            # SystemExit, not a return: a command run inside another (w3s-experiment trains
            # through w3s-simulate) stops the outer one too, through its clean-up.
            print(
                f"{self.name}: stopped ({str(stop) or 'interrupted'})", file=sys.stderr, flush=True
            )
            raise SystemExit(INTERRUPTED) from None
        except Exception:
            traceback.print_exc()
            print(
                f"{self.name}: stopped by an unexpected error (exit status {UNEXPECTED_ERROR}); "
                "the traceback above says where",
                file=sys.stderr,
                flush=True,
            )
            return UNEXPECTED_ERROR

    def _run(self, args: list[str]) -> int:
        """The job's exit status; a problem the user can fix is one line and status 2."""
        try:
            options = [a for a in args if a.startswith("-")]
            if options:
                raise JobError(
                    f"unknown option {options[0]!r}: arguments are key=value overrides "
                    f"(see {self.name} --help)"
                )
            cfg = self.compose(args)
            status = self.job(cfg, args)
            return status if isinstance(status, int) else 0
        except JobError as error:
            print(f"{self.name}: {error.brief()}", file=sys.stderr)
            return INPUT_ERROR


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, unless ignored.

    Python's default ends the process on the spot, past every ``finally``: a stopped
    ``w3s-simulate`` left Flower's SuperLink, simulation and Ray workers training on into its
    run directory, and its temporary files behind. Signal handlers belong to the main thread,
    so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # A signal the process was started to ignore (nohup's SIGHUP) stays ignored.
    handled = [n for n in STOP_SIGNALS if signal.getsignal(n) == signal.SIG_DFL]
    previous = {number: signal.signal(number, interrupt) for number in handled}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def compose_checked(
    overrides: Sequence[str],
    config_name: str,
    check: Callable[[DictConfig], None] | None = None,
    conf_dir: Path | None = CONF_DIR,
) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, checked by ``check``.

    For a command's own config and for the configs a job composes before its work starts
    (a harness's post-training job, each ablation variant): what Hydra or OmegaConf refuses,
    a mistyped key or a missing mandatory one, becomes a :class:`JobError` in one line.
    """
    try:
        cfg = compose_config(overrides, config_name=config_name, conf_dir=conf_dir)
        check_added_keys(cfg, overrides, config_name, conf_dir)
        if check is not None:
            check(cfg)  # reading a missing mandatory key raises OmegaConf's error
    except OverrideParseException as error:
        raise JobError(f"{one_line(error)} ({QUOTING_HINT})") from None
    except (HydraException, OmegaConfBaseException) as error:
        unknown = UNKNOWN_KEY.search(str(error))
        if unknown is None:
            raise JobError(one_line(error)) from None
        # Hydra suggests "+key=..." here, which would add a key that nothing reads.
        key = unknown.group(1)
        given = [o for o in overrides if override_key(o) == key]
        others = [o for o in overrides if override_key(o) != key]
        try:
            base = compose_config(others, config_name=config_name, conf_dir=conf_dir)
        except (HydraException, OmegaConfBaseException):
            base = None
        named = given[-1] if given else key
        raise JobError(f"{named}: no such setting{_did_you_mean(base, key)}") from None
    return cfg


def check_added_keys(
    cfg: DictConfig, overrides: Sequence[str], config_name: str, conf_dir: Path | None
) -> None:
    """Refuse a ``+key=value`` that adds a key outside :data:`OPEN_MAPPINGS`: nothing reads it.

    Hydra itself suggests the ``+`` for a mistyped key (``+federation.round=5``), and the job
    would then run with its default, the typo kept in ``config.yaml`` without a word. A
    ``++key=value`` sets the key where the config has it and adds it where not: refused then.
    """
    base = None  # the config without the ++ overrides: the keys it has
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override_key(override)
        if any(key == open_ or key.startswith(f"{open_}.") for open_ in OPEN_MAPPINGS):
            continue
        if override.startswith("++"):
            if base is None:
                kept = [o for o in overrides if not o.startswith("++")]
                base = compose_config(kept, config_name=config_name, conf_dir=conf_dir)
            if _has_key(base, key):
                continue
        raise JobError(
            f"{override.split('=', 1)[0]}: adds a setting that nothing reads"
            f"{_did_you_mean(cfg, key)}; new keys go only under {', '.join(OPEN_MAPPINGS)} "
            "(docs/configuration.md)"
        )


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether ``cfg`` has the dotted ``key``, a mandatory one (``???``) included."""
    parent_key, _, last = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    # `in` on a DictConfig is False for a mandatory key; its keys() holds it.
    return isinstance(parent, DictConfig) and last in parent.keys()  # noqa: SIM118


def override_key(override: str) -> str:
    """``+data.root=/x`` -> ``data.root``."""
    return override.lstrip("+~").split("=", 1)[0]


def _did_you_mean(cfg: DictConfig | None, key: str) -> str:
    """``" (did you mean federation.rounds?)"`` for a key that ``cfg`` lacks, or ``""``.

    The first part of the dotted key that ``cfg`` lacks (or the last, which a ``+`` added) is
    replaced by the nearest of the keys beside it (``fedration.rounds`` -> ``federation.rounds``).
    """
    parts, node = key.split("."), cfg
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return ""
        last = depth == len(parts) - 1
        if part in node and not last:
            node = node[part]
            continue
        close = difflib.get_close_matches(part, [str(k) for k in node if k != part], n=1)
        if not close:
            return ""
        return f" (did you mean {'.'.join([*parts[:depth], close[0], *parts[depth + 1 :]])}?)"
    return ""


def one_line(error: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages folded into one line, without the search path."""
    return " ".join(str(error).split("Config search path")[0].split())
