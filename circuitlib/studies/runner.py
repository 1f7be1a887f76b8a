"""Run a study: its pending units, serially or on Dask distributed, into its results store.

    run_study(spec)                    a local Dask cluster, one single-threaded worker per core
    run_study(spec, workers=0)         serially, in this process
    run_study(spec, scheduler=ADDR)    on an existing Dask cluster (Slurm via dask-jobqueue, a GPU box, ...)
    study_status(spec)                 done / pending / failed / running units, time spent and left
    study_table(spec)                  the finished rows of this spec, one per circuit

A unit (see `circuitlib.studies.spec`) loads the model once per worker process, generates its prompts,
runs one `extract.sweep` over all its alphas, prunes every distinct circuit for real
(`surgery.prune`) and measures the pruned model on the validation and the held-out test split.
It writes one row per alpha, with per-prompt correctness and KL (for intervals over prompts) and
its provenance, atomically (`circuitlib.studies.store`). A unit that raises is recorded as failed with
its error and retried by the next run; Ctrl-C or a crash loses only the units in flight.
"""

from __future__ import annotations

import os
import platform
import time
import traceback
import uuid
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from circuitlib.studies.provenance import provenance
from circuitlib.studies.spec import Spec, Unit
from circuitlib.studies.store import RunningElsewhere, Store

_LOADED: dict = {}  # (model, device) -> (model, tokenizer), one per worker process


@dataclass
class PlannedUnit:
    unit: Unit
    key: str
    digest: str


def plan(spec: Spec) -> list[PlannedUnit]:
    """Every unit of `spec` with its key (the prompts are generated to fingerprint them; no model is loaded)."""
    from circuitlib.models.loading import load_tokenizer
    from circuitlib.pipeline.extraction import prompts_digest
    from circuitlib.tasks import get_task

    tokenizer = load_tokenizer(spec.model)
    digests: dict[tuple, str] = {}
    planned = []
    for u in spec.units():
        data_key = (u.task, u.n, u.n_test, u.seed)
        if data_key not in digests:
            data = get_task(u.task).generate(tokenizer, n=u.n, seed=u.seed, n_test=u.n_test)
            digests[data_key] = prompts_digest(data)
        planned.append(PlannedUnit(u, u.key(digests[data_key]), digests[data_key]))
    return planned


def cached_model(name: str, device: str):
    """The model `name` on `device`, loaded once per process (a worker runs many units of one model)."""
    if (name, device) not in _LOADED:
        from circuitlib.models.loading import load_model

        _LOADED[(name, device)] = load_model(name, device=device)
    return _LOADED[(name, device)]


@torch.inference_mode()
def _per_prompt(task, split, full_log_probs: torch.Tensor, model) -> dict:
    """Correctness [n] and KL to the full model [n] of `model` on one split."""
    from circuitlib.core.metrics import kl_per_prompt

    logits = model(split.tokens.to(model.device), last_only=True)
    return {
        "correct": task.correct(split, logits).cpu().tolist(),
        "kl": kl_per_prompt(full_log_probs, logits).cpu().tolist(),
    }


