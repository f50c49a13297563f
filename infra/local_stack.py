#!/usr/bin/env python
"""A real local multi-process stack, to exercise ubt's cluster path on one machine.

Under one state dir, on free ports, it starts:
  s3       `moto_server` (in-memory S3) with one bucket
  mlflow   `mlflow server`: sqlite backend, artifacts proxied by the server to s3://BUCKET/mlflow on moto
  prefect  `prefect server start` (sqlite under STATE/prefect)
  ray      two `ray start --block` node processes (a head and a worker, 1 CPU each), token auth

    python infra/local_stack.py up --state DIR      # prints `export ...` lines and writes DIR/stack.env
    python infra/local_stack.py status --state DIR
    python infra/local_stack.py down --state DIR

As a module (loaded by file path, infra/ is not a package): `up(state_dir) -> Stack`, `down(state_dir)`,
`status(state_dir)`. Nothing happens at import. Linux only (process groups are read from /proc).
Each component is started in its own session (process group) recorded in DIR/stack.json, and `down`
signals those groups only: it never runs `ray stop`, which kills every Ray process of the user on the
machine, other people's included.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUCKET = "ubt"
# moto accepts any credentials; these are its documented dummies, not secrets
S3_KEY, S3_SECRET = "testing", "testing"
# AF_UNIX paths hold 107 bytes; Ray puts sockets at TEMP/session_<date>_<pid>/sockets/plasma_store (~64 more)
_RAY_TEMP_MAX = 40
# variables that would point a component at another server than its own, or hand it real credentials
_FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "PREFECT_API_URL", "PREFECT_API_KEY",
                "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")


def _clean_env() -> dict[str, str]:
    """This process's environment without the variables above and without any AWS_* (real keys stay out)."""
    return {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV and not k.startswith("AWS_")}


# Runs in a subprocess: ray.init in the caller's process would clash with any other Ray it uses (see the
# `local_stack` fixture). Waits for both nodes, then prints their ids.
_RAY_PROBE = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if len(alive) >= 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(alive))
"""


class StackError(RuntimeError):
    """A component did not come up, or the state dir is unusable; the message names the log to read."""


@dataclass(frozen=True)
class Stack:
    """Endpoints of a running stack. `env()` is what a client process needs to use all of it."""

    state_dir: str
    prefect_api_url: str
    mlflow_uri: str
    s3_endpoint: str
    bucket: str
    ray_address: str
    ray_token_path: str
    already_running: bool = field(default=False, compare=False)

    def env(self) -> dict[str, str]:
        """Environment variables for a client (the flow, `ubt`, a test's subprocess)."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "RAY_ADDRESS": self.ray_address,
            # Ray 2.60 turns token auth on for `ray start --head`; clients need the same mode and token
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.ray_token_path,
        }

    def overrides(self) -> list[str]:
        """`section.key=value` overrides that point a ubt run config at this stack."""
        return [f"ray.address={self.ray_address}", f"mlflow.tracking_uri={self.mlflow_uri}",
                f"s3.endpoint_url={self.s3_endpoint}"]

    def env_script(self) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        lines += [f"# ubt overrides: {' '.join(self.overrides())}", f"# bucket: s3://{self.bucket}"]
        return "\n".join(lines) + "\n"


# --- processes -----------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(process group id, start time in clock ticks) of a live, non-zombie process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[2]), int(fields[19])


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[0] == pgid:
                members.append(int(entry))
    return members


def _alive(rec: dict) -> bool:
    """Whether the group we started is still there (and is ours: a reused pid has another start time)."""
    stat = _proc_stat(rec["pid"])
    if stat is not None:
        return stat == (rec["pid"], rec["start_time"])
    # the leader is gone but members may linger; Linux never reuses a pid that is still some group's id
    return bool(_group_members(rec["pid"]))


