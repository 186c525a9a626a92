"""Sweeps on a SLURM cluster: ``sweeper slurm`` writes a batch script into the sweep directory and submits
it; the job (``python -m sweeper.slurm SWEEP_DIR``, the batch shell itself through ``exec``) starts a Ray
cluster over its allocation, runs or resumes the sweep on it, and requeues itself when stopped.

Why each choice (ray#59551 and the threads it collects; PITFALLS.md):
- A Ray cluster per allocation, its processes started by this job only: the head here on the batch node,
  a worker on every other node as an ``srun --overlap`` step running ``ray start --block``. Stopping the
  job's Ray = ending those processes (``ray start --block`` ends the Ray processes it started); never
  ``ray stop``, which ends every Ray on a shared node.
- Resources from the allocation (``--num-cpus``/``--num-gpus``), never detected: Ray counts the node's
  cores, not the job's.
- Ports and a short temp dir unique to the job and node (from the job id): two jobs, or two nodes of one
  job on one host, never meet; a Unix socket path must stay under 107 bytes.
- The wall clock: ``--signal=B:USR1@LEAD`` goes to the batch shell, which is this process (``exec``), so
  no bash trap is needed; sweeper.graceful stops the sweep so that nothing is lost, then the job runs
  ``scontrol requeue`` on itself (up to ``--max-requeues``). A requeued job runs this same script, and the
  sweep resumes (possibly on other nodes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT_DIR = "slurm"
SCRIPT_NAME = "job.sh"
JOB_RECORD = "job.json"
TAG_ALLOCATION_PREFIX = "sweeper.slurm.allocation."  # parent run: one tag per allocation (JSON)


class SlurmError(Exception):
    """A submission refused before anything was submitted, or a SLURM command that failed."""


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    sbatch: list[str] = field(default_factory=list)
    signal_lead: int = 300
    max_requeues: int = 10
    no_kill: bool = False


TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


def check_options(opts: SlurmOptions) -> None:
    if opts.nodes < 1:
        raise SlurmError(f"--nodes {opts.nodes}: at least 1")
    if opts.gpus_per_node < 0 or (opts.cpus_per_node is not None and opts.cpus_per_node < 1):
        raise SlurmError("--gpus-per-node must be >= 0 and --cpus-per-node >= 1")
    if opts.time is not None and not TIME.match(opts.time):
        raise SlurmError(f"--time {opts.time}: SLURM's forms: MM, HH:MM:SS, D-HH:MM:SS (e.g. 24:00:00)")
    if opts.signal_lead < 10:
        raise SlurmError(f"--signal-lead {opts.signal_lead}: at least 10 seconds before the time limit")
    if opts.max_requeues < 0:
        raise SlurmError(f"--max-requeues {opts.max_requeues}: 0 or more")


def check_shared_storage(storage: str) -> None:
    """Every node of the allocation reads and writes the sweep directory: an absolute path on a shared
    filesystem, or an object-store URI. A relative path names a different folder on each node's view."""
    if "://" in storage:
        return
    if not os.path.isabs(storage):
        raise SlurmError(
            f"--storage {storage}: every node of the job reads and writes the sweep directory; give an "
            "absolute path on a filesystem all nodes share (e.g. /scratch/$USER/sweeps) or an s3:// URI"
        )


def batch_script(opts: SlurmOptions, name: str, sweep_dir: str, output: str, workdir: str) -> str:
    """The batch script: SLURM's options, then ``exec`` of the job in the Python that submitted it."""
    lines = [
        "#!/bin/bash",
        f"# Written by `sweeper slurm` for sweep {name}; a requeued job runs this same script.",
        f"#SBATCH --job-name=sweeper-{name}",
        f"#SBATCH --nodes={opts.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if opts.cpus_per_node is not None:
        lines.append(f"#SBATCH --cpus-per-task={opts.cpus_per_node}")
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    lines += [
        # USR1 to the batch shell (B:) this long before the time limit: the sweep stops and requeues.
        f"#SBATCH --signal=B:USR1@{opts.signal_lead}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={output}",
    ]
    if opts.no_kill:
        lines.append("#SBATCH --no-kill")
    lines += [f"#SBATCH {arg}" for arg in opts.sbatch]
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV}
    lines += ["", f"cd {shlex.quote(workdir)}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    job = [sys.executable, "-m", "sweeper.slurm", sweep_dir, "--max-requeues", str(opts.max_requeues)]
    job += ["--gpus-per-node", str(opts.gpus_per_node)]
    if opts.cpus_per_node is not None:
        job += ["--cpus-per-node", str(opts.cpus_per_node)]
    # exec: the job is the batch shell, so SLURM's USR1 (B:) and SIGTERM reach it without a trap.
    lines += ["exec " + " ".join(shlex.quote(a) for a in job), ""]
    return "\n".join(lines)


FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "SWEEPER_DATA",
    "SWEEPER_STOP_GRACE_S",
    "SWEEPER_TRACKING_RETRY_S",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)
