"""The demo's run folder bookkeeping: which recipe made it, which steps are done, how long each took.

``RUN_DIR/demo_run.json`` holds a fingerprint of the recipe (both configs' text
and the demo settings) and each finished step's result. Running the demo again
skips the finished steps (a stage resumes from its own checkpoint); a folder of
another recipe, or one the demo did not make, is refused rather than mixed or
deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from mmdist.atomic import write_text_atomic

STATE_FILE = "demo_run.json"
DEMO_VERSION = 1


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and what to do."""


def run_fingerprint(align_path: Path, fuse_path: Path, quick: bool) -> dict:
    """What makes two demo runs the same run: both recipes' text and the demo settings."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    # The recipes' content, not their paths: the same recipe from another checkout is the same run.
    return {
        "demo_version": DEMO_VERSION,
        "quick": quick,
        "align_config": digest(align_path),
        "fuse_config": digest(fuse_path),
    }


class DemoState:
    """``RUN_DIR/demo_run.json``: the fingerprint, the steps done with their results and timings."""

    def __init__(self, run_dir: Path, fingerprint: dict):
        self.path = run_dir / STATE_FILE
        self.data = {"fingerprint": fingerprint, "done": {}, "timings_s": {}}

    @classmethod
    def open(cls, run_dir: Path, fingerprint: dict, overwrite: bool) -> DemoState:
        """Start, continue or refuse: a folder of another recipe (or not a demo folder) is never reused silently."""
        state = cls(run_dir, fingerprint)
        if run_dir.exists() and any(run_dir.iterdir()) and not state.path.is_file():
            # Never delete or write into a folder the demo did not make, even with --overwrite.
            raise DemoError(f"{run_dir} is not empty and holds no {STATE_FILE}, so it is not a demo run folder; "
                            "choose another --run-dir (or empty this one yourself)")
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            stored = json.loads(state.path.read_text())
            theirs = stored.get("fingerprint", {})
            differ = [k for k in sorted(set(theirs) | set(fingerprint)) if theirs.get(k) != fingerprint.get(k)]
            if differ:
                settings = ", ".join(f"{k}: {theirs.get(k)!r} there, {fingerprint.get(k)!r} now" for k in differ)
                raise DemoError(
                    f"{run_dir} holds a demo run with other settings ({settings}); "
                    "running into it would mix two runs. Use another --run-dir, or --overwrite to start over"
                )
            state.data = stored
        run_dir.mkdir(parents=True, exist_ok=True)
        state.save()
        return state

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def done(self, step: str) -> Optional[dict]:
        return self.data["done"].get(step)

    def run(self, step: str, title: str, fn: Callable[[], dict]) -> dict:
        """Run ``fn`` unless ``step`` is done; record its result and its time."""
        result = self.done(step)
        if result is not None:
            print(f"[demo] {title}: done in an earlier run, kept")
            return result
        print(f"[demo] {title} ...", flush=True)
        start = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - start
        self.data["timings_s"][step] = round(self.data["timings_s"].get(step, 0.0) + seconds, 2)
        self.data["done"][step] = result
        self.save()
        print(f"[demo] {title}: {seconds:.1f} s", flush=True)
        return result

    def add_time(self, step: str, seconds: float) -> None:
        """Time spent in a step that did not finish (an interrupted stage); counted when it is resumed."""
        self.data["timings_s"][step] = round(self.data["timings_s"].get(step, 0.0) + seconds, 2)
        self.save()
