"""Where a run may write, decided before it starts.

Every path a command writes is ``-o`` itself, or ``-o`` joined with a name
made by :func:`safe_name` (one component: no separator, no ``.`` or ``..``,
no control character, at most :data:`MAX_NAME_BYTES` bytes). Before the first
photo runs, :func:`check_output` refuses an output that cannot be written
(a missing permission, a file where a folder is wanted, a folder where a
file is wanted) and :func:`refuse_inputs` one that would replace a file the
run reads (a photo, the ``--gt`` file, the weights). :class:`OutputLock`
lets one run at a time write an output; :func:`settings_mismatch` tells a
``--resume`` run that continues an output made with other settings.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from deepmask_cli.core.errors import UserError

#: Longest output name, in UTF-8 bytes: a file system's 255, less room for
#: the temporary names (``.NAME.XXXXXXXX.tmp``) written beside it.
MAX_NAME_BYTES = 200


#: Why a photo whose name :func:`safe_name` cannot make safe gets no output.
UNSAFE_NAME = "its name cannot name an output file (empty, or dots only); rename the photo"


class OutputError(UserError, ValueError):
    """An output that cannot be written, or would replace an input."""


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, new lines) shown as
    ``\\xNN`` escapes: safe to print, and still one line."""
    return "".join(c if unicodedata.category(c)[0] != "C" or c == " " else repr(c)[1:-1] for c in str(text))


def safe_name(stem: str, suffix: str = "") -> str | None:
    """One safe path component from a photo's name: ``stem`` with separators
    and control characters replaced by ``_``, shortened with a short hash
    when it is long (so long names stay distinct), then ``suffix``. ``None``
    for a stem left empty or made of dots only (``""``, ``.``, ``..``)."""
    cleaned = "".join("_" if (c in "/\\\0" or unicodedata.category(c)[0] == "C") else c for c in stem).strip()
    if not cleaned.strip("."):
        return None
    limit = MAX_NAME_BYTES - len(suffix.encode()) - 4  # room for "-NNN" of unique_name
    raw = cleaned.encode("utf-8", "surrogateescape")
    if len(raw) > limit:
        digest = hashlib.sha1(raw).hexdigest()[:10]
        head = raw[: limit - len(digest) - 1].decode("utf-8", "ignore")
        cleaned = f"{head}-{digest}"
    return cleaned + suffix


def unique_name(image_path: str | Path, used: set[str], suffix: str = "") -> str | None:
    """:func:`safe_name` of the photo's stem, then ``-1``, ``-2``, ... for
    names already in ``used`` (which it joins). ``None``: no safe name."""
    base = safe_name(Path(image_path).stem)
    if base is None:
        return None
    name, n = f"{base}{suffix}", 1
    while name in used:
        name = f"{base}-{n}{suffix}"
        n += 1
    used.add(name)
    return name


def check_output(out: str | Path, *, folder: bool, option: str = "-o") -> Path:
    """Refuse, before any work, an output that cannot be written: a file
    where ``folder`` wants one, a folder where a file is wanted, a path under
    a file, a folder without write permission. Returns ``out``."""
    out = Path(out)
    what = "a folder" if folder else "a file"
    if out.exists():
        if folder and not out.is_dir():
            raise OutputError(f"{out}: is a file; {option} names {what} here, choose another {option}")
        if not folder and out.is_dir():
            raise OutputError(f"{out}: is a folder; {option} names {what} here (e.g. {out / 'props.json'})")
    parent = out if folder else out.parent
    anc = parent
    while not anc.exists():
        if anc == anc.parent:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise OutputError(f"{out}: {anc} is a file, not a folder; choose another {option}")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write in {anc} (permission denied); choose another {option}")
    return out


def _key(path: str | Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def refuse_inputs(targets: Iterable[str | Path], protected: Mapping[str, Iterable[str | Path]],
                  option: str = "-o") -> None:
    """Refuse (before any work) when a path the run will write is one it
    reads: ``protected`` maps a description (``"an input photo"``, ``"the
    --gt file"``) to its paths."""
    reads: dict[str, tuple[str, str]] = {}
    for what, paths in protected.items():
        for p in paths:
            reads.setdefault(_key(p), (what, str(p)))
    for t in targets:
        hit = reads.get(_key(t))
        if hit is not None:
            what, p = hit
            raise OutputError(f"{t}: writing it would replace {what} ({p}); choose another {option}")


def refuse_foreign(targets: Iterable[Path], is_ours: Callable[[Path], bool], what: str,
                   option: str = "-o") -> None:
    """Refuse (before any work) when a path the run will write already holds
    something that ``is_ours`` does not recognise as deepmask's ``what``:
    only deepmask's own outputs are ever replaced."""
    foreign = [t for t in targets if os.path.lexists(t) and not is_ours(t)]
    if foreign:
        more = f" ({len(foreign)} such)" if len(foreign) > 1 else ""
        raise OutputError(f"{foreign[0]}: exists and is not {what}, so it is not replaced{more}; "
                          f"move it, or choose another {option}")


class OutputLock:
    """One run at a time per output: an exclusive lock on a hidden file beside
    a file output (``.NAME.lock``) or inside a folder output (``.deepmask.lock``,
    or ``.deepmask-shard-I-of-N.lock`` for one shard of a run), taken at once
    or refused, held until :meth:`release`, and removed by its holder."""

    def __init__(self, out: str | Path, *, folder: bool, shard: tuple[int, int] | None = None) -> None:
        from filelock import FileLock, Timeout

        out = Path(out)
        tag = "" if shard is None else f"-shard-{shard[0]}-of-{shard[1]}"
        self.path = out / f".deepmask{tag}.lock" if folder else out.with_name(f".{out.name}{tag}.lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise OutputError(f"another deepmask run is writing {out}; wait for it to finish, "
                              "or choose another -o") from None

    def release(self) -> None:
        if self._lock.is_locked:
            # removed while still held: a run that opens it afterwards makes a
            # new file, and one that opened it before finds it locked
            self.path.unlink(missing_ok=True)
            self._lock.release()

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def option_name(field: str) -> str:
    """The command-line option of a settings field."""
    if field.startswith("scale_") and field != "scale_prior":
        return "--scales"
    return {"fmt": "--format", "exif": "--no-exif"}.get(field, "--" + field.replace("_", "-"))


def settings_mismatch(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """``None`` when ``now`` equals ``recorded`` (the settings an interrupted
    run wrote into its output); else the first difference, as ``"--option
    NOW (the interrupted run had WAS)"``."""
    def flat(d: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v))
            else:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out

    a, b = flat(recorded), flat(now)
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{option_name(k)} {b.get(k)} (the interrupted run had {a.get(k)})"
    return None


def refuse_other_settings(out: str | Path, recorded: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse a ``--resume`` of ``out`` whose settings differ from those the
    interrupted run recorded, naming the first option that differs."""
    differ = settings_mismatch(recorded, now)
    if differ is not None:
        raise OutputError(f"{out}: --resume with other settings than the interrupted run: {differ}; "
                          "give the same options, or drop --resume to start over")