def _stop_group(rec: dict, grace: float) -> None:
    if not _alive(rec):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_members(rec["pid"]):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _group_members(rec["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)


def _free_port() -> int:
    # bound on all interfaces: Ray listens on the machine's address, the servers on loopback
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    # the console scripts of the interpreter running this file (its venv), then PATH
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; install the project with "
                         "`pip install -c constraints.txt -e '.[test]'` (moto[server] is a test extra)")
    return found


def _tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


class _Launcher:
    """Starts processes and records each in STATE/stack.json at once, so `down` can stop a half-started stack."""

    def __init__(self, state: Path, base_env: dict[str, str]):
        self.state = state
        self.base_env = base_env
        self.record: dict = {"processes": []}
        self.popens: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.state / "logs" / f"{name}.log"
        with open(log, "wb") as out:  # one log per `up`: its tail is quoted in errors
            proc = subprocess.Popen(argv, env={**self.base_env, **env}, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.state, start_new_session=True)
        stat = _proc_stat(proc.pid)
        start_time = stat[1] if stat else 0
        self.record["processes"].append({"name": name, "pid": proc.pid, "start_time": start_time, "log": str(log)})
        self.popens[name] = proc
        self.save()
        return proc

    def save(self) -> None:
        _write_atomic(self.state / "stack.json", json.dumps(self.record, indent=2))

    def wait(self, name: str, ready, timeout: float, what: str) -> None:
        """Poll `ready()` until true; fail early if the process exits, naming its log either way."""
        proc, log = self.popens[name], self.state / "logs" / f"{name}.log"
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise StackError(f"{name}: exited with code {code} while starting; see {log}\n{_tail(str(log))}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise StackError(f"{name}: {what} not ready after {timeout:.0f} s; see {log}\n{_tail(str(log))}")
            time.sleep(0.5)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- health checks -------------------------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return resp.status == 200


def _s3_client(endpoint: str):
    import boto3  # lazily: importing this module must stay cheap and side-effect free

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                        region_name="us-east-1")


def _bucket_ready(endpoint: str, bucket: str, create: bool) -> bool:
    client = _s3_client(endpoint)
    if create:
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
    return bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}