"""What the job needs of the submitting shell (SLURM passes the environment along too, but a requeued
job's environment is the one recorded at submission, and the script should say what it relies on)."""


def sbatch(script: Path) -> str:
    """Submit; return the job id."""
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run `sweeper slurm` on a SLURM login node") from None
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


# ---- status ---------------------------------------------------------------------------------------------
def job_status(sweep_dir) -> dict[str, Any] | None:
    """The sweep's SLURM job as ``status`` shows it: id, state, requeues, the current allocation's nodes."""
    if not sweep_dir.exists(f"{SCRIPT_DIR}/{JOB_RECORD}"):
        return None
    record = json.loads(sweep_dir.read_text(f"{SCRIPT_DIR}/{JOB_RECORD}"))
    out: dict[str, Any] = {"job": record["job"], "state": "unknown", "requeues": None, "nodes": None}
    try:
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", record["job"]], capture_output=True, text=True, timeout=20
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return out
    fields = dict(re.findall(r"(\w+)=(\S*)", done.stdout))
    if done.returncode == 0 and fields:
        out["state"] = fields.get("JobState", "unknown")
        out["requeues"] = int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else None
        out["nodes"] = fields.get("NodeList") if fields.get("NodeList") not in (None, "(null)") else None
        out["reason"] = fields.get("Reason") if fields.get("Reason") not in (None, "None") else None
    else:
        out["state"] = "gone from SLURM (ended long ago)"
    return out


# ---- inside the allocation ------------------------------------------------------------------------------
def _hostnames(nodelist: str) -> list[str]:
    done = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def _node_addr(node: str) -> str:
    done = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True)
    found = re.search(r"NodeAddr=(\S+)", done.stdout)
    addr = found.group(1) if found else node
    return socket.gethostbyname(addr)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def job_ports(job_id: int, nodes: int) -> dict[str, int]:
    """Ports unique to this job: the head's GCS port and one dashboard-agent port per node (Ray's fixed
    defaults, 6379 and 52365, are what two jobs on one node collide on; the others Ray picks at random).
    From the job id, so a rerun of the job picks the same; the next free block if one is taken."""
    block = 1 + nodes
    for offset in range(0, 200 * block, block):
        base = 20000 + ((job_id * block) % 20000 + offset) % 20000
        ports = list(range(base, base + block))
        if all(_free(p) for p in ports):
            return {"gcs": ports[0], "agents": ports[1:]}
    raise SlurmError("no free block of ports for the job's Ray cluster")


