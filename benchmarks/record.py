"""A benchmark's record that survives being cut off: rows reach the disk as they finish.

GPU time comes in short leases and every step of a session runs under `timeout`. A step that wrote
its results only at the end would leave nothing when its time ran out, so each command keeps one
Record:
- every finished row is appended to <stem>.jsonl and flushed to the disk at once (a SIGKILL keeps
  all rows finished before it);
- on SIGTERM or SIGINT (what `timeout` and Ctrl-C send) the record writes <stem>.json (and .md when
  it has a markdown writer) from the rows so far, marked "partial": true, and the process exits
  with 128 + the signal number;
- finish() writes the same files, complete.
"""
import json
import os
import signal
import sys
from pathlib import Path


class Record:
    """result: the header dict the JSON starts with; rows go under result["rows"] (or `rows_key`).
    out_dir None: nothing is written (rows are still kept). markdown: result -> str, or None."""

    def __init__(self, out_dir, stem, result, rows_key="rows", markdown=None):
        self.result, self.rows_key, self.markdown = result, rows_key, markdown
        self.result.setdefault(rows_key, [])
        self.paths = None
        if out_dir is not None:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            self.paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("jsonl", "json", "md")}
            self._jsonl = open(self.paths["jsonl"], "w", encoding="utf-8")
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    @property
    def rows(self):
        return self.result[self.rows_key]

    def add(self, row):
        """Keep a finished row and put it on the disk now."""
        self.rows.append(row)
        if self.paths is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        return row

    def write(self, partial=False):
        """<stem>.json (and .md) from the rows so far; returns the paths written."""
        if self.paths is None:
            return []
        result = dict(self.result, partial=True) if partial else self.result
        written = [self.paths["json"]]
        _atomic_write(self.paths["json"], json.dumps(result, indent=1) + "\n")
        if self.markdown is not None:
            text = self.markdown(result)
            if partial:
                text = ("**Partial record**: the command was stopped before it finished; the rows below are "
                        "those it completed.\n\n" + text)
            _atomic_write(self.paths["md"], text)
            written.append(self.paths["md"])
        return written

    def finish(self):
        """The complete record; restores the signal handlers. Returns the paths written."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        written = self.write()
        if self.paths is not None:
            self._jsonl.close()
        return written

    def _on_signal(self, signum, frame):
        try:
            written = self.write(partial=True)
            print(f"stopped by signal {signum}: partial record of {len(self.rows)} rows in "
                  f"{', '.join(map(str, written)) or 'no file (no --out)'}", file=sys.stderr, flush=True)
        finally:
            os._exit(128 + signum)  # no unwinding: a handler deep in a library must not swallow it


def _atomic_write(path, text):
    """Write through a temporary file and rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