def _ray_nodes(address: str, env: dict[str, str], timeout: float) -> list[str]:
    """Ids of the alive Ray nodes, probed from a subprocess (never ray.init in this process)."""
    out = subprocess.run([sys.executable, "-c", _RAY_PROBE, address, str(timeout)], env=env, capture_output=True,
                         text=True, timeout=timeout + 60)
    if out.returncode != 0:
        raise StackError(f"ray: cannot connect to {address}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the stack -----------------------------------------------------------------------------------------------


def _read_record(state: Path) -> dict | None:
    try:
        return json.loads((state / "stack.json").read_text())
    except (OSError, ValueError):
        return None


_COMPONENT_PROCESSES = {"prefect": ("prefect",), "mlflow": ("mlflow",), "s3": ("s3",),
                        "ray": ("ray-head", "ray-worker")}


def _health(stack: Stack, env: dict[str, str], alive: dict[str, bool]) -> dict[str, str]:
    """Component name -> "ok" or what is wrong; components whose processes are gone are not probed."""
    checks = {
        "prefect": lambda: _http_ok(f"{stack.prefect_api_url}/health"),
        "mlflow": lambda: _http_ok(f"{stack.mlflow_uri}/health"),
        "s3": lambda: _bucket_ready(stack.s3_endpoint, stack.bucket, create=False),
        "ray": lambda: len(_ray_nodes(stack.ray_address, env, timeout=10)) == 2,
    }
    result = {}
    for name, check in checks.items():
        dead = [p for p in _COMPONENT_PROCESSES[name] if not alive.get(p)]
        if dead:
            result[name] = f"not running ({', '.join(dead)} exited; see {stack.state_dir}/logs)"
            continue
        try:
            result[name] = "ok" if check() else "unhealthy"
        except Exception as e:  # any failure is a finding to report, not a crash of `status`
            first = str(e).splitlines()[0][:200] if str(e) else ""
            result[name] = f"unreachable ({type(e).__name__}: {first})"
    return result


def _client_env(stack: Stack) -> dict[str, str]:
    return {**_clean_env(), "RAY_USAGE_STATS_ENABLED": "0", **stack.env()}


def status(state_dir: str | os.PathLike) -> dict:
    """What runs under `state_dir`: {"processes": {name: alive}, "health": {component: "ok" | why}}."""
    state = Path(state_dir).resolve()
    record = _read_record(state)
    if record is None:
        return {"processes": {}, "health": {}}
    procs = {rec["name"]: _alive(rec) for rec in record["processes"]}
    if "stack" not in record:  # a half-started stack: `up` failed or was interrupted
        return {"processes": procs, "health": {}}
    stack = Stack(**record["stack"])
    return {"processes": procs, "health": _health(stack, _client_env(stack), procs)}


def up(state_dir: str | os.PathLike, timeout: float = 180, prefect_ui: bool = False) -> Stack:
    """Start the stack under `state_dir` (created if missing) and wait until every component is healthy.

    A stack already alive and healthy there is returned as is (`already_running=True`); leftovers of a dead
    or half-started one are stopped first. On failure everything started is stopped again and a
    `StackError` names the component and its log file.

    Args:
        state_dir: holds logs/, stack.json, stack.env, the sqlite databases and Ray's temp dir (or a link to it).
        timeout: seconds each component may take to become healthy (a loaded 2-core machine needs ~60).
        prefect_ui: serve Prefect's web UI too (slower start; off for tests).
    """
    state = Path(state_dir).resolve()
    record = _read_record(state)
    if record is not None:
        procs = {rec["name"]: _alive(rec) for rec in record["processes"]}
        if "stack" in record and all(procs.values()):
            stack = Stack(**record["stack"])
            if all(v == "ok" for v in _health(stack, _client_env(stack), procs).values()):
                return Stack(**{**record["stack"], "already_running": True})
        down(state)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    try:
        return _start(state, timeout, prefect_ui)
    except BaseException:  # KeyboardInterrupt too: never leave half a stack running
        down(state)
        raise


def _ray_temp_dir(state: Path) -> Path:
    inside = state / "ray"
    if len(str(inside)) <= _RAY_TEMP_MAX:
        return inside
    # too long for Ray's socket paths: a short dir in /tmp, linked from the state dir and removed by `down`
    short = Path("/tmp") / f"ubt-ray-{hashlib.sha256(str(state).encode()).hexdigest()[:10]}"
    short.mkdir(exist_ok=True)
    if not inside.is_symlink():
        inside.symlink_to(short)
    return short


def _start(state: Path, timeout: float, prefect_ui: bool) -> Stack:
    ports = {name: _free_port() for name in ("prefect", "mlflow", "s3", "ray")}
    s3_endpoint = f"http://127.0.0.1:{ports['s3']}"
    ray_temp = _ray_temp_dir(state)
    ray_temp.mkdir(exist_ok=True)
    token_path = state / "ray_auth_token"
    if not token_path.exists():
        token_path.touch(mode=0o600)
        token_path.write_text(secrets.token_hex(32))

    base_env = {**_clean_env(), "RAY_USAGE_STATS_ENABLED": "0"}
    launcher = _Launcher(state, base_env)
    launcher.record["ray_temp_dir"] = str(ray_temp)
    s3_env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": s3_endpoint}

    # all processes start before any is waited for: startup (Prefect ~20 s, MLflow ~14 s, Ray ~10 s) overlaps
    launcher.start("s3", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], {})

    ray_env = {
        **s3_env,  # Ray workers read and write the stack's S3, as KubeRay pods get it from a Secret
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # else SIGTERM waits 30 s for a drain nobody needs here
        "RAY_DEDUP_LOGS": "0",
    }

    def ray_node(head: bool) -> list[str]:
        argv = [_bin("ray"), "start", "--block", "--num-cpus", "1", "--disable-usage-stats",
                "--object-store-memory", str(1 << 30),  # a shared machine: not 30 % of its RAM per node
                # explicit free ports: the defaults (52365, 10001, ...) would collide between the two nodes
                # and with any other Ray on the machine
                "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
                "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
                "--temp-dir", str(ray_temp)]
        if head:
            argv += ["--head", "--port", str(ports["ray"]), "--include-dashboard=false",
                     "--dashboard-port", str(_free_port())]
            if importlib.util.find_spec("grpc") is not None:  # ray[client] installed: it would take port 10001
                argv += ["--ray-client-server-port", str(_free_port())]
            return argv
        return argv + ["--address", ray_address]

    address_file = ray_temp / "ray_current_cluster"  # `ray start --head` writes its GCS address here
    address_file.unlink(missing_ok=True)
    launcher.start("ray-head", ray_node(head=True), ray_env)

    mlflow_dir = state / "mlflow"
    mlflow_dir.mkdir(exist_ok=True)
    launcher.start("mlflow", [
        _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        # the server proxies artifact uploads and downloads: clients need no S3 credentials
        "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow",
    ], {**s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        # with job execution on, the server forks background workers that can outlive it
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    prefect_api = f"http://127.0.0.1:{ports['prefect']}/api"
    launcher.start("prefect", [
        _bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"]),
        "--analytics-off", "--ui" if prefect_ui else "--no-ui",
    ], {"PREFECT_HOME": str(state / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": prefect_api})

    launcher.wait("s3", lambda: _bucket_ready(s3_endpoint, BUCKET, create=True), timeout, "S3 bucket")
    launcher.wait("ray-head", lambda: address_file.read_text().strip() != "", timeout, "head node")
    ray_address = address_file.read_text().strip()
    launcher.start("ray-worker", ray_node(head=False), ray_env)

    stack = Stack(state_dir=str(state), prefect_api_url=prefect_api, mlflow_uri=f"http://127.0.0.1:{ports['mlflow']}",
                  s3_endpoint=s3_endpoint, bucket=BUCKET, ray_address=ray_address, ray_token_path=str(token_path))
    launcher.wait("mlflow", lambda: _http_ok(f"{stack.mlflow_uri}/health"), timeout, "/health")
    launcher.wait("prefect", lambda: _http_ok(f"{prefect_api}/health"), timeout, "/api/health")
    # polled while watching the worker node's process, so a node that dies fails fast, naming its log
    launcher.wait("ray-worker", lambda: len(_ray_nodes(ray_address, _client_env(stack), timeout=15)) == 2,
                  timeout, f"2 alive Ray nodes (Ray's own logs: {ray_temp}/session_latest/logs)")

    launcher.record["stack"] = {k: v for k, v in asdict(stack).items() if k != "already_running"}
    launcher.save()
    _write_atomic(state / "stack.env", stack.env_script())
    return stack


def down(state_dir: str | os.PathLike, grace: float = 15) -> list[str]:
    """Stop every process group the stack under `state_dir` started; returns the names that were running.

    The worker node goes first, the head last; each group gets SIGTERM, then SIGKILL after `grace` seconds.
    """
    state = Path(state_dir).resolve()
    record = _read_record(state)
    if record is None:
        return []
    stopped = []
    for rec in reversed(record["processes"]):  # reverse start order: ray-worker before ray-head
        if _alive(rec):
            stopped.append(rec["name"])
            _stop_group(rec, grace)
    left = [rec["name"] for rec in record["processes"] if _alive(rec)]
    if left:
        raise StackError(f"{', '.join(left)}: still running after SIGKILL; see {state / 'stack.json'} for the pids")
    ray_temp = Path(record.get("ray_temp_dir", ""))
    if record.get("ray_temp_dir") and not ray_temp.is_relative_to(state):
        shutil.rmtree(ray_temp, ignore_errors=True)  # the short /tmp dir of a long state path ...
        if (state / "ray").is_symlink():
            (state / "ray").unlink()  # ... and its link
    (state / "stack.json").unlink(missing_ok=True)
    (state / "stack.env").unlink(missing_ok=True)
    return stopped


# --- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("up", "start the stack and print its environment"), ("down", "stop everything it started"),
                       ("status", "show which components run and are healthy")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state", required=True, help="state dir (logs, databases, stack.env)")
        if name == "up":
            p.add_argument("--timeout", type=float, default=180, help="seconds per component (default 180)")
            p.add_argument("--ui", action="store_true", help="serve the Prefect UI too")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            stack = up(args.state, timeout=args.timeout, prefect_ui=args.ui)
            word = "already running" if stack.already_running else "up"
            print(f"local stack {word} in {stack.state_dir}; `source {stack.state_dir}/stack.env` to use it",
                  file=sys.stderr)
            sys.stdout.write(stack.env_script())
        elif args.command == "down":
            stopped = down(args.state)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
        else:
            report = status(args.state)
            if not report["processes"]:
                print(f"no stack recorded in {args.state}", file=sys.stderr)
                return 1
            print(json.dumps(report, indent=2))
            healthy = report["health"] and all(v == "ok" for v in report["health"].values())
            return 0 if healthy else 1
    except StackError as e:
        print(f"local_stack: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