def run_unit(
    planned: PlannedUnit,
    store_root: str,
    *,
    study: str,
    device: str = "cpu",
    threads: int = 1,
    progress: bool = False,
    prov: dict | None = None,
    run_id: str | None = None,
) -> dict:
    """Compute one unit and write its rows; a failure is recorded, not raised. Returns a short summary.

    A unit already in the store is not computed again: Dask recomputes a finished task whose result
    was held by a worker that died later, and another run may have finished the unit meanwhile.
    Nor is a unit that another live run (another `run_id`) has claimed: status "elsewhere".
    """
    store, unit, key = Store(store_root), planned.unit, planned.key
    run_id = run_id or uuid.uuid4().hex
    if store.unit_path(key).exists():
        return {"key": key, "label": unit.label, "status": "done", "seconds": 0.0, "already_stored": True}
    marker = {"unit": unit.label, "run": run_id, "pid": os.getpid(), "host": platform.node()}
    other = store.claim(
        key, {**marker, "done": 0, "total": None}, owned_elsewhere=lambda m: m.get("run") != run_id and _alive(m)
    )
    if other is not None:
        return {"key": key, "label": unit.label, "status": "elsewhere", "by": _holder(other)}
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.set_num_threads(threads)
    last_report = [0.0]

    def on_step(done: int, total: int, states: int) -> None:
        if time.perf_counter() - last_report[0] > 5 or done == total:
            last_report[0] = time.perf_counter()
            store.write_running(key, {**marker, "done": done, "total": total, "states": states})

    try:
        saved = store.read_partial(key)  # the snapshot of an earlier, cut-off run of this unit
        rows, resumed = _compute(unit, key, planned.digest, study, device, threads, progress, on_step, store, saved)
        earlier = float(saved["seconds"]) if resumed else 0.0
        # CPU time counts the work whatever else shares the cores; unknown (NaN) when the unit resumed
        # from a snapshot saved before snapshots recorded it
        earlier_cpu = saved.get("cpu_seconds") if resumed else 0.0
        unit_seconds = earlier + time.perf_counter() - started
        unit_cpu = float("nan") if earlier_cpu is None else float(earlier_cpu) + time.process_time() - cpu_started
        info = {
            **(prov or provenance(device, threads)),
            "torch_threads": threads,
            "device": device,
            "unit_seconds": unit_seconds,
            "unit_cpu_seconds": unit_cpu,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        store.write_unit(key, [{**r, **info} for r in rows])
        return {"key": key, "label": unit.label, "status": "done", "seconds": unit_seconds}
    except Exception as e:  # noqa: BLE001 - recorded with its traceback and retried by the next run
        store.write_failure(
            key,
            {
                "unit": unit.label,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
                "host": platform.node(),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        return {"key": key, "label": unit.label, "status": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        store.clear_running(key)


@torch.inference_mode()
def _compute(
    unit: Unit,
    key: str,
    digest: str,
    study: str,
    device: str,
    threads: int,
    progress: bool,
    on_step,
    store: Store,
    saved: dict | None,
) -> tuple[list[dict], bool]:
    """The unit's rows, and whether its sweep went on from `saved` (the snapshot of a cut-off run)."""
    from circuitlib.pipeline.extraction import check_memory, extraction_out_of_memory_as_error, prompts_digest
    from circuitlib.tasks import get_task

    model, tokenizer = cached_model(unit.model, device)
    task = get_task(unit.task)
    data = task.generate(tokenizer, n=unit.n, seed=unit.seed, n_test=unit.n_test)
    found = prompts_digest(data)
    if found != digest:
        raise RuntimeError(
            f"the prompts generated on this worker differ from the planner's ({found} != {digest}): "
            "different circuitlib versions or tokenizers on the driver and the workers"
        )
    n, seq_len = max(unit.n, unit.n_test), data.validation.tokens.shape[1]
    check_memory(model, n, seq_len, "fast", SPEC_N)
    with extraction_out_of_memory_as_error(model, n, seq_len, "fast", "the unit", SPEC_N):
        return _sweep_and_measure(unit, key, digest, study, progress, on_step, store, saved, model, task, data)


SPEC_N = "the spec's n"


def _sweep_and_measure(unit, key, digest, study, progress, on_step, store, saved, model, task, data):
    """`_compute`'s work once the memory check passed: the sweep and the measurement of every circuit."""
    from circuitlib.core.ablation import mean_activations
    from circuitlib.core.metrics import log_probs
    from circuitlib.core.surgery import prune
    from circuitlib.discovery.greedy import ResumeError, sweep
    from circuitlib.pipeline.extraction import full_reference

    full_logits = {s: model.unembed(r) for s, r in full_reference(model, data).items()}  # [n, V] per split
    full_lp = {s: log_probs(logits) for s, logits in full_logits.items()}
    means = mean_activations(model, data.patching.tokens) if unit.ablation == "mean" else None
    full = {s: {"correct": task.correct(getattr(data, s), full_logits[s]).cpu().tolist()} for s in full_logits}
    # `saved`: the store's partial record of this unit, if an earlier run was cut off: go on from it
    before = float(saved["seconds"]) if saved else 0.0
    before_cpu = (saved or {}).get("cpu_seconds", None if saved else 0.0)
    started, cpu_started = time.perf_counter(), time.process_time()

    def on_layer(snapshot: dict) -> None:
        cpu = None if before_cpu is None else float(before_cpu) + time.process_time() - cpu_started
        store.write_partial(
            key, {"snapshot": snapshot, "seconds": before + time.perf_counter() - started, "cpu_seconds": cpu}
        )

    def run(resume):
        return sweep(
            model,
            data.patching.tokens,
            data.validation.tokens,
            list(unit.alphas),
            ablation=unit.ablation,
            include_mlps=unit.include_mlps,
            order=unit.order,
            progress=progress,
            means=means,
            on_step=on_step,
            on_layer=on_layer,
            resume=resume,
        )

    resumed = saved is not None
    try:
        circuits = run(saved["snapshot"] if saved else None)
    except ResumeError:  # a snapshot of other settings: start afresh
        before, before_cpu, started, cpu_started = 0.0, 0.0, time.perf_counter(), time.process_time()
        resumed = False
        circuits = run(None)
    sweep_seconds = before + time.perf_counter() - started
    S = data.validation.tokens.shape[1]
    full_params, full_flops = model.count_parameters()["parameters"], model.flops(S)
    measured: dict[tuple, dict] = {}
    rows = []
    for c in circuits:
        kept = tuple(c.kept)
        if kept not in measured:
            pruned = prune(model, list(kept), unit.ablation, means)
            size = pruned.count_parameters()
            measured[kept] = {
                "size": size,
                "flops": pruned.flops(S),
                **{s: _per_prompt(task, getattr(data, s), full_lp[s], pruned) for s in ("validation", "test")},
            }
            del pruned
        m = measured[kept]
        rows.append(
            {
                "study": study,
                "key": key,
                "model": unit.model,
                "task": task.name,
                "ablation": unit.ablation,
                "include_mlps": unit.include_mlps,
                "seed": unit.seed,
                "alpha": c.alpha,
                "n": unit.n,
                "n_test": unit.n_test,
                "order": unit.order,
                "n_alphas": len(unit.alphas),
                "prompts_digest": digest,
                "kept_heads": c.kept_heads,
                "kept_mlps": c.kept_mlps,
                "heads": len(c.kept_heads),
                "mlps": len(c.kept_mlps),
                "circuit_kl": c.final_kl,
                "val_accuracy": _mean(m["validation"]["correct"]),
                "val_kl": _mean(m["validation"]["kl"]),
                "test_accuracy": _mean(m["test"]["correct"]),
                "test_kl": _mean(m["test"]["kl"]),
                "val_correct": m["validation"]["correct"],
                "test_correct": m["test"]["correct"],
                "val_kl_per_prompt": m["validation"]["kl"],
                "test_kl_per_prompt": m["test"]["kl"],
                "full_val_accuracy": _mean(full["validation"]["correct"]),
                "full_test_accuracy": _mean(full["test"]["correct"]),
                "full_val_correct": full["validation"]["correct"],
                "full_test_correct": full["test"]["correct"],
                "parameters": m["size"]["parameters"],
                "ablation_bias": m["size"]["ablation_bias"],
                "full_parameters": full_params,
                "parameter_reduction": 1 - m["size"]["parameters"] / full_params,
                "flops": m["flops"],
                "full_flops": full_flops,
                "flop_ratio": m["flops"] / full_flops,
                "sweep_seconds": sweep_seconds,
            }
        )
    return rows, resumed


def _mean(values: list) -> float:
    return float(sum(values) / len(values))


def run_study(
    spec: Spec,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int = 1,
    device: str | None = None,
    max_units: int | None = None,
    tasks: list[str] | None = None,
    ablations: list[str] | None = None,
    include_mlps: list[bool] | None = None,
    progress: bool = True,
) -> dict:
    """Compute the pending units of `spec` (finished ones are skipped, failed ones retried).

    workers:   local Dask workers (default: one per core); 0 runs serially in this process
    scheduler: address of an existing Dask scheduler (then `workers` is ignored)
    threads:   torch threads per worker (recorded with every row)
    device:    overrides the spec's device ("cuda" sends every unit to the workers' GPU)
    max_units: stop after this many units (the rest stay pending)
    tasks:     run only the units of these tasks of the spec (the others stay pending)
    ablations, include_mlps: likewise, only the units of these ablation schemes / MLP settings
               (e.g. the units one chapter needs first)
    Returns {"done": [...], "failed": [...], "elsewhere": [...], "quarantined": [...]} summaries of
    the units this call ran ("elsewhere": units another run claimed after this one started, left to
    it; "quarantined": units whose files could not be read, moved to quarantine/ and pending again).

    Refused before any work when another live run is computing one of the units this call would
    run (its `running/` marker): wait for it, or limit this call to other units. A serial run also
    refuses, before any prompt is made, a spec whose n (of the chosen tasks) would not fit in memory
    (`circuitlib.pipeline.extraction.check_memory`); on Dask each worker checks its unit before starting it (a unit that
    does not fit fails, named so).
    The store's folders are made only once all of this passed.
    """
    from circuitlib.models.loading import check_device

    device = device or spec.device
    if scheduler is None:
        check_device(device)  # on a remote cluster the workers' devices count, not ours
    unknown = sorted(set(tasks or []) - set(spec.tasks))
    if unknown:
        raise ValueError(f"task {unknown[0]!r} is not in the spec {spec.name} (its tasks: {', '.join(spec.tasks)})")
    for name, chosen, values in (
        ("ablation", ablations, spec.ablations),
        ("include_mlps", include_mlps, spec.include_mlps),
    ):
        missing = [c for c in (chosen or []) if c not in values]
        if missing:
            raise ValueError(
                f"{name} {missing[0]!r} is not in the spec {spec.name} (its values: {', '.join(map(str, values))})"
            )
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive number of torch threads per worker, got {threads!r}")
    store = Store(spec.store)
    if scheduler is None and workers == 0:
        _check_memory_of_units(spec, device, tasks)  # before `plan` makes the prompts of an n that cannot fit
    planned = plan(spec)  # loads the tokenizer: an unknown model is refused here, nothing created
    damaged = store.unreadable({p.key for p in planned})  # moved to quarantine/ once everything is checked
    finished = store.done() - set(damaged)
    pending = [
        p
        for p in planned
        if p.key not in finished
        and (not tasks or p.unit.task in tasks)
        and (not ablations or p.unit.ablation in ablations)
        and (not include_mlps or p.unit.include_mlps in include_mlps)
    ]
    live = {k: v for k, v in store.running().items() if _alive(v)}
    busy = [p for p in pending if p.key in live]
    if busy:
        raise RunningElsewhere(
            f"{len(busy)} unit(s) of study {spec.name} are being computed by another run now: "
            + "; ".join(f"{p.unit.label} ({_holder(live[p.key])})" for p in busy[:3])
            + ("; ..." if len(busy) > 3 else "")
            + f". Wait for it to finish (python -m circuitlib study status {spec.source or spec.name} shows it), "
            "or limit this run to other units (--task, --ablation, --include-mlps on the command line; "
            "tasks=, ablations=, include_mlps= in Python)"
        )
    pending = pending[:max_units]
    labels = {p.key: p.unit.label for p in planned}
    results = {
        "done": [],
        "failed": [],
        "elsewhere": [],
        "quarantined": [
            {"key": k, "label": labels[k], "reason": reason, "to": str(store.quarantine(k, reason))}
            for k, reason in damaged.items()
        ],
    }
    if not pending:
        return results
    store.check_writable()  # the store's folders, made once everything else is checked
    prov = provenance(device, threads)
    run_id = uuid.uuid4().hex  # this run's claims on units (store.claim); another run's are left alone
    common = dict(study=spec.name, device=device, threads=threads, prov=prov, run_id=run_id)
    if scheduler is None and workers == 0:
        bar = tqdm(pending, desc=f"study {spec.name}", unit="unit", disable=not progress)
        for p in bar:
            bar.set_postfix_str(p.unit.label)
            r = run_unit(p, str(store.root), progress=progress, **common)
            results[r["status"]].append(r)
        return results
    return _run_on_dask(spec, store, pending, common, workers, scheduler, threads, progress, results)


def _check_memory_of_units(spec: Spec, device: str, tasks: list[str] | None) -> None:
    """Refuse a spec whose units (of `tasks`, default all) would not fit in this process's memory, before
    any prompt is made (`circuitlib.pipeline.extraction.check_memory`; the prompt length from one prompt of
    each task)."""
    from circuitlib.pipeline.extraction import check_memory
    from circuitlib.tasks import get_task

    model, tokenizer = cached_model(spec.model, device)  # loaded once for every unit of this process anyway
    for task in spec.tasks:
        if not tasks or task in tasks:
            n = max(spec.n[task], spec.n_test[task])
            check_memory(
                model, n, get_task(task).check(tokenizer, 2 * spec.n[task] + spec.n_test[task]), "fast", SPEC_N
            )


def _run_on_dask(spec, store, pending, common, workers, scheduler, threads, progress, results) -> dict:
    from distributed import Client, LocalCluster, wait

    cluster = None
    if scheduler is None:
        n = workers or os.cpu_count() or 1
        thread_env = {v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        # No dashboard; the scheduler's small HTTP server (health checks) on a free local port, so that
        # two studies on one machine never compete for Dask's default port 8787.
        cluster = LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            env=thread_env,
            silence_logs=40,
        )
    client = Client(cluster if cluster is not None else scheduler)
    try:
        labels, remaining = {}, set()
        for i, p in enumerate(pending):
            future = client.submit(run_unit, p, str(store.root), key=f"unit-{p.key}", priority=-i, pure=False, **common)
            labels[future.key] = p
            remaining.add(future)
        pending_keys = {p.key for p in pending}
        bar = tqdm(total=len(remaining), desc=f"study {spec.name}", unit="unit", disable=not progress)
        while remaining:
            try:
                finished, remaining = wait(remaining, timeout=5, return_when="FIRST_COMPLETED")
            except TimeoutError:
                finished = set()
            for f in finished:
                try:
                    r = f.result()
                except Exception as e:  # noqa: BLE001 - a worker died: record it like any failure
                    p = labels[f.key]
                    store.write_failure(
                        p.key,
                        {
                            "unit": p.unit.label,
                            "error": f"{type(e).__name__}: {e}",
                            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        },
                    )
                    r = {"key": p.key, "label": p.unit.label, "status": "failed", "error": str(e)}
                f.release()  # its rows are in the store: a worker lost later must not make Dask redo it
                results[r["status"]].append(r)
                bar.update(1)
            running = store.running()  # this run's units only: a killed run's markers may remain
            bar.set_postfix_str(
                " | ".join(
                    f"{v.get('unit', '?')} {v.get('done', 0)}/{v.get('total') or '?'}"
                    for k, v in running.items()
                    if k in pending_keys
                )
            )
        bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        for key, marker in store.running().items():  # units this run cut off by Ctrl-C or a crash
            if marker.get("run") == common["run_id"]:  # are pending again, not "running"
                store.clear_running(key)
    return results


def study_status(spec: Spec, workers: int | None = None) -> dict:
    """Done, pending, failed and running units of `spec`, time spent and an estimate of the time left.

    A unit whose file cannot be read is "damaged" (the next `run_study` moves the file to quarantine/
    and computes the unit anew); "quarantined" counts the units not done whose file was moved there.

    A unit's cost is its CPU time (`unit_cpu_seconds`: the work itself, whatever else shared the
    cores) where recorded, else its wall time (`unit_seconds`, longer on a shared machine; units
    that resumed from snapshots older than the CPU-time records have only this). The estimate: for
    each unit not done, the mean cost of finished units of the same task and configuration (else
    of all finished units), less what a unit cut off part-way has already saved (`partial/`),
    divided by `workers` (default: one per core) as if each worker had a core to itself.
    """
    import pandas as pd

    store = Store(spec.store)
    planned = plan(spec)
    keys = {p.key for p in planned}
    done, failures, quarantined, damaged = store.done(), store.failures(), store.quarantined(), {}
    running = {k: v for k, v in store.running().items() if _alive(v)}
    table = store.read(keys & done, damaged=damaged)
    done -= set(damaged)
    costs = None
    if len(table):
        columns = [c for c in ("task", "ablation", "include_mlps", "unit_seconds", "unit_cpu_seconds") if c in table]
        costs = table.groupby("key")[columns].first()
        costs["cpu"] = (
            pd.to_numeric(costs["unit_cpu_seconds"], errors="coerce") if "unit_cpu_seconds" in costs else float("nan")
        )
    spent = float(costs["unit_seconds"].sum()) if costs is not None else 0.0
    cpu_spent = float(costs["cpu"].sum()) if costs is not None else 0.0
    left, units = 0.0, []
    for p in planned:
        state = (
            "done"
            if p.key in done
            else "damaged"
            if p.key in damaged
            else "running"
            if p.key in running
            else "failed"
            if p.key in failures
            else "pending"
        )
        saved = store.read_partial(p.key) if state != "done" else None
        units.append(
            {
                "key": p.key,
                "unit": p.unit.label,
                "state": state,
                **({"error": failures[p.key].get("error")} if state == "failed" else {}),
                **({"error": damaged[p.key]} if state == "damaged" else {}),
                **({"quarantined": True} if state != "done" and p.key in quarantined else {}),
                **(
                    {
                        "progress": (
                            f"{running[p.key].get('done')}/{running[p.key]['total']}"
                            if running[p.key].get("total")
                            else None
                        ),  # None: still starting
                        "updated_s_ago": round(time.time() - running[p.key].get("updated", time.time())),
                    }
                    if state == "running"
                    else {}
                ),
                **(
                    {
                        "saved": f"{len(saved['snapshot']['states'][0]['decisions'])} candidates, "
                        f"{float(saved['seconds']) / 3600:.2f} h"
                    }
                    if saved
                    else {}
                ),
            }
        )
        if state != "done" and costs is not None:
            same = costs[
                (costs.task == _task_name(p.unit.task))
                & (costs.ablation == p.unit.ablation)
                & (costs.include_mlps == p.unit.include_mlps)
            ]
            same = same if len(same) else costs
            if same["cpu"].notna().any():
                expected, saved_part = float(same["cpu"].mean()), (saved or {}).get("cpu_seconds")
            else:
                expected, saved_part = float(same["unit_seconds"].mean()), None
            if saved_part is None and saved:
                saved_part = saved["seconds"]
            left += max(0.0, expected - float(saved_part or 0.0))
    counts = {s: sum(u["state"] == s for u in units) for s in ("done", "running", "failed", "pending", "damaged")}
    counts["quarantined"] = sum(bool(u.get("quarantined")) for u in units)
    n_workers = workers or os.cpu_count() or 1
    return {
        "study": spec.name,
        "store": str(spec.store),
        "units": len(units),
        **counts,
        "other_units_in_store": len(done - keys),
        "seconds_spent": spent,
        "cpu_seconds_spent": cpu_spent,
        "units_with_cpu_seconds": int(costs["cpu"].notna().sum()) if costs is not None else 0,
        "seconds_left_estimate": left / n_workers if costs is not None else None,
        "workers_assumed": n_workers,
        "unit_states": units,
    }


STALE_AFTER_S = 15 * 60  # a marker of another host not updated for this long is a dead run's


def _holder(marker: dict) -> str:
    return f"pid {marker.get('pid', '?')} on {marker.get('host', '?')}"


def _alive(marker: dict) -> bool:
    """Whether a `running/` marker's process still runs: on this host, whether its pid exists; a
    marker of another host counts while it was updated in the last STALE_AFTER_S seconds."""
    if marker.get("host") != platform.node() or not isinstance(marker.get("pid"), int):
        return time.time() - float(marker.get("updated", 0)) < STALE_AFTER_S
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _task_name(task: str) -> str:
    from circuitlib.tasks import get_task

    return get_task(task).name


def study_table(spec: Spec, damaged: dict | None = None):
    """The rows of `spec`'s finished units (older settings in the same store are left out).

    An unreadable unit file raises a ValueError naming it, unless `damaged` is a dict: then the
    unit is left out and `damaged[key]` says why (see `Store.read`)."""
    return Store(spec.store).read({p.key for p in plan(spec)}, damaged=damaged)


def summary_table(table):
    """Mean and spread over seeds per task, configuration and alpha (the `study show` table)."""
    import pandas as pd

    if not len(table):
        return pd.DataFrame()
    g = table.groupby(["task", "ablation", "include_mlps", "alpha"], sort=True)
    out = g.agg(
        seeds=("seed", "nunique"),
        heads=("heads", "mean"),
        heads_sd=("heads", "std"),
        mlps=("mlps", "mean"),
        test_accuracy=("test_accuracy", "mean"),
        test_accuracy_sd=("test_accuracy", "std"),
        full_test_accuracy=("full_test_accuracy", "mean"),
        test_kl=("test_kl", "mean"),
        test_kl_sd=("test_kl", "std"),
        parameter_reduction=("parameter_reduction", "mean"),
        flop_ratio=("flop_ratio", "mean"),
    )
    return out.reset_index()