class JobCluster:
    """The Ray processes this job starts, and only those: ``ray start --block`` for the head here and, as
    ``srun`` steps, one on every other node."""

    def __init__(self, job_id: int, nodes: list[str], cpus: int, gpus: int) -> None:
        self.job_id, self.nodes, self.cpus, self.gpus = job_id, nodes, cpus, gpus
        self.ports = job_ports(job_id, len(nodes))
        self.head_ip = _node_addr(nodes[0])
        self.address = f"{self.head_ip}:{self.ports['gcs']}"
        self.processes: list[subprocess.Popen] = []
        self.ray = str(Path(sys.executable).parent / "ray")

    def _node_args(self, index: int, ip: str) -> list[str]:
        return [
            "--block",
            "--node-ip-address",
            ip,
            "--num-cpus",
            str(self.cpus),
            "--num-gpus",
            str(self.gpus),
            # Short and unique per job and node: Ray's socket paths live under it (107-byte limit).
            "--temp-dir",
            f"/tmp/sw{self.job_id}n{index}",
            "--dashboard-agent-listen-port",
            str(self.ports["agents"][index]),
            "--disable-usage-stats",
        ]

    def start(self, log) -> None:
        head = [self.ray, "start", "--head", "--port", str(self.ports["gcs"])]
        head += ["--include-dashboard", "false"]
        self.processes.append(_spawn(head + self._node_args(0, self.head_ip), log))
        deadline = time.monotonic() + 120
        while not _answers(self.head_ip, self.ports["gcs"]):
            if time.monotonic() > deadline or self.processes[0].poll() is not None:
                raise SlurmError(f"the Ray head did not start on {self.nodes[0]} (see the job's output)")
            time.sleep(0.5)
        for index, node in enumerate(self.nodes[1:], start=1):
            step = [
                "srun",
                "--overlap",
                "--nodes=1",
                "--ntasks=1",
                f"--nodelist={node}",
                "--kill-on-bad-exit=0",
            ]
            worker = [self.ray, "start", "--address", self.address]
            self.processes.append(_spawn(step + worker + self._node_args(index, _node_addr(node)), log))

    def wait_for_nodes(self, timeout: float = 180) -> int:
        import ray

        deadline = time.monotonic() + timeout
        while True:
            alive = sum(1 for n in ray.nodes() if n["Alive"])
            if alive >= len(self.nodes) or time.monotonic() > deadline:
                return alive
            time.sleep(1)

    def stop(self) -> None:
        """End this job's Ray: SIGTERM to each ``ray start --block`` (an ``srun`` passes it to its step),
        which ends the Ray processes it started; SIGKILL what is left after 30 s."""
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 30
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def _spawn(cmd: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _record_allocation(meta: dict[str, Any], experiment: str, restart: int, info: dict[str, Any]) -> None:
    """The allocation on the sweep's parent run (tag per allocation), for `status` and the MLflow UI."""
    try:
        from mlflow.tracking import MlflowClient

        from sweeper.tracking import TAG_ROLE, TAG_SWEEP

        client = MlflowClient(meta["tracking_uri"])
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{TAG_SWEEP}` = '{meta['sweep_id']}' and tags.`{TAG_ROLE}` = 'parent'",
        )
        if runs:
            client.set_tag(runs[0].info.run_id, f"{TAG_ALLOCATION_PREFIX}{restart}", json.dumps(info))
    except Exception as err:  # noqa: BLE001 - a record, never the sweep's fate
        print(f"sweeper slurm: could not record the allocation on the parent run: {err}", flush=True)


def submit(loaded, storage: str, opts: SlurmOptions, dry_run: bool) -> tuple[str | None, str, list[str]]:
    """Check everything a job an hour from now would trip on, then write the script into the sweep
    directory and submit it. Returns the job id (None for a dry run), the script and warnings."""
    from sweeper.location import parse_location
    from sweeper.orchestrate import kept_tracking_uri, prepare_sweep_dir, stage_datasets
    from sweeper.spec import expand
    from sweeper.tracking import check_reachable, default_tracking_uri

    check_options(opts)
    check_shared_storage(storage)
    spec = loaded.spec
    if spec.resources.gpu not in (0, "auto") and float(spec.resources.gpu) > 0 and opts.gpus_per_node == 0:
        raise SlurmError(
            f"{loaded.path}: resources.gpu is {spec.resources.gpu} but the job asks for no GPU; "
            "add --gpus-per-node N"
        )
    if opts.cpus_per_node is not None and spec.resources.cpu > opts.cpus_per_node:
        raise SlurmError(
            f"{loaded.path}: resources.cpu is {spec.resources.cpu} per trial, more than --cpus-per-node "
            f"{opts.cpus_per_node}: no trial would ever start"
        )
    trials = expand(loaded)
    location = parse_location(storage)
    sweep_dir = location.child(spec.name)
    tracking_uri = kept_tracking_uri(sweep_dir) or default_tracking_uri()
    warnings = []
    if tracking_uri.startswith("sqlite:"):
        if opts.nodes > 1:
            warnings.append(
                f"tracking store {tracking_uri} is SQLite: trials on {opts.nodes} nodes writing one SQLite "
                "file over a network filesystem can corrupt it (its locks do not hold over NFS). Use an "
                "`mlflow server` (MLFLOW_TRACKING_URI=http://host:5000) or a PostgreSQL URI; see docs/cluster.md"
            )
        path = tracking_uri.removeprefix("sqlite:///")
        if not os.path.isabs(path):
            raise SlurmError(f"MLFLOW_TRACKING_URI {tracking_uri}: give an absolute path every node shares")
    check_reachable(tracking_uri)
    stage_datasets(loaded, trials)  # a missing dataset now, not an hour later in the queue
    workdir = os.getcwd()
    output = (
        f"{sweep_dir.path}/{SCRIPT_DIR}/job-%j.out"
        if sweep_dir.is_local
        else f"{workdir}/slurm-{spec.name}-%j.out"
    )
    script = batch_script(opts, spec.name, sweep_dir.uri, output, workdir)
    if dry_run:
        return None, script, warnings
    prepare_sweep_dir(loaded, sweep_dir, tracking_uri)
    sweep_dir.child(SCRIPT_DIR).write_text(SCRIPT_NAME, script)
    if sweep_dir.is_local:
        local = Path(sweep_dir.path) / SCRIPT_DIR / SCRIPT_NAME
    else:  # sbatch reads a local file; the sweep directory keeps the copy a requeue runs
        local = Path(workdir) / f"slurm-{spec.name}.sh"
        local.write_text(script)
    local.chmod(0o755)
    job = sbatch(local)
    sweep_dir.child(SCRIPT_DIR).write_text(
        JOB_RECORD,
        json.dumps({"job": job, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "script": str(local)}),
    )
    return job, script, warnings


def job_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper.slurm")
    parser.add_argument("sweep_dir")
    parser.add_argument("--max-requeues", type=int, default=10)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    parser.add_argument("--cpus-per-node", type=int, default=None)
    args = parser.parse_args(argv)

    early: list[str] = []  # a signal before the sweep's own handling is in place

    def on_signal(signum, frame):
        early.append(signal.Signals(signum).name)
        from sweeper import graceful

        graceful.note_stop(early[-1])

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, on_signal)

    from sweeper.location import parse_location
    from sweeper.orchestrate import SweepInterrupted, run_sweep
    from sweeper.spec import load_frozen_spec

    job_id = int(os.environ["SLURM_JOB_ID"])
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    nodes = _hostnames(os.environ["SLURM_JOB_NODELIST"])
    cpus = args.cpus_per_node or int(os.environ.get("SLURM_CPUS_ON_NODE", "1"))
    sweep_dir = parse_location(args.sweep_dir)
    meta = json.loads(sweep_dir.read_text("sweep.json"))
    loaded = load_frozen_spec(sweep_dir)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(f"sweeper slurm: job {job_id}, allocation {restart + 1}, nodes {','.join(nodes)}", flush=True)
    # The job's own Ray: authenticated with a token only this job knows (srun passes the environment on).
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ.pop("RAY_ADDRESS", None)
    cluster = JobCluster(job_id, nodes, cpus, args.gpus_per_node)
    ended = "finished"
    status = 0
    try:
        cluster.start(sys.stdout)
        import ray

        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        alive = cluster.wait_for_nodes()
        print(f"sweeper slurm: Ray cluster at {cluster.address}, {alive} of {len(nodes)} nodes", flush=True)
        if early:
            raise SweepInterrupted(early[0], sweep_dir)
        result = run_sweep(
            loaded, storage=sweep_dir.parent, address=cluster.address, tracking_uri=meta["tracking_uri"]
        )
        failed = sum(o.status != "FINISHED" for o in result.outcomes)
        print(
            f"sweeper slurm: sweep ended, {len(result.outcomes) - failed} finished, {failed} failed",
            flush=True,
        )
        status = 0 if failed == 0 else 1
    except SweepInterrupted as stopped:
        ended = f"stopped ({stopped.reason})"
        status = 75
    except Exception as err:  # noqa: BLE001 - said in the job's output; the allocation is recorded
        ended = f"error: {type(err).__name__}: {err}"
        print(f"sweeper slurm: {ended}", flush=True)
        status = 1
    finally:
        # The sweep is over: a signal from now on (the time limit's USR1 arriving late, a scancel) has
        # nothing left to stop, and its default action would end this job FAILED after a finished sweep.
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        cluster.stop()
    info = {"job": job_id, "nodes": nodes, "start": started, "end": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _record_allocation(meta, loaded.spec.experiment, restart, {**info, "ended": ended})
    if status == 75:
        if restart < args.max_requeues:
            print(
                f"sweeper slurm: requeueing job {job_id} ({restart + 1} of {args.max_requeues})", flush=True
            )
            subprocess.run(["scontrol", "requeue", str(job_id)], check=False)
            return 0
        print(
            f"sweeper slurm: stopped after {restart} requeues (--max-requeues {args.max_requeues}); "
            f"submit again with `sweeper slurm` or run `sweeper resume {args.sweep_dir}`",
            flush=True,
        )
    return status


if __name__ == "__main__":
    code = job_main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Ray and MLflow are shut down already; their exit hooks have hung here past the sweep's end (seen
    # under load in CI), until SLURM's signal ended the job FAILED. The job's status is decided.
    os._exit(code)
