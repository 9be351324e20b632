"""The orchestration of `iris-segment batch` (in the client): decide what to run, run it on Dask, record every row.

1. Lock the output folder, read OUT/results.csv, remove temporary files an interrupted run left, and check every
   study (results.py: done, to run, or kept because its output is the user's). Results of another task among these
   studies are refused unless --overwrite.
2. Write results.csv at once with a row for every study: the done ones as they were, the kept ones `skipped`, the ones
   to run `skipped` "not finished" until their own row replaces it. A crash at any point thus leaves a table that
   says what is done, and an output the batch is about to replace is always one it owns (it has a row).
3. Start the cluster (cluster.py), register the SegmenterPlugin (the model loads once on every worker; the task
   embedding, encoded once by the caller, travels inside it), check every worker loaded it, and submit one task
   per study carrying only paths.
4. As each study finishes, its row replaces the placeholder and results.csv is rewritten atomically (at most every
   SAVE_EVERY seconds, and at the end: a crash loses at most that much, and those studies are redone because
   their rows still say "not finished"); a tqdm bar shows studies done, the rate and the ETA.
5. Ctrl-C: cancel the remaining futures, mark their rows interrupted, save the table, close the client and the
   cluster. The next run resumes.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import IrisInputError
from ..inference.task import TaskEmbedding
from . import results as R
from .cluster import LocalPlan, connect, local_plan
from .settings import Options
from .targets import Study

RUN_RECORD = "batch.json"
SAVE_EVERY = 1.0  # seconds: results.csv is rewritten after a finished study at most this often, and at the end
DASK_FAILURES = {
    "KilledWorker": "the worker process died while segmenting this study (out of memory?)",
    "CancelledError": "cancelled by Dask (the scheduler, or the connection to it, was lost?)",
    "FutureCancelledError": "cancelled by Dask (the scheduler, or the connection to it, was lost?)",
}


@dataclass
class Summary:
    studies: int
    already_done: int = 0
    ok: int = 0  # segmented in this run
    failed: int = 0
    kept: int = 0  # skipped: the output is the user's
    interrupted: bool = False
    seconds: float = 0.0  # from the cluster's start to the last study
    workers: str = ""
    results: Path | None = None

    @property
    def ran(self) -> int:
        return self.ok + self.failed


def plan_studies(studies: list[Study], out_dir: Path, table: R.ResultsTable, key: str, overwrite: bool
                 ) -> dict[str, R.Verdict]:
    """The verdict for every study (results.check_study); with `overwrite`, every study runs."""
    if overwrite:
        return {s.id: R.Verdict(R.RUN) for s in studies}
    return {s.id: R.check_study(s, s.output(out_dir), table.get(s.id), key) for s in studies}


def _refuse_other_task(studies: list[Study], table: R.ResultsTable, key: str) -> None:
    other = sorted({r["task"] for s in studies if (r := table.get(s.id)) and r.get("status") == R.OK and r.get("task") != key})
    if other:
        n = sum(1 for s in studies if (r := table.get(s.id)) and r.get("status") == R.OK and r.get("task") != key)
        raise IrisInputError(f"{table.path}: {n} of these studies were segmented with another task (task {', '.join(other)}, now "
                             f"{key}: another reference, labels, model or options); pass --overwrite to redo them with this "
                             "one, or give another --output-dir")


def _refuse_target_overwrite(studies: list[Study], out_dir: Path) -> None:
    clash = [s for s in studies if s.output(out_dir).resolve() == s.path.resolve()]
    if clash:
        raise IrisInputError(f"{clash[0].path}: its label map would replace the image itself; give an --output-dir other "
                             "than the targets folder")


def _write_run_record(out_dir: Path, task: TaskEmbedding, key: str, options: Options, source: str) -> None:
    from .. import __version__

    record = {"task": key, "model_id": task.model_id, "labels": task.labels, "names": task.names,
              "options": asdict(options), "targets": source, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": sys.argv, "IrisSegmentLib": __version__}
    R.write_atomic(out_dir / RUN_RECORD, json.dumps(record, indent=1) + "\n")


def _failed(study: Study, out_dir: Path, key: str, reason: str) -> dict:
    return {"id": study.id, "path": str(study.path), "output": str(study.output(out_dir)), "status": R.FAILED,
            "reason": reason, "task": key}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_batch(studies: list[Study], out_dir: str | Path, task: TaskEmbedding, options: Options, key: str, *,
              source: str = "", scheduler: str | None = None, workers: int | None = None, overwrite: bool = False,
              progress: bool = True, echo: Callable[[str], None] = print) -> Summary:
    """Segments `studies` into `out_dir` with `task` (see the module docstring); returns what happened."""
    out = Path(out_dir).resolve()
    structures = R.structure_columns(task.labels, task.names)
    summary = Summary(len(studies), results=out / R.RESULTS)
    with R.OutputLock(out):
        table = R.ResultsTable.load(out / R.RESULTS, structures)
        _refuse_target_overwrite(studies, out)
        if not overwrite:
            _refuse_other_task(studies, table, key)
        stray = R.remove_stray_temporaries(out)
        verdicts = plan_studies(studies, out, table, key, overwrite)
        todo = [s for s in studies if verdicts[s.id].state == R.RUN]
        for s in studies:
            v = verdicts[s.id]
            if v.state == R.KEPT:
                table.set(R.skipped_row(s, s.output(out), v.reason, key))
            elif v.state == R.RUN:
                table.set(R.skipped_row(s, s.output(out), R.NOT_FINISHED, key))
        table.save()
        summary.already_done = sum(v.state == R.DONE for v in verdicts.values())
        summary.kept = sum(v.state == R.KEPT for v in verdicts.values())
        echo(f"{len(studies)} studies: {summary.already_done} already done (checked), {summary.kept} kept (outputs not "
             f"written by this batch), {len(todo)} to segment")
        if stray:
            echo(f"removed {len(stray)} temporary file(s) left by an interrupted run")
        redo = [f"{s.id} ({verdicts[s.id].reason})" for s in todo if verdicts[s.id].reason]
        if redo:
            echo(f"redoing {len(redo)}: {', '.join(redo[:5])}" + (f" and {len(redo) - 5} more" if len(redo) > 5 else ""))
        if summary.kept:
            echo(f"kept {summary.kept} existing output(s) not written by this batch; --overwrite replaces them "
                 f"(see {table.path})")
        if not todo:
            return summary
        _write_run_record(out, task, key, options, source)
        _run(todo, out, task, options, key, table, structures, summary, scheduler, workers, progress, echo)
    return summary


def _run(todo: list[Study], out: Path, task: TaskEmbedding, options: Options, key: str, table: R.ResultsTable,
         structures, summary: Summary, scheduler: str | None, workers: int | None, progress: bool, echo) -> None:
    from distributed import as_completed
    from distributed.comm import get_address_host
    from tqdm import tqdm

    from .worker import SegmenterPlugin, plugin_status, segment_study

    plan: LocalPlan | None = None if scheduler else local_plan(options.device, workers)
    client = cluster = futures = bar = None
    name = f"iris-segment-{key}-{uuid.uuid4().hex[:8]}"
    pending = {s.id for s in todo}
    t0 = saved = time.perf_counter()
    try:
        echo(f"starting {plan.describe()}" if plan else f"connecting to the Dask scheduler at {scheduler}")
        client, cluster = connect(scheduler, plan)
        hosts = Counter(get_address_host(address) for address in client.run(os.getpid))  # workers per machine
        plugin = SegmenterPlugin(name, options, task, key, threads=plan.threads if plan else None, local=plan is not None,
                                 workers_per_host=dict(hosts))
        client.register_plugin(plugin, name=name)
        statuses = {w: s for w, s in client.run(plugin_status, name).items() if s is not None}
        errors = [f"worker {w}: {s['error']}" for w, s in statuses.items() if s["error"]]
        if errors:
            raise IrisInputError(errors[0] + (f" (and {len(errors) - 1} more workers)" if len(errors) > 1 else ""))
        kinds = Counter((s["device"], s["threads"]) for s in statuses.values())
        summary.workers = f"{len(statuses)} worker(s): " + ", ".join(
            f"{n} on {d} with {t} torch thread(s)" for (d, t), n in sorted(kinds.items()))
        echo(f"{summary.workers}; model loaded on each; segmenting {len(todo)} studies")
        futures = client.map(segment_study, [name] * len(todo), [s.id for s in todo], [str(s.path) for s in todo],
                             [str(s.output(out)) for s in todo], key=[f"{name}-{i}" for i in range(len(todo))], pure=False)
        by_key = {f.key: s for f, s in zip(futures, todo)}
        bar = tqdm(total=len(todo), unit="study", desc="batch", disable=not progress, smoothing=0.1)
        for fut in as_completed(futures):
            study = by_key[fut.key]
            try:
                raw = fut.result()
            except Exception as e:  # the worker process died (KilledWorker), or Dask failed around the task
                raw = _failed(study, out, key, DASK_FAILURES.get(type(e).__name__) or _one_line(e))
            table.set(R.format_row(raw, structures))
            pending.discard(study.id)
            if not pending or time.perf_counter() - saved >= SAVE_EVERY:
                table.save()
                saved = time.perf_counter()
            if raw["status"] == R.OK:
                summary.ok += 1
            else:
                summary.failed += 1
            bar.update(1)
            bar.set_postfix(ok=summary.ok, failed=summary.failed, refresh=False)
            summary.seconds = time.perf_counter() - t0
    except KeyboardInterrupt:
        summary.interrupted = True
        if futures is not None:
            client.cancel(futures)
        for sid in pending:
            row = table.get(sid)
            if row is not None and row.get("status") == R.SKIPPED:
                row["reason"] = R.INTERRUPTED
    finally:
        table.save()  # every row recorded so far (also when an error stops the run)
        if bar is not None:
            bar.close()
        if client is not None:
            if cluster is None:  # a shared cluster: free the model on its workers
                try:
                    client.unregister_worker_plugin(name)
                except Exception:
                    pass
            client.close()
        if cluster is not None:
            cluster.close()
